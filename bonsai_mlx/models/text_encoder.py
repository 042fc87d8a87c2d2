"""Prompt encoding for FLUX.2 [klein]: hidden states of Qwen3, as Flux2KleinPipeline takes them.

    prompt -> chat template (enable_thinking=False) -> 512 tokens, right-padded
           -> Qwen3 decoder layers 1..27 with a causal + key-padding mask
           -> [h9 | h18 | h27] per token: (B, 512, 3 * hidden)

The model is mlx-lm's Qwen3 (`mlx_lm.models.qwen3`), cut after the deepest layer used: the
final norm, the lm_head and layers 28..35 are never built, loaded or run. It reads the
diffusers `text_encoder/` folder (transformers Qwen3ForCausalLM safetensors, possibly
sharded) and the mlx-lm layout of Bonsai's `text_encoder-mlx-4bit/` (affine-quantized, with
"quantization" in config.json).

`PromptEncoder` loads the weights on the first prompt it has not seen, frees them after
encoding (unless keep_loaded=True), and caches embeddings in memory and optionally on disk
(`prompt_cache.py`), so a seed sweep over one prompt runs Qwen3 once.

mlx-lm is imported when a model is first built, not with this module: it imports
transformers, which takes seconds.

On MLX's CPU backend `mx.quantized_matmul` is some 20-200x slower than a float32 matmul
through BLAS, so there a quantized encoder runs each decoder layer dequantized: one layer's
float weights are made, used and dropped at a time (`Qwen3Encoder(..., dequantize=True)`),
which costs about one layer of float weights in memory. On a GPU the quantized kernels run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bonsai_mlx.checks import check_prompts, integer, number
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.prompt_cache import PromptCache
from bonsai_mlx.weights import (
    check_no_custom_code,
    check_regular_files,
    checkpoint_float_dtype,
    file_sha256,
    load_into,
    load_weights,
    parse_dtype,
    read_json,
    safetensors_files,
    save_safetensors,
    write_json,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from mlx_lm.models import qwen3
    from transformers import PreTrainedTokenizerBase

DEFAULT_OUT_LAYERS = (9, 18, 27)
# Upper bounds on a Qwen3 config.json's sizes, far above every real Qwen3 (Qwen3-8B: 36
# layers, hidden 4096, 32 heads of 128, MLP 12288, 151936 tokens): a larger value is a
# broken or hostile config, refused before mlx-lm builds (and MLX allocates) anything.
MAX_QWEN3_LAYERS = 512
MAX_QWEN3_SIZES = {"hidden_size": 65536, "intermediate_size": 262144,
                   "num_attention_heads": 1024, "num_key_value_heads": 1024,
                   "head_dim": 1024, "vocab_size": 1 << 20}
# Qwen3's tokenizer.json is 11 MB; transformers reads these files itself, whole.
MAX_TOKENIZER_FILE_BYTES = 256 * 1024 * 1024
# Qwen3-4B, the FLUX.2 [klein] 4B text encoder (Qwen/Qwen3-4B's config.json).
QWEN3_4B = {
    "model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36,
    "intermediate_size": 9728, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "tie_word_embeddings": True,
}
# Qwen/Qwen3-8B's config.json: the text encoder of FLUX.2 [klein] 9B (hidden 4096 = the 9B
# transformer's width; its lm_head is not tied to the embedding)
QWEN3_8B = {
    "model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36,
    "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-6, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rope_theta": 1000000.0, "tie_word_embeddings": False,
}
QUANTIZE_GROUP_SIZE = 64  # for quantize_bits at load time, as mlx-lm converts
LOAD_QUANTIZE_BITS = (4, 8)  # quantize_bits at load time
SAVE_QUANTIZE_BITS = (3, 4, 8)  # MLX affine widths `save_text_encoder` writes
# config.json key of a text encoder saved by bonsai-mlx with only the layers a pipeline
# reads: {"source_num_hidden_layers": 36, "out_layers": [9, 18, 27]}. Its last layer's
# output is then a plain hidden state (no final norm follows it).
TRUNCATED_KEY = "bonsai_mlx_truncated"
# Overrides dequantize="auto": 1/true (always dequantize layers), 0/false (never), auto.
DEQUANTIZE_ENV = "BONSAI_TEXT_ENCODER_DEQUANTIZE"


def attention_mask_4d(attention_mask: mx.array) -> mx.array:
    """(B, L) 1 = token, 0 = pad -> (B, 1, L, L) bool: causal and key not padding.

    The mask transformers builds for Qwen3 from an attention_mask (sdpa and eager alike):
    query i sees key j iff j <= i and j is a token. Padded queries are not masked, so with
    right padding they see every real token; the DiT attends to them, so they must match.
    """
    length = attention_mask.shape[1]
    idx = mx.arange(length)
    causal = idx[:, None] >= idx[None, :]  # (L, L)
    keys = attention_mask.astype(mx.bool_)[:, None, None, :]  # (B, 1, 1, L)
    return causal[None, None] & keys


class Qwen3Encoder(nn.Module):
    """mlx-lm's Qwen3 cut after `args.num_hidden_layers` layers, returning hidden states.

    Keeps the module tree and names of mlx-lm's `qwen3.Model` (`model.embed_tokens`,
    `model.layers.N...`: `model` is mlx-lm's `Qwen3Model`), so transformers and mlx-lm
    checkpoints load unchanged. No lm_head, and no final norm unless `final_norm`:
    transformers' last hidden state (index num_hidden_layers of the full model) is taken
    after the final norm, so asking for it needs the norm.
    """

    def __init__(self, args: qwen3.ModelArgs, final_norm: bool = False):
        super().__init__()
        from mlx_lm.models import qwen3

        self.args = args
        self.model = qwen3.Qwen3Model(args)
        if not final_norm:
            del self.model.norm

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array,
        out_layers: Sequence[int],
        dequantize: bool = False,
    ) -> mx.array:
        """(B, L) token ids and mask -> (B, L, len(out_layers) * hidden).

        Layer k is `hidden_states[k]` of transformers: 0 the embeddings, k the output of
        decoder layer k (1-based). `dequantize` runs each layer with its quantized linears
        dequantized to float32 (`dequantized_linears`; the hidden states then are float32
        too) and evaluates it before the next, so only one layer's float weights exist at
        a time. The embedding lookup dequantizes only the rows it gathers either way.
        """
        mask = attention_mask_4d(attention_mask)
        h = self.model.embed_tokens(input_ids)
        kept = {0: h}
        for k, layer in enumerate(self.model.layers, start=1):
            if dequantize:
                with dequantized_linears(layer):
                    h = layer(h, mask)
                    mx.eval(h)
            else:
                h = layer(h, mask)
            if k in out_layers:
                kept[k] = h
        if "norm" in self.model and len(self.model.layers) in out_layers:
            kept[len(self.model.layers)] = self.model.norm(h)
        return mx.concatenate([kept[k] for k in out_layers], axis=-1)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """mlx-lm's Qwen3 name mapping, minus the tensors of parts this model never runs."""
        from mlx_lm.models import qwen3

        weights = qwen3.Model.sanitize(self, weights)  # it reads only self.args
        n = self.args.num_hidden_layers
        layer_index = re.compile(r"model\.layers\.(\d+)\.")

        skip = ("lm_head.",) if "norm" in self.model else ("lm_head.", "model.norm.")

        def needed(name: str) -> bool:
            if name.startswith(skip):
                return False
            m = layer_index.match(name)
            return m is None or int(m.group(1)) < n

        return {k: v for k, v in weights.items() if needed(k)}


