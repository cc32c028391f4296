"""`TrainConfig`: every knob of a Dreambooth run, its presets, its validation and its JSON form.

Field names follow the diffusers `train_dreambooth.py` script wherever it has one, so people coming from
that script feel at home. The config is the only thing the notebooks hand to each other: notebook 1
writes it as JSON into the project folder, the others read it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_nb.errors import ConfigError
from dreambooth_nb.storage import FORMAT, atomic_write_text, check_format

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers")
METHOD_LEARNING_RATES = {
    "full": (1e-3, "Dreambooth works best at 1e-6 to 5e-6."),
    # LoRA's adapters start at zero and train at ≈100× full fine-tuning's rate.
    "lora": (1e-2, "LoRA works best near 1e-4."),
}
"""The methods a config may name (`model.methods.METHODS` trains each), the highest learning rate each accepts
and where it works best."""
RESUMABLE = {"resumable": True}
"""Field metadata: the setting may change between a run and its resumption without changing what is
trained (where things are saved, how often, how many steps in all, and the memory savers, which the
out-of-memory advice asks to turn on)."""


@dataclass
class Concept:
    """One subject of a run: its photos and prompt, and (with prior preservation) its class images. The
    names are the diffusers script's single-subject settings, which `preset` takes for a run's one subject."""

    instance_data_dir: str
    """Folder with the 3–10 photos of the subject; `photo.txt` beside `photo.jpg` is that photo's caption."""
    instance_prompt: str
    """Prompt of the photos (and the text `[trigger]` stands for in captions), e.g. "a photo of sks dog". A rare
    token like `sks` is not required (the study): "a photo of Bob's dog" works."""
    class_data_dir: str | None = None
    """Folder for the subject's class images (prior preservation); missing ones are generated. Subjects of the
    same class may share one."""
    class_prompt: str | None = None
    """Prompt of the class images, the subject's class without the identifier: "a photo of a dog"."""
    num_class_images: int = 100
    """How many class images prior preservation uses for this subject (generated once, reused by every run)."""

    @property
    def class_noun(self) -> str:
        """The word naming the subject's class (`class_noun`)."""
        return class_noun(self.instance_prompt, self.class_prompt)


def class_noun(instance_prompt: str, class_prompt: str | None) -> str:
    """The word naming a subject's class: the class prompt's last word ("a photo of a dog" → "dog"; without a class
    prompt, the instance prompt's). Drafted captions put `[trigger]` where it stands, automatic masks segment it,
    DreamBench's templates name it."""
    return (class_prompt or instance_prompt).split()[-1]


