"""The run's prompts as the UNet sees them: token ids, the encoders' hidden states, SDXL's added conditioning.

A batch names each row's prompt by its index in the run's prompt table (`batch["prompt"]`); `Prompts` turns
those into the UNet's `encoder_hidden_states` and (SDXL) `added_cond_kwargs`, through the model family
(`families.py`). While the text encoders train they run on every batch; once frozen the whole table is
encoded once and they leave the GPU. The loop never knows which model or how many encoders it has.
"""

from __future__ import annotations

import torch

from dreambooth_nb.model.families import Family


def tokenize(prompts: list[str], *, tokenizer, length: int | None = None) -> torch.Tensor:
    """Token ids [n, length] (default: tokenizer.model_max_length), padded and truncated as the pipelines do."""
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=length or tokenizer.model_max_length,
                     return_tensors="pt").input_ids


class Prompts:
    def __init__(self, texts: list[str], *, family: Family, tokenizers: list):
        self.texts, self.family = list(texts), family
        self.token_ids = [tokenize(self.texts, tokenizer=tokenizer, length=length)
                          for tokenizer, length in zip(tokenizers, family.tokens_read(tokenizers))]
        self._encoded: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @torch.no_grad()
    def encode_once(self, encoders: list, *, device: torch.device, keep: bool = True) -> None:
        """Encode every prompt now, with the (frozen) encoders. `keep`: move those off the GPU into host memory
        (for the final snapshot); else the caller lets them go (`Components.release_text_encoders`), and no
        copy of them ever reaches host memory."""
        hidden, pooled = self.family.encode(encoders, [ids.to(device) for ids in self.token_ids])
        self._encoded = (hidden.float(), None if pooled is None else pooled.float())
        for encoder in encoders if keep else ():
            if next(encoder.parameters()).is_cuda:
                encoder.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def encoded(self) -> bool:
        """Whether `encode_once` ran: every prompt's encoding is at hand."""
        return self._encoded is not None

    def conditioning(self, batch: dict, *, encoders: list | None, device: torch.device,
                     resolution: int) -> tuple[torch.Tensor, dict | None]:
        """(encoder_hidden_states, added_cond_kwargs) for a batch: live through `encoders` while they train,
        else from the table `encode_once` made."""
        rows = batch["prompt"].to(device)
        if encoders is not None:
            hidden, pooled = self.family.encode(encoders, [ids.to(device)[rows] for ids in self.token_ids])
        else:
            hidden, pooled = self._encoded[0][rows], None if self._encoded[1] is None else self._encoded[1][rows]
        return hidden, self.family.added_conditioning(pooled, original_sizes=batch["original_size"].tolist(),
                                                      crops=batch["crop"].tolist(), resolution=resolution,
                                                      device=device)
