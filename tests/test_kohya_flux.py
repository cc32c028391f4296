"""`to_kohya` judged by diffusers' own kohya Flux reader: a PEFT LoRA on the tiny Flux transformer, converted,
saved and loaded back with `FluxPipeline.load_lora_weights`, must change exactly the weights it trained, by
exactly `B @ A · scale`."""

import re

import pytest
import torch
from safetensors.torch import save_file

from dreambooth_nb.model.kohya_flux import to_kohya

RANK, LORA_ALPHA = 4, 8  # a scale of 2 that the caller folds in: the file's alpha must not repeat it

TARGETS = {
    # The QLoRA blog's Flux targets: single blocks' q, k, v too, without their proj_mlp.
    "qlora": dict(target_modules=["to_k", "to_q", "to_v", "to_out.0"]),
    # diffusers' Flux DreamBooth default, plus every other block linear; the top-level proj_out is no block's.
    "everything": dict(target_modules=[
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2", "proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear"],
        exclude_modules="proj_out"),
    # Fused layers with untrained parts: q alone in img qkv, k alone in txt qkv.
    "partial": dict(target_modules=["to_q", "add_k_proj", "proj_mlp"]),
}

# Single blocks' parts of BFL's linear1, which diffusers 0.42 splits only at FLUX.1's real widths.
_LINEAR1 = re.compile(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from dreambooth_nb.toy.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))


def _load_pipe(path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(path, local_files_only=True)


def _trained_lora(transformer, seed, **targets):
    """The PEFT state of a random LoRA on `transformer`, its B nonzero, and {module: its delta B @ A · scale}."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", **targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would make every delta vanish
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    state = get_peft_model_state_dict(transformer)
    scale = LORA_ALPHA / RANK
    modules = {key.removesuffix(".lora_A.weight") for key in state if key.endswith(".lora_A.weight")}
    deltas = {m: state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"] * scale for m in modules}
    return state, deltas


def _folded(state):
    """The caller's side of the contract: PEFT's alpha / rank folded into every B."""
    return {key: value * (LORA_ALPHA / RANK) if ".lora_B." in key else value for key, value in state.items()}


@pytest.fixture(scope="module", params=list(TARGETS))
def converted(request, tiny_flux, tmp_path_factory):
    """(the kohya file without linear1, which the tiny width can't load, {module: reference delta})."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    state, deltas = _trained_lora(transformer, seed=len(request.param), **TARGETS[request.param])
    kohya = to_kohya(_folded(state), transformer_config=dict(transformer.config))
    file = tmp_path_factory.mktemp("kohya") / f"{request.param}.safetensors"
    save_file({k: v for k, v in kohya.items() if "_linear1." not in k}, file,
              metadata={"ss_network_module": "networks.lora"})
    return file, {m: d for m, d in deltas.items() if not _LINEAR1.fullmatch(m)}


def _linear_weights(transformer):
    return {name: module.weight.detach().clone() for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear)}


def _assert_delta(actual, expected, name, weight=None):
    # float32 rounding of the matmul and, where the delta was fused, of W + delta: at the scale of those numbers.
    scale = float(expected.abs().max()) + (0.0 if weight is None else float(weight.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}")


def test_diffusers_loads_the_kohya_file_as_the_trained_deltas(converted, tiny_flux):
    file, deltas = converted
    pipe = _load_pipe(tiny_flux)
    before = _linear_weights(pipe.transformer)
    pipe.load_lora_weights(file)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay; the adapters go, leaving plain Linears to read
    after = _linear_weights(pipe.transformer)
    assert after.keys() == before.keys() and deltas.keys() <= before.keys()
    for name in before:
        if name in deltas:
            _assert_delta(after[name] - before[name], deltas[name], name, weight=before[name])
        else:
            assert torch.equal(after[name], before[name]), f"{name} was not trained but changed"


def test_the_reader_names_the_trained_modules_and_zero_for_untrained_parts(converted):
    from diffusers import FluxPipeline

    file, deltas = converted
    read = FluxPipeline.lora_state_dict(file)
    modules = {key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in read
               if key.endswith(".lora_A.weight")}
    assert deltas.keys() <= modules
    for module in modules - deltas.keys():  # an untrained part of a fused qkv
        assert re.search(r"\.attn\.(to|add)_[qkv]", module), module
        assert not read[f"transformer.{module}.lora_B.weight"].any(), f"{module} is untrained but moves"


FLUX1_WIDTHS = {"num_attention_heads": 24, "attention_head_dim": 128}  # FLUX.1's real transformer


@pytest.mark.parametrize("parts", [("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                                   ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.to_q", "proj_mlp")])
def test_linear1_round_trips_at_flux1_width(parts, tmp_path):
    hidden = 24 * 128
    generator = torch.Generator().manual_seed(len(parts))
    lora = {}
    for part in parts:
        width = 4 * hidden if part == "proj_mlp" else hidden
        lora[f"single_transformer_blocks.7.{part}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator)
        lora[f"single_transformer_blocks.7.{part}.lora_B.weight"] = torch.randn(width, RANK, generator=generator)
    kohya = to_kohya(lora, transformer_config=FLUX1_WIDTHS)
    assert kohya["lora_unet_single_blocks_7_linear1.alpha"].item() == RANK * len(parts)
    save_file(kohya, tmp_path / "linear1.safetensors")

    from diffusers import FluxPipeline

    read = FluxPipeline.lora_state_dict(tmp_path / "linear1.safetensors")
    for part in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        prefix = f"transformer.single_transformer_blocks.7.{part}"
        delta = read[f"{prefix}.lora_B.weight"] @ read[f"{prefix}.lora_A.weight"]
        if part in parts:
            key = f"single_transformer_blocks.7.{part}"
            _assert_delta(delta, lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"], part)
        else:
            assert not delta.any(), f"{part} is untrained but moves"


def test_diffusers_cannot_split_linear1_below_flux1_width(tmp_path):
    """The limit the module docstring names: diffusers 0.42 hard-codes linear1's split at 3072/12288."""
    from diffusers import FluxPipeline

    lora = {"single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(RANK, 32),
            "single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, RANK)}
    save_file(to_kohya(lora, transformer_config={"num_attention_heads": 2, "attention_head_dim": 16}),
              tmp_path / "tiny.safetensors")
    with pytest.raises(AssertionError):
        FluxPipeline.lora_state_dict(tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("key", ["x_embedder.lora_A.weight", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                                 "single_transformer_blocks.0.attn.to_out.0.lora_A.weight",
                                 "transformer_blocks.0.attn.norm_q.lora_A.weight"])
def test_unknown_keys_are_refused_by_name(key):
    with pytest.raises(ValueError, match=re.escape(key)):
        to_kohya({key: torch.zeros(RANK, 32)}, transformer_config={"num_attention_heads": 2, "attention_head_dim": 16})


def test_a_lone_half_is_refused():
    with pytest.raises(ValueError, match=re.escape("transformer_blocks.0.ff.net.2.lora_B.weight")):
        to_kohya({"transformer_blocks.0.ff.net.2.lora_A.weight": torch.zeros(RANK, 32)},
                 transformer_config={"num_attention_heads": 2, "attention_head_dim": 16})