@dataclass
class TrainConfig:
    # --- Base model -------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = SD15
    """Hub id (needs internet, as on Colab) or a local folder in diffusers layout (never touches the network)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model."""
    vae_model_name_or_path: str | None = None
    """A VAE to use instead of the base model's (Hub id or folder). None: the base model's, except SDXL in
    fp16, which gets madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE overflows to NaN in fp16)."""
    variant: str | None = None
    """Weight variant to download, e.g. "fp16" halves the download; trained parts are upcast to fp32 anyway."""

    # --- Data -------------------------------------------------------------------------------------------
    concepts: list[Concept] = field(default_factory=list)
    """The run's subjects, each a `Concept` with its own photos, prompt and class images: one for the usual
    run (`preset(instance_data_dir=..., instance_prompt=...)` makes it from the diffusers script's
    single-subject names), several to teach a dog and a cat at once. They take turns (round robin): sample k
    of the run is subject k mod n, so a batch of n holds one of each."""
    with_prior_preservation: bool = False
    """Train on generated class images too, so the model keeps what the class looks like. The study: needed for faces."""
    prior_loss_weight: float = 1.0
    """Weight of the class-image loss against the instance loss."""
    class_images_from_captions: bool = False
    """With prior preservation and captioned photos: generate class image i from photo i's caption (round robin)
    with the class prompt in place of `[trigger]` ("[trigger] on a beach" → "a photo of a dog on a beach"),
    so the prior half of each step sees the same scenes as the photos; each such image keeps its prompt in
    `class-NNNNN.txt`. Off: every class image is the class prompt alone (the diffusers script)."""
    sample_batch_size: int = field(default=4, metadata=RESUMABLE)
    """Batch size when generating class images."""
    resolution: int = 512
    """Training resolution in pixels (images are resized so the shorter side matches, then cropped square)."""
    center_crop: bool = True
    """Center crop (True) or a random crop per step (False; not possible with cached latents)."""
    random_flip: bool = False
    """Flip images horizontally at random: more variety, but wrong for asymmetric subjects (text, logos)."""

    # --- Optimisation -----------------------------------------------------------------------------------
    train_batch_size: int = 1
    """Instance images per micro-batch (prior preservation adds as many class images)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches summed into one optimizer step: batch 4 = batch 1 × 4 accumulated, at a quarter of the memory."""
    num_processes: int = 1
    """Data-parallel processes, one per GPU (Kaggle's 2×T4): each trains on its own share of every step's
    samples, so the effective batch is train_batch_size × gradient_accumulation_steps × num_processes. Set
    by `train(config, num_processes=...)`, which keeps the effective batch where it can (see `distributed`)."""
    max_train_steps: int = field(default=400, metadata=RESUMABLE)
    """Optimizer steps. The study: ~400 for objects, 800–1200 for faces. Overfitting comes fast."""
    learning_rate: float = 2e-6
    """UNet learning rate. The study: 2e-6 for objects, 1e-6 (or 2e-6) for faces; 5e-6 already overfits."""
    lr_scheduler: str = "constant"
    """One of constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."""
    lr_warmup_steps: int = 0
    """Steps of linear warm-up at the start of the schedule."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    """Gradient clipping over every trained parameter (UNet and text encoder together)."""

    # --- Text encoder -----------------------------------------------------------------------------------
    train_text_encoder: bool = False
    """Train the text encoder too: better quality (the study), costs ≈1 GB more on 16 GB cards."""
    text_encoder_learning_rate: float | None = None
    """Its own learning rate; None means the same as `learning_rate`."""
    stop_text_encoder_training: int | None = None
    """Step after which the text encoder is frozen (None: train it to the end)."""

    # --- Method: full fine-tuning or LoRA --------------------------------------------------------------
    method: str = "full"
    """"full" fine-tunes every UNet weight (and the text encoder's with train_text_encoder): the study's
    method. "lora" trains small low-rank adapters on the attention projections instead (PEFT): ≈0.8 M
    parameters for SD 1.5 at rank 4, a 3 MB snapshot instead of 1.7 GB, less memory, and files that stack in
    AUTOMATIC1111/ComfyUI; it needs a higher learning rate (≈1e-4: the "lora" preset). With
    train_text_encoder the text encoder gets adapters too."""
    lora_rank: int = 4
    """LoRA rank: 4 is diffusers' default (train_dreambooth_lora.py); 8–32 are common for faces in kohya."""
    lora_alpha: float | None = None
    """LoRA alpha; the adapters' output is scaled by alpha / rank. None means alpha = rank (scale 1)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input while training (0 disables it)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet modules that get adapters: the attention projections, as diffusers' LoRA scripts choose."""

    # --- Memory and speed -------------------------------------------------------------------------------
    mixed_precision: str = field(default="no", metadata=RESUMABLE)
    """"auto" (decided where training runs: bf16 on GPUs that have it — compute capability 8.0 and newer —,
    fp16 on older GPUs such as the T4 and P100, none on CPU), "fp16", "bf16" or "no". Trained weights stay
    fp32 masters under autocast. "auto" lets a config written on a CPU runtime train in fp16 on a T4."""
    use_8bit_adam: bool = field(default=False, metadata=RESUMABLE)
    """8-bit AdamW from bitsandbytes: optimizer state 2 bytes/param instead of 8 (saves ≈5 GB on SD 1.5's UNet)."""
    load_in_4bit: bool = field(default=False, metadata=RESUMABLE)
    """QLoRA: load the frozen base denoiser in 4 bits (NF4 with double quantization, bitsandbytes, computing in
    the run's 16-bit precision), a quarter of its 16-bit memory: FLUX.1-dev's 12 B-parameter transformer takes
    ≈6 GB instead of 24. LoRA only, on a CUDA GPU; the adapters stay fp32 masters and snapshots hold them
    alone, for the unquantized base. Each step dequantizes the weights it uses, so steps are slower; `fit`
    turns it on only where the 16-bit base does not fit."""
    gradient_checkpointing: bool = field(default=False, metadata=RESUMABLE)
    """Recompute activations in the backward pass: ~6× less activation memory for ~30 % more time."""
    attention_backend: str = field(default="sdpa", metadata=RESUMABLE)
    """"sdpa" (PyTorch, always works) or "xformers" (used only if installed and it actually runs)."""
    check_memory_plan: bool = field(default=True, metadata=RESUMABLE)
    """On a GPU, plan the run's memory before anything downloads (`dreambooth_nb.plan`, from the model's
    configs alone) and stop with the plan and the savers that would fit if it does not; False trains anyway,
    for when you know better than the plan."""
    fit_to_gpu: bool = field(default=False, metadata=RESUMABLE)
    """Let the memory plan choose the savers above (checkpointing, batch or accumulation, 8-bit Adam) for the
    GPU training runs on: the fastest that fit (`dreambooth_nb.fit`). Notebook 1 asks once (`FIT_TO_GPU`, on by
    default there) and saves the answer here; the training panel's "Fit the memory savers to this GPU" starts
    from it and re-fits on Train. False: the savers stay as set."""
    cache_latents: bool = field(default=False, metadata=RESUMABLE)
    """Encode every image with the VAE once and free the VAE from the GPU (saves memory and ~25 % of a step)."""
    latent_cache_dir: str | None = field(default=None, metadata=RESUMABLE)
    """With cache_latents: also keep the encoded latents in this folder, so later runs on the same photos
    (a sweep, a rerun after a disconnect) skip the VAE. None keeps them in memory only."""

    # --- Loss -------------------------------------------------------------------------------------------
    masked_loss: bool = False
    """Weight each photo's loss by where its subject is: subject pixels count fully, the background
    `mask_background_weight`, so the model learns the subject rather than the room it was photographed in
    (`dataset.masks`). The mask is `photo.mask.png` beside the photo (white = subject), else made from the
    class word by `mask_segmenter` and cached beside the runs (`subject-masks/`). Class images are never
    masked: prior preservation keeps the whole picture of the class."""
    mask_background_weight: float = 0.3
    """With masked_loss: the weight of background pixels (0 ignores the background entirely, 1 is no mask). Some
    weight keeps the model drawing a clean background around the subject: on the toy model (`bench/masked_loss.py`)
    0.3 copied the photos' background a third to half as often as the plain loss, its subject fidelity near the
    plain loss's (0.41–0.46 against 0.37–0.50 over steps 100–300), where 0.1 (OneTrainer's default) copied about
    as little but lost a third of the subject fidelity."""
    mask_segmenter: str = "CIDAS/clipseg-rd64-refined"
    """With masked_loss: the text-prompted segmenter (CLIPSeg, Hub id or folder) that masks photos without a
    `photo.mask.png`, from the class word ("a photo of a dog" → "dog")."""
    offset_noise: float = 0.0
    """Offset-noise strength (e.g. 0.1): lets the model learn very dark or bright images. 0 disables it."""
    snr_gamma: float | None = None
    """Min-SNR loss weighting gamma (5.0 is the paper's value). None disables it."""
    use_ema: bool = False
    """Keep an exponential moving average of the UNet and save it. The study saw no clear difference, and
    on the GPU it costs a full fp32 copy of the UNet (3.44 GB for SD 1.5): see `offload_ema`."""
    ema_decay: float = 0.9999
    offload_ema: bool = field(default=False, metadata=RESUMABLE)
    """Keep the EMA copy in CPU memory and bring it to the GPU only for its update after each optimizer
    step (as diffusers' `--offload_ema`): 3.44 GB less GPU memory for SD 1.5, one round trip per step."""

    # --- Run, saving, resume ----------------------------------------------------------------------------
    seed: int = 0
    """Seeds data order, noise and timesteps: the same config gives the same weights, resumed or not."""
    output_dir: str = field(default="dreambooth-output", metadata=RESUMABLE)
    """Where states (for resume) and snapshots (for comparison) go. On Colab put it on Drive."""
    checkpointing_steps: int | None = field(default=None, metadata=RESUMABLE)
    """Save the full training state every N steps, so a disconnect loses at most N steps. None: every 100
    steps, or less often when the states would not fit the disk (on Colab's Google Drive the deleted ones
    count too: they stay in Drive's Trash for 30 days); the run says which interval it chose and why."""
    checkpoints_total_limit: int | None = field(default=1, metadata=RESUMABLE)
    """Keep only the last K training states (snapshots are never deleted). None keeps all. A state of full
    SD 1.5 fine-tuning is ≈5.2 GB (fp32 UNet + 8-bit Adam), and the new one exists beside the old one while
    it is written, so every extra kept state costs that much disk."""
    resume_from_checkpoint: str | None = field(default="latest", metadata=RESUMABLE)
    """"latest" continues from the newest complete state if there is one; a state folder path resumes from
    that state. None refuses to touch an `output_dir` that already holds a run (start a new run in a new
    folder, or delete the old one first)."""
    snapshot_steps: list[int] = field(default_factory=list, metadata=RESUMABLE)
    """Steps at which the trained weights are saved for comparison (fp16 with mixed precision, only the
    trained parts: ≈1.7 GB for SD 1.5's UNet); the final step is always saved as a complete pipeline."""
    stop_when: str = field(default="end", metadata=RESUMABLE)
    """"end": train to max_train_steps. "suggested": measure each snapshot as it is saved (rendered and judged
    as the comparison does, `results.early_stop`) and stop once the comparison's rule (`quality.suggest`) has
    a suggested snapshot and `stop_patience` later snapshots did not better it: the run keeps that snapshot
    (`<run>/stopped.json` says why; export takes it). Needs a judge (the toy model's, or DINOv2 + CLIP: a
    download) and one process."""
    stop_patience: int = field(default=1, metadata=RESUMABLE)
    """With stop_when="suggested": how many snapshots after the suggested one must fail to better it."""

    # ------------------------------------------------------------------------------------------------------
    def validate(self, *, check_paths: bool = True) -> "TrainConfig":
        """Raise one `ConfigError` naming the field and the fix for the first impossible or dangerous value.

        Runs before any model is loaded, so a typo never costs a download.
        """
        def fail(name: str, message: str):
            raise ConfigError(f"{name}: {message}")

        if not self.pretrained_model_name_or_path:
            fail("pretrained_model_name_or_path", "is empty; give a Hub id such as "
                 f"'{SD15}' or a local folder in diffusers layout.")
        if self.method not in METHOD_LEARNING_RATES:
            fail("method", f"{self.method!r} is unknown; choose 'full' (the study's fine-tuning) or 'lora'.")
        top, best = METHOD_LEARNING_RATES[self.method]
        if not 0 < self.learning_rate <= top:
            fail("learning_rate", f"{self.learning_rate!r} is out of range; use a value in (0, {top:g}]. {best}")
        te_lr = self.text_encoder_learning_rate
        if te_lr is not None and not 0 < te_lr <= 1e-3:
            fail("text_encoder_learning_rate", f"{te_lr!r} is out of range; use a value in (0, 1e-3] or None.")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_processes",
                     "resolution", "sample_batch_size"):
            if getattr(self, name) <= 0:
                fail(name, f"must be a positive whole number, got {getattr(self, name)!r}.")
        if self.resolution % 8:
            fail("resolution", f"{self.resolution} is not a multiple of 8 (the VAE downsamples by 8); try 512.")
        if self.lr_warmup_steps < 0:
            fail("lr_warmup_steps", "must be 0 or more (0 turns warm-up off).")
        if self.lr_scheduler not in LR_SCHEDULERS:
            fail("lr_scheduler", f"{self.lr_scheduler!r} is unknown; choose one of {', '.join(LR_SCHEDULERS)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            fail("mixed_precision", f"{self.mixed_precision!r} is unknown; choose 'no', 'fp16' or 'bf16'.")
        if self.lora_rank <= 0:
            fail("lora_rank", f"must be a positive whole number (4 to 32 is usual), got {self.lora_rank!r}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            fail("lora_alpha", "must be positive, or None for alpha = rank.")
        if not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", "must be at least 0 and below 1 (0 disables it).")
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            fail("lora_target_modules", "give module names such as ['to_q', 'to_k', 'to_v', 'to_out.0'].")
        if self.attention_backend not in ATTENTION:
            fail("attention_backend", f"{self.attention_backend!r} is unknown; choose 'sdpa' or 'xformers'.")
        if self.stop_text_encoder_training is not None and self.stop_text_encoder_training < 0:
            fail("stop_text_encoder_training", "must be a step number (0 or more) or None.")
        if self.cache_latents and not self.center_crop:
            fail("cache_latents", "needs center_crop=True (a cached latent has one fixed crop); "
                 "set center_crop=True or cache_latents=False.")
        if self.prior_loss_weight < 0:
            fail("prior_loss_weight", "must be 0 or more (1.0 is usual).")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            fail("snr_gamma", "must be positive (5.0 is usual) or None to disable min-SNR weighting.")
        if self.offset_noise < 0:
            fail("offset_noise", "must be 0 or more (0.1 is usual).")
        if not 0 < self.ema_decay < 1:
            fail("ema_decay", "must be between 0 and 1 (0.9999 is usual).")
        if self.max_grad_norm <= 0:
            fail("max_grad_norm", "must be positive (1.0 is usual).")
        if self.checkpointing_steps is not None and self.checkpointing_steps <= 0:
            fail("checkpointing_steps", f"must be a positive whole number or None (automatic), got "
                 f"{self.checkpointing_steps!r}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            fail("checkpoints_total_limit", "must be 1 or more, or None to keep every state.")
        if not 0 <= self.mask_background_weight <= 1:
            fail("mask_background_weight", f"must be between 0 (ignore the background) and 1 (no mask), got "
                 f"{self.mask_background_weight!r}; 0.1 is usual.")
        if self.stop_when not in ("end", "suggested"):
            fail("stop_when", f"{self.stop_when!r} is unknown; choose 'end' or 'suggested'.")
        if not isinstance(self.stop_patience, int) or self.stop_patience < 1:
            fail("stop_patience", f"must be 1 or more snapshots, got {self.stop_patience!r}.")
        bad_steps = [s for s in self.snapshot_steps if not 0 < s <= self.max_train_steps]
        if bad_steps:
            fail("snapshot_steps", f"{bad_steps} fall outside 1..max_train_steps={self.max_train_steps}.")
        self._validate_subjects(fail, check_paths=check_paths)
        if self.resume_from_checkpoint not in (None, "latest") and check_paths \
                and not Path(self.resume_from_checkpoint).is_dir():
            fail("resume_from_checkpoint", f"folder {self.resume_from_checkpoint!r} does not exist; "
                 "use 'latest', None, or a state folder under output_dir/states.")
        if check_paths:
            model = self.pretrained_model_name_or_path
            if model_location(model) == "folder" and not (Path(model) / "model_index.json").is_file():
                fail("pretrained_model_name_or_path", f"folder {model!r} has no model_index.json; point it "
                     "at a model saved in diffusers layout (the folder that holds unet/, vae/, ...).")
            if model_location(model) is None:
                fail("pretrained_model_name_or_path", f"{model!r} is neither an existing folder, a .safetensors "
                     "or .ckpt file, nor a Hub id ('owner/name'); fix the path or the id.")
        return self

    def _validate_subjects(self, fail, *, check_paths: bool) -> None:
        """The subjects' part of `validate`. One subject's settings are named as `preset` takes them
        (instance_prompt, ...); with several, by their place in `concepts`."""
        if not self.concepts:
            fail("instance_data_dir", "no subject to train: give the folder with your photos and their prompt "
                 "(preset(..., instance_data_dir=..., instance_prompt=...)), or `concepts` for several.")
        for number, concept in enumerate(self.concepts, start=1):
            def name(setting: str) -> str:
                return setting if len(self.concepts) == 1 else f"concepts[{number - 1}] (subject {number}) {setting}"

            if not concept.instance_prompt.strip():
                fail(name("instance_prompt"), "is empty; describe the photos, e.g. 'a photo of sks dog'.")
            if check_paths and not concept.instance_data_dir:
                fail(name("instance_data_dir"), "is empty; point it at the folder with your photos.")
            if check_paths and not Path(concept.instance_data_dir).is_dir():
                fail(name("instance_data_dir"), f"folder {concept.instance_data_dir!r} does not exist; upload "
                     "your photos there or fix the path.")
            if self.with_prior_preservation:
                if not (concept.class_prompt or "").strip():
                    fail(name("class_prompt"), "is needed with prior preservation, e.g. 'a photo of a dog'.")
                if not concept.class_data_dir:
                    fail(name("class_data_dir"), "is needed with prior preservation: a folder for the class images.")
            if concept.num_class_images <= 0:
                fail(name("num_class_images"), f"must be a positive whole number, got {concept.num_class_images!r}.")
        if len({c.instance_prompt for c in self.concepts}) < len(self.concepts):
            fail("concepts", "two subjects share an instance_prompt; give each its own (a rare word each).")
        prompts_of: dict[str, set] = {}
        for concept in self.concepts:
            prompts_of.setdefault(concept.class_data_dir, set()).add(concept.class_prompt)
        shared = [folder for folder, prompts in prompts_of.items() if folder and len(prompts) > 1]
        if self.with_prior_preservation and shared:
            fail("concepts", f"subjects with different class prompts share the class folder {shared[0]!r}; give "
                 "each class prompt its own folder (subjects of the same class may share one).")

    @property
    def subjects_label(self) -> str:
        """The subjects' instance prompts joined with "; " (grid titles, summaries)."""
        return "; ".join(subject.instance_prompt for subject in self.concepts)

    @property
    def effective_batch(self) -> int:
        """Instance images per optimizer step: batch × accumulation × processes."""
        return self.train_batch_size * self.gradient_accumulation_steps * self.num_processes

    # --- JSON round trip --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path=None) -> str:
        """The config as JSON (with the format it is written in: `storage.FORMAT`), written to `path` if given."""
        text = json.dumps({"format": FORMAT, **self.to_dict()}, indent=2)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "TrainConfig":
        """Build a config from a dict, rejecting unknown keys and wrong types with the key's name."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of settings, got {type(data).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(fields))
        if set(unknown) & set(SUBJECT_SETTINGS):
            raise ConfigError(f"{source}: {', '.join(sorted(set(unknown) & set(SUBJECT_SETTINGS)))} describe a "
                              "subject: a config lists its subjects in concepts=[{'instance_data_dir': ..., "
                              "'instance_prompt': ...}]; or give them to preset(...), which makes the one subject.")
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; "
                              "check the spelling against dreambooth_nb.TrainConfig.")
        values = {}
        for key, value in data.items():
            values[key] = _coerce(key, value, hints[key], source)
        return cls(**values)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config file there; run notebook 01 (setup) first, or fix PROJECT_DIR.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); fix it or delete it and rerun setup.") from None
        check_format(data, source=str(path), what="Run notebook 1 again to write a project's config anew; a run "
                                                  "folder from then cannot be resumed: train into a new one.")
        return cls.from_dict({k: v for k, v in data.items() if k != "format"}, source=str(path))

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (unknown names raise ConfigError)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def model_location(name: str) -> str | None:
    """Where a base model comes from: "folder" (an existing local folder), "file" (an existing single-file
    checkpoint, .safetensors or .ckpt: see `single_file`), "hub" (an id such as 'owner/name' that is not a
    local folder) or None (none of these). The rule is diffusers' own: an existing folder wins, so a relative
    path like `models/sd15` is local when it exists and a Hub id otherwise."""
    if Path(name).expanduser().is_dir():
        return "folder"
    if is_single_file(name):
        return "file"
    if _HUB_ID.match(name):
        return "hub"
    return None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_single_file(model: str) -> bool:
    """An existing single-file checkpoint in the original layout (`model.single_file` converts it)."""
    path = Path(model).expanduser()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def default_snapshot_steps(max_steps: int, *, stop_when: str = "end") -> list[int]:
    """Halfway and the end (the end is always saved): enough to see overfitting coming, light on disk. What
    notebook 1 saves and the training panel starts from. With stop_when="suggested", every quarter: early stop
    needs a snapshot after the suggested one to confirm it, so halfway-and-end could only stop at the end."""
    parts = 4 if stop_when == "suggested" else 2
    return [max_steps * i // parts for i in range(1, parts)] if max_steps >= parts else []


def lr_label(lr: float) -> str:
    """A learning rate as run folders name it: the shortest exact form, 3.8e-05 → "3.8e-5", 1e-4 → "1e-4"
    (so a folder name never disagrees with the value it holds)."""
    import numpy as np

    return np.format_float_scientific(lr, trim="-", exp_digits=1)


def resumable(name: str) -> bool:
    """Whether setting `name` may change when a run resumes (see `RESUMABLE`)."""
    return bool(_FIELDS[name].metadata.get("resumable"))


def changed_settings(before: dict, config: "TrainConfig", *, ignore=()) -> list[str]:
    """The settings of `config` that differ from `before` (a run's saved config) and change what is trained.

    Resumable settings never count. Batch size, accumulation and the number of processes count only when
    their product (the samples per optimizer step) changes. A text encoder that trained so far may be frozen
    from now on.
    """
    now = config.to_dict()
    changed = sorted(k for k, v in now.items() if not resumable(k) and k not in ignore and before[k] != v)
    batch = ("train_batch_size", "gradient_accumulation_steps", "num_processes")
    if before.get("train_batch_size", 0) * before.get("gradient_accumulation_steps", 0) * \
            before.get("num_processes", 1) == config.effective_batch:
        changed = [k for k in changed if k not in batch]
    if before.get("train_text_encoder") and not config.train_text_encoder:
        changed = [k for k in changed if k not in ("train_text_encoder", "text_encoder_learning_rate",
                                                   "stop_text_encoder_training")]
    return changed


def _concept(data: dict, source: str) -> Concept:
    fields = {f.name for f in dataclasses.fields(Concept)}
    unknown = sorted(set(data) - fields)
    if unknown or not {"instance_data_dir", "instance_prompt"} <= set(data):
        raise ConfigError(f"{source}: a subject needs instance_data_dir and instance_prompt (and may have "
                          f"class_data_dir, class_prompt, num_class_images); got {sorted(data)}.")
    hints = typing.get_type_hints(Concept)
    return Concept(**{k: _coerce(k, v, hints[k], source) for k, v in data.items()})


def _coerce(key: str, value, hint, source: str):
    """Check one JSON value against the field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{source}: {key} must not be null.")
    if args and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args[0] is Concept:
        if not isinstance(value, list) or not all(isinstance(v, (dict, Concept)) for v in value):
            raise ConfigError(f"{source}: {key} must be a list of subjects ({{'instance_data_dir': ..., "
                              f"'instance_prompt': ...}}), got {value!r}.")
        return [v if isinstance(v, Concept) else _concept(v, f"{source}: {key}") for v in value]
    if origin is list:
        item = args[0]
        ok = isinstance(value, list) and all(
            isinstance(v, item) and not (item is int and isinstance(v, bool)) for v in value)
        if not ok:
            kind = "whole numbers" if item is int else "texts"
            raise ConfigError(f"{source}: {key} must be a list of {kind}, got {value!r}.")
        return list(value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - every field type is listed above
        ok = True
    if not ok:
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}.")
    return value


# --- Presets from the Diffusers Dreambooth study ----------------------------------------------------------
PRESETS: dict[str, dict] = {
    # Objects: low LR and few steps; prior preservation not needed.
    "object": dict(learning_rate=2e-6, max_train_steps=400, train_batch_size=4, with_prior_preservation=False),
    # Faces: lower LR, more steps, smaller batch, and prior preservation so "a person" stays a person.
    "face": dict(learning_rate=1e-6, max_train_steps=1200, train_batch_size=2, with_prior_preservation=True,
                 num_class_images=200),
    # LoRA instead of full fine-tuning: combines with either of the above. LoRA needs a far higher learning
    # rate than full fine-tuning: 1e-4 is what diffusers' Dreambooth LoRA example trains SD 1.5 with
    # (examples/dreambooth/README.md, "Training with Low-Rank Adaptation of Large Language Models (LoRA)").
    "lora": dict(method="lora", learning_rate=1e-4, lora_rank=4),
    # SDXL: a LoRA on SDXL base at 1024 px — full fine-tuning of SDXL does not fit 16 GB. Its settings are
    # those of diffusers' SDXL Dreambooth LoRA example (examples/dreambooth/README_sdxl.md: LR 1e-4, constant,
    # 500 steps, fp16 with madebyollin/sdxl-vae-fp16-fix, chosen here automatically), with min-SNR γ = 5 as in
    # Hugging Face's free-Colab SDXL Dreambooth LoRA notebook. Combine: preset("object", "sdxl", "16gb").
    # The fp16 weight variant halves the download (5 GB instead of 10 GB for the UNet) and the host RAM
    # needed to load it; the base stays frozen in fp16 anyway.
    "sdxl": dict(pretrained_model_name_or_path=SDXL, variant="fp16", method="lora", learning_rate=1e-4,
                 max_train_steps=500, resolution=1024, snr_gamma=5.0),
    # SD 3.5 Medium always trains a LoRA (its 2.5 B-parameter transformer does not fit 16 GB for full
    # fine-tuning). The settings of diffusers' SD3 Dreambooth LoRA example (examples/dreambooth/README_sd3.md:
    # LR 4e-4, constant, 500 steps, fp16; adapters on the joint attention's image and text projections), at
    # the model's native 1024 px. Its T5 reads 77 tokens of each prompt, as that script trains it.
    # (Class images one at a time, here and for FLUX.1: at these models' sizes a batch of four with guidance
    # does not fit a T4 beside the pipeline.)
    "sd3": dict(pretrained_model_name_or_path=SD35_MEDIUM, variant=None, method="lora", learning_rate=4e-4,
                max_train_steps=500, resolution=1024, snr_gamma=None, sample_batch_size=1,
                lora_target_modules=["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                     "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]),
    # FLUX.1-dev always trains a LoRA. The settings of Hugging Face's "Fine-tune FLUX.1-dev on consumer
    # hardware with QLoRA" (2025-06-19; diffusers' research_projects/flux_lora_quantization): rank 4 on the
    # attention's q, k, v and output projections (the default targets), LR 1e-4, 700 steps at 512 px (batch
    # 1 × 4 accumulated with "object" + "16gb"). On a 16 GB GPU `fit` loads its 12 B-parameter transformer in
    # 4 bits (NF4).
    "flux": dict(pretrained_model_name_or_path=FLUX_DEV, variant=None, method="lora", learning_rate=1e-4,
                 max_train_steps=700, resolution=512, snr_gamma=None, lora_rank=4, sample_batch_size=1),
    # 16 GB memory profile: combines with any of the above.
    # Mixed precision "auto": fp16 on a T4 or P100, bf16 where the GPU has it, decided where training runs.
    "16gb": dict(use_8bit_adam=True, gradient_checkpointing=True, mixed_precision="auto",
                 attention_backend="sdpa", cache_latents=True),
}


SUBJECT_SETTINGS = tuple(f.name for f in dataclasses.fields(Concept))
"""The diffusers script's single-subject settings (instance_data_dir, instance_prompt, class_data_dir,
class_prompt, num_class_images): `preset` takes them and makes the run's one `Concept`; `TrainConfig` has
only `concepts`."""


def preset(*names: str, **overrides) -> TrainConfig:
    """`preset("face", "16gb", instance_data_dir=..., instance_prompt=...)`: presets applied left to right,
    then the overrides.

    The single-subject settings (`SUBJECT_SETTINGS`, the diffusers script's names) make the run's one subject,
    a `Concept` (with the preset's num_class_images, such as "face"'s 200, unless you give one); or give
    `concepts` for several, each with its own count, or num_class_images=N here for all of them (a
    preset's count never replaces a count a concept holds). Under the 16gb profile a batch that would not fit is reached by
    accumulation instead: batch 4 becomes batch 1 × 4 accumulated steps (same effective batch, same result,
    a quarter of the activation memory).
    """
    values: dict = {}
    for name in names:
        if name not in PRESETS:
            raise ConfigError(f"preset {name!r} is unknown; choose from {', '.join(PRESETS)}.")
        values.update(PRESETS[name])
    if "16gb" in names and values.get("train_batch_size", 1) > 1:
        values["gradient_accumulation_steps"] = values.pop("train_batch_size")
        values["train_batch_size"] = 1
    values.update(overrides)
    subject = {name: values.pop(name) for name in SUBJECT_SETTINGS if name in values}
    concepts = [c if isinstance(c, Concept) else _concept(c, "concepts") for c in values.get("concepts") or []]
    described = sorted(set(subject) - {"num_class_images"})
    if concepts and described:
        raise ConfigError(f"preset: {', '.join(described)} and concepts both describe subjects; give one "
                          "subject by its settings, or every subject in concepts.")
    if concepts and "num_class_images" in overrides:
        values["concepts"] = [dataclasses.replace(c, num_class_images=overrides["num_class_images"])
                              for c in concepts]
    elif described:
        values["concepts"] = [Concept(**{"instance_data_dir": "", "instance_prompt": "", **subject})]
    return TrainConfig.from_dict(values)
