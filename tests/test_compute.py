"""What measuring a snapshot costs against training (`planning.compute`): the FLOP counts behind it follow the
arithmetic of a forward and a backward pass, and the share early stop's default rests on.

FLOPs are counted on fake tensors from shapes alone: whole numbers, the same on every machine, so the checks
below are exact or bounded by the arithmetic, never by one machine's output.
"""

import pytest
import torch

from dreambooth_nb import preset
from dreambooth_nb.config import default_snapshot_steps
from dreambooth_nb.planning import planner
from dreambooth_nb.planning.compute import ON_BY_DEFAULT_AT, measuring_share, snapshot_interval
from dreambooth_nb.planning.trace import counting_flops, read_model_configs, step_flops, trace_render

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def micro_step_flops(**settings) -> int:
    config = preset(pretrained_model_name_or_path=SD15, instance_data_dir="p", instance_prompt="a photo of sks mug",
                    resolution=512, mixed_precision="fp16", train_batch_size=1, cache_latents=True, **settings)
    card, _ = planner.resolve_gpu("T4")
    return step_flops(planner.trace_key(read_model_configs(SD15), planner.setup_for(config, card)))


@pytest.fixture(scope="module")
def forward() -> int:
    """SD 1.5's UNet forward on one sample at 512 px: a render's sampling step without guidance."""
    return trace_render(read_model_configs(SD15), resolution=512, passes=1).step_flops


def test_attention_on_cpu_tensors_is_counted_as_on_the_gpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, h, s, d = 2, 8, 1024, 64
    with FakeTensorMode():
        q = torch.randn(b, h, s, d, requires_grad=True)
        with counting_flops() as counter:
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            forward = counter.get_total_flops()
            out.sum().backward()
    assert forward == 4 * b * h * s * s * d  # Q·Kᵀ and (softmax)·V, 2 flops per multiply-add
    assert counter.get_total_flops() == forward + 10 * b * h * s * s * d  # the backward's five products


def test_guidance_doubles_a_sampling_step():
    configs = read_model_configs(SD15)
    one, two = (trace_render(configs, resolution=512, passes=p) for p in (1, 2))
    assert two.step_flops == 2 * one.step_flops  # every product is linear in the batch
    assert two.decode_flops == one.decode_flops  # one image decoded either way
    # SD 1.5's VAE decoder at 512 px weighs about three UNet passes: not negligible beside 50 sampling steps.
    assert 2 * one.step_flops < one.decode_flops < 4 * one.step_flops


def test_training_step_is_forward_and_backward(forward):
    # Each product's backward is two products of its size (the input's gradient and the weight's), attention's
    # 2.5 (its five products against the forward's two): 3× to 3.5× the forward. The first convolution needs no
    # input gradient (its input is the noisy latents), under 1 % of SD 1.5's forward.
    full = micro_step_flops(gradient_checkpointing=False) / forward
    assert 2.99 < full <= 3.5
    # Checkpointing recomputes the checkpointed blocks' forward in the backward: at most one forward more.
    checkpointed = micro_step_flops(gradient_checkpointing=True) / forward
    assert full < checkpointed <= full + 1
    # A LoRA's frozen base gets no weight gradient: 2× to 2.5× the forward, plus the rank-4 adapters' own.
    lora = micro_step_flops(method="lora", gradient_checkpointing=False) / forward
    assert 2 < lora < 2.6 and lora < full - 0.5


def test_snapshot_interval():
    config = preset(instance_data_dir="p", instance_prompt="a", max_train_steps=400, snapshot_steps=[100, 200, 300])
    assert snapshot_interval(config) == 100
    assert snapshot_interval(config.replace(snapshot_steps=[])) == 400
    assert snapshot_interval(config.replace(snapshot_steps=[200, 400])) == 200  # the end counts once
    assert default_snapshot_steps(400, stop_when="suggested") == [100, 200, 300]
    assert default_snapshot_steps(400) == [200]


def test_share_scales_with_what_is_rendered_and_how_often(tiny_model):
    config = preset(pretrained_model_name_or_path=str(tiny_model), instance_data_dir="p", instance_prompt="a",
                    resolution=32, max_train_steps=400, snapshot_steps=[100, 200, 300], train_batch_size=1,
                    gradient_accumulation_steps=4)

    def share(config=config, **spec):
        return measuring_share(config, **{"images": 8, "inference_steps": 50, "guidance_scale": 7.5, **spec},
                               gpu="T4")

    base = share()
    assert share(images=16).fraction == pytest.approx(2 * base.fraction, rel=1e-12)
    assert share(config.replace(snapshot_steps=[200])).fraction == pytest.approx(base.fraction / 2, rel=1e-12)
    unguided = share(guidance_scale=1.0)  # (the pipeline does not guide at 1: one pass per step)
    render = trace_render(read_model_configs(str(tiny_model)), resolution=32, passes=1)
    assert base.measure_flops - unguided.measure_flops == 8 * 50 * render.step_flops
    assert "8 images × 50 sampling steps" in str(base) and "100 training steps" in str(base)


def test_measuring_costs_far_more_than_the_default_rule_allows():
    """The README's reason for early stop being off by default: notebook 4's renders (4 prompts × 2 seeds ×
    50 steps) cost about half of 100 steps of the object preset's training on SD 1.5 — over 3× the 10 % at
    which it would be on, a margin no card's difference between training and inference speed closes."""
    config = preset("object", "16gb", instance_data_dir="p", instance_prompt="a photo of sks mug",
                    class_prompt="a photo of a mug")
    config = config.replace(snapshot_steps=default_snapshot_steps(config.max_train_steps, stop_when="suggested"))
    share = measuring_share(config, images=8, inference_steps=50, guidance_scale=7.5, gpu="T4")
    assert share.interval == 100
    assert share.fraction > 3 * ON_BY_DEFAULT_AT
