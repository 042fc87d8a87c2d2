"""Text-to-image, editing and image-to-image with FLUX.2 [klein] on MLX.

    pipe = Pipeline.from_pretrained("black-forest-labs/FLUX.2-klein-4B")
    image = pipe.generate("a red fox in the snow", seed=0)

The steps are diffusers' `Flux2KleinPipeline`, in the same order and arithmetic: encode
the prompt (Qwen3, evicted afterwards), draw noise in the patchified latent space
(B, 128, H/16, W/16) and pack it row-major into tokens, run the FlowMatch Euler schedule
(with classifier-free guidance for base models), un-normalise, unpatchify and decode.
Reference images for editing are encoded, normalised and appended after the noise tokens
with time coordinate 10 + 10 i; they are never noised.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from bonsai_mlx import lora
from bonsai_mlx.checks import text
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.text_encoder import PromptEncoder
from bonsai_mlx.models.transformer import Flux2Transformer
from bonsai_mlx.models.vae import VAE
from bonsai_mlx.scheduler import (
    MAX_STEPS,
    SchedulerConfig,
    euler_step,
    img2img_start_index,
    make_schedule,
)
from bonsai_mlx.weights import (
    check_no_custom_code,
    check_writable,
    load_weights,
    parse_dtype,
    read_json,
    resolve_model_path,
    save_safetensors,
    write_json,
)

import mlx.core as mx
import numpy as np

MULTIPLE = 16  # VAE factor 8 x 2x2 patch: one token per 16x16 pixels
MIN_SIZE, MAX_SIZE = 16, 4096  # per side, pixels
DEFAULT_SIZE = 1024  # per side, without a size or an input image
MAX_REFERENCE_PIXELS = 1024 * 1024  # reference images are shrunk to at most 1 MP
REFERENCE_TIME_STEP = 10  # reference image i gets time coordinate 10 + 10 i

# Only these files are downloaded from the Hub (both layouts; a repo holds one of them).
ALLOW_PATTERNS = [
    "model_index.json", "manifest.json",
    # tokenizer data only: never a .py file a tokenizer_config.json could point at
    "scheduler/*.json", "tokenizer/*.json", "tokenizer/*.txt", "tokenizer/*.jinja",
    "tokenizer/*.model",
    "transformer/*.json", "transformer/*.safetensors",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "vae/*.json", "vae/*.safetensors",
    "transformer-packed-mflux/*.json", "transformer-packed-mflux/*.safetensors",
    "text_encoder-mlx-4bit/*.json", "text_encoder-mlx-4bit/*.safetensors",
]
PIPELINE_CLASSES = ("Flux2KleinPipeline",)
DIFFUSERS_COMPONENTS = {  # model_index.json entries of a saved pipeline
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}

ImageInput = "PIL.Image.Image | str | Path"


class Pipeline:
    """FLUX.2 [klein]: `from_pretrained`, `generate`, `encode_prompt`.

    After each `generate`, `last_timings` holds seconds per stage (`encode`, `images` when
    images were encoded, `steps` as a list, `decode`), `last_peak_memory` the peak MLX
    memory in bytes and `last_seed` the seed used.
    """

    def __init__(
        self,
        transformer: Flux2Transformer,
        vae: VAE,
        prompt_encoder: PromptEncoder,
        scheduler_config: SchedulerConfig,
        *,
        is_distilled: bool,
    ):
        self.transformer = transformer
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.scheduler_config = scheduler_config
        self.is_distilled = bool(is_distilled)
        self.default_steps = 4 if self.is_distilled else 50
        self.default_guidance = 1.0 if self.is_distilled else 4.0
        self.last_timings: dict[str, float | list[float]] = {}
        self.last_peak_memory: int | None = None
        self.last_seed: int | None = None
        self.source: Path | None = None  # the folder from_pretrained read (save_pretrained)

    # ---- loading --------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        dtype: str | mx.Dtype = "bfloat16",
        revision: str | None = None,
        *,
        keep_text_encoder: bool = False,
        prompt_cache_dir: str | Path | None = None,
    ) -> Pipeline:
        """Load a diffusers `Flux2KleinPipeline` folder or a Bonsai MLX pack.

        `path_or_repo_id` is a local folder, a Hugging Face repo id or an alias (`ternary`,
        `binary`, `klein-4b`, `klein-base-4b`); only the files used are downloaded, and
        HF_HUB_OFFLINE and the cache are respected. `dtype` is the compute dtype of all three
        models (`"auto"`: bfloat16 on a GPU, float32 on the CPU). The text encoder is released
        after each prompt encoding unless `keep_text_encoder`; `prompt_cache_dir` caches
        prompt embeddings on disk.
        """
        dtype = parse_dtype(dtype)
        root = resolve_model_path(path_or_repo_id, revision=revision,
                                  allow_patterns=ALLOW_PATTERNS)
        layout = detect_layout(root)
        dirs = LAYOUTS[layout]
        check_no_custom_code(root, *(root / d for d in (*dirs.values(), *SHARED_DIRS)))
        index_path = root / "model_index.json"
        index = read_json(index_path) if index_path.is_file() else {}
        scheduler = SchedulerConfig.from_pretrained(root / "scheduler")
        # dense, or packed (our layout or a Bonsai MLX 1-/2-bit pack, converted exactly)
        transformer = Flux2Transformer.from_pretrained(root / dirs["transformer"], dtype=dtype)
        vae = VAE.from_pretrained(root / "vae", dtype=dtype)
        prompt_encoder = PromptEncoder.from_pretrained(
            root / dirs["text_encoder"], root / "tokenizer", dtype=dtype,
            keep_loaded=keep_text_encoder, cache_dir=prompt_cache_dir,
        )
        latent_channels = vae.config.latent_channels
        in_channels = transformer.config.in_channels
        if vae.scale_factor * 2 != MULTIPLE or in_channels != 4 * latent_channels:
            raise BonsaiError(
                f"{root}: the VAE (factor {vae.scale_factor}, {latent_channels} latent channels) "
                f"does not fit the transformer ({in_channels} input channels); "
                "FLUX.2 [klein] needs factor 8 and 4 x latent channels"
            )
        # Bonsai packs are compressions of the distilled FLUX.2 [klein] 4B.
        distilled = index.get("is_distilled", layout == "bonsai-mlx-pack")
        pipe = cls(transformer, vae, prompt_encoder, scheduler, is_distilled=bool(distilled))
        pipe.source = root
        return pipe

    # ---- saving ---------------------------------------------------------------------

    def save_pretrained(
        self,
        path: str | Path,
        *,
        overwrite: bool = False,
        text_encoder_bits: int = 4,
        transformer_dtype: str | mx.Dtype | None = None,
        vae_dtype: str | mx.Dtype | None = None,
    ) -> Path:
        """Write this pipeline in bonsai-mlx's layout (diffusers-like folders):

        - `model_index.json`, `scheduler/`, `tokenizer/`;
        - `transformer/`: dense, or packed (binary / ternary, with quantization_config.json,
          docs/formats.md) as the transformer is in memory (see `bonsai_mlx.convert`); float
          tensors in `transformer_dtype` (default: the model's dtype);
        - `text_encoder/`: Qwen3 with only the layers up to the deepest one the pipeline
          reads (recorded in its config.json), MLX affine `text_encoder_bits` (3, 4, 8;
          16 keeps float weights);
        - `vae/`: encoder and decoder, in `vae_dtype` (default: as stored in the source).

        Everything is written into a temporary folder beside `path`, then renamed into place:
        a failure leaves nothing behind. An existing `path` is an error unless `overwrite`,
        and even then only a model folder is replaced (`check_destination`). Returns the
        folder.
        """
        dst = Path(path).expanduser().absolute()
        sources = [p for p in (self.source, self.prompt_encoder.text_encoder_dir,
                               self.prompt_encoder.tokenizer_dir) if p is not None]
        check_destination(dst, overwrite=overwrite, sources=sources)
        if self.source is None:
            raise BonsaiError("this pipeline was not loaded with from_pretrained, so its VAE "
                              "files are unknown; load it from a folder to save it")
        if self.loras:
            raise BonsaiError(f"LoRAs are loaded ({', '.join(self.loras)}); unload_lora() "
                              "first, or fuse_lora() on a dense model to save them merged")
        check_writable(dst.parent, hint="choose another folder")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is a normal folder
        try:
            self._write(tmp, text_encoder_bits, transformer_dtype, vae_dtype)
            if dst.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
                os.replace(dst, old / dst.name)
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dst)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):  # a full or read-only disk: nothing was left behind
                raise BonsaiError(f"cannot write {dst} ({e.strerror or e}); nothing was "
                                  "written: free some space or choose another folder") from e
            raise
        return dst

    def _write(self, folder: Path, text_encoder_bits, transformer_dtype, vae_dtype) -> None:
        source = self.source  # not None: save_pretrained checked
        index_path = source / "model_index.json"
        index = read_json(index_path) if index_path.is_file() else {}
        index = {k: v for k, v in index.items() if not k.startswith("bonsai_mlx")}
        index.update({"_class_name": PIPELINE_CLASSES[0], "is_distilled": self.is_distilled})
        for name, entry in DIFFUSERS_COMPONENTS.items():
            index.setdefault(name, entry)
        quant = self.transformer.save_pretrained(folder / "transformer", dtype=transformer_dtype)
        text = self.prompt_encoder.save_pretrained(folder / "text_encoder",
                                                   bits=text_encoder_bits)
        save_vae_files(source / "vae", folder / "vae", vae_dtype)
        (folder / "tokenizer").mkdir()
        for f in sorted(Path(self.prompt_encoder.tokenizer_dir).iterdir()):
            if f.is_file():
                shutil.copyfile(f, folder / "tokenizer" / f.name)
        scheduler_file = source / "scheduler" / "scheduler_config.json"
        scheduler = (read_json(scheduler_file) if scheduler_file.is_file()
                     else {"_class_name": "FlowMatchEulerDiscreteScheduler",
                           **dataclasses.asdict(self.scheduler_config)})
        write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
        index["bonsai_mlx"] = {
            "transformer": quant.get("format", "dense"),
            "text_encoder_bits": (text.get("quantization") or {}).get("bits", 16),
            "text_encoder_out_layers": list(self.prompt_encoder.out_layers),
        }
        write_json(folder / "model_index.json", index)

    # ---- prompts --------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[str]) -> mx.array:
        """Prompt(s) -> embeddings (B, 512, 3 * text hidden size), as diffusers."""
        return self.prompt_encoder.encode(_check_prompts(prompt))

    # ---- LoRA adapters (bonsai_mlx.lora) ----------------------------------------------

    def load_lora(self, path_or_repo_id: str | Path, scale: float = 1.0, name: str | None = None,
                  weight_name: str | None = None, *, revision: str | None = None,
                  ignore_unmatched: bool = False) -> str:
        """Apply a FLUX.2 LoRA to the transformer, unmerged (dense, 1-bit and ternary
        models alike); returns its name (default: the file's stem). `path_or_repo_id`: a
        .safetensors file, a folder, a Hugging Face repo id (`weight_name` picks the file
        when it holds several) or a `lora.LoraFile` already read. Formats: diffusers/PEFT,
        BFL/ai-toolkit, kohya. See README "LoRA adapters"."""
        return lora.load_lora(self.transformer, path_or_repo_id, scale=scale, name=name,
                              weight_name=weight_name, revision=revision,
                              ignore_unmatched=ignore_unmatched)

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """Rescale loaded LoRAs by name (`{name: scale}`); 0 turns one off."""
        lora.set_lora_scales(self.transformer, scales)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all; the original layers come back unchanged."""
        lora.unload_lora(self.transformer, name)

    def fuse_lora(self) -> list[str]:
        """Merge the loaded LoRAs into a dense transformer's weights (faster steps; a packed
        model refuses). Permanent: reload the model to undo."""
        return lora.fuse_lora(self.transformer)

    @property
    def loras(self) -> dict[str, lora.LoraInfo]:
        """Loaded LoRAs by name: source, format, scale, ranks, layers, bytes."""
        return lora.lora_infos(self.transformer)

    # ---- generation -----------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        latents: np.ndarray | mx.array | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        strength: float | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_images: int = 1,
        output_type: str = "pil",
        callback: Callable[[int, int, mx.array], None] | None = None,
        sigmas: Sequence[float] | None = None,
        tiled_vae: bool | None = None,
    ):
        """Generate images.

        - `width`, `height`: multiples of 16 in [16, 4096]; default 1024, or the size of the
          first (resized, cropped) input image when `images` are given.
        - `steps`, `guidance`: default 4 / 1.0 for distilled models, 50 / 4.0 for base
          models (classifier-free guidance with `negative_prompt`, default ""). Guidance on
          a distilled model is ignored, with a warning.
        - `seed`: same seed, same machine -> identical image. `latents` (B, 128, H/16, W/16),
          diffusers' layout, replaces the seeded noise.
        - `images`: reference images (PIL images or paths) for editing; with `strength` in
          (0, 1], exactly one image is the start of image-to-image instead.
        - `num_images` per prompt; a list of prompts gives a batch.
        - `output_type`: "pil" (an image, or a list for a batch), "np" (float32 (B, H, W, 3)
          in [0, 1]) or "mx".
        - `callback(step, total, latents)` after each step, latents (B, 128, H/16, W/16).
        - `sigmas`: a custom schedule (the configured shift still applies).
        - `tiled_vae`: force tiled (True) or untiled (False) decoding; default automatic.
        """
        t_start = time.perf_counter()
        mx.reset_peak_memory()
        prompts = _check_prompts(prompt)
        if output_type not in ("pil", "np", "mx"):
            raise BonsaiError(f"output_type must be 'pil', 'np' or 'mx', not {output_type!r}")
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise BonsaiError(f"num_images must be a positive integer, not {num_images!r}")
        steps, guidance = self._steps_and_guidance(steps, guidance, sigmas)
        use_cfg = guidance > 1.0 and not self.is_distilled
        image_list = _as_image_list(images)
        if strength is not None:
            if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
                raise BonsaiError(f"strength must be in (0, 1], not {strength!r}")
            if len(image_list) != 1:
                raise BonsaiError(
                    f"image-to-image (strength) takes exactly one input image, got "
                    f"{len(image_list)}"
                )
        prepared = [prepare_image(load_image(im), im) for im in image_list]
        if prepared:
            width = width if width is not None else prepared[0].size[0]
            height = height if height is not None else prepared[0].size[1]
        width = DEFAULT_SIZE if width is None else width
        height = DEFAULT_SIZE if height is None else height
        check_size(width, height)
        h, w = height // MULTIPLE, width // MULTIPLE
        batch = len(prompts) * num_images
        noise = self._initial_noise(latents, seed, (batch, 128, h, w))  # (B, h*w, 128)
        timings: dict[str, float | list[float]] = {}

        # 1. prompts (the text encoder is released by the PromptEncoder afterwards)
        t0 = time.perf_counter()
        negatives = _negative_prompts(negative_prompt, len(prompts)) if use_cfg else []
        embeds = self.prompt_encoder.encode(prompts + negatives)
        embeds = embeds.astype(self.transformer.dtype)
        cond = mx.repeat(embeds[: len(prompts)], num_images, axis=0)
        uncond = mx.repeat(embeds[len(prompts):], num_images, axis=0) if use_cfg else None
        mx.eval([a for a in (cond, uncond) if a is not None])
        del embeds
        txt_ids = text_ids(cond.shape[1])
        timings["encode"] = time.perf_counter() - t0

        # 2. input images: editing references, or the image-to-image start
        schedule = make_schedule(self.scheduler_config, steps, h * w, sigmas=sigmas)
        img_ids = latent_ids(h, w)
        refs = None
        x = noise
        if prepared:
            t0 = time.perf_counter()
            if strength is None:
                refs, ref_ids = self._encode_references(prepared, batch)
                img_ids = np.concatenate([img_ids, ref_ids], axis=0)
            else:
                # strength > 0 always leaves at least the last step to run
                schedule = schedule.start_at(img2img_start_index(schedule.num_steps, strength))
                init = prepared[0]
                if init.size != (width, height):
                    init = init.resize((width, height), _lanczos())
                z = self._encode_image(init)  # (1, h*w, 128)
                x = noise_latents(z, noise, float(schedule.sigmas[0]))
            self.vae.unload_encoder()
            timings["images"] = time.perf_counter() - t0
        del prepared

        # 3. denoise
        rope = self.transformer.rope_tables(img_ids, txt_ids)
        n_tokens = h * w
        step_times = []
        total = schedule.num_steps
        for i in range(total):
            t0 = time.perf_counter()
            inputs = x if refs is None else mx.concatenate([x, refs], axis=1)
            t = schedule.model_timestep(i)
            v = self.transformer(inputs, cond, t, rope=rope)[:, :n_tokens]
            v = v.astype(mx.float32)
            if use_cfg:
                v_neg = self.transformer(inputs, uncond, t, rope=rope)[:, :n_tokens]
                v_neg = v_neg.astype(mx.float32)
                v = v_neg + guidance * (v - v_neg)
            x = euler_step(x, v, float(schedule.sigmas[i]), float(schedule.sigmas[i + 1]))
            mx.eval(x)
            step_times.append(time.perf_counter() - t0)
            if callback is not None:
                callback(i + 1, total, unpack_latents(x, h, w))
        timings["steps"] = step_times
        del cond, uncond, refs, rope, inputs, v
        mx.clear_cache()

        # 4. decode, one image at a time (peak memory of one decode)
        t0 = time.perf_counter()
        packed = x.reshape(batch, h, w, -1)
        out = []
        for b in range(batch):
            z = self.vae.denormalize_latents(packed[b : b + 1])
            img = self.vae.decode(z, tiled=tiled_vae).astype(mx.float32)
            img = mx.clip(img * 0.5 + 0.5, 0.0, 1.0)
            mx.eval(img)
            out.append(img)
        result = mx.concatenate(out, axis=0) if len(out) > 1 else out[0]
        mx.eval(result)
        timings["decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        self.last_timings = timings
        self.last_peak_memory = int(mx.get_peak_memory())
        mx.clear_cache()

        if output_type == "mx":
            return result
        arr = np.array(result)
        if output_type == "np":
            return arr
        return to_pil(arr)

    # ---- helpers --------------------------------------------------------------------

    def _steps_and_guidance(self, steps, guidance, sigmas) -> tuple[int, float]:
        if sigmas is not None:
            n = len(sigmas)
            if steps is not None and steps != n:
                raise BonsaiError(f"steps={steps} but {n} sigmas were given; pass one of them")
            steps = n
        if steps is None:
            steps = self.default_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
            raise BonsaiError(f"steps must be an integer in 1..{MAX_STEPS}, not {steps!r}")
        if guidance is None:
            guidance = self.default_guidance
        elif not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise BonsaiError(f"guidance must be a number, not {guidance!r}")
        elif self.is_distilled and guidance > 1.0:
            warnings.warn(
                f"guidance {guidance} is ignored: this model is guidance-distilled "
                "(is_distilled in model_index.json)", stacklevel=3,
            )
        return steps, float(guidance)

    def _initial_noise(self, latents, seed, shape) -> mx.array:
        """(B, 128, h, w) noise or given latents -> packed (B, h*w, 128) float32."""
        if latents is not None:
            latents = mx.array(np.asarray(latents, dtype=np.float32)) if not isinstance(
                latents, mx.array) else latents.astype(mx.float32)
            if tuple(latents.shape) != shape:
                raise BonsaiError(
                    f"latents must have shape {shape} (batch, 128, height/16, width/16), got "
                    f"{tuple(latents.shape)}"
                )
            self.last_seed = None
        else:
            if seed is None:
                seed = secrets.randbelow(2**32)
            elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
                raise BonsaiError(f"seed must be a non-negative integer, not {seed!r}")
            self.last_seed = seed
            latents = mx.random.normal(shape, dtype=mx.float32, key=mx.random.key(seed))
        b, c, h, w = shape
        return mx.contiguous(latents.transpose(0, 2, 3, 1).reshape(b, h * w, c))

    def _encode_image(self, image) -> mx.array:
        """A prepared PIL image -> normalised packed latents (1, h*w, 128)."""
        x = mx.array(image_to_array(image))[None]  # (1, H, W, 3) in [-1, 1]
        p = self.vae.normalize_latents(self.vae.encode(x).astype(mx.float32))
        p = p.astype(mx.float32)
        mx.eval(p)
        return p.reshape(1, -1, p.shape[-1])

    def _encode_references(self, images, batch: int) -> tuple[mx.array, np.ndarray]:
        tokens, ids = [], []
        for i, image in enumerate(images):
            tokens.append(self._encode_image(image)[0])
            w, h = image.size
            ids.append(latent_ids(h // MULTIPLE, w // MULTIPLE,
                                  t=REFERENCE_TIME_STEP + REFERENCE_TIME_STEP * i))
        refs = mx.concatenate(tokens, axis=0)
        refs = mx.broadcast_to(refs[None], (batch, *refs.shape))
        return refs, np.concatenate(ids, axis=0)


# ---- layout ---------------------------------------------------------------------------

# Folder of each model per layout (SHARED_DIRS are in both).
SHARED_DIRS = ("tokenizer", "vae", "scheduler")
LAYOUTS = {
    "diffusers": {"transformer": "transformer", "text_encoder": "text_encoder"},
    "bonsai-mlx-pack": {"transformer": "transformer-packed-mflux",
                        "text_encoder": "text_encoder-mlx-4bit"},
}


def detect_layout(root: Path) -> str:
    """'diffusers' or 'bonsai-mlx-pack'; anything else is an explained BonsaiError."""
    root = Path(root)
    if not root.is_dir():
        raise BonsaiError(f"{root} is not a folder")
    if (root / "transformer-packed-mflux").is_dir():
        missing = [d for d in ("text_encoder-mlx-4bit", "tokenizer", "vae", "scheduler")
                   if not (root / d).is_dir()]
        if missing:
            raise BonsaiError(
                f"{root} is a Bonsai MLX pack but lacks {', '.join(missing)}/; the download "
                "is incomplete or the folder was copied partly"
            )
        return "bonsai-mlx-pack"
    index_path = root / "model_index.json"
    if index_path.is_file():
        cls_name = read_json(index_path).get("_class_name")
        if cls_name not in PIPELINE_CLASSES:
            raise BonsaiError(
                f"{index_path} describes a {cls_name!r}; bonsai-mlx runs FLUX.2 [klein] "
                f"({', '.join(PIPELINE_CLASSES)}) only"
            )
        missing = [d for d in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")
                   if not (root / d).is_dir()]
        if missing:
            raise BonsaiError(
                f"{root} is a Flux2KleinPipeline folder but lacks {', '.join(missing)}/; "
                "the download is incomplete or the folder was copied partly"
            )
        return "diffusers"
    found = sorted(p.name for p in root.iterdir())[:12]
    raise BonsaiError(
        f"{root} is not a FLUX.2 [klein] model folder: expected a diffusers pipeline "
        "(model_index.json with transformer/, text_encoder/, tokenizer/, vae/, scheduler/) or "
        f"a Bonsai MLX pack (transformer-packed-mflux/, text_encoder-mlx-4bit/, vae/); found "
        f"{found}"
    )


def check_destination(dst: str | Path, *, overwrite: bool, sources: Sequence[str | Path] = ()
                      ) -> None:
    """Whether `save_pretrained` / `convert` may write `dst`; a BonsaiError, before anything
    is touched, if not.

    A new folder is always fine. An existing one needs `overwrite`, and is replaced only if
    it is a model folder (one bonsai-mlx wrote, or a layout `detect_layout` knows) and not
    a filesystem root or mount point, the current folder or one holding it, the home folder
    or one holding it, nor a source folder, one inside a source or one holding a source.
    """
    dst = Path(dst).expanduser().absolute()
    if not dst.exists() and not dst.is_symlink():
        return
    if not overwrite:
        raise BonsaiError(f"{dst} already exists; choose another folder or pass "
                          "overwrite=True (--overwrite) to replace it")
    if not dst.is_dir():
        raise BonsaiError(f"{dst} is a file, not a folder; remove it first")
    reason = _unreplaceable(dst.resolve(), [Path(s).expanduser().resolve() for s in sources])
    if reason:
        raise BonsaiError(f"refusing to replace {dst}: it is {reason}. --overwrite replaces "
                          "only a model folder (one bonsai-mlx wrote); choose a new folder")


def _unreplaceable(real: Path, sources: list[Path]) -> str | None:
    """Why the existing folder `real` (resolved) must not be replaced, or None."""

    def within(inner: Path, outer: Path) -> bool:
        return inner == outer or outer in inner.parents

    if real == Path(real.anchor) or os.path.ismount(real):
        return "a filesystem root or mount point"
    if within(Path.cwd().resolve(), real):
        return "the current folder or a folder holding it"
    if within(Path.home().expanduser().resolve(), real):
        return "the home folder or a folder holding it"
    for source in sources:
        if real == source:
            return "the folder the model is loaded from (its weights are read lazily)"
        if within(source, real):
            return f"a folder holding the source {source}"
        if within(real, source):
            return f"inside the source {source}"
    index = real / "model_index.json"
    if index.is_file() and "bonsai_mlx" in read_json(index):
        return None
    try:
        detect_layout(real)
    except BonsaiError:
        return "not a model folder (no FLUX.2 [klein] model_index.json or Bonsai MLX pack)"
    return None


def save_vae_files(source: Path, folder: Path, dtype: str | mx.Dtype | None = None) -> None:
    """Copy a `vae/` folder's config and weights (encoder included: editing and
    image-to-image need it; text-to-image never loads it). `dtype` None copies the files
    byte for byte; otherwise float tensors are cast to it."""
    folder.mkdir(parents=True)
    dt = parse_dtype(dtype) if dtype is not None else None
    files = [f for f in sorted(source.iterdir()) if f.is_file()
             and (f.suffix == ".safetensors" or f.name.endswith(".json"))]
    for f in files:
        if f.suffix != ".safetensors" or dt is None:
            shutil.copyfile(f, folder / f.name)
            continue
        tensors = {k: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in load_weights(f).items()}
        save_safetensors(folder / f.name, tensors, metadata={"format": "pt"})


# ---- inputs ---------------------------------------------------------------------------


def _check_prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (not isinstance(prompts, (list, tuple)) or not prompts
            or not all(isinstance(p, str) for p in prompts)):
        raise BonsaiError("prompt must be a string or a non-empty list of strings")
    return [text(p, "the prompt") for p in prompts]


def _negative_prompts(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n  # diffusers' Flux2KleinPipeline always uses ""
    if isinstance(negative_prompt, str):
        return [text(negative_prompt, "the negative prompt")] * n
    negatives = list(negative_prompt)
    if len(negatives) != n or not all(isinstance(p, str) for p in negatives):
        raise BonsaiError(
            f"negative_prompt must be a string or a list of {n} strings (one per prompt)"
        )
    return [text(p, "the negative prompt") for p in negatives]


def check_size(width, height) -> None:
    """Multiples of 16 within [MIN_SIZE, MAX_SIZE]; the error suggests valid sizes."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise BonsaiError(f"{name} must be an integer number of pixels, not {v!r}")
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise BonsaiError(f"{name} {v} is out of range: use {MIN_SIZE} to {MAX_SIZE} pixels")
    bad = [(n, v) for n, v in (("width", width), ("height", height)) if v % MULTIPLE]
    if bad:
        def near(v):
            lo = max(MIN_SIZE, v // MULTIPLE * MULTIPLE)
            hi = min(MAX_SIZE, lo + MULTIPLE)
            return f"{lo} or {hi}"

        parts = ", ".join(f"{n} {v} (nearest valid: {near(v)})" for n, v in bad)
        raise BonsaiError(f"width and height must be multiples of {MULTIPLE}: {parts}")


def text_ids(length: int) -> np.ndarray:
    """Position ids of text tokens: (L, 4) with (t, h, w, l) = (0, 0, 0, k)."""
    ids = np.zeros((length, 4), np.int32)
    ids[:, 3] = np.arange(length)
    return ids


def latent_ids(h: int, w: int, t: int = 0) -> np.ndarray:
    """Position ids of an h x w token grid, row-major: (h*w, 4) with (t, y, x, 0)."""
    ids = np.zeros((h * w, 4), np.int32)
    ids[:, 0] = t
    ids[:, 1] = np.repeat(np.arange(h), w)
    ids[:, 2] = np.tile(np.arange(w), h)
    return ids


def unpack_latents(x: mx.array, h: int, w: int) -> mx.array:
    """Packed tokens (B, h*w, C) -> diffusers' latent layout (B, C, h, w)."""
    b, _, c = x.shape
    return x.reshape(b, h, w, c).transpose(0, 3, 1, 2)


def noise_latents(z: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """Flow-matching forward process: sigma * noise + (1 - sigma) * z."""
    return sigma * noise + (1.0 - sigma) * z


# ---- images ---------------------------------------------------------------------------


def _as_image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (str, Path)) or _is_pil(images):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise BonsaiError(f"images must be a PIL image, a path or a list of them, not {images!r}")


def _is_pil(x) -> bool:
    try:
        import PIL.Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, PIL.Image.Image)


def _lanczos():
    import PIL.Image

    return PIL.Image.Resampling.LANCZOS


def load_image(image):
    """A PIL image as is, or a path opened and decoded (BonsaiError naming the file)."""
    import PIL.Image

    if _is_pil(image):
        return image
    if not isinstance(image, (str, Path)):
        raise BonsaiError(f"an input image must be a PIL image or a path, not {type(image)}")
    path = Path(image).expanduser()
    check_image_file(path, f"image {path}")
    try:
        img = PIL.Image.open(path)
        img.load()
    except PIL.Image.DecompressionBombError as e:
        raise BonsaiError(f"image {path}: {str(e).rstrip('.')}; use a smaller image") from None
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise BonsaiError(f"cannot read image {path}: {e}; use a PNG, JPEG or WebP file") from e
    return img


def check_image_file(path: Path, label: str) -> None:
    """An input image must be a regular file: a FIFO or a device would block or never end
    when read, a folder cannot be an image."""
    if not path.exists():
        raise BonsaiError(f"{label} does not exist; check the path")
    if not path.is_file():
        raise BonsaiError(f"{label} is not a regular file (a folder, FIFO or device); "
                          "give a PNG, JPEG or WebP file")


def prepared_size(width: int, height: int, name=None) -> tuple[int, int]:
    """The size an input image of `width` x `height` has once prepared (`prepare_image`)."""
    width, height = _resized(width, height, name)
    return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE


def _resized(width: int, height: int, name=None) -> tuple[int, int]:
    """An input image's size, checked, once resized to at most MAX_REFERENCE_PIXELS (aspect
    kept, sides truncated; before the crop to multiples of 16)."""
    label = f"image {name}" if isinstance(name, (str, Path)) else "input image"
    if width < 64 or height < 64:
        raise BonsaiError(f"{label} is {width}x{height}; both sides must be at least 64 px")
    if max(width / height, height / width) > 8:
        raise BonsaiError(f"{label} is {width}x{height}; the aspect ratio must be at most 8:1")
    if width * height > MAX_REFERENCE_PIXELS:
        scale = math.sqrt(MAX_REFERENCE_PIXELS / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width, height


def prepare_image(image, name=None):
    """Resize/crop an input image as Flux2KleinPipeline does; returns an RGB PIL image.

    Larger than 1 MP: LANCZOS-resized to about 1 MP (aspect kept, sides truncated); then
    centre-cropped to multiples of 16; then converted to RGB.
    """
    width, height = image.size
    resized = _resized(width, height, name)
    if resized != (width, height):
        image = image.resize(resized, _lanczos())
        width, height = image.size
    w16, h16 = width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE
    left, top = (width - w16) // 2, (height - h16) // 2
    image = image.crop((left, top, left + w16, top + h16))
    return image.convert("RGB")


def image_to_array(image) -> np.ndarray:
    """RGB PIL image -> float32 (H, W, 3) in [-1, 1]."""
    return 2.0 * (np.asarray(image).astype(np.float32) / 255.0) - 1.0


def preprocess_image(image) -> np.ndarray:
    """PIL image or path -> float32 (H, W, 3) in [-1, 1], ready for the VAE."""
    return image_to_array(prepare_image(load_image(image), image))


def to_pil(images: np.ndarray):
    """float32 (B, H, W, 3) in [0, 1] -> a PIL image, or a list of them for B > 1."""
    import PIL.Image

    arr = (images * 255).round().astype(np.uint8)
    out = [PIL.Image.fromarray(a) for a in arr]
    return out[0] if len(out) == 1 else out