class DequantizedLinear(nn.Module):
    """An `nn.QuantizedLinear` as a float matmul, its weight dequantized to `dtype`.

    float32 by default, also for a bfloat16 model: on MLX's CPU backend a float32 matmul
    (BLAS) is ~4x faster than a bfloat16 one, and bfloat16 activations are promoted.
    Holds the float weight, so make it just before use."""

    def __init__(self, layer: nn.QuantizedLinear, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.weight = mx.dequantize(
            layer.weight, layer.scales, layer.get("biases"),
            group_size=layer.group_size, bits=layer.bits, mode=layer.mode, dtype=dtype,
        )  # (out, in)
        if "bias" in layer:
            self.bias = layer.bias

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight.T)
        return x @ self.weight.T


@contextlib.contextmanager
def dequantized_linears(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `module`'s `nn.QuantizedLinear`s are `DequantizedLinear`s; they
    are put back after it (also on an error), which frees the float weights. Evaluate what
    you compute inside the block before leaving it, or the float weights outlive it in the
    graph."""
    quantized = [(path, m) for path, m in module.named_modules()
                 if isinstance(m, nn.QuantizedLinear)]
    if not quantized:
        yield module
        return
    module.update_modules(tree_unflatten([(p, DequantizedLinear(m)) for p, m in quantized]))
    try:
        yield module
    finally:
        module.update_modules(tree_unflatten(quantized))


def should_dequantize(setting: bool | str = "auto") -> bool:
    """Whether a quantized encoder runs its layers dequantized (`Qwen3Encoder`).

    True or False as given; "auto": the BONSAI_TEXT_ENCODER_DEQUANTIZE environment variable
    if set (1/true, 0/false, auto), else whether MLX's default device is the CPU, where
    quantized matmuls are slow and float32 ones fast.
    """
    if setting == "auto":
        env = os.environ.get(DEQUANTIZE_ENV, "auto").strip().lower()
        choices = {"1": True, "true": True, "0": False, "false": False, "auto": "auto", "": "auto"}
        if env not in choices:
            raise BonsaiError(
                f"{DEQUANTIZE_ENV}={os.environ[DEQUANTIZE_ENV]!r}: use 1, 0 or auto"
            )
        setting = choices[env]
    if setting == "auto":
        return mx.default_device().type == mx.DeviceType.cpu
    if isinstance(setting, bool):
        return setting
    raise BonsaiError(f'dequantize must be True, False or "auto", not {setting!r}')


def load_qwen3_encoder(
    folder: str | Path,
    num_layers: int,
    dtype: str | mx.Dtype = "bfloat16",
    quantize_bits: int | None = None,
) -> Qwen3Encoder:
    """The first `num_layers` layers of the Qwen3 in `folder`, weights evaluated.

    `folder` is a transformers Qwen3ForCausalLM folder or an mlx-lm (quantized) one.
    `quantize_bits` (4 or 8) quantizes a float checkpoint's linears and embedding as
    mlx-lm does (affine, group 64); for a quantized checkpoint it must match its bits.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = read_json(config_path)
    args = qwen3_args(config, config_path)
    if num_layers > args.num_hidden_layers:
        raise BonsaiError(
            f"{config_path} has {args.num_hidden_layers} layers; layer {num_layers} "
            "was requested"
        )
    # A truncated copy's last layer is not the model's last: no final norm after it.
    final_norm = num_layers == args.num_hidden_layers and TRUNCATED_KEY not in config
    args.num_hidden_layers = num_layers
    try:  # mlx-lm's RoPE refuses a rope_scaling it does not know
        model = Qwen3Encoder(args, final_norm=final_norm)
    except (TypeError, ValueError, KeyError) as e:
        raise BonsaiError(f"{config_path}: cannot build Qwen3 from it ({e})") from e
    # mx.load is lazy: the tensors of skipped layers are never read from disk.
    weights = model.sanitize(load_weights(folder))
    quantization = mlx_quantization(config)
    if quantization is not None:
        _quantize_as_stored(model, quantization, weights, quantize_bits, folder)
    model.set_dtype(parse_dtype(dtype))
    load_into(model, weights, folder, evaluate=False)
    del weights
    if quantize_bits is not None and quantization is None:
        if quantize_bits not in LOAD_QUANTIZE_BITS:
            raise BonsaiError(f"quantize_bits must be 4 or 8, not {quantize_bits}")
        nn.quantize(model, group_size=QUANTIZE_GROUP_SIZE, bits=quantize_bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % QUANTIZE_GROUP_SIZE == 0)
    # One layer at a time, so quantizing at load never holds all the float weights at once.
    mx.eval(model.model.embed_tokens.parameters())
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    model.eval()
    return model


def mlx_quantization(config: dict) -> dict | None:
    """The MLX affine quantization an mlx-lm config.json records (`"quantization"`: bits,
    group_size, per-layer overrides), or None for a float checkpoint."""
    quantization = config.get("quantization")
    return quantization if isinstance(quantization, dict) else None


def _quantize_as_stored(model: Qwen3Encoder, quantization: dict, weights: dict[str, mx.array],
                        quantize_bits: int | None, folder: Path) -> None:
    """Make the layers the checkpoint stores quantized (those with `.scales`) quantized."""
    bits = quantization.get("bits")
    if quantize_bits is not None and quantize_bits != bits:
        raise BonsaiError(
            f"{folder} is already quantized to {bits} bits; "
            f"quantize_bits={quantize_bits} cannot change that (leave it unset)"
        )
    quantized_paths = {k.removesuffix(".scales") for k in weights if k.endswith(".scales")}

    def quantized_here(path: str, module: nn.Module) -> bool | dict:
        if path not in quantized_paths:
            return False
        per_layer = quantization.get(path)  # mlx-lm's per-layer overrides
        return per_layer if isinstance(per_layer, dict) else True

    nn.quantize(model, group_size=quantization.get("group_size", 64), bits=bits,
                mode=quantization.get("mode", "affine"), class_predicate=quantized_here)


def qwen3_sizes(config: dict, source: str | Path) -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) of a transformers or mlx-lm Qwen3 config.json,
    checked without importing mlx-lm (`qwen3_args` checks the rest)."""
    if config.get("model_type") != "qwen3":
        raise BonsaiError(
            f"{source}: model_type is {config.get('model_type')!r}, expected 'qwen3' "
            "(the FLUX.2 [klein] text encoder); is this the text_encoder folder?"
        )
    sizes = config.get("num_hidden_layers"), config.get("hidden_size")
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        raise BonsaiError(
            f"{source} is not a complete Qwen3 config: num_hidden_layers and hidden_size "
            f"must be positive integers, not {sizes}"
        )
    try:
        integer(sizes[0], "num_hidden_layers", high=MAX_QWEN3_LAYERS)
        integer(sizes[1], "hidden_size", high=MAX_QWEN3_SIZES["hidden_size"])
    except BonsaiError as e:
        raise BonsaiError(f"{source}: {e}") from None
    return sizes


def qwen3_args(config: dict, source: str | Path) -> qwen3.ModelArgs:
    """mlx-lm's ModelArgs from a transformers or mlx-lm Qwen3 config.json."""
    qwen3_sizes(config, source)
    try:  # what mlx-lm would divide by or build layers of
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size",
                     "vocab_size", "head_dim"):
            if name in config or name != "head_dim":
                integer(config.get(name), name, low=1, high=MAX_QWEN3_SIZES[name])
        number(config.get("rms_norm_eps"), "rms_norm_eps", positive=True)
        if config["num_attention_heads"] % config["num_key_value_heads"]:
            raise BonsaiError("num_attention_heads must be a multiple of num_key_value_heads")
    except BonsaiError as e:
        raise BonsaiError(f"{source}: {e}") from None
    from mlx_lm.models import qwen3

    try:
        args = qwen3.ModelArgs.from_dict(config)
        # transformers >= 5 nests it in rope_parameters; a string would fail mid-encode
        args.rope_theta = number(args.rope_theta, "rope_theta", positive=True)
    except BonsaiError as e:
        raise BonsaiError(f"{source}: {e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise BonsaiError(f"{source} is not a complete Qwen3 config: {e}") from e
    return args


class PromptEncoder:
    """Prompts -> FLUX.2 [klein] prompt embeddings (B, L, len(out_layers) * hidden).

    Matches diffusers' `Flux2KleinPipeline.encode_prompt`. Qwen3 is loaded on the first
    prompt not found in `cache` (a `PromptCache`: the last `cache_size` in memory, all of
    them under `cache_dir` if given) and released after each encode unless `keep_loaded`.

    `dequantize` ("auto", True, False): run a quantized encoder one float32 layer at a
    time (see `should_dequantize`; "auto" does on the CPU, not on a GPU). In float32 the
    embeddings equal the quantized path's to rounding; with a bfloat16 `dtype` they are
    computed in float32 (closer to the float model) and returned in bfloat16.
    """

    def __init__(
        self,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        *,
        dtype: str | mx.Dtype = "bfloat16",
        out_layers: Sequence[int] = DEFAULT_OUT_LAYERS,
        max_sequence_length: int = 512,
        quantize_bits: int | None = None,
        keep_loaded: bool = False,
        cache_dir: str | Path | None = None,
        cache_size: int = 8,
        dequantize: bool | str = "auto",
    ):
        self.text_encoder_dir = Path(text_encoder_dir)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.dtype = parse_dtype(dtype)
        self.out_layers = tuple(int(k) for k in out_layers)
        self.max_sequence_length = int(max_sequence_length)
        self.quantize_bits = quantize_bits
        self.keep_loaded = keep_loaded
        if dequantize not in ("auto", True, False):
            raise BonsaiError(f'dequantize must be True, False or "auto", not {dequantize!r}')
        self.dequantize = dequantize

        check_no_custom_code(self.text_encoder_dir, self.tokenizer_dir)
        self.hidden_size = self._check_layers()
        if self.max_sequence_length < 1:
            raise BonsaiError(f"max_sequence_length must be positive, not {max_sequence_length}")
        if quantize_bits not in (None, *LOAD_QUANTIZE_BITS):
            raise BonsaiError(f"quantize_bits must be 4, 8 or None, not {quantize_bits}")
        if not self.tokenizer_dir.is_dir():
            raise BonsaiError(f"{self.tokenizer_dir} is not a folder (the tokenizer/ folder)")

        self.model: Qwen3Encoder | None = None
        self.loads = 0  # how many times Qwen3 was loaded (tests, benchmarks)
        self._tokenizer = None
        self._identity: str | None = None
        shape = (1, self.max_sequence_length, len(self.out_layers) * self.hidden_size)
        self.cache = PromptCache(cache_dir, cache_size, self._cache_key, shape, self.dtype)

    def _check_layers(self) -> int:
        """The hidden size, once the layers asked for are checked against the config."""
        config_path = self.text_encoder_dir / "config.json"
        config = read_json(config_path)
        num_layers, hidden_size = qwen3_sizes(config, config_path)
        truncated = config.get(TRUNCATED_KEY)
        too_deep = [k for k in self.out_layers if k > num_layers]
        if isinstance(truncated, dict) and self.out_layers and too_deep:
            raise BonsaiError(
                f"{self.text_encoder_dir} holds only the first {num_layers} of "
                f"Qwen3's {truncated.get('source_num_hidden_layers', '?')} layers (saved by "
                f"bonsai-mlx for hidden-state layers {truncated.get('out_layers')}); layer "
                f"{too_deep[0]} is requested: use the original, untruncated text encoder"
            )
        if not self.out_layers or not all(0 <= k <= num_layers for k in self.out_layers):
            raise BonsaiError(
                f"out_layers {self.out_layers} must be non-empty hidden-state indices in "
                f"0..{num_layers} ({config_path})"
            )
        return hidden_size

    @classmethod
    def from_pretrained(
        cls, text_encoder_dir: str | Path, tokenizer_dir: str | Path, **kwargs
    ) -> PromptEncoder:
        """Same arguments as the constructor; nothing heavy is loaded until `encode`."""
        return cls(text_encoder_dir, tokenizer_dir, **kwargs)

    # -- public -------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[str]) -> mx.array:
        """One prompt or a list -> (B, max_sequence_length, len(out_layers) * hidden)."""
        prompts = check_prompts(prompt)
        found = {p: self.cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, e in found.items() if e is None]
        if missing:
            embeds = self._run_model(missing)
            for i, p in enumerate(missing):
                found[p] = embeds[i : i + 1]
                self.cache.put(p, found[p])
        return mx.concatenate([found[p] for p in prompts], axis=0)

    def tokenize(self, prompts: Sequence[str]) -> tuple[mx.array, mx.array]:
        """Prompts -> (input_ids, attention_mask), each (B, max_sequence_length) int32.

        Warns for each prompt longer than the limit, with the number of tokens dropped.
        """
        tokenizer = self.tokenizer
        ids, masks = [], []
        for p in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False,
                add_generation_prompt=True, enable_thinking=False,
            )
            n = len(tokenizer(text)["input_ids"])
            if n > self.max_sequence_length:
                short = p if len(p) <= 60 else p[:57] + "..."
                warnings.warn(
                    f"prompt {short!r} is {n} tokens with the chat template; truncated to "
                    f"{self.max_sequence_length}, {n - self.max_sequence_length} tokens "
                    "dropped",
                    stacklevel=2,
                )
            out = tokenizer(
                text, padding="max_length", truncation=True,
                max_length=self.max_sequence_length,
            )
            ids.append(out["input_ids"])
            masks.append(out["attention_mask"])
        return mx.array(np.array(ids, np.int32)), mx.array(np.array(masks, np.int32))

    def save_pretrained(self, folder: str | Path, *, bits: int = 4) -> dict:
        """Write this encoder's Qwen3, cut after its deepest `out_layers`, into `folder`
        (see `save_text_encoder`). Returns the config written."""
        return save_text_encoder(self.text_encoder_dir, folder, self.out_layers, bits=bits)

    def unload(self) -> None:
        """Release Qwen3's weights now (the next uncached prompt loads them again)."""
        self.model = None
        mx.clear_cache()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use (never with the folder's own code)."""
        if self._tokenizer is None:
            # We use only transformers' tokenizers: its "PyTorch was not found" advice (and
            # mlx-lm's, which sets the same variable) is noise for our users.
            os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
            from transformers import AutoTokenizer

            check_regular_files(self.tokenizer_dir, MAX_TOKENIZER_FILE_BYTES)
            try:  # never the folder's own Python code, whatever a terminal answers
                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.tokenizer_dir), trust_remote_code=False)
            except Exception as e:
                raise BonsaiError(
                    f"could not load the tokenizer from {self.tokenizer_dir}: {e}"
                ) from e
        return self._tokenizer

    # -- internals ----------------------------------------------------------------------

    def _run_model(self, prompts: list[str]) -> mx.array:
        input_ids, attention_mask = self.tokenize(prompts)
        if self.model is None:
            self.model = load_qwen3_encoder(
                self.text_encoder_dir, max(self.out_layers), self.dtype, self.quantize_bits
            )
            self.loads += 1
        try:
            embeds = self.model(
                input_ids, attention_mask, self.out_layers,
                dequantize=should_dequantize(self.dequantize),
            ).astype(self.dtype)
            mx.eval(embeds)
        finally:
            if not self.keep_loaded:
                self.unload()
        return embeds

    def _cache_key(self) -> tuple[str, ...]:
        """What determines the embeddings, for the disk cache: a hash of the weights' bytes
        (hashed once per file and process, `file_sha256`), config, tokenizer files, dtype
        and quantization; the layers read; the length."""
        if self._identity is None:
            h = hashlib.sha256()
            h.update((self.text_encoder_dir / "config.json").read_bytes())
            for f in safetensors_files(self.text_encoder_dir):
                h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
            for f in sorted(self.tokenizer_dir.iterdir()):
                if f.is_file():
                    h.update(f.name.encode() + b"\0" + f.read_bytes())
            h.update(f"{self.dtype} {self.quantize_bits}".encode())
            self._identity = h.hexdigest()
        return self._identity, repr(self.out_layers), str(self.max_sequence_length)


