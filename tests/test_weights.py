import json
import struct

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import (
    check_weights,
    load_weights,
    parse_dtype,
    read_json,
    resolve_model_path,
    save_safetensors,
)

import mlx.core as mx
import numpy as np
import pytest


def test_sharded_folder_loads_every_shard(tmp_path):
    a = {"x.weight": mx.arange(6, dtype=mx.float32).reshape(2, 3)}
    b = {"y.weight": mx.ones((4,), dtype=mx.bfloat16)}
    save_safetensors(tmp_path / "m-00001-of-00002.safetensors", a)
    save_safetensors(tmp_path / "m-00002-of-00002.safetensors", b)
    index = {"weight_map": {"x.weight": "m-00001-of-00002.safetensors",
                            "y.weight": "m-00002-of-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    w = load_weights(tmp_path)
    assert sorted(w) == ["x.weight", "y.weight"]
    assert w["y.weight"].dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(w["x.weight"]), np.arange(6).reshape(2, 3))


def test_missing_shard_is_named(tmp_path):
    index = {"weight_map": {"x": "gone.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BonsaiError, match="gone.safetensors"):
        load_weights(tmp_path)


def test_truncated_file_gives_clear_error(tmp_path):
    f = tmp_path / "w.safetensors"
    save_safetensors(f, {"w": mx.ones((64, 64))})
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(BonsaiError, match="truncated"):
        load_weights(f)


def test_non_safetensors_file_gives_clear_error(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(struct.pack("<Q", 10**12) + b"garbage")
    with pytest.raises(BonsaiError, match="not a safetensors file"):
        load_weights(f)
    f.write_bytes(b"abc")
    with pytest.raises(BonsaiError, match="not a safetensors file"):
        load_weights(f)


def test_check_weights_lists_every_problem():
    w = {"a": mx.zeros((2, 2)), "b": mx.zeros((3,)), "extra": mx.zeros((1,))}
    with pytest.raises(BonsaiError) as e:
        check_weights(w, {"a": (2, 2), "b": (4,), "c": (1,)}, "model.safetensors")
    msg = str(e.value)
    assert "missing (1): c" in msg and "unexpected (1): extra" in msg and "b: file (3,)" in msg
    check_weights(w, {"a": (2, 2), "b": (3,), "extra": (1,)}, "ok")  # no error


def test_bad_json_names_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{nope")
    with pytest.raises(BonsaiError, match="config.json"):
        read_json(f)


def test_parse_dtype():
    assert parse_dtype("float32") == mx.float32
    with pytest.raises(BonsaiError, match="float64"):
        parse_dtype("float64")


def test_offline_uncached_repo_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(BonsaiError, match="not in the local Hugging Face cache"):
        resolve_model_path("someone/not-cached-model")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    save_safetensors(tmp_path / "a.safetensors", {"w": mx.ones((2,))})
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_aliases_resolve_to_repo_ids_and_typos_get_a_hint(tmp_path):
    from bonsai_mlx.weights import MODEL_ALIASES, resolve_model

    assert resolve_model("ternary") == MODEL_ALIASES["ternary"]
    assert resolve_model("owner/name") == "owner/name"
    assert resolve_model(tmp_path) == str(tmp_path)
    with pytest.raises(BonsaiError, match="did you mean 'ternary'"):
        resolve_model("ternery")
    with pytest.raises(BonsaiError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "folder"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(BonsaiError, match="is a file"):
        resolve_model(tmp_path / "f.txt")


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_gpu():
    expected = mx.bfloat16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32
    assert parse_dtype("auto") == expected


def test_saved_files_get_a_normal_mode(tmp_path):
    import os

    from bonsai_mlx.weights import write_json

    umask = os.umask(0o022)
    try:
        save_safetensors(tmp_path / "a.safetensors", {"w": mx.ones((2,))})
        write_json(tmp_path / "c.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o644
    assert read_json(tmp_path / "c.json") == {"a": 1}


def test_preferred_stem_wins_else_any_file(tmp_path):
    save_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", {"a": mx.ones((1,))})
    save_safetensors(tmp_path / "ae.safetensors", {"b": mx.ones((1,))})
    assert list(load_weights(tmp_path, "diffusion_pytorch_model")) == ["a"]
    assert list(load_weights(tmp_path, ("missing", "ae", "diffusion_pytorch_model"))) == ["b"]
    assert sorted(load_weights(tmp_path, "missing")) == ["a", "b"]  # no preferred stem: all


def test_config_values_of_the_wrong_type_name_the_file_and_key():
    from bonsai_mlx.models.transformer import Flux2TransformerConfig
    from bonsai_mlx.models.vae import VAEConfig
    from bonsai_mlx.scheduler import SchedulerConfig

    cfg = Flux2TransformerConfig.from_dict(
        {"num_attention_heads": 4, "attention_head_dim": 32, "axes_dims_rope": [8, 8, 8, 8],
         "out_channels": None, "rope_theta": 2000, "_class_name": "x"}, "t/config.json")
    assert cfg.axes_dims_rope == (8, 8, 8, 8) and cfg.out_channels == cfg.in_channels
    assert VAEConfig.from_dict({"patch_size": [2, 2]}).patch_size == (2, 2)
    with pytest.raises(BonsaiError, match=r"t/config.json: num_attention_heads must be an "
                                          r"integer, not '24'"):
        Flux2TransformerConfig.from_dict({"num_attention_heads": "24"}, "t/config.json")
    with pytest.raises(BonsaiError, match="guidance_embeds must be true or false, not 1"):
        Flux2TransformerConfig.from_dict({"guidance_embeds": 1})
    with pytest.raises(BonsaiError, match="block_out_channels must be a non-empty list"):
        VAEConfig.from_dict({"block_out_channels": 128})
    with pytest.raises(BonsaiError, match="s.json: shift must be a number, not 'three'"):
        SchedulerConfig.from_dict({"shift": "three"}, "s.json")


def test_folder_bytes_per_component_leave_hidden_files_out(tmp_path):
    from bonsai_mlx.weights import TOP_LEVEL, folder_bytes, human_bytes

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_bytes(b"x" * 10)
    (tmp_path / "vae" / "w.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "vae" / ".cache").mkdir()
    (tmp_path / "vae" / ".cache" / "big").write_bytes(b"x" * 1000)
    (tmp_path / "model_index.json").write_bytes(b"x" * 3)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"x" * 7)
    assert folder_bytes(tmp_path) == {"vae": 110, TOP_LEVEL: 3}
    assert folder_bytes(tmp_path, weights_only=True) == {"vae": 100}
    assert [human_bytes(n) for n in (999, 1000, 1_234_567, 3.89e9, 2e15)] == [
        "999 B", "1.00 kB", "1.23 MB", "3.89 GB", "2000.00 TB"]


def test_atomic_dir_replaces_only_on_success_and_leaves_nothing_behind(tmp_path):
    from bonsai_mlx.weights import atomic_dir

    dst = tmp_path / "out"
    with atomic_dir(dst) as tmp:
        (tmp / "a").write_text("new")
        assert not dst.exists()
    assert (dst / "a").read_text() == "new" and oct(dst.stat().st_mode)[-3:] != "700"
    with pytest.raises(BonsaiError, match="already exists"):
        with atomic_dir(dst):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(dst, overwrite=True) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash")
    assert (dst / "a").read_text() == "new"
    with atomic_dir(dst, overwrite=True) as tmp:
        (tmp / "b").write_text("replaced")
    assert sorted(p.name for p in dst.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders
    (tmp_path / "file").write_text("x")
    with pytest.raises(BonsaiError, match="is a file"):
        with atomic_dir(tmp_path / "file", overwrite=True):
            pass
