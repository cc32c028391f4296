"""The run: the sample stream, prompts, the one training loop, several GPUs, class images, EMA."""
