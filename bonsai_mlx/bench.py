"""Benchmarks: seconds per stage, memory over time, on-disk footprint, distance to the peak.

`run_bench` runs a model (an alias, Hub repo or folder, through `Pipeline.from_pretrained`)
or a synthetic one (`synthetic="binary" | "ternary" | "bf16"`: FLUX.2 [klein] 4B's exact
shapes with random weights in the release's formats, built in memory, so no download and the
same speed and memory as real weights) at each size: `warmup` untimed runs, then `repeats`
timed runs. Each timed run gives one JSON record:

- seconds for prompt encoding, each denoising step, VAE decode and the whole image;
- peak memory (`mx.get_peak_memory`, reset before the run) and the mean / max of
  `mx.get_active_memory()` sampled every 50 ms in a background thread (the method behind
  the published "1.50 GB" figure);
- bytes on disk per component (safetensors files; computed array bytes for synthetic);
- the roofline: FLOPs of one transformer step counted from the config, the achieved
  TFLOP/s, and the fraction of the chip's approximate peak (`PEAK_TFLOPS`);
- the machine (chip, CPU, memory, OS, MLX version and backend, bonsai-mlx version, git
  revision).

Synthetic runs time the real code: the transformer with `BinaryLinear` / `TernaryLinear`
layers holding random packed arrays, the Qwen3 encoder quantized to 4 bits (its first 27
layers, all that prompt encoding runs), and the full VAE decoder. `compare_frameworks`
(`--compare`) times the same size, steps and dtype through diffusers + torch (and says when
it or mflux is not importable). `tiny=True` swaps in miniature configs for a smoke run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bonsai_mlx import __version__
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import parse_dtype, read_json, safetensors_files

import click
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

SCHEMA = "bonsai-mlx-bench/1"
SYNTHETIC_KINDS = ("binary", "ternary", "bf16")
DEFAULT_SIZES = ((512, 512), (1024, 1024))
TINY_SIZES = ((64, 64),)
SAMPLE_INTERVAL_S = 0.05
DEFAULT_PROMPT = "A photo of a bonsai tree on a wooden table, soft window light"

# Qwen3-4B, the FLUX.2 [klein] 4B text encoder (its config.json), and the 4-bit layout of the
# Bonsai `text_encoder-mlx-4bit/` pack.
QWEN3_4B = {
    "model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36,
    "intermediate_size": 9728, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "tie_word_embeddings": True,
}
TEXT_BITS, TEXT_GROUP_SIZE = 4, 64

# Miniatures for `tiny=True`: every packed layer's input size a multiple of 128.
TINY_TRANSFORMER = {
    "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32,
    "num_attention_heads": 4, "joint_attention_dim": 3 * 64, "axes_dims_rope": (8, 8, 8, 8),
}
TINY_QWEN3 = {
    **QWEN3_4B, "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
}
TINY_OUT_LAYERS = (1, 2, 3)
TINY_TEXT_TOKENS = 32
TINY_VAE = {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 32}

# Approximate dense 16-bit peak TFLOP/s. Apple GPUs run FP16 at their FP32 FMA rate
# (cores x 128 ALUs x 2 FLOP x clock); per-core figures are derived from Apple's and
# reviewers' published totals and are good to ~10%. M5's GPU neural accelerators are not
# counted (a fraction above 1 is possible there). NVIDIA: dense BF16 tensor-core figures
# from the datasheets, no sparsity. CPUs: unknown (n/a).
APPLE_GPU_TFLOPS_PER_CORE = {"M1": 0.33, "M2": 0.36, "M3": 0.41, "M4": 0.44, "M5": 0.45}
APPLE_GPU_DEFAULT_CORES = {  # the largest GPU of each variant, used when the count is unknown
    "M1": 8, "M1 Pro": 16, "M1 Max": 32, "M1 Ultra": 64,
    "M2": 10, "M2 Pro": 19, "M2 Max": 38, "M2 Ultra": 76,
    "M3": 10, "M3 Pro": 18, "M3 Max": 40, "M3 Ultra": 80,
    "M4": 10, "M4 Pro": 20, "M4 Max": 40,
    "M5": 10,
}
NVIDIA_BF16_TFLOPS = (  # first match wins (substring of the device name)
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0),
)


# ---------------------------------------------------------------------------------------
# Machine


def backend() -> str:
    """'metal', 'cuda' or 'cpu': where MLX runs by default in this process."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "gpu"


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"])
        return int(out) if out.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _apple_gpu_cores() -> int | None:
    out = _run(["system_profiler", "SPDisplaysDataType"])
    m = re.search(r"Total Number of Cores:\s*(\d+)", out)
    return int(m.group(1)) if m else None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    rev = _run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    if not rev:
        return None
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return rev + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """Chip, CPU, memory, OS, MLX version and backend, bonsai-mlx version, git revision."""
    be = backend()
    try:
        device = mx.device_info()
    except Exception:  # not every backend reports it
        device = {}
    cpu = _cpu_model()
    chip = str(device.get("device_name") or cpu) if be != "cpu" else cpu
    info: dict[str, Any] = {
        "chip": chip,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "backend": be,
        "bonsai_mlx_version": __version__,
        "git_revision": _git_revision(),
    }
    if be == "metal":
        info["gpu_cores"] = _apple_gpu_cores()
    if be == "cpu":
        from bonsai_mlx._blas import openblas_status

        blas = openblas_status()
        info["blas"] = "openblas" if blas["loaded"] else "mlx bundled"
        info["openblas_core"] = blas["corename"]
    return info


