"""The sampling schedule against diffusers' FlowMatchEulerDiscreteScheduler (fixtures from
scripts/fixtures/make_pipeline.py) and the exact Euler / image-to-image math."""

import json
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.scheduler import (
    SchedulerConfig,
    compute_empirical_mu,
    euler_step,
    img2img_start_index,
    make_schedule,
)

import mlx.core as mx
import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "pipeline" / "scheduler.json"


@pytest.fixture(scope="module")
def reference():
    return json.loads(FIXTURE.read_text())


def test_schedule_matches_diffusers_for_every_config_size_and_step_count(reference):
    configs = {k: SchedulerConfig.from_dict(v) for k, v in reference["configs"].items()}
    assert len(reference["cases"]) > 200
    for case in reference["cases"]:
        cfg = configs[case["config"]]
        s = make_schedule(cfg, case["steps"], case["image_seq_len"], sigmas=case["custom_sigmas"])
        what = f"{case['config']} steps={case['steps']} seq={case['image_seq_len']}"
        assert compute_empirical_mu(case["image_seq_len"], case["steps"]) == case["mu"], what
        np.testing.assert_array_equal(s.sigmas, np.float32(case["sigmas"]), err_msg=what)
        np.testing.assert_array_equal(s.timesteps, np.float32(case["timesteps"]), err_msg=what)
        got = [s.model_timestep(i) for i in range(s.num_steps)]
        np.testing.assert_array_equal(np.float32(got), np.float32(case["model_timesteps"]),
                                      err_msg=what)


def test_mu_breakpoint_is_at_4300_tokens():
    # Above 4300 tokens mu no longer depends on the number of steps.
    assert compute_empirical_mu(4301, 4) == compute_empirical_mu(4301, 50)
    assert compute_empirical_mu(4300, 4) != compute_empirical_mu(4300, 50)


def test_klein_schedule_starts_at_one_and_ends_at_zero(reference):
    cfg = SchedulerConfig.from_dict(reference["configs"]["klein"])
    s = make_schedule(cfg, 4, 4096)
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0 and len(s.sigmas) == 5
    assert np.all(np.diff(s.sigmas) < 0)


def test_euler_step_is_x_plus_dt_times_v():
    x = mx.array(np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    v = mx.array(np.full((1, 2, 3), 2.0, np.float32))
    out = euler_step(x, v, 0.75, 0.25)
    np.testing.assert_array_equal(np.array(out), np.arange(6).reshape(1, 2, 3) - 1.0)
    assert out.dtype == mx.float32


def test_img2img_start_index_follows_strength():
    assert img2img_start_index(4, 1.0) == 0
    assert img2img_start_index(4, 0.5) == 2
    assert img2img_start_index(4, 0.3) == 2  # int(4 - 1.2) = 2
    assert img2img_start_index(10, 0.05) == 9


def test_unsupported_scheduler_settings_are_clear_errors():
    with pytest.raises(BonsaiError, match="use_karras_sigmas"):
        SchedulerConfig.from_dict({"use_karras_sigmas": True})
    with pytest.raises(BonsaiError, match="not supported"):
        SchedulerConfig.from_dict({"_class_name": "DDIMScheduler"})
    with pytest.raises(BonsaiError, match="time_shift_type"):
        SchedulerConfig.from_dict({"time_shift_type": "cosine"})
    with pytest.raises(BonsaiError, match="steps"):
        make_schedule(SchedulerConfig(), 0, 256)