# ---- saving ---------------------------------------------------------------------------


def save_text_encoder(
    source: str | Path,
    folder: str | Path,
    out_layers: Sequence[int] = DEFAULT_OUT_LAYERS,
    *,
    bits: int = 4,
) -> dict:
    """Write the Qwen3 of `source` with only the layers up to max(out_layers) into `folder`
    (mlx-lm layout: config.json + model.safetensors), for a smaller payload.

    - `bits` 3, 4 or 8: MLX affine, group 64, quantised by mlx-lm (`quantize_model`) in the
      checkpoint's own float dtype; 16: float weights as stored. A checkpoint already
      quantised (Bonsai's `text_encoder-mlx-4bit/`) keeps its tensors bit for bit, and
      must be asked for its own width: re-quantising would not be lossless.
    - config.json says so: `num_hidden_layers` is the number kept and `bonsai_mlx_truncated`
      records the source's layer count and `out_layers`, so a pipeline that needs a deeper
      layer gets a clear error. Prompt embeddings for `out_layers` are bit-identical to the
      untruncated encoder's at the same width.
    Each file is written atomically; the caller makes the folder atomic. Returns the config.
    """
    source, folder = Path(source), Path(folder)
    out_layers = sorted({int(k) for k in out_layers})
    if bits not in (*SAVE_QUANTIZE_BITS, 16):
        raise BonsaiError(f"text encoder bits must be 3, 4, 8 or 16, not {bits}")
    config_path = source / "config.json"
    config = read_json(config_path)
    args = qwen3_args(config, config_path)
    if not out_layers or out_layers[0] < 0 or out_layers[-1] > args.num_hidden_layers:
        raise BonsaiError(f"out_layers {out_layers} must be hidden-state indices in "
                          f"0..{args.num_hidden_layers} ({config_path})")
    keep = max(out_layers[-1], 1)
    quantization = mlx_quantization(config)
    if quantization is not None and quantization.get("bits") != bits:
        raise BonsaiError(
            f"{source} is already MLX affine {quantization.get('bits')}-bit; saving it at {bits} "
            f"bits would not be lossless: use {quantization.get('bits')} bits for it"
        )
    model = load_qwen3_encoder(source, keep, checkpoint_float_dtype(source))
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if quantization is None and bits != 16:
        from mlx_lm.utils import quantize_model

        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints bits per weight
            model, quantized = quantize_model(model, {}, QUANTIZE_GROUP_SIZE, bits)
        quantization = quantized["quantization"]
    if quantization is not None:
        out["quantization"] = out["quantization_config"] = quantization
    if keep < args.num_hidden_layers or TRUNCATED_KEY in config:
        out.update(_truncated_config(config, args.num_hidden_layers, keep, out_layers))
    weights = dict(tree_flatten(model.parameters()))
    save_safetensors(folder / "model.safetensors", weights, metadata={"format": "mlx"})
    write_json(folder / "config.json", out)
    return out


def _truncated_config(config: dict, num_layers: int, keep: int, out_layers: list[int]) -> dict:
    """The config.json entries of an encoder cut after `keep` of `num_layers` layers."""
    previous = config.get(TRUNCATED_KEY) or {}
    out = {
        TRUNCATED_KEY: {
            "source_num_hidden_layers": previous.get("source_num_hidden_layers", num_layers),
            "out_layers": out_layers,
        },
        "num_hidden_layers": keep,
    }
    if isinstance(config.get("layer_types"), list):
        out["layer_types"] = config["layer_types"][:keep]
    if isinstance(config.get("max_window_layers"), int):
        out["max_window_layers"] = min(config["max_window_layers"], keep)
    return out