def peak_tflops(machine: dict[str, Any]) -> tuple[float | None, str]:
    """(approximate dense 16-bit peak TFLOP/s, where the figure comes from) for a machine."""
    chip = machine.get("chip") or ""
    if machine.get("backend") == "metal":
        m = re.search(r"\b(M\d)(?:\s+(Pro|Max|Ultra))?\b", chip)
        if m and m.group(1) in APPLE_GPU_TFLOPS_PER_CORE:
            family = m.group(1)
            variant = f"{family} {m.group(2)}" if m.group(2) else family
            cores = machine.get("gpu_cores") or APPLE_GPU_DEFAULT_CORES.get(variant)
            if cores:
                peak = APPLE_GPU_TFLOPS_PER_CORE[family] * cores
                return round(peak, 2), f"approx. {variant} {cores}-core GPU FP16"
        return None, f"unknown Apple GPU {chip!r}"
    if machine.get("backend") == "cuda":
        for name, peak in NVIDIA_BF16_TFLOPS:
            if name.lower() in chip.lower():
                return peak, f"NVIDIA {name} dense BF16 (datasheet)"
        return None, f"unknown GPU {chip!r}"
    return None, "CPU peak unknown"


# ---------------------------------------------------------------------------------------
# FLOPs


def transformer_flops(
    config, height: int, width: int, text_tokens: int = 512, batch: int = 1
) -> dict[str, int]:
    """FLOPs of one transformer forward (one denoising step) at height x width.

    Linear layers: 2*M*K*N with M the tokens each layer sees (image tokens H/16 * W/16, text
    tokens, both for the joint parts, 1 for the timestep and modulation layers). Attention:
    4*L^2*D per block over the joint sequence L (QK^T and AV). Norms, RoPE and
    element-wise ops are left out (well under 1%).
    """
    c = config
    d, f = c.inner_dim, c.mlp_hidden_dim
    n_img = (height // 16) * (width // 16)
    n_txt = text_tokens
    n = n_img + n_txt

    def lin(m: int, k: int, out: int) -> int:
        return 2 * m * k * out

    embed = (
        lin(n_img, c.in_channels, d)
        + lin(n_txt, c.joint_attention_dim, d)
        + lin(1, c.timestep_guidance_channels, d) + lin(1, d, d)
        + (lin(1, c.timestep_guidance_channels, d) + lin(1, d, d) if c.guidance_embeds else 0)
        + 2 * lin(1, d, 6 * d) + lin(1, d, 3 * d)  # modulations
    )
    double = c.num_layers * (4 * lin(n, d, d) + lin(n, d, 2 * f) + lin(n, f, d))
    single = c.num_single_layers * (lin(n, d, 3 * d + 2 * f) + lin(n, d + f, d))
    final = lin(1, d, 2 * d) + lin(n_img, d, c.patch_size**2 * c.out_channels)
    linear = batch * (embed + double + single + final)
    attention = batch * (c.num_layers + c.num_single_layers) * 4 * n * n * d
    return {
        "image_tokens": n_img,
        "text_tokens": n_txt,
        "linear": linear,
        "attention": attention,
        "total": linear + attention,
    }


def text_encoder_flops(config: dict[str, Any], tokens: int, layers: int) -> int:
    """FLOPs of prompt encoding: the first `layers` Qwen3 decoder layers over `tokens`
    tokens (q/k/v/o and the SwiGLU MLP as 2*M*K*N, attention 4*L^2*heads*head_dim; the
    embedding lookup and norms left out)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    linear = 2 * tokens * (h * q + 2 * h * kv + q * h + 3 * h * i)
    attention = 4 * tokens * tokens * q
    return layers * (linear + attention)


# ---------------------------------------------------------------------------------------
# Memory over time


class MemorySampler:
    """Samples `mx.get_active_memory()` every `interval` seconds in a background thread.

    `with MemorySampler() as s: ...` then `s.mean`, `s.max`, `s.count` (bytes).
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL_S):
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(mx.get_active_memory())
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(mx.get_active_memory())

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> int:
        return int(statistics.fmean(self.samples)) if self.samples else 0

    @property
    def max(self) -> int:
        return max(self.samples, default=0)


# ---------------------------------------------------------------------------------------
# Synthetic models: full-size shapes, random weights in the release's formats


def _random_uint32(shape: Sequence[int], key) -> mx.array:
    """Uniformly random 32-bit words (`randint` over the full range leaves low bits zero)."""
    k1, k2 = mx.random.split(key)
    hi = mx.random.randint(0, 1 << 16, shape, key=k1).astype(mx.uint32)
    lo = mx.random.randint(0, 1 << 16, shape, key=k2).astype(mx.uint32)
    return (hi << 16) | lo


