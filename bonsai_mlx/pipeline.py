"""Text-to-image, editing and image-to-image with FLUX.2 [klein] on MLX.

    pipe = Pipeline.from_pretrained("black-forest-labs/FLUX.2-klein-4B")
    image = pipe.generate("a red fox in the snow", seed=0)

The steps are diffusers' `Flux2KleinPipeline`, in the same order and arithmetic: encode
the prompt (Qwen3, evicted afterwards), draw noise in the patchified latent space
(B, 128, H/16, W/16) and pack it row-major into tokens, run the FlowMatch Euler schedule
(with classifier-free guidance for base models), un-normalise, unpatchify and decode.
Reference images for editing are encoded, normalised and appended after the noise tokens
with time coordinate 10 + 10 i; they are never noised. With `reference_kv_cache` (diffusers'
`Flux2KleinKVPipeline`) they run once, alone, and every step attends to their cached keys and
values instead. Inpainting (`Flux2KleinInpaintPipeline`) starts from the noised image, puts
its kept region back after every step (bonsai_mlx/inpaint.py) and shows it to the model as
the first reference.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx import distributed, lora, memory
from bonsai_mlx.checks import check_prompts, flag
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import LANCZOS, MULTIPLE, ImageInput, image_to_array, to_pil
from bonsai_mlx.inpaint import KnownRegion, MaskInput
from bonsai_mlx.layout import (
    ALLOW_PATTERNS,
    KV_PIPELINE_CLASS,
    LAYOUTS,
    SHARED_DIRS,
    check_destination,
    detect_layout,
)
from bonsai_mlx.models.text_encoder import PromptEncoder
from bonsai_mlx.models.transformer import ContextMemo, Flux2Transformer, Rope
from bonsai_mlx.models.transformer_layers import ReferenceKV
from bonsai_mlx.models.vae import VAE
from bonsai_mlx.request import GenerationRequest, GenerationResult
from bonsai_mlx.scheduler import (
    Schedule,
    SchedulerConfig,
    denoised_estimate,
    euler_step,
    img2img_start_index,
    make_schedule,
    noise_latents,
)
from bonsai_mlx.weights import (
    atomic_dir,
    check_no_custom_code,
    check_writable,
    parse_dtype,
    read_json,
    resolve_model_path,
)

import mlx.core as mx
import numpy as np
import PIL.Image

REFERENCE_TIME_STEP = 10  # reference image i gets time coordinate 10 + 10 i


class GenerationCancelled(Exception):
    """Raise it from a `generate` callback to stop between steps: `generate` lets it
    propagate, returns nothing, and leaves the pipeline ready for the next call."""


class Pipeline:
    """FLUX.2 [klein]: `from_pretrained`, `generate`, `encode_prompt`.

    After each `generate`, `last_timings` holds seconds per stage (`encode`, `images` when
    images were encoded, `reference_kv` when reference keys and values were cached, `steps`
    as a list, `decode`), `last_peak_memory` the peak MLX memory in bytes (of which
    `last_decode_peak_memory` during decoding) and `last_seed` the seed used. `parallel`
    says how a call is spread over the ranks of `mlx.launch` (docs/distributed.md).
    """

    def __init__(
        self,
        transformer: Flux2Transformer,
        vae: VAE,
        prompt_encoder: PromptEncoder,
        scheduler_config: SchedulerConfig,
        *,
        is_distilled: bool,
        reference_kv_cache: bool = False,
    ):
        self.transformer = transformer
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.scheduler_config = scheduler_config
        self.is_distilled = bool(is_distilled)
        self.latent_channels = transformer.config.in_channels  # of the packed 2x2 patches
        self.default_steps = 4 if self.is_distilled else 50
        self.default_guidance = 1.0 if self.is_distilled else 4.0
        # generate's default: keep the reference images' keys and values (FLUX.2 [klein] KV)
        self.reference_kv_cache = bool(reference_kv_cache)
        self.last_timings: dict[str, float | list[float]] = {}
        self.last_peak_memory: int | None = None
        self.last_decode_peak_memory: int | None = None
        self.last_seed: int | None = None
        self.source: Path | None = None  # the folder from_pretrained read (save_pretrained)
        self.parallel = distributed.Parallel()  # one process unless from_pretrained says so
        self._latent_preview = None

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
        vae: str | Path | None = None,
        tensor_parallel: bool = False,
        data_parallel: bool = False,
    ) -> Pipeline:
        """Load a diffusers `Flux2KleinPipeline` folder or a Bonsai MLX pack.

        `path_or_repo_id` is a local folder, a Hugging Face repo id or an alias (`ternary`,
        `binary`, `klein-4b`, `klein-base-4b`, `klein-9b`, `klein-base-9b`, `klein-9b-kv`);
        only the files used are downloaded, and HF_HUB_OFFLINE and the cache are respected.
        `dtype` is the compute dtype of all three models (`"auto"`: bfloat16 on a GPU,
        float32 on the CPU). The text encoder is released after each prompt encoding unless
        `keep_text_encoder`; `prompt_cache_dir` caches prompt embeddings on disk. `vae`
        swaps the VAE decoder: `"small"` (FLUX.2's small decoder), a Hub repo or a folder;
        images are still encoded with the model's own encoder.

        Under `mlx.launch` (docs/distributed.md), with every rank running the same calls:
        `tensor_parallel` shards the transformer across the ranks (each image faster);
        `data_parallel` makes `generate` split each batch (prompts x `num_images`) across
        them. Both are no-ops in a single process.
        """
        if tensor_parallel and data_parallel:
            raise BonsaiError("choose tensor_parallel or data_parallel, not both")
        dtype = parse_dtype(dtype)
        root = resolve_model_path(path_or_repo_id, revision=revision,
                                  allow_patterns=ALLOW_PATTERNS)
        layout = detect_layout(root)
        dirs = LAYOUTS[layout]
        check_no_custom_code(root, *(root / d for d in (*dirs.values(), *SHARED_DIRS)))
        index_path = root / "model_index.json"
        index = read_json(index_path) if index_path.is_file() else {}
        # Bonsai packs (of the distilled klein 4B) and the KV pipeline are distilled unsaid
        is_kv = index.get("_class_name") == KV_PIPELINE_CLASS
        distilled = flag(index.get("is_distilled", layout == "bonsai-mlx-pack" or is_kv),
                         f"{index_path}: is_distilled")
        scheduler = SchedulerConfig.from_pretrained(root / "scheduler")
        # dense, or packed (our layout or a Bonsai MLX 1-/2-bit pack, converted exactly)
        transformer = Flux2Transformer.from_pretrained(root / dirs["transformer"], dtype=dtype)
        vae = (VAE.from_pretrained(root / "vae", dtype=dtype) if vae is None else
               VAE.from_pretrained(vae, dtype=dtype, encoder=root / "vae"))
        prompt_encoder = PromptEncoder.from_pretrained(
            root / dirs["text_encoder"], root / "tokenizer", dtype=dtype,
            keep_loaded=keep_text_encoder, cache_dir=prompt_cache_dir,
        )
        _check_fit(root, transformer, vae)
        pipe = cls(transformer, vae, prompt_encoder, scheduler, is_distilled=distilled,
                   reference_kv_cache=is_kv)
        pipe.source = root
        if tensor_parallel:
            distributed.use_tensor_parallel(pipe)
        elif data_parallel:
            distributed.use_data_parallel(pipe)
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
        if self.parallel.mode == "tensor":
            raise BonsaiError("this pipeline holds one rank's shard of the transformer "
                              "(tensor_parallel); load it without tensor_parallel to save it")
        if self.loras:
            raise BonsaiError(f"LoRAs are loaded ({', '.join(self.loras)}); unload_lora() "
                              "first, or fuse_lora() on a dense model to save them merged")
        check_writable(dst.parent, hint="choose another folder")
        from bonsai_mlx.saving import write_pipeline

        with atomic_dir(dst, overwrite=overwrite) as tmp:
            write_pipeline(self, tmp, text_encoder_bits, transformer_dtype, vae_dtype)
        return dst

    # ---- prompts --------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[str]) -> mx.array:
        """Prompt(s) -> embeddings (B, 512, 3 * text hidden size), as diffusers."""
        return self.prompt_encoder.encode(check_prompts(prompt))

    # ---- LoRA adapters (bonsai_mlx.lora) ----------------------------------------------

    def load_lora(self, path_or_repo_id: str | Path, scale: float = 1.0, name: str | None = None,
                  weight_name: str | None = None, *, revision: str | None = None,
                  ignore_unmatched: bool = False) -> str:
        """Apply a FLUX.2 LoRA to the transformer, unmerged (dense, 1-bit and ternary
        models alike); returns its name (default: the file's stem). `path_or_repo_id`: a
        .safetensors file, a folder, a Hugging Face repo id (`weight_name` picks the file
        when it holds several) or a `lora.LoraFile` already read. Formats: diffusers/PEFT,
        BFL/ai-toolkit, kohya. See README "LoRA adapters"."""
        if self.parallel.mode == "tensor":
            raise BonsaiError("LoRA adapters and tensor_parallel do not combine yet (the "
                              "adapters are not sharded); load the pipeline data_parallel")
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
        callback: Callable[..., None] | None = None,
        sigmas: Sequence[float] | None = None,
        tiled_vae: bool | None = None,
        preview: bool = False,
        mask: MaskInput | None = None,
        reference_kv_cache: bool | None = None,
        vae_tile_size: int | None = None,
    ) -> PIL.Image.Image | list[PIL.Image.Image] | np.ndarray | mx.array:
        """Generate images.

        - `width`, `height`: multiples of 16 in [16, 4096]; default 1024, or the size of the
          first (resized, cropped) input image when `images` are given.
        - `steps`, `guidance`: default 4 / 1.0 for distilled models, 50 / 4.0 for base
          models (classifier-free guidance with `negative_prompt`, default ""). Guidance on
          a distilled model is ignored, with a warning.
        - `seed`: same seed, same machine -> identical image. `latents` (B, 128, H/16, W/16),
          diffusers' layout, replaces the seeded noise (with `strength` it is noised into
          the image as that noise; diffusers' inpainting instead starts from `latents`).
        - `images`: reference images (PIL images or paths) for editing; with `strength` in
          (0, 1], exactly one image is the start of image-to-image instead.
        - `mask`: inpainting (diffusers' Flux2KleinInpaintPipeline): white = repaint, black =
          keep; a PIL image, a path or a (H, W) array, the size of `images[0]`, the image to
          repaint (resized, not cropped, to multiples of 16, or to `width` x `height`);
          further images are references. `strength` defaults to 0.8.
        - `reference_kv_cache`: run the reference images once, keep their attention keys and
          values, and give later steps only the text and noise tokens (FLUX.2 [klein] KV,
          `Flux2KleinKVPipeline`). Default: on for models whose model_index.json names that
          pipeline, else off. On other models it is an approximation (references then see
          neither text nor noise), faster with several references.
        - `num_images` per prompt; a list of prompts gives a batch.
        - `output_type`: "pil" (an image, or a list for a batch), "np" (float32 (B, H, W, 3)
          in [0, 1]) or "mx".
        - `callback(step, total, latents)` after each step, latents (B, 128, H/16, W/16);
          raising `GenerationCancelled` in it stops the generation. `preview=True` adds a
          4th argument: a small RGB picture (H/8 x W/8, PIL; a list for a batch) of the
          model's current estimate of the final image (`bonsai_mlx.preview`).
        - `sigmas`: a custom schedule (the configured shift still applies).
        - `tiled_vae`, `vae_tile_size` (px): force VAE tiling [default: tiles if memory is short].
        """
        request = GenerationRequest.create(
            prompt, width=width, height=height, steps=steps, guidance=guidance, seed=seed,
            latents=latents, images=images, strength=strength, negative_prompt=negative_prompt,
            num_images=num_images, output_type=output_type, sigmas=sigmas, tiled_vae=tiled_vae,
            mask=mask, reference_kv_cache=reference_kv_cache, vae_tile_size=vae_tile_size)
        return self.run(request, callback, preview=preview).output(request.output_type)

    def run(self, request: GenerationRequest, callback: Callable[..., None] | None = None,
            *, preview: bool = False) -> GenerationResult:
        """Generate what a checked request asks for (`generate` checks its arguments into
        one; `callback` and `preview` as there); sets `last_timings`, `last_peak_memory`
        and `last_seed` too."""
        t_start = time.perf_counter()
        mx.reset_peak_memory()
        timings: dict[str, float | list[float]] = {}
        x, seed = self._sample(request, timings, callback, preview)
        mx.clear_cache()  # the conditioning and the transformer's activations are gone
        # the decode's own peak is kept apart (the small decoder's saving); the whole call's
        # is the larger one
        peak = mx.get_peak_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        images = self.parallel.decode(lambda: self._decode(x, request), request.batch)
        timings["decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        self.last_decode_peak_memory = int(mx.get_peak_memory())
        result = GenerationResult(images, seed, timings,
                                  max(int(peak), self.last_decode_peak_memory))
        self.last_timings, self.last_peak_memory, self.last_seed = timings, result.peak_memory, seed
        mx.clear_cache()
        return result

    def _sample(self, request: GenerationRequest, timings: dict,
                callback: Callable[..., None] | None, preview: bool = False,
                ) -> tuple[mx.array, int | None]:
        """The final packed latents (B, h*w, C) and the seed; what they were made from is
        released on return."""
        steps, guidance = self._steps_and_guidance(request)
        noise, seed = self._noise(request)  # first: wrong latents fail before any encoding
        t0 = time.perf_counter()
        cond = self._encode(request, guidance)
        rows = self.parallel.rows(request.batch)  # this rank's images: all unless data-parallel
        noise, cond = noise[rows], cond.rows(rows)
        timings["encode"] = time.perf_counter() - t0
        start = self._start_latents(request, noise, steps, timings)
        h, w = request.height // MULTIPLE, request.width // MULTIPLE
        total = start.schedule.num_steps
        step_times, x, x_prev, t0 = [], start.x, start.x, time.perf_counter()
        for i, x in enumerate(self._denoise(start, cond, guidance), start=1):
            finite = mx.isfinite(x).all()  # one reduction: never decode NaN into an image
            mx.eval(x, finite)
            if not finite.item():
                raise self._non_finite(i, total, guidance)
            step_times.append(time.perf_counter() - t0)
            if callback is not None and preview:
                sigma, sigma_next = start.schedule.sigmas[i - 1 : i + 1]
                x0 = denoised_estimate(x_prev, x, float(sigma), float(sigma_next))
                picture = to_pil(self.latent_preview()(unpack_latents(x0, h, w)))
                callback(i, total, unpack_latents(x, h, w), picture)
            elif callback is not None:
                callback(i, total, unpack_latents(x, h, w))
            x_prev, t0 = x, time.perf_counter()
        timings["steps"] = step_times
        return x, seed

    def latent_preview(self):
        """The VAE's cheap latent -> RGB preview (`bonsai_mlx.preview.LatentPreview`),
        fitted on first use (or read from its cache) and kept."""
        if self._latent_preview is None:
            from bonsai_mlx.preview import LatentPreview

            self._latent_preview = LatentPreview.for_vae(self.vae)
        return self._latent_preview

    def _non_finite(self, step: int, total: int, guidance: float | None) -> BonsaiError:
        dtype = str(self.transformer.dtype).split(".")[-1]
        return BonsaiError(
            f"step {step} of {total} produced non-finite latents (NaN or infinity); "
            + (f"lower the guidance ({guidance:g}) or " if guidance is not None else "")
            + f"use another dtype than {dtype} (float32 is the most robust)"
        )

    def _steps_and_guidance(self, request: GenerationRequest) -> tuple[int, float | None]:
        """Steps and the classifier-free guidance scale (None: no CFG) on this model."""
        steps = self.default_steps if request.steps is None else request.steps
        guidance = self.default_guidance if request.guidance is None else request.guidance
        if self.is_distilled and request.guidance is not None and request.guidance > 1.0:
            warnings.warn(
                f"guidance {request.guidance} is ignored: this model is guidance-distilled "
                "(is_distilled in model_index.json)", stacklevel=5,
            )
        use_cfg = guidance > 1.0 and not self.is_distilled
        if request.negative_prompts is not None and not use_cfg:
            why = ("this model is guidance-distilled (is_distilled in model_index.json)"
                   if self.is_distilled else f"guidance {guidance:g} <= 1 uses none")
            warnings.warn(f"negative_prompt is ignored: it needs classifier-free guidance, "
                          f"and {why}", stacklevel=5)
        return steps, guidance if use_cfg else None

    def _noise(self, request: GenerationRequest) -> tuple[mx.array, int | None]:
        """Seeded noise (B, C, h, w), or the request's latents, packed to (B, h*w, C) float32;
        and the seed (None for given latents)."""
        c = self.latent_channels
        b, h, w = request.batch, request.height // MULTIPLE, request.width // MULTIPLE
        if request.latents is not None:
            if tuple(request.latents.shape) != (b, c, h, w):
                raise BonsaiError(
                    f"latents must have shape {(b, c, h, w)} (batch, {c}, height/16, "
                    f"width/16), got {tuple(request.latents.shape)}"
                )
            latents, seed = request.latents, None
        else:
            seed = self.parallel.seed(request.seed)  # the same on every rank
            latents = mx.random.normal((b, c, h, w), dtype=mx.float32, key=mx.random.key(seed))
        return mx.contiguous(latents.transpose(0, 2, 3, 1).reshape(b, h * w, c)), seed

    def _encode(self, request: GenerationRequest, guidance: float | None) -> Conditioning:
        """The prompts' embeddings, num_images times each (and the negative prompts' for
        classifier-free guidance); the PromptEncoder releases the text encoder after."""
        n = len(request.prompts)
        negatives = (list(request.negative_prompts or [""] * n)  # diffusers' default: ""
                     if guidance is not None else [])
        embeds = self.parallel.encode(
            lambda: self.prompt_encoder.encode(list(request.prompts) + negatives))
        embeds = embeds.astype(self.transformer.dtype)
        positive = mx.repeat(embeds[:n], request.num_images, axis=0)
        negative = mx.repeat(embeds[n:], request.num_images, axis=0) if negatives else None
        mx.eval([a for a in (positive, negative) if a is not None])
        return Conditioning(positive, negative, text_ids(positive.shape[1]))

    def _start_latents(self, request: GenerationRequest, noise: mx.array, steps: int,
                       timings: dict) -> StartLatents:
        """Where denoising starts: the noise, or with input images the editing references
        beside it, or for image-to-image the noised image at the schedule's first sigma;
        inpainting is both, and keeps the unmasked region."""
        h, w = request.height // MULTIPLE, request.width // MULTIPLE
        schedule = make_schedule(self.scheduler_config, steps, h * w, sigmas=request.sigmas)
        start = StartLatents(noise, None, latent_ids(h, w), schedule)
        if not request.images:
            return start
        t0 = time.perf_counter()
        if request.strength is not None:
            first = img2img_start_index(schedule.num_steps, request.strength)
            if first >= schedule.num_steps:  # as diffusers refuses it
                raise BonsaiError(
                    f"strength {request.strength} leaves none of the {schedule.num_steps} "
                    "steps to run; use a larger strength or more steps")
            schedule = schedule.start_at(first)
            start = dataclasses.replace(start, schedule=schedule)
        refs = ref_ids = None
        if request.strength is None or request.mask is not None:  # editing, inpainting
            refs, ref_ids = self._encode_references(request)
        if request.mask is not None:  # the image to repaint is the first reference
            z = refs[:, : h * w]
            start = dataclasses.replace(
                start, x=noise_latents(z, noise, float(schedule.sigmas[0])),
                known=KnownRegion(z, noise, mx.array(request.mask)))
        elif request.strength is not None:  # image-to-image
            init = request.images[0]
            if init.size != (request.width, request.height):
                init = init.resize((request.width, request.height), LANCZOS)
            x = noise_latents(self._encode_image(init, request), noise,
                              float(schedule.sigmas[0]))
            start = dataclasses.replace(start, x=x)
        self.vae.unload_encoder()
        timings["images"] = time.perf_counter() - t0
        if refs is None:
            return start
        return self._with_references(start, refs, ref_ids, request, timings)

    def _with_references(self, start: StartLatents, refs: mx.array, ref_ids: np.ndarray,
                         request: GenerationRequest, timings: dict) -> StartLatents:
        """Reference tokens (1, R, C) as the transformer takes them: appended after the noise
        tokens, or, with reference KV caching, run once and kept as keys and values."""
        use_kv = (self.reference_kv_cache if request.reference_kv_cache is None
                  else request.reference_kv_cache)
        if not use_kv:
            rows = start.x.shape[0]  # this rank's images (data-parallel: a share)
            return dataclasses.replace(
                start, refs=mx.broadcast_to(refs, (rows, *refs.shape[1:])),
                ids=np.concatenate([start.ids, ref_ids], axis=0))
        t0 = time.perf_counter()
        kv = self.transformer.reference_kv(refs, ref_ids)
        timings["reference_kv"] = time.perf_counter() - t0
        return dataclasses.replace(start, kv=kv)

    def _denoise(self, start: StartLatents, cond: Conditioning,
                 guidance: float | None) -> Iterator[mx.array]:
        """The sampler, driven by the caller: RoPE once, then per step the velocity (with
        classifier-free guidance when `guidance`), an Euler step, and the latents yielded
        unevaluated, (B, h*w, C) float32."""
        rope = self.transformer.rope_tables(start.ids, cond.ids)
        memo = ContextMemo()  # the text projections, computed once per prompt
        x, schedule, n = start.x, start.schedule, start.x.shape[1]
        for i in range(schedule.num_steps):
            inputs = x if start.refs is None else mx.concatenate([x, start.refs], axis=1)
            t = schedule.model_timestep(i)
            v = self._velocity(inputs, cond.positive, t, rope, memo, n, start.kv)
            if guidance is not None:
                v_neg = self._velocity(inputs, cond.negative, t, rope, memo, n, start.kv)
                v = v_neg + guidance * (v - v_neg)
            x = euler_step(x, v, float(schedule.sigmas[i]), float(schedule.sigmas[i + 1]))
            if start.known is not None:
                x = start.known.blend(x, float(schedule.sigmas[i + 1]))
            yield x

    def _velocity(self, inputs: mx.array, context: mx.array, t: float, rope: Rope,
                  memo: ContextMemo, n: int, kv: list[ReferenceKV] | None) -> mx.array:
        """The transformer's prediction for the n image tokens, float32."""
        v = self.transformer(inputs, context, t, rope=rope, context_memo=memo, reference_kv=kv)
        return v[:, :n].astype(mx.float32)

    def _decode(self, x: mx.array, request: GenerationRequest) -> mx.array:
        """Packed latents (B, h*w, C) -> images (B, H, W, 3) float32 in [0, 1], one image at
        a time (the peak memory of one decode), tiled as the memory available allows."""
        h, w = request.height // MULTIPLE, request.width // MULTIPLE
        packed = x.reshape(x.shape[0], h, w, -1)
        tile = memory.vae_tile_now(self.vae, request, request.width, request.height)
        out = []
        for b in range(x.shape[0]):
            z = self.vae.denormalize_latents(packed[b : b + 1])
            img = (self.vae.decode(z, tiled=False) if tile is None
                   else self.vae.decode_tiled(z, tile_size=tile)).astype(mx.float32)
            finite = mx.isfinite(img).all()  # never a NaN image written as black
            img = mx.clip(img * 0.5 + 0.5, 0.0, 1.0)
            mx.eval(img, finite)
            if not finite.item():
                raise BonsaiError(
                    f"decoding image {b + 1} produced non-finite pixels (NaN or infinity); use "
                    f"another dtype than {str(self.vae.dtype).split('.')[-1]} (float32 is the "
                    "most robust)"
                )
            out.append(img)
        result = mx.concatenate(out, axis=0) if len(out) > 1 else out[0]
        mx.eval(result)
        return result

    def _encode_image(self, image: PIL.Image.Image, request: GenerationRequest) -> mx.array:
        """A prepared PIL image -> normalised packed latents (1, h*w, C)."""
        x = mx.array(image_to_array(image))[None]  # (1, H, W, 3) in [-1, 1]
        self.vae.load_encoder()  # before the memory it leaves is measured
        tile = memory.vae_tile_now(self.vae, request, *image.size, encode=True)
        z = (self.vae.encode(x, tiled=False) if tile is None
             else self.vae.encode_tiled(x, tile_size=tile))
        p = self.vae.normalize_latents(z.astype(mx.float32)).astype(mx.float32)
        mx.eval(p)
        return p.reshape(1, -1, p.shape[-1])

    def _encode_references(self, request: GenerationRequest) -> tuple[mx.array, np.ndarray]:
        """The request's images as reference tokens (1, R, C) and their ids, time 10 + 10 i
        for image i."""
        tokens, ids = [], []
        for i, image in enumerate(request.images):
            tokens.append(self._encode_image(image, request))
            w, h = image.size
            ids.append(latent_ids(h // MULTIPLE, w // MULTIPLE,
                                  t=REFERENCE_TIME_STEP + REFERENCE_TIME_STEP * i))
        return mx.concatenate(tokens, axis=1), np.concatenate(ids, axis=0)


@dataclass
class Conditioning:
    """The prompts as the transformer reads them."""

    positive: mx.array  # (B, L, joint_attention_dim), the transformer's dtype
    negative: mx.array | None  # the negative prompts', with classifier-free guidance
    ids: np.ndarray  # (L, 4) text position ids

    def rows(self, rows: slice) -> Conditioning:
        """These rows of the batch (a data-parallel rank's images)."""
        negative = None if self.negative is None else self.negative[rows]
        return dataclasses.replace(self, positive=self.positive[rows], negative=negative)


@dataclass
class StartLatents:
    """Where denoising starts."""

    x: mx.array  # (B, h*w, C) float32 packed latents
    refs: mx.array | None  # (B, n, C) editing reference tokens, never noised
    ids: np.ndarray  # position ids of the image tokens, then the references'
    schedule: Schedule
    kv: list[ReferenceKV] | None = None  # the references as cached keys and values instead
    known: KnownRegion | None = None  # inpainting: what is kept, put back after each step


def _check_fit(root: Path, transformer: Flux2Transformer, vae: VAE) -> None:
    latent_channels = vae.config.latent_channels
    in_channels = transformer.config.in_channels
    if vae.scale_factor * 2 != MULTIPLE or in_channels != 4 * latent_channels:
        raise BonsaiError(
            f"{root}: the VAE (factor {vae.scale_factor}, {latent_channels} latent channels) "
            f"does not fit the transformer ({in_channels} input channels); "
            "FLUX.2 [klein] needs factor 8 and 4 x latent channels"
        )


# ---- inputs ---------------------------------------------------------------------------


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

