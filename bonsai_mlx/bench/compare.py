"""Side by side: the same size, steps and dtype timed through diffusers + torch.

Each stage (prompt encoding, one transformer step, VAE decode) is built, timed and freed in
turn, on random inputs of the real shapes. When torch or diffusers is not importable the
record says why instead.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from bonsai_mlx.bench.report import SCHEMA, median_seconds
from bonsai_mlx.bench.synthetic import QWEN3_4B, TINY_QWEN3
from bonsai_mlx.layout import detect_layout


class Unavailable(Exception):
    """The other framework cannot run here; the message says why."""


def compare_frameworks(target, synthetic, width, height, steps, repeats, warmup, ours, stamp,
                       machine, log) -> list[dict[str, Any]]:
    """Time diffusers + torch at this size; one record with the ratios ours / theirs (or the
    reason it did not run)."""
    base = {"schema": SCHEMA, "kind": "compare", "timestamp": stamp,
            "framework": "diffusers", "model": target.model, "precision": target.precision,
            "dtype": target.dtype, "width": width, "height": height, "steps": steps,
            "machine": machine}
    try:
        theirs = _time_diffusers(target, synthetic, width, height, steps, repeats, warmup, log)
    except Unavailable as e:
        log(f"diffusers: not compared: {e}")
        return [{**base, "available": False, "reason": str(e)}]
    mine = median_seconds([r["seconds"] for r in ours])
    ratios = {k: (mine[k] / v if v and mine[k] is not None else None)
              for k, v in theirs["seconds"].items() if k in mine}
    return [{**base, "available": True, **theirs, "ours_seconds": mine,
             "ratio_ours_over_theirs": ratios}]


def _torch_setup(dtype: str):
    try:
        import torch
    except ImportError as e:
        raise Unavailable(f"torch is not importable ({e})") from None
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"diffusers / transformers not importable ({e})") from None
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
              "float32": torch.float32}[dtype]
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


def _sync(torch, device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _builders(target, synthetic, torch, tdtype, device) -> list[Callable[[], Any]]:
    """Builders of the text encoder, transformer and VAE: the folder's own diffusers models
    for a model, random dense ones of the same configs for a synthetic target (diffusers
    has no packed binary / ternary layers)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import Qwen3Config, Qwen3ForCausalLM

    diffusers_logging.set_verbosity_error()  # its dtype-cast notice is irrelevant here
    if synthetic is None:
        root = target.pipeline.source  # the folder our pipeline was loaded from
        if detect_layout(root) != "diffusers":
            raise Unavailable(f"diffusers cannot load the Bonsai MLX pack {root}; compare "
                              "with the matching `*-unpacked` repo instead")
        return [
            lambda: Qwen3ForCausalLM.from_pretrained(root / "text_encoder", torch_dtype=tdtype),
            lambda: Flux2Transformer2DModel.from_pretrained(root / "transformer",
                                                            torch_dtype=tdtype),
            lambda: AutoencoderKLFlux2.from_pretrained(root / "vae", torch_dtype=tdtype),
        ]
    qcfg = {k: v for k, v in (TINY_QWEN3 if target.tiny else QWEN3_4B).items()
            if k != "model_type"}
    tcfg = {k: v for k, v in target.pipeline.transformer.config.to_dict().items()
            if k != "_class_name"}
    vcfg = dataclasses.asdict(target.pipeline.vae.config)
    models = [lambda: Qwen3ForCausalLM(Qwen3Config(**qcfg)),
              lambda: Flux2Transformer2DModel(**tcfg), lambda: AutoencoderKLFlux2(**vcfg)]
    return [lambda build=build: _torch_random_module(torch, build, tdtype, device)
            for build in models]


def _stage_calls(torch, device, tdtype, n_txt: int, width: int, height: int):
    """For each stage, model -> a call on random inputs of the real shapes."""
    n_img = (height // 16) * (width // 16)

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

    return [encode_call, step_call, decode_call]


def _time_diffusers(target, synthetic, width, height, steps, repeats, warmup, log):
    """Median seconds of prompt encoding (Qwen3ForCausalLM with hidden states, as
    Flux2KleinPipeline calls it), one transformer forward and the VAE decode; total =
    encode + steps x step + decode."""
    torch, tdtype, device = _torch_setup(target.dtype)

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

    builders = _builders(target, synthetic, torch, tdtype, device)
    calls = _stage_calls(torch, device, tdtype, target.text_tokens, width, height)
    seconds: dict[str, float] = {}
    with torch.inference_mode():
        for name, build, call in zip(("encode", "step", "decode"), builders, calls,
                                     strict=True):
            # The module lives only in this statement: freed before the next one is built.
            seconds[name] = timed(call(build().to(device)))
            log(f"diffusers {width}x{height}: {name} {seconds[name]:.3f} s")
    seconds["total"] = seconds["encode"] + steps * seconds["step"] + seconds["decode"]
    import diffusers

    return {"seconds": seconds, "device": device, "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
            "note": "stage by stage on random inputs of the real shapes; total = encode + "
                    "steps x step + decode (no scheduler or image conversion); dense "
                    "weights (diffusers has no packed binary/ternary layers)"}
