"""The VAE tiled as the memory allows: untiled when it fits, else the largest tiles that fit
(memory.choose_vae_tile), decided the same way when the pipeline runs and when
check_memory refuses a request before loading. Tiles give the same image, so a small
machine runs what fits in any way; forced options still win."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bonsai_mlx.memory as memory
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models import vae_tiling
from bonsai_mlx.models.transformer import Flux2TransformerConfig
from bonsai_mlx.models.vae import VAE, VAEConfig
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.request import GenerationRequest

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from test_cli import assert_user_error, run
from test_pipeline import TOLERANCE
from test_vae import BOUND

FIXTURES = Path(__file__).parent / "fixtures"
PIPELINE = FIXTURES / "pipeline"
TINY = PIPELINE / "distilled"
CASES = json.loads((PIPELINE / "cases.json").read_text())
GB = 10**9


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(TINY, dtype="float32")


@pytest.fixture
def tiles_used(monkeypatch):
    """("decode" | "encode", tile size) of every tiled VAE pass the pipeline makes."""
    used = []
    for kind in ("decode", "encode"):
        original = getattr(VAE, f"{kind}_tiled")

        def spy(self, x, *, tile_size, _kind=kind, _original=original, **kwargs):
            used.append((_kind, tile_size))
            return _original(self, x, tile_size=tile_size, **kwargs)

        monkeypatch.setattr(VAE, f"{kind}_tiled", spy)
    return used


def machine_with(monkeypatch, available: int) -> None:
    """A machine with `available` bytes free, whenever asked."""
    monkeypatch.setattr(memory, "available_memory", lambda: available)


def run_case(pipe, case: str, **kwargs) -> np.ndarray:
    """One of the diffusers reference cases (scripts/fixtures/make_pipeline.py)."""
    k = CASES[case]["kwargs"]
    images = [PIPELINE / n for n in k.get("images", [])] or None
    latents = np.load(PIPELINE / "cases.npz")[f"{case}/latents"]
    kwargs = {"steps": k["num_inference_steps"], **kwargs}
    return pipe.generate(k["prompt"], width=k["width"], height=k["height"], latents=latents,
                         images=images, output_type="np", **kwargs)


def reference(case: str) -> np.ndarray:
    return np.load(PIPELINE / "cases.npz")[f"{case}/image"]


def assert_same_image(out: np.ndarray, ref: np.ndarray, bound: float) -> None:
    err = float(np.abs(out - ref).max())
    assert err <= bound, f"max abs error {err:.2e} > {bound:.2e}"


def tiny_vae_bytes(pipe, width: int, height: int, tile: int | None, encode=False) -> int:
    return memory.vae_bytes(pipe.vae.config, width, height, 4, tile_size=tile, gpu=False,
                            encode=encode)


# ---- at run time: the pipeline --------------------------------------------------------


def test_short_memory_decodes_in_smaller_tiles_and_the_image_is_the_same(
        pipe, tiles_used, monkeypatch):
    # 96x64: tiles of 48 (2 x 2) or 32 (3 x 2); memory between their estimates
    tiles = memory.tile_sizes(96, 64)
    assert tiles[:2] == [48, 32]
    machine_with(monkeypatch, (tiny_vae_bytes(pipe, 96, 64, 48)
                               + tiny_vae_bytes(pipe, 96, 64, 32)) // 2)
    tiled = run_case(pipe, "distilled_t2i")
    assert tiles_used == [("decode", 32)]  # the largest tile that fits
    untiled = run_case(pipe, "distilled_t2i", tiled_vae=False)
    assert tiles_used == [("decode", 32)]
    assert_same_image(tiled, untiled, BOUND * float(np.abs(untiled).max()))
    assert_same_image(tiled, reference("distilled_t2i"), TOLERANCE)  # diffusers' image


def test_enough_memory_decodes_untiled(pipe, tiles_used, monkeypatch):
    machine_with(monkeypatch, tiny_vae_bytes(pipe, 96, 64, None))
    run_case(pipe, "distilled_t2i")
    assert tiles_used == []


def test_reference_images_are_encoded_in_tiles_when_memory_is_short(
        pipe, tiles_used, monkeypatch):
    # the reference (100x72) is prepared to 96x64 as the output: the same choice for both
    machine_with(monkeypatch, (tiny_vae_bytes(pipe, 96, 64, 48, encode=True)
                               + tiny_vae_bytes(pipe, 96, 64, 32, encode=True)) // 2)
    out = run_case(pipe, "distilled_edit")
    assert tiles_used == [("encode", 32), ("decode", 32)]
    assert_same_image(out, reference("distilled_edit"), TOLERANCE)


def test_forced_tiling_options_win_over_the_memory(pipe, tiles_used, monkeypatch):
    machine_with(monkeypatch, 1)  # nothing fits: automatic would take the smallest tile
    run_case(pipe, "distilled_t2i", steps=1, tiled_vae=False)
    assert tiles_used == []
    machine_with(monkeypatch, 100 * GB)  # everything fits: automatic would not tile
    run_case(pipe, "distilled_t2i", steps=1, tiled_vae=True)
    assert tiles_used == [("decode", 48)]  # the largest tile that splits the image
    run_case(pipe, "distilled_t2i", steps=1, vae_tile_size=40)
    assert tiles_used[1:] == [("decode", 40)]


def test_the_estimate_sees_the_tiles_that_the_tiling_cuts(monkeypatch):
    vae = VAE.from_pretrained(FIXTURES / "vae" / "small", dtype="float32")
    spans = []
    original = vae_tiling._run_tile

    def spy(layers, needs, x, ys, xs, stats):
        spans.append((x.shape[1:3], ys[1] - ys[0], xs[1] - xs[0]))
        return original(layers, needs, x, ys, xs, stats)

    monkeypatch.setattr(vae_tiling, "_run_tile", spy)
    f = vae.scale_factor
    for (h, w), tile in [((96, 160), 48), ((136, 64), 40), ((64, 64), 32)]:
        spans.clear()
        vae.decode_tiled(mx.zeros((1, h // f, w // f, 32)), tile_size=tile)
        latent = [(a, b) for shape, a, b in spans if shape == (h // f, w // f)]
        largest = (max(a for a, _ in latent) * f, max(b for _, b in latent) * f)
        assert vae_tiling.largest_tile(h, w, tile, f) == largest


# ---- before loading: check_memory -----------------------------------------------------


def tiny_estimate(width: int, height: int, available: int | None = None, **kwargs):
    sizes = memory.read_model_sizes(TINY, "float32")
    return memory.estimate_memory(sizes, width, height, dtype="float32", available=available,
                                  **kwargs)


def test_check_memory_accepts_a_size_that_fits_only_in_tiles():
    untiled = tiny_estimate(1024, 1024, tiled_vae=False)
    available = untiled.total - 1
    estimate = memory.check_memory(TINY, 1024, 1024, dtype="float32", available=available)
    assert estimate.vae_tile_size is not None and estimate.total <= available
    with pytest.raises(BonsaiError, match=r"decoding in tiles \(--tile-vae.*which fits"):
        memory.check_memory(TINY, 1024, 1024, dtype="float32", tiled_vae=False,
                            available=available)


def test_check_memory_refuses_what_fits_in_no_tiling_and_names_the_largest_size():
    smallest = tiny_estimate(1024, 1024, vae_tile_size=vae_tiling.MIN_TILE_SIZE)
    available = smallest.total - 1
    with pytest.raises(BonsaiError) as error:
        memory.check_memory(TINY, 1024, 1024, dtype="float32", available=available)
    message = str(error.value)
    # refused with the VAE in tiles: here the transformer step is what does not fit
    assert "1024x1024 needs about" in message and " px) but about" in message
    fit = message.split("the largest size that fits is ")[1].split(" ")[0]
    w, h = map(int, fit.split("x"))
    assert tiny_estimate(w, h, available).total <= available
    assert tiny_estimate(w + 16, h + 16, available).total > available


def test_check_memory_keeps_a_given_tile_size_and_suggests_choosing_one():
    available = tiny_estimate(1024, 1024, tiled_vae=False).total - 1
    forced = tiny_estimate(1024, 1024, available, vae_tile_size=1024)  # one tile: no saving
    assert forced.vae_tile_size == 1024 and forced.total > available
    with pytest.raises(BonsaiError, match=r"in tiles of 1024 px.*choosing the tile size "
                                          r"automatically \(no --vae-tile-size\).*which fits"):
        memory.check_memory(TINY, 1024, 1024, dtype="float32", vae_tile_size=1024,
                            available=available)


def test_a_text_encoder_kept_loaded_counts_with_the_weights_throughout():
    """--no-offload: the text encoder is resident beside each step and the VAE, so what fits
    with it released between prompts does not fit with it kept."""
    sizes = memory.read_model_sizes(TINY, "float32")
    kept = sizes.text_encoder_kept()
    assert kept.weights == sizes.weights + sizes.text_encoder > sizes.weights
    assert kept.text_encoder == 0
    untiled = dict(dtype="float32", tiled_vae=False)  # tiles would make room for it here
    released = tiny_estimate(256, 256, tiled_vae=False)
    assert sizes.text_encoder > 0 and released.vae > 0
    memory.check_memory(TINY, 256, 256, available=released.total, **untiled)
    with pytest.raises(BonsaiError, match="256x256 needs about"):
        memory.check_memory(TINY, 256, 256, available=released.total, keep_text_encoder=True,
                            **untiled)


def test_a_containers_page_cache_is_not_counted_as_used(tmp_path):
    """Under a cgroup v2 limit, memory.current includes the page cache of the files read
    (the model's): its inactive part is reclaimable, so available = limit - (current -
    inactive_file), capped by MemAvailable."""
    gb = 10**9
    (tmp_path / "memory.max").write_text(f"{8 * gb}\n")
    (tmp_path / "memory.current").write_text(f"{7 * gb}\n")
    (tmp_path / "memory.stat").write_text(f"anon {2 * gb}\nfile {5 * gb}\n"
                                          f"active_file {gb}\ninactive_file {4 * gb}\n")
    assert memory._linux_available(tmp_path) == min(8 * gb - 3 * gb,
                                                     memory._linux_available(tmp_path / "no"))
    (tmp_path / "memory.max").write_text("max\n")  # no limit: MemAvailable
    assert memory._linux_available(tmp_path) == memory._linux_available(tmp_path / "no")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_memory_this_process_freed_and_keeps_counts_as_available():
    from bonsai_mlx import _malloc

    if not _malloc.malloc_status()["keeps_freed_memory"]:
        pytest.skip("glibc does not keep freed memory here")
    with mx.stream(mx.cpu):
        x = mx.ones((32, 1024, 1024))  # 128 MiB
        mx.eval(x)
        before = _malloc.free_bytes()
        del x
        assert _malloc.free_bytes() - before >= 0.95 * 128 * 2**20


# ---- a small machine with the real model ----------------------------------------------


def klein_binary(itemsize: int) -> memory.ModelSizes:
    """FLUX.2 [klein] 4B as the binary Bonsai pack stores it (benchmarks/RESULTS.md: 460 MB
    of 1-bit codes, 57.5 MB of scales and 390 MB of dense layers in 16 bits; the 4-bit
    Qwen3 text encoder 2.263 GB) with Klein's VAE (49.6 M decoder-side and 34.4 M encoder
    parameters), float tensors in the compute dtype."""
    floats = itemsize * 10**6
    return memory.ModelSizes(
        transformer=Flux2TransformerConfig(), vae=VAEConfig(),
        weights=460 * 10**6 + int((28.75 + 195 + 49.6) * floats),
        text_encoder=2_263 * 10**6, vae_encoder=int(34.4 * floats))


@pytest.fixture
def klein_on_a_small_machine(monkeypatch):
    """check_memory sees Klein 4B binary (whatever folder it is given) on a machine with
    `available` bytes free: returns a function that sets them."""
    def machine(available: int, itemsize: int = 4) -> None:
        monkeypatch.setattr(memory, "read_model_sizes", lambda root, dtype: klein_binary(itemsize))
        machine_with(monkeypatch, available)

    return machine


LINUX_8GB = 7 * GB  # MemAvailable of an idle 8 GB Linux machine, about


@pytest.mark.slow
def test_gen_1024_on_an_8gb_linux_machine_is_not_refused(tmp_path, klein_on_a_small_machine):
    klein_on_a_small_machine(LINUX_8GB)
    klein = klein_binary(4)
    untiled = memory.estimate_memory(klein, 1024, 1024, dtype="float32", gpu=False,
                                     tiled_vae=False, available=LINUX_8GB)
    assert untiled.total > LINUX_8GB  # Klein's untiled decode needs ~24 GB
    out = tmp_path / "fox.png"
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--steps", "1", "--seed", "0",
                 "--dtype", "float32", "-o", str(out), "-q")  # the default 1024x1024
    assert result.exit_code == 0, (result.output, result.exception)
    with Image.open(out) as image:
        assert image.size == (1024, 1024)
    # forced untiled, it is refused, with the way out
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--dtype", "float32", "--no-tile-vae",
                 "-o", str(tmp_path / "other.png"))
    assert_user_error(result, "1024x1024 needs about", "VAE", "untiled",
                      "decoding in tiles (--tile-vae", "which fits")


def test_gen_checks_the_memory_with_the_tile_size_given(tmp_path, klein_on_a_small_machine):
    klein_on_a_small_machine(LINUX_8GB)
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--dtype", "float32",
                 "--vae-tile-size", "1024", "-o", str(tmp_path / "fox.png"))
    assert_user_error(result, "VAE", "in tiles of 1024 px", "choosing the tile size "
                      "automatically (no --vae-tile-size)", "which fits")


# Metal's recommended working set on Macs with up to 16 GB is about 2/3 of the memory
# (10.67 GB on a 16 GB M4: exo-explore/exo#1672), and MLX counts it as available.
MAC_8GB = 8 * 2**30 * 2 // 3


@pytest.mark.parametrize("scratch", [memory.VAE_SCRATCH["gpu"], memory.VAE_SCRATCH["cpu"]],
                         ids=["assumed", "as-much-as-the-cpu"])
def test_an_8gb_mac_at_1024_is_not_refused_when_tiles_fit(klein_on_a_small_machine,
                                                          monkeypatch, scratch):
    """The GPU's scratch factor is an assumption (not measured on a Mac): whatever it is,
    1024x1024 in bfloat16 on an 8 GB Mac goes ahead, tiled if need be."""
    klein_on_a_small_machine(MAC_8GB, itemsize=2)
    monkeypatch.setattr(memory, "_on_gpu", lambda: True)
    monkeypatch.setitem(memory.VAE_SCRATCH, "gpu", scratch)
    estimate = memory.check_memory(TINY, 1024, 1024, dtype="bfloat16")
    assert estimate.total <= MAC_8GB
    untiled = memory.estimate_memory(klein_binary(2), 1024, 1024, dtype="bfloat16", gpu=True,
                                     tiled_vae=False)
    assert (estimate.vae_tile_size is None) == (untiled.total <= MAC_8GB)
    if scratch == memory.VAE_SCRATCH["cpu"]:
        assert estimate.vae_tile_size is not None  # the case the tiles rescue


# ---- the options ----------------------------------------------------------------------


@pytest.mark.parametrize("value, phrase", [
    (0, "in 32..4096"), (24, "in 32..4096"), (8192, "in 32..4096"),
    (100, "multiple of 8, e.g. 96"), (64.0, "must be an integer"), (True, "an integer")])
def test_vae_tile_size_is_checked(value, phrase):
    with pytest.raises(BonsaiError, match=f"vae_tile_size.*{phrase}"):
        GenerationRequest.create("a fox", vae_tile_size=value)


def test_a_tile_size_forces_tiling_and_contradicts_untiled():
    assert GenerationRequest.create("a fox", vae_tile_size=256).tiled_vae is True
    with pytest.raises(BonsaiError, match="vae_tile_size sets .* but tiled_vae=False"):
        GenerationRequest.create("a fox", vae_tile_size=256, tiled_vae=False)


@pytest.mark.parametrize("args, phrases", [
    (["--vae-tile-size", "100"], ["--vae-tile-size", "multiple of 8"]),
    (["--vae-tile-size", "64", "--no-tile-vae"], ["--vae-tile-size", "--no-tile-vae"])])
def test_the_cli_checks_the_tile_size(tmp_path, args, phrases):
    result = run("gen", "-m", str(TINY), "-p", "a fox", *args, "-o", str(tmp_path / "x.png"))
    assert_user_error(result, *phrases)
