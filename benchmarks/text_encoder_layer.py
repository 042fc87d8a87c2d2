"""One Qwen3-4B decoder layer (hidden 2560, intermediate 9728, 32 q / 8 kv heads, head dim
128), 4-bit affine group 64, random weights, 512 tokens, float32: seconds per layer through
mx.quantized_matmul vs dequantized one layer at a time (bonsai_mlx.models.text_encoder).

    python benchmarks/text_encoder_layer.py [REPEATS]

This is the measurement behind `PromptEncoder(dequantize="auto")` dequantizing on the CPU.
"""
import sys
import time

import bonsai_mlx  # noqa: F401  (first: OpenBLAS before mlx.core on Linux)
from bonsai_mlx.models.text_encoder import attention_mask_4d, dequantized_linears

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 2
args = qwen3.ModelArgs(
    model_type="qwen3", hidden_size=2560, num_hidden_layers=1, intermediate_size=9728,
    num_attention_heads=32, rms_norm_eps=1e-6, vocab_size=151936, num_key_value_heads=8,
    max_position_embeddings=40960, head_dim=128, tie_word_embeddings=True, rope_theta=1e6,
)
mx.random.seed(0)
layer = qwen3.TransformerBlock(args)
layer.set_dtype(mx.float32)
nn.quantize(layer, group_size=64, bits=4)
mx.eval(layer.parameters())
L = 512
ids_mask = mx.concatenate([mx.ones((1, 40), mx.int32), mx.zeros((1, L - 40), mx.int32)], 1)
mask = attention_mask_4d(ids_mask)
x = mx.random.normal((1, L, 2560)) * 0.5
mx.eval(x, mask)
flops = 2 * L * sum(m.weight.shape[0] * m.weight.shape[1] * 32 // 4
                    for _, m in layer.named_modules() if isinstance(m, nn.QuantizedLinear))
print(f"linear GFLOP per layer at {L} tokens: {flops / 1e9:.1f}")

def dense():
    with dequantized_linears(layer):
        y = layer(x, mask)
        mx.eval(y)
    return y

def quant():
    y = layer(x, mask)
    mx.eval(y)
    return y

out = {}
for name, fn, n in (("dequantized", dense, reps), ("quantized", quant, 1)):
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out[name] = fn()
        times.append(time.perf_counter() - t)
    peak = mx.get_peak_memory() - before
    best = min(times)
    print(f"{name}: {best:.2f} s/layer (runs {', '.join(f'{t:.2f}' for t in times)}), "
          f"{flops / best / 1e9:.1f} GFLOP/s linear, peak +{peak / 2**20:.0f} MiB; "
          f"27 layers (extrapolated) {27 * best:.0f} s")
a, b = out["quantized"], out["dequantized"]
print("max |dequantized - quantized| / max|quantized| =",
      (mx.abs(a - b).max() / mx.abs(a).max()).item())
