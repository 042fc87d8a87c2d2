"""The kernel self-check and its fallback (bonsai_mlx/kernels/selfcheck.py), on Linux: a test
double of `mx.fast.metal_kernel` built on the CPU emulator stands in for Metal
(tests/kernel_doubles.py), so a kernel that fails to compile, returns garbage or NaN, or
aborts its process behaves here as it would on a Mac."""

import json
import warnings

from bonsai_mlx import kernels
from bonsai_mlx.kernels import device, metal, reference, selfcheck
from bonsai_mlx.kernels.device import Device
from bonsai_mlx.kernels.selfcheck import KernelFallbackWarning

import kernel_doubles
import mlx.core as mx
import numpy as np
import pytest
from kernel_cases import make_input, make_weight, needs_cxx, with_bug

pytestmark = needs_cxx


@pytest.fixture(autouse=True)
def verdict_cache(tmp_path, monkeypatch):
    """A fresh verdict cache and no verdicts or warnings remembered from other tests."""
    monkeypatch.setenv("BONSAI_KERNEL_CACHE", str(tmp_path / "verdicts"))
    monkeypatch.delenv("BONSAI_KERNELS", raising=False)
    kernel_doubles.CALLS.clear()
    selfcheck.forget()
    yield tmp_path / "verdicts"
    selfcheck.forget()


def fake_metal(factory, isolated: bool = False):
    return device.use(Device(chip="Apple M0 (test double)", has_metal=True, factory=factory,
                             isolated=isolated))


def fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, KernelFallbackWarning)]


def binary_case(m: int):
    packed, scales, _ = make_weight("binary", 48, 256, seed=3)
    x, _ = make_input((m, 256), mx.float32, seed=4)
    return x, packed, scales


def test_healthy_kernels_pass_their_self_check():
    with fake_metal(kernel_doubles.emulated):
        found = selfcheck.verdicts(["gemv/binary/float32", "gemm/ternary/bfloat16",
                                    "dequantize/ternary/float16"])
    assert all(v.usable and not v.reason for v in found.values()), found
    assert all(0 <= v.error_ratio < 1 for v in found.values())


@pytest.mark.parametrize("double,reason", [
    (kernel_doubles.gemm_compile_error, "RuntimeError: [metal::Device] Unable to build metal"),
    (kernel_doubles.gemm_garbage, "outputs off"),
    (kernel_doubles.gemm_nan, "outputs not finite"),
], ids=["compile-error", "garbage", "nan"])
def test_a_failing_kernel_falls_back_with_exactly_one_warning(double, reason):
    x, packed, scales = binary_case(20)  # 20 rows: the fused GEMM
    with fake_metal(double), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kernels.binary_matmul(x, packed, scales)
        second = kernels.binary_matmul(x, packed, scales)
        assert kernels.kernel_path(20, "binary", mx.float32) == "reference"
    messages = fallback_warnings(caught)
    assert len(messages) == 1
    assert messages[0].startswith("Metal kernel gemm (binary, float32) failed its self-check "
                                  f"on Apple M0 (test double), {device.os_build()}, MLX "
                                  f"{mx.__version__}: ")
    assert reason in messages[0] and "\n" not in messages[0]
    assert messages[0].endswith("Run `bonsai-mlx doctor` and paste its output in a bug report.")
    expected = np.array(reference.binary_matmul(x, packed, scales))
    np.testing.assert_array_equal(np.array(first), expected)
    np.testing.assert_array_equal(np.array(second), expected)
    assert kernel_doubles.CALLS == {"bonsai_packed_gemm": 1}  # the check, then never


def test_other_kernels_of_a_device_stay_in_use():
    x, packed, scales = binary_case(3)  # 3 rows: the small-M kernel, which works
    with fake_metal(kernel_doubles.gemm_compile_error), warnings.catch_warnings(record=True) as c:
        warnings.simplefilter("always")
        y = kernels.binary_matmul(x, packed, scales)
    assert fallback_warnings(c) == []
    assert kernels.kernel_path(3) == "reference"  # (the real device of this machine)
    np.testing.assert_allclose(np.array(y), np.array(reference.binary_matmul(x, packed, scales)),
                               rtol=1e-5, atol=1e-4)