def _random_like_packed(layer, rng_key) -> None:
    """Fill a BinaryLinear / TernaryLinear with random packed weights and scales.

    Scales make the weights' standard deviation about that of `nn.Linear`'s default init
    (1/sqrt(3K)), so activations stay in range through all the blocks.
    """
    k1, k2 = mx.random.split(rng_key)
    n, k = layer.output_dims, layer.input_dims
    if layer.format == "binary":
        layer.weight = _random_uint32(layer.weight.shape, k1)
        std = 1.0
    else:  # 243 byte values hold 5 trits each
        layer.weight = mx.random.randint(0, 243, layer.weight.shape, key=k1).astype(mx.uint8)
        std = math.sqrt(2 / 3)
    s = 1.0 / (std * math.sqrt(3 * k))
    layer.scales = (s * mx.random.uniform(0.75, 1.25, (n, k // 128), key=k2)).astype(mx.float16)


def synthetic_transformer(kind: str, dtype: mx.Dtype, tiny: bool = False, seed: int = 0):
    """The Klein 4B transformer (or a miniature) with random weights; `kind` 'binary' or
    'ternary' swaps its 100 packed layers for BinaryLinear / TernaryLinear with random
    packed arrays. The dense float weights are never materialised for packed layers."""
    from bonsai_mlx.models.transformer import Flux2Transformer, Flux2TransformerConfig

    config = Flux2TransformerConfig(**(TINY_TRANSFORMER if tiny else {}))
    mx.random.seed(seed)
    model = Flux2Transformer(config, dtype)  # lazy: nothing computed yet
    if kind in ("binary", "ternary"):
        from bonsai_mlx.quant import use_packed_layers
        from bonsai_mlx.quant.model import get_module, model_packed_layer_paths

        use_packed_layers(model, kind)
        key = mx.random.key(seed)
        for path in model_packed_layer_paths(model):
            key, sub = mx.random.split(key)
            _random_like_packed(get_module(model, path), sub)
    _eval_in_parts(model)
    return model


def _eval_in_parts(model: nn.Module) -> None:
    """Evaluate the parameters child by child (each block of a list on its own), so only
    one block's float32 random init is transient at a time."""
    for child in model.children().values():
        for m in child if isinstance(child, list) else [child]:
            mx.eval(m.parameters())
    mx.eval(model.parameters())
    model.eval()


def _quantized_random(module: nn.Module, dtype: mx.Dtype, key) -> None:
    """Replace an affine-quantized module's weight / scales / biases by random ones of the
    same shapes: codes uniform, w = scale * q + bias spread like a trained 4-bit layer."""
    k1, k2 = mx.random.split(key)
    module.weight = _random_uint32(module.weight.shape, k1)
    k_in = module.scales.shape[-1] * module.group_size
    levels = 2**module.bits - 1
    s = mx.random.uniform(0.75, 1.25, module.scales.shape, key=k2) * (
        2.0 / (levels * math.sqrt(k_in))
    )
    module.scales = s.astype(dtype)
    module.biases = (-s * levels / 2).astype(dtype)


class SyntheticPromptEncoder:
    """Qwen3-4B's first 27 layers, 4-bit, random weights: `encode(prompt)` runs the real
    `Qwen3Encoder` on token ids derived from the prompt's bytes (no tokenizer download).

    Duck-types `PromptEncoder.encode`. Unlike the real one it keeps its weights loaded and
    caches nothing, so each call costs the encoder forward and not a reload from disk.
    `run=False` builds nothing (the footprint is computed from the shapes) and `encode`
    returns zeros of the right shape (`--skip-encode`: time only the transformer and VAE).
    """

    def __init__(self, dtype: mx.Dtype, tiny: bool = False, seed: int = 0, run: bool = True):
        from bonsai_mlx.models.text_encoder import DEFAULT_OUT_LAYERS, Qwen3Encoder, qwen3_args

        config = TINY_QWEN3 if tiny else QWEN3_4B
        self.out_layers = TINY_OUT_LAYERS if tiny else DEFAULT_OUT_LAYERS
        self.max_sequence_length = TINY_TEXT_TOKENS if tiny else 512
        self.dtype = dtype
        self.runs = run
        self.config = dict(config)
        args = qwen3_args(dict(config), "synthetic Qwen3 config")
        self.hidden_size = args.hidden_size
        full_layers = args.num_hidden_layers
        args.num_hidden_layers = max(self.out_layers)
        mx.random.seed(seed)
        model = Qwen3Encoder(args)  # lazy: nothing computed until evaluated
        model.set_dtype(dtype)
        nn.quantize(model, group_size=TEXT_GROUP_SIZE, bits=TEXT_BITS)
        # On disk the pack holds all layers (and the final norm): count what is not built.
        self.footprint_bytes = (
            shipped_bytes(model)
            + (full_layers - len(model.model.layers)) * shipped_bytes(model.model.layers[0])
            + args.hidden_size * 2
        )
        self.model = None
        if not run:
            return
        key = mx.random.key(seed + 1)
        for _, m in model.named_modules():
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                key, sub = mx.random.split(key)
                _quantized_random(m, dtype, sub)
        mx.eval(model.model.embed_tokens.parameters())
        _eval_in_parts(model.model)
        self.model = model

    def encode(self, prompt: str | Sequence[str]) -> mx.array:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = self.max_sequence_length
        if self.model is None:
            shape = (len(prompts), n, len(self.out_layers) * self.hidden_size)
            return mx.zeros(shape, self.dtype)
        vocab = self.model.args.vocab_size
        rows, masks = [], []
        for p in prompts:
            ids = [b % vocab for b in p.encode("utf-8")][:n]
            rows.append(ids + [0] * (n - len(ids)))
            masks.append([1] * len(ids) + [0] * (n - len(ids)))
        from bonsai_mlx.models.text_encoder import should_dequantize

        # as PromptEncoder does: one dequantized layer at a time on the CPU
        embeds = self.model(mx.array(rows), mx.array(masks), self.out_layers,
                            dequantize=should_dequantize()).astype(self.dtype)
        mx.eval(embeds)
        return embeds


def synthetic_vae(dtype: mx.Dtype, tiny: bool = False, seed: int = 0):
    """FLUX.2's VAE decoder (or a miniature) with random weights in `dtype`."""
    from bonsai_mlx.models.vae import VAE, VAEConfig

    mx.random.seed(seed)
    vae = VAE(VAEConfig(**(TINY_VAE if tiny else {})), dtype)
    vae.update(tree_map(lambda v: v.astype(dtype), vae.parameters()))
    vae.bn.running_mean = mx.zeros_like(vae.bn.running_mean).astype(mx.float32)
    vae.bn.running_var = mx.ones_like(vae.bn.running_var).astype(mx.float32)
    mx.eval(vae.parameters())
    vae.eval()
    return vae


def shipped_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters as the release stores them: float tensors in 16 bits
    (bf16 / fp16, whatever the compute dtype), packed and quantized codes as they are.
    Works on unevaluated arrays (only shapes and dtypes are read)."""
    return sum(v.size * 2 if mx.issubdtype(v.dtype, mx.floating) else v.nbytes
               for _, v in tree_flatten(module.parameters()))


SYNTHETIC_SCHEDULER = {"use_dynamic_shifting": True, "shift": 3.0}  # Klein's scheduler


def synthetic_pipeline(kind: str, dtype: str | mx.Dtype = "bfloat16", tiny: bool = False,
                       encode: bool = True):
    """A `Pipeline` of synthetic Klein 4B components (or miniatures): the transformer in
    `kind` ('binary', 'ternary' or 'bf16' = all dense in `dtype`), the 4-bit Qwen3 encoder
    (zeros instead when `encode` is False) and the VAE. Returns (pipeline, footprint bytes
    per component as the release would store them)."""
    from bonsai_mlx.pipeline import Pipeline
    from bonsai_mlx.scheduler import SchedulerConfig

    if kind not in SYNTHETIC_KINDS:
        raise BonsaiError(f"synthetic must be one of {', '.join(SYNTHETIC_KINDS)}, not {kind!r}")
    dtype = parse_dtype(dtype)
    transformer = synthetic_transformer(kind, dtype, tiny)
    vae = synthetic_vae(dtype, tiny)
    prompt_encoder = SyntheticPromptEncoder(dtype, tiny, run=encode)
    pipe = Pipeline(transformer, vae, prompt_encoder, SchedulerConfig(**SYNTHETIC_SCHEDULER),
                    is_distilled=True)
    footprint = {
        "transformer": shipped_bytes(transformer),
        "text_encoder": prompt_encoder.footprint_bytes,
        "vae": _vae_file_bytes(vae),
    }
    return pipe, footprint


def _vae_file_bytes(vae) -> int:
    """Bytes of the VAE as shipped: the decoder we hold plus the encoder and quant_conv
    that the file also carries (computed from the config, never built)."""
    from bonsai_mlx.models.vae import Encoder

    encoder = Encoder(vae.config)  # lazy init: shapes only, nothing computed
    n = 2 * vae.config.latent_channels
    extra = sum(v.size for _, v in tree_flatten(encoder.parameters())) + n * n + n
    return shipped_bytes(vae) + extra * 2


COMPONENT_DIRS = {  # folder-name prefix -> component
    "transformer": "transformer", "text_encoder": "text_encoder", "vae": "vae",
}


def folder_footprint(root: str | Path) -> dict[str, int]:
    """Bytes of the safetensors files of each component folder of a model root
    (`transformer*/`, `text_encoder*/`, `vae/`)."""
    root = Path(root)
    out: dict[str, int] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for prefix, component in COMPONENT_DIRS.items():
            if sub.name.startswith(prefix):
                try:
                    files = safetensors_files(sub)
                except BonsaiError:
                    continue
                out[component] = out.get(component, 0) + sum(f.stat().st_size for f in files)
    return out


# ---------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class BenchTarget:
    """What is benchmarked: a loaded pipeline, its name, precision and footprint."""

    pipeline: Any
    model: str
    precision: str
    dtype: str
    footprint: dict[str, int]
    footprint_source: str
    text_tokens: int
    tiny: bool
    encodes: bool = True  # False: the synthetic text encoder was replaced by zeros


def load_target(
    model: str | None = None,
    synthetic: str | None = None,
    dtype: str = "bfloat16",
    tiny: bool = False,
    skip_encode: bool = False,
) -> BenchTarget:
    """Build the synthetic pipeline or load `model` (alias, repo id or folder)."""
    if (model is None) == (synthetic is None):
        raise BonsaiError("pass a model (alias, Hub repo or folder) or --synthetic, not both")
    if synthetic is not None:
        kind = synthetic.lower()
        pipe, footprint = synthetic_pipeline(kind, dtype, tiny, encode=not skip_encode)
        return BenchTarget(
            pipe, f"synthetic-{kind}" + ("-tiny" if tiny else ""), kind, _dtype_name(dtype),
            footprint, "computed", pipe.prompt_encoder.max_sequence_length, tiny,
            not skip_encode,
        )
    if tiny or skip_encode:
        raise BonsaiError("--tiny and --skip-encode apply to --synthetic models only")
    from bonsai_mlx.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model, dtype=dtype)  # aliases resolve there
    return BenchTarget(
        pipe, model, model_precision(pipe.transformer), _dtype_name(dtype),
        folder_footprint(pipe.source),  # the folder it was loaded from
        "files", pipe.prompt_encoder.max_sequence_length, False,
    )


def _dtype_name(dtype: str | mx.Dtype) -> str:
    return str(parse_dtype(dtype)).rsplit(".", 1)[-1]  # 'bfloat16', 'float32', ...


def model_precision(transformer: nn.Module) -> str:
    """'binary', 'ternary', 'mlx-affine' or 'dense': what the loaded transformer's linear
    layers are (whatever folder layout they came from)."""
    from bonsai_mlx.quant import BinaryLinear, TernaryLinear

    kinds = {type(m) for _, m in transformer.named_modules()}
    for cls, name in ((BinaryLinear, "binary"), (TernaryLinear, "ternary"),
                      (nn.QuantizedLinear, "mlx-affine")):
        if cls in kinds:
            return name
    return "dense"


def run_once(target: BenchTarget, width: int, height: int, steps: int, prompt: str,
             seed: int, log: Callable[[str], None] | None = None,
             tiled_vae: bool | None = None) -> dict[str, Any]:
    """One timed image: stage seconds (from the pipeline), wall total, memory."""
    pipe = target.pipeline

    def progress(step: int, total: int, latents) -> None:
        if log is not None:
            log(f"  step {step}/{total} done")

    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    with MemorySampler() as sampler:
        t0 = time.perf_counter()
        image = pipe.generate(prompt, width=width, height=height, steps=steps, seed=seed,
                              output_type="mx", callback=progress, tiled_vae=tiled_vae)
        mx.eval(image)
        wall = time.perf_counter() - t0
    timings = dict(pipe.last_timings)
    step_times = [float(s) for s in timings.get("steps", [])]
    return {
        "seconds": {
            "encode": float(timings.get("encode", 0.0)) if target.encodes else None,
            "steps": step_times,
            "denoise": sum(step_times),
            "decode": float(timings.get("decode", 0.0)),
            "total": wall,
        },
        "memory": {
            "peak_bytes": int(mx.get_peak_memory()),
            "active_mean_bytes": sampler.mean,
            "active_max_bytes": sampler.max,
            "samples": sampler.count,
            "interval_s": sampler.interval,
        },
    }


def _kernel_paths(precision: str, flops: dict[str, int]) -> dict[str, str] | None:
    """Which packed-matmul implementation the packed layers take, per row count M (image
    stream, text stream, joint sequence); None for dense models."""
    if precision not in ("binary", "ternary"):
        return None
    from bonsai_mlx.kernels import kernel_path

    n_img, n_txt = flops["image_tokens"], flops["text_tokens"]
    return {"image_tokens": kernel_path(n_img), "text_tokens": kernel_path(n_txt),
            "joint": kernel_path(n_img + n_txt)}


def _encode_flops(target: BenchTarget) -> int | None:
    """Prompt-encoding FLOPs for the target's text encoder (None when it is not known)."""
    enc = target.pipeline.prompt_encoder
    config = getattr(enc, "config", None)
    if config is None and hasattr(enc, "text_encoder_dir"):
        try:
            config = read_json(Path(enc.text_encoder_dir) / "config.json")
        except BonsaiError:
            return None
    if not config or not hasattr(enc, "out_layers"):
        return None
    return text_encoder_flops(config, target.text_tokens, max(enc.out_layers))


def _encode_roofline(flops: int | None, seconds: float | None) -> dict[str, Any]:
    achieved = flops / seconds / 1e12 if (flops and seconds) else None
    return {"encode_flops": flops, "encode_achieved_tflops": achieved}


def roofline(flops: dict[str, int], step_times: Sequence[float],
             machine: dict[str, Any]) -> dict[str, Any]:
    """Achieved TFLOP/s of the median step and the fraction of the peak (None if unknown)."""
    peak, source = peak_tflops(machine)
    step = statistics.median(step_times) if step_times else None
    achieved = flops["total"] / step / 1e12 if step else None
    return {
        "flops_per_step": flops["total"],
        "linear_flops_per_step": flops["linear"],
        "attention_flops_per_step": flops["attention"],
        "image_tokens": flops["image_tokens"],
        "text_tokens": flops["text_tokens"],
        "median_step_seconds": step,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_source": source,
        "fraction_of_peak": achieved / peak if (achieved and peak) else None,
    }


def run_bench(
    model: str | None = None,
    *,
    synthetic: str | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    steps: int = 4,
    repeats: int = 3,
    warmup: int = 1,
    dtype: str = "auto",
    tiny: bool = False,
    skip_encode: bool = False,
    compare: bool = False,
    profile: bool = False,
    tiled_vae: bool | None = None,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    json_path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark and return the records: one `"kind": "run"` record per timed run, and with
    `compare` one `"kind": "compare"` record per size and framework. `json_path` appends
    them as JSON lines. `log` receives progress lines (default: stderr). `skip_encode`
    (synthetic only) feeds zeros instead of running the text encoder; encode seconds are
    then None. `profile` adds one profiled 1-step image per size: seconds per kind of work
    (bonsai_mlx/profiler.py) in each run record's `profile`. `tiled_vae` forces tiled (True)
    or untiled (False) VAE decoding; None decides by size."""
    log = log or (lambda s: click.echo(s, err=True))
    if sizes is None:
        sizes = TINY_SIZES if tiny else DEFAULT_SIZES
    from bonsai_mlx.pipeline import check_size

    for w, h in sizes:
        check_size(w, h)
    if steps < 1 or repeats < 1 or warmup < 0:
        raise BonsaiError("steps and repeats must be >= 1 and warmup >= 0")

    machine = machine_info()
    log(f"machine: {machine['chip']} ({machine['backend']}), MLX {machine['mlx_version']}")
    t0 = time.perf_counter()
    target = load_target(model, synthetic, dtype, tiny, skip_encode)
    log(f"loaded {target.model} in {time.perf_counter() - t0:.1f} s")
    config = target.pipeline.transformer.config
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    encode_flops = _encode_flops(target)  # the same at every size
    records: list[dict[str, Any]] = []
    for w, h in sizes:
        flops = transformer_flops(config, h, w, target.text_tokens)
        for i in range(warmup):
            log(f"{w}x{h}: warm-up {i + 1}/{warmup}")
            run_once(target, w, h, steps, f"{prompt} (warm-up {i})", seed, log, tiled_vae)
        for i in range(repeats):
            # A new prompt each run: the prompt encoder caches embeddings per prompt.
            result = run_once(target, w, h, steps, f"{prompt} (run {i})", seed + i, log,
                              tiled_vae)
            record = {
                "schema": SCHEMA,
                "kind": "run",
                "timestamp": stamp,
                "command": command,
                "model": target.model,
                "precision": target.precision,
                "dtype": target.dtype,
                "tiny": target.tiny,
                "text_encoder_ran": target.encodes,
                "width": w,
                "height": h,
                "steps": steps,
                "run": i,
                "warmup_runs": warmup,
                **result,
                "footprint_bytes": {**target.footprint,
                                    "total": sum(target.footprint.values())},
                "footprint_source": target.footprint_source,
                "roofline": {
                    **roofline(flops, result["seconds"]["steps"], machine),
                    **_encode_roofline(encode_flops, result["seconds"]["encode"]),
                },
                "packed_kernels": _kernel_paths(target.precision, flops),
                "machine": machine,
            }
            log(f"{w}x{h}: run {i + 1}/{repeats}: {result['seconds']['total']:.2f} s")
            records.append(record)
        if profile:
            _add_profile(records[-repeats:], target, w, h, prompt, seed, log, tiled_vae)
        if compare:
            ours = [r for r in records
                    if r["kind"] == "run" and (r["width"], r["height"]) == (w, h)]
            records.extend(compare_frameworks(target, synthetic, model, w, h, steps, repeats,
                                              warmup, ours, stamp, machine, log))
    if json_path is not None:
        with open(json_path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return records


def _add_profile(records, target, w, h, prompt, seed, log, tiled_vae) -> None:
    """One more 1-step image under the profiler; its report goes into each record."""
    from bonsai_mlx.profiler import StepProfiler

    log(f"{w}x{h}: profiling one step")
    with StepProfiler() as prof:
        run_once(target, w, h, 1, f"{prompt} (profile)", seed, None, tiled_vae)
    for r in records:
        r["profile"] = prof.report()


# ---------------------------------------------------------------------------------------
# Side by side: diffusers + torch, mflux


def compare_frameworks(target, synthetic, model, width, height, steps, repeats, warmup,
                       ours, stamp, machine, log) -> list[dict[str, Any]]:
    """Time the same size, steps and dtype through diffusers + torch and mflux when they
    are importable; one record per framework with ratios ours / theirs (or the reason it
    did not run)."""
    records = []
    for framework, runner in (("diffusers", _time_diffusers), ("mflux", _time_mflux)):
        base = {"schema": SCHEMA, "kind": "compare", "timestamp": stamp,
                "framework": framework, "model": target.model, "precision": target.precision,
                "dtype": target.dtype, "width": width, "height": height, "steps": steps,
                "machine": machine}
        try:
            theirs = runner(target, synthetic, model, width, height, steps, repeats, warmup, log)
        except _Unavailable as e:
            log(f"{framework}: not compared: {e}")
            records.append({**base, "available": False, "reason": str(e)})
            continue
        mine = _median_seconds([r["seconds"] for r in ours])
        ratios = {k: (mine[k] / v if v and mine[k] is not None else None)
                  for k, v in theirs["seconds"].items() if k in mine}
        records.append({**base, "available": True, **theirs, "ours_seconds": mine,
                        "ratio_ours_over_theirs": ratios})
    return records


class _Unavailable(Exception):
    pass


def _median_seconds(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median over runs of encode, step (median step), decode and total seconds."""
    if not runs:
        return {}
    step = [statistics.median(r["steps"]) for r in runs if r["steps"]]
    encode = [r["encode"] for r in runs if r["encode"] is not None]
    return {
        "encode": statistics.median(encode) if encode else None,
        "step": statistics.median(step) if step else 0.0,
        "decode": statistics.median(r["decode"] for r in runs),
        "total": statistics.median(r["total"] for r in runs),
    }


def _torch_setup(dtype: str):
    try:
        import torch
    except ImportError as e:
        raise _Unavailable(f"torch is not importable ({e})") from None
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise _Unavailable(f"diffusers / transformers not importable ({e})") from None
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
              "float32": torch.float32}[_dtype_name(dtype)]
    if torch.cuda.is_available():
        device = "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    return torch, tdtype, device


def _torch_random_module(torch, build, tdtype, device):
    """Build a torch module without an fp32 copy: on the meta device, then real storage in
    `tdtype` filled like nn.Linear's default init (norm weights 1)."""
    with torch.device("meta"):
        module = build()
    module = module.to(dtype=tdtype).to_empty(device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                bound = 1.0 / math.sqrt(p[0].numel())
                cpu = torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound,
                                                                         generator=gen)
                p.copy_(cpu.to(tdtype))
        for name, b in module.named_buffers():
            if "running_var" in name:
                b.fill_(1.0)
            elif b.is_floating_point():
                b.zero_()
    return module.eval()


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _time_diffusers(target, synthetic, model, width, height, steps, repeats, warmup, log):
    """Prompt encoding (Qwen3ForCausalLM forward with hidden states, as Flux2KleinPipeline
    calls it), `steps` transformer forwards and the VAE decode, each stage built, timed and
    freed in turn, on random inputs of the real shapes. Synthetic: random weights, dense
    (diffusers has no packed layers). A model: its diffusers folders."""
    torch, tdtype, device = _torch_setup(target.dtype)
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast notice is irrelevant here
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if synthetic is None:
        from bonsai_mlx.pipeline import detect_layout

        root = target.pipeline.source  # the folder our pipeline was loaded from
        if detect_layout(root) != "diffusers":
            raise _Unavailable(f"diffusers cannot load the Bonsai MLX pack {root}; compare "
                               "with the matching `*-unpacked` repo instead")

        def text_model():
            return Qwen3ForCausalLM.from_pretrained(root / "text_encoder", torch_dtype=tdtype)

        def transformer_model():
            return Flux2Transformer2DModel.from_pretrained(root / "transformer",
                                                           torch_dtype=tdtype)

        def vae_model():
            return AutoencoderKLFlux2.from_pretrained(root / "vae", torch_dtype=tdtype)
    else:
        tiny = target.tiny
        qcfg = dict(TINY_QWEN3 if tiny else QWEN3_4B)
        qcfg.pop("model_type")
        tcfg = target.pipeline.transformer.config.to_dict()
        tcfg.pop("_class_name")
        vcfg = dataclasses.asdict(target.pipeline.vae.config)

        def text_model():
            return _torch_random_module(
                torch, lambda: Qwen3ForCausalLM(Qwen3Config(**qcfg)), tdtype, device)

        def transformer_model():
            return _torch_random_module(
                torch, lambda: Flux2Transformer2DModel(**tcfg), tdtype, device)

        def vae_model():
            return _torch_random_module(torch, lambda: AutoencoderKLFlux2(**vcfg), tdtype, device)

    n_txt = target.text_tokens
    n_img = (height // 16) * (width // 16)
    seconds: dict[str, float] = {}

    def timed(fn) -> float:
        times = []
        for i in range(warmup + repeats):
            _sync(torch, device)
            t0 = time.perf_counter()
            fn()
            _sync(torch, device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def encode_call(m):
        ids = torch.randint(0, m.config.vocab_size, (1, n_txt), device=device)
        mask = torch.ones_like(ids)
        return lambda: m(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                         use_cache=False)

    def step_call(m):
        x = torch.randn(1, n_img, m.config.in_channels, device=device, dtype=tdtype)
        c = torch.randn(1, n_txt, m.config.joint_attention_dim, device=device, dtype=tdtype)
        t = torch.full((1,), 0.5, device=device, dtype=tdtype)
        img_ids = torch.zeros(n_img, 4, device=device)
        img_ids[:, 1] = torch.arange(n_img, device=device) // (width // 16)
        img_ids[:, 2] = torch.arange(n_img, device=device) % (width // 16)
        txt_ids = torch.zeros(n_txt, 4, device=device)
        txt_ids[:, 3] = torch.arange(n_txt, device=device)
        return lambda: m(hidden_states=x, encoder_hidden_states=c, timestep=t,
                         img_ids=img_ids, txt_ids=txt_ids, return_dict=False)

    def decode_call(m):
        f = 2 ** (len(m.config.block_out_channels) - 1)
        z = torch.randn(1, m.config.latent_channels, height // f, width // f, device=device,
                        dtype=tdtype)
        return lambda: m.decode(z, return_dict=False)

    def stage(build, call) -> float:
        # The module lives only in this frame: freed before the next stage is built.
        return timed(call(build().to(device)))

    with torch.inference_mode():
        for name, build, call in (("encode", text_model, encode_call),
                                  ("step", transformer_model, step_call),
                                  ("decode", vae_model, decode_call)):
            seconds[name] = stage(build, call)
            log(f"diffusers {width}x{height}: {name} {seconds[name]:.3f} s")
    seconds["total"] = seconds["encode"] + steps * seconds["step"] + seconds["decode"]
    import diffusers

    return {"seconds": seconds, "device": device, "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
            "note": "stage by stage on random inputs of the real shapes; total = encode + "
                    "steps x step + decode (no scheduler or image conversion); dense "
                    "weights (diffusers has no packed binary/ternary layers)"}


def _time_mflux(target, synthetic, model, width, height, steps, repeats, warmup, log):
    try:
        import mflux
    except ImportError:
        raise _Unavailable("mflux is not importable (pip install mflux)") from None
    version = getattr(mflux, "__version__", "unknown")
    raise _Unavailable(
        f"mflux {version} is importable, but its FLUX.2 [klein] API is not wired up here; "
        f"time it with its own CLI at {width}x{height}, {steps} steps"
    )


# ---------------------------------------------------------------------------------------
# Report


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f}"


def _human(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A readable summary: per model and size, medians over the timed runs, then the
    comparisons and the footprint."""
    runs = [r for r in records if r["kind"] == "run"]
    lines = []
    if runs:
        m = runs[0]["machine"]
        lines.append(f"machine: {m['chip']} | {m['backend']} | MLX {m['mlx_version']} | "
                     f"{_gb(m['memory_bytes'])} GB | {m['os']} | bonsai-mlx "
                     f"{m['bonsai_mlx_version']} {m['git_revision'] or ''}".rstrip())
    mw = max([22] + [len(r["model"]) for r in runs])
    header = (f"{'model':<{mw}} {'size':>9} {'steps':>5} {'runs':>4} {'encode s':>9} "
              f"{'step s':>8} {'decode s':>9} {'total s':>8} {'peak GB':>8} "
              f"{'act mean':>8} {'act max':>8} {'TFLOP/step':>10} {'TFLOP/s':>8} {'% peak':>7}")
    lines += [header, "-" * len(header)]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["width"], r["height"], r["steps"]), []).append(r)
    for (model, w, h, steps), rs in groups.items():
        sec = _median_seconds([r["seconds"] for r in rs])
        mem = {key: int(statistics.median(r["memory"][key] for r in rs))
               for key in ("peak_bytes", "active_mean_bytes", "active_max_bytes")}
        step_all = [s for r in rs for s in r["seconds"]["steps"]]
        roof = roofline(
            {"total": rs[0]["roofline"]["flops_per_step"], "linear": 0, "attention": 0,
             "image_tokens": 0, "text_tokens": 0}, step_all, rs[0]["machine"])
        frac = roof["fraction_of_peak"]
        lines.append(
            f"{model:<{mw}} {f'{w}x{h}':>9} {steps:>5} {len(rs):>4} "
            f"{_num(sec['encode'], '.3f'):>9} "
            f"{sec['step']:>8.3f} {sec['decode']:>9.3f} {sec['total']:>8.3f} "
            f"{_gb(mem['peak_bytes']):>8} {_gb(mem['active_mean_bytes']):>8} "
            f"{_gb(mem['active_max_bytes']):>8} "
            f"{rs[0]['roofline']['flops_per_step'] / 1e12:>10.3f} "
            f"{_num(roof['achieved_tflops'], '.3f'):>8} "
            f"{_num(frac * 100 if frac is not None else None, '.1f'):>7}")
    if runs:
        peak = runs[0]["roofline"]
        lines.append(f"peak: {_num(peak['peak_tflops'], '.1f')} TFLOP/s ({peak['peak_source']}); "
                     "step = median step; GB = 1e9 bytes")
        if any(not r.get("text_encoder_ran", True) for r in runs):
            lines.append("encode n/a: text encoder skipped (--skip-encode); totals exclude it")
        fp = runs[0]["footprint_bytes"]
        lines.append(f"footprint ({runs[0]['footprint_source']}): " + ", ".join(
            f"{k} {_human(v)}" for k, v in fp.items()))
    lines += _profile_lines(runs)
    for r in records:
        if r["kind"] != "compare":
            continue
        where = f"{r['framework']} {r['width']}x{r['height']}"
        if not r["available"]:
            lines.append(f"{where}: not compared: {r['reason']}")
            continue
        theirs, ratio = r["seconds"], r["ratio_ours_over_theirs"]
        lines.append(f"{where} ({r['device']}, torch {r['torch_version']}): " + ", ".join(
            f"{k} {theirs[k]:.3f} s (ours/theirs {_num(ratio.get(k), '.2f')})" for k in theirs))
    return "\n".join(lines)


def _profile_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    from bonsai_mlx.profiler import format_profile

    lines, seen = [], set()
    for r in runs:
        key = (r["model"], r["width"], r["height"])
        if r.get("profile") and key not in seen:
            seen.add(key)
            lines += [f"profile {r['model']} {r['width']}x{r['height']}, one step "
                      "(seconds per kind of work):", format_profile(r["profile"])]
    return lines


# ---------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' or '512' -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m:
        raise BonsaiError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 512x512)")
    w = int(m.group(1))
    return w, int(m.group(2) or w)


@click.command("bench")
@click.argument("model", required=False)
@click.option("--synthetic", type=click.Choice(SYNTHETIC_KINDS, case_sensitive=False),
              help="Random weights with Klein 4B's shapes and this transformer format.")
@click.option("--size", "sizes", multiple=True, metavar="WxH",
              help="Image size, repeatable (default 512x512 and 1024x1024; --tiny: 64x64).")
@click.option("--steps", default=4, show_default=True, help="Denoising steps.")
@click.option("--repeats", "-n", default=3, show_default=True, help="Timed runs per size.")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs first.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              default="auto", show_default=True,
              help="Compute dtype; auto is bfloat16 on a GPU, float32 on the CPU.")
@click.option("--tiny", is_flag=True, help="Miniature synthetic model: a smoke run in seconds.")
@click.option("--skip-encode", is_flag=True,
              help="Synthetic only: zeros instead of the 4-bit text encoder, to time only "
                   "the transformer and VAE; encode seconds are then n/a.")
@click.option("--compare", is_flag=True, help="Also time diffusers + torch (and mflux).")
@click.option("--profile", is_flag=True,
              help="Also seconds per kind of work (linears, attention, norms, RoPE, VAE) "
                   "in one profiled step per size.")
@click.option("--tile-vae/--no-tile-vae", default=None,
              help="Force tiled / untiled VAE decoding (default: tiled above 1536x1536).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=False)
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Append the records to this file as JSON lines.")
def bench_command(model, synthetic, sizes, steps, repeats, warmup, dtype, tiny, skip_encode,
                  compare, profile, tile_vae, prompt, json_path) -> None:
    """Benchmark MODEL (alias, Hub repo or folder) or a --synthetic model: seconds per
    stage, memory, footprint and the distance to the chip's peak."""
    if tiny and synthetic is None:
        synthetic = "binary"
    records = run_bench(
        model, synthetic=synthetic, sizes=[parse_size(s) for s in sizes] or None,
        steps=steps, repeats=repeats, warmup=warmup, dtype=dtype, tiny=tiny,
        skip_encode=skip_encode, compare=compare, profile=profile, tiled_vae=tile_vae,
        prompt=prompt, json_path=json_path,
        command=_command_line(click.get_current_context().params),
    )
    click.echo(format_table(records))


def _command_line(params: dict[str, Any]) -> str:
    """The command that reproduces this run (options spelled out, defaults included)."""
    parts = ["bonsai-mlx", "bench"]
    if params.get("model"):
        parts.append(params["model"])
    if params.get("synthetic"):
        parts += ["--synthetic", params["synthetic"]]
    for s in params.get("sizes") or ():
        parts += ["--size", s]
    for name in ("steps", "repeats", "warmup", "dtype"):
        parts += [f"--{name}", str(params[name])]
    parts += [f"--{flag.replace('_', '-')}" for flag in ("tiny", "skip_encode", "compare",
                                                         "profile") if params.get(flag)]
    if params.get("tile_vae") is not None:
        parts.append("--tile-vae" if params["tile_vae"] else "--no-tile-vae")
    if params.get("prompt") not in (None, DEFAULT_PROMPT):
        parts += ["--prompt", params["prompt"]]
    return shlex.join(parts)


command = bench_command  # what `bonsai-mlx bench` looks up


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bonsai_mlx.bench` / benchmarks/bench.py: user errors print one line, exit 2."""
    try:
        bench_command.main(args=list(argv) if argv is not None else None,
                           prog_name="bonsai-mlx bench", standalone_mode=False)
    except BonsaiError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
