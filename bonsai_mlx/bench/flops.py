"""FLOPs of one denoising step and of prompt encoding, counted from the configs, and the
roofline: achieved TFLOP/s and the fraction of the chip's peak."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bonsai_mlx.bench.machine import peak_tflops


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