def test_verdicts_are_cached_on_disk_and_a_corrupt_entry_is_a_miss(verdict_cache):
    with fake_metal(kernel_doubles.gemm_garbage), pytest.warns(KernelFallbackWarning):
        assert not selfcheck.usable("gemm", "binary", mx.float32)
    [entry] = verdict_cache.glob("gemm-binary-float32-*.json")
    record = json.loads(entry.read_text())
    assert record["usable"] is False and record["key"]["source"]
    assert set(record["key"]) == {"bonsai_mlx", "mlx", "os", "chip", "factory", "source"}
    assert kernel_doubles.CALLS == {"bonsai_packed_gemm": 1}

    selfcheck.forget()  # a new process: the verdict comes from disk, the kernel does not run
    with fake_metal(kernel_doubles.gemm_garbage), warnings.catch_warnings(record=True) as c:
        warnings.simplefilter("always")
        assert not selfcheck.usable("gemm", "binary", mx.float32)
    assert kernel_doubles.CALLS == {"bonsai_packed_gemm": 1}
    assert "(cached verdict)" in fallback_warnings(c)[0]

    for corrupt in ["{not json", json.dumps({"usable": True}), json.dumps(
            dict(record, key=dict(record["key"], mlx="0.0.1"), usable=True))]:
        entry.write_text(corrupt)
        selfcheck.forget()
        with fake_metal(kernel_doubles.gemm_garbage), warnings.catch_warnings(record=True):
            assert not selfcheck.usable("gemm", "binary", mx.float32)  # checked again
    assert kernel_doubles.CALLS == {"bonsai_packed_gemm": 4}
    assert json.loads(entry.read_text())["key"] == record["key"]  # rewritten whole


def test_a_changed_kernel_source_is_checked_again(verdict_cache, tmp_path, monkeypatch):
    # The cache key holds a hash of the kernel's sources (packed.h, its body, metal.py): a
    # rewritten kernel is never judged by the verdict of the one it replaced.
    with fake_metal(kernel_doubles.gemm_garbage), pytest.warns(KernelFallbackWarning):
        assert not selfcheck.usable("gemm", "binary", mx.float32)
    old_source = selfcheck.cache_key(device.current(), "gemm")["source"]
    gemv_source = metal.source_hash("gemv")
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal", "// Fused packed GEMM",
             "// (a changed comment)\n// Fused packed GEMM")
    assert metal.source_hash("gemm") != old_source
    assert metal.source_hash("gemv") == gemv_source  # the other kernels keep their verdicts
    selfcheck.forget()
    with fake_metal(kernel_doubles.gemm_garbage), warnings.catch_warnings(record=True) as c:
        warnings.simplefilter("always")
        assert not selfcheck.usable("gemm", "binary", mx.float32)
    assert "(cached verdict)" not in fallback_warnings(c)[0]  # checked again, not read
    assert kernel_doubles.CALLS == {"bonsai_packed_gemm": 2}
    assert len(list(verdict_cache.glob("gemm-binary-float32-*.json"))) == 2


def test_cache_folder_honours_xdg_and_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv("BONSAI_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert selfcheck.cache_dir() == tmp_path / "xdg" / "bonsai-mlx" / "kernels"
    monkeypatch.setenv("BONSAI_KERNEL_CACHE", str(tmp_path / "mine"))
    assert selfcheck.cache_dir() == tmp_path / "mine"


def test_an_unwritable_cache_only_costs_a_check(verdict_cache):
    verdict_cache.parent.mkdir(exist_ok=True)
    verdict_cache.write_text("a file where the cache folder should be")
    with fake_metal(kernel_doubles.emulated):
        assert selfcheck.usable("dequantize", "binary", mx.float32)


def test_reference_path_never_touches_a_custom_kernel(monkeypatch, verdict_cache):
    def no_kernels(**kwargs):
        raise AssertionError("BONSAI_KERNELS=reference built a custom kernel")

    monkeypatch.setenv("BONSAI_KERNELS", "reference")
    x, packed, scales = binary_case(20)
    with fake_metal(no_kernels), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = kernels.binary_matmul(x, packed, scales)
        kernels.dequantize_binary(packed, scales)
        kernels.ternary_matmul(*(make_input((600, 256), mx.float32)[:1]),
                               *make_weight("ternary", 8, 256)[:2])
    assert fallback_warnings(caught) == [] and not verdict_cache.exists()
    np.testing.assert_array_equal(np.array(y), np.array(reference.binary_matmul(x, packed,
                                                                                scales)))


def test_forced_metal_path_skips_the_self_check(monkeypatch):
    # BONSAI_KERNELS forces a path (for debugging and benchmarks): no check, no fallback.
    monkeypatch.setenv("BONSAI_KERNELS", "metal")
    x, packed, scales = binary_case(20)
    with fake_metal(kernel_doubles.gemm_garbage):
        y = kernels.binary_matmul(x, packed, scales)
    assert (np.array(y) == 3.0).all()


def test_isolated_self_check_survives_a_kernel_that_aborts_its_process(verdict_cache):
    # On a real device the check runs in a child process: a GPU fault aborts the process
    # from a Metal completion handler. The double aborts the child the same way.
    x, packed, scales = binary_case(3)
    with fake_metal("kernel_doubles:gemv_aborts", isolated=True), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = kernels.binary_matmul(x, packed, scales)
        found = selfcheck.verdicts([selfcheck.kernel_id(k, "binary", "float32")
                                    for k in selfcheck.KERNELS])
    assert "died with SIGABRT" in found["gemv/binary/float32"].reason
    assert found["gemm/binary/float32"].usable and found["dequantize/binary/float32"].usable
    assert len(fallback_warnings(caught)) == 1
    np.testing.assert_array_equal(np.array(y), np.array(reference.binary_matmul(x, packed,
                                                                                scales)))
    assert len(list(verdict_cache.glob("*.json"))) == 3  # the abort is the kernel's: cached


def test_a_child_that_cannot_start_falls_back_without_caching(verdict_cache):
    # A failure of the check's own process (here: its factory does not import) is not the
    # kernel's: fall back now, check again in the next process.
    with fake_metal("no_such_module:metal_kernel", isolated=True), \
            pytest.warns(KernelFallbackWarning, match="exited with status 1: "
                                                      "ModuleNotFoundError"):
        assert not selfcheck.usable("gemm", "ternary", mx.bfloat16)
    assert not list(verdict_cache.glob("*.json"))


@pytest.fixture(scope="module")
def binary_pack(tmp_path_factory):
    from bonsai_packs import dense_transformer_weights, write_bonsai_pack

    root = tmp_path_factory.mktemp("selfcheck-pack")
    return write_bonsai_pack(root / "pack", dense_transformer_weights("binary", seed=1), 1)


@pytest.mark.parametrize("double", [kernel_doubles.gemm_compile_error,
                                    kernel_doubles.gemm_garbage], ids=["compile-error",
                                                                       "garbage"])
def test_pipeline_image_with_a_failing_kernel_equals_the_reference_path_image(
        binary_pack, monkeypatch, double):
    # The tiny pipeline's packed layers see 16 image rows (fused GEMM: broken here) and 512+
    # text / joint rows (dequantize kernel, emulated: works). One warning, and the image is
    # the reference path's to the bit.
    from bonsai_mlx.pipeline import Pipeline

    from bonsai_packs import generate

    monkeypatch.setenv("BONSAI_KERNELS", "reference")
    reference_image = generate(Pipeline.from_pretrained(binary_pack, dtype="float32"))
    monkeypatch.delenv("BONSAI_KERNELS")
    with fake_metal(double), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = generate(Pipeline.from_pretrained(binary_pack, dtype="float32"))
    [message] = fallback_warnings(caught)
    assert message.startswith("Metal kernel gemm (binary, float32) failed its self-check")
    np.testing.assert_array_equal(image, reference_image)
    assert kernel_doubles.CALLS["bonsai_packed_gemm"] == 1  # the check, then never
    assert kernel_doubles.CALLS["bonsai_dequantize"] > 10  # the check, then every text row
