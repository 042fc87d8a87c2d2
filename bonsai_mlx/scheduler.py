"""FlowMatch Euler sampling schedule for FLUX.2 [klein].

Reproduces diffusers' `FlowMatchEulerDiscreteScheduler` exactly as `Flux2KleinPipeline`
drives it: sigmas `linspace(1, 1/N, N)` (or custom ones), the time shift chosen by
`scheduler_config.json` (resolution-dependent with FLUX.2's empirical mu, or a static
shift), an optional stretch to `shift_terminal`, a final 0 appended. The arithmetic is done
in float32 in the same order as diffusers, so sigmas and timesteps match bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx.checks import BaseConfig, flag, integer, number
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import read_json

import mlx.core as mx
import numpy as np

MAX_STEPS = 1000  # a bound on work: diffusers' schedules have 1000 training timesteps
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "stochastic_sampling")
# diffusers' fields that FLUX.2's schedule does not read (`compute_empirical_mu` sets the
# shift): still checked, so that a broken value is an error rather than silently ignored.
_UNUSED_NUMBERS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift (diffusers' `compute_empirical_mu`).

    Linear in the image sequence length above 4300 tokens; below, interpolated between fits
    made at 10 and 200 steps.
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


@dataclass(frozen=True)
class SchedulerConfig(BaseConfig):
    """The fields of `scheduler/scheduler_config.json` that change the schedule."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    use_flow_sigmas: bool = False

    def __post_init__(self) -> None:
        def put(name, value):  # frozen: fields are normalised once, here
            object.__setattr__(self, name, value)

        put("num_train_timesteps", integer(self.num_train_timesteps, "num_train_timesteps",
                                           low=1))
        put("shift", number(self.shift, "shift", positive=True))
        for name in ("use_dynamic_shifting", "invert_sigmas", "use_flow_sigmas"):
            put(name, flag(getattr(self, name), name))
        if self.time_shift_type not in ("exponential", "linear"):
            raise BonsaiError(f"time_shift_type {self.time_shift_type!r} must be "
                              "'exponential' or 'linear'")
        if self.shift_terminal is not None:
            terminal = number(self.shift_terminal, "shift_terminal")
            if not 0 <= terminal < 1:
                raise BonsaiError(f"shift_terminal must be in [0, 1), not {terminal}")
            put("shift_terminal", terminal)

    @classmethod
    def from_dict(cls, d: dict, source: str = "scheduler config") -> SchedulerConfig:
        cls_name = d.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if cls_name != "FlowMatchEulerDiscreteScheduler":
            raise BonsaiError(
                f"{source}: scheduler {cls_name!r} is not supported; FLUX.2 [klein] uses "
                "FlowMatchEulerDiscreteScheduler"
            )
        used = [k for k in _UNSUPPORTED if d.get(k)]
        if used:
            raise BonsaiError(f"{source}: {', '.join(used)} is not supported; set it to false")
        for name in _UNUSED_NUMBERS:
            if d.get(name) is not None:
                number(d[name], f"{source}: {name}")
        return super().from_dict(d, source)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> SchedulerConfig:
        """Read `<folder>/scheduler_config.json` (a pipeline's `scheduler/` folder)."""
        path = Path(folder) / "scheduler_config.json"
        return cls.from_dict(read_json(path), str(path))


@dataclass(frozen=True)
class Schedule:
    """`sigmas` (N + 1, float32, last one terminal) and model `timesteps` (N, float32)."""

    sigmas: np.ndarray
    timesteps: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def model_timestep(self, i: int) -> float:
        # diffusers hands the transformer `timestep / 1000` in float32.
        return float(self.timesteps[i] / np.float32(1000))

    def start_at(self, index: int) -> Schedule:
        """The tail of the schedule from step `index` on (image-to-image)."""
        return Schedule(self.sigmas[index:], self.timesteps[index:])


def _time_shift(config: SchedulerConfig, mu: float, t: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):  # sigma 0 -> shifted sigma 0, as in diffusers
        if config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
        return mu / (mu + (1 / t - 1) ** 1.0)


def _static_shift(shift: float, s: np.ndarray) -> np.ndarray:
    return shift * s / (1 + (shift - 1) * s)


def make_schedule(
    config: SchedulerConfig,
    num_steps: int,
    image_seq_len: int,
    sigmas: list[float] | np.ndarray | None = None,
) -> Schedule:
    """The sampling schedule for `num_steps` steps over `image_seq_len` image tokens.

    `sigmas`, when given, replaces `linspace(1, 1/N, N)` and sets the number of steps;
    the configured shift is still applied to it, as in diffusers.
    """
    if sigmas is not None:
        s = np.array(sigmas, dtype=np.float64).astype(np.float32)
        if s.ndim != 1 or not 1 <= len(s) <= MAX_STEPS:
            raise BonsaiError(f"sigmas must be a 1-D list of 1 to {MAX_STEPS} floats, got "
                              f"shape {s.shape}")
        num_steps = len(s)
    else:
        if not 1 <= num_steps <= MAX_STEPS:
            raise BonsaiError(f"steps must be in 1..{MAX_STEPS}, got {num_steps}")
        if config.use_flow_sigmas:
            # diffusers drops the pipeline's sigmas then: the scheduler's own spacing.
            s = _default_sigmas(config, num_steps)
        else:
            s = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    mu = compute_empirical_mu(image_seq_len, num_steps)
    if config.use_dynamic_shifting:
        s = _time_shift(config, mu, s)
    else:
        s = _static_shift(config.shift, s)
    if config.shift_terminal:
        one_minus = 1 - s
        with np.errstate(divide="ignore", invalid="ignore"):  # NaN where diffusers has NaN
            s = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    s = np.asarray(s, dtype=np.float32)
    n = np.float32(config.num_train_timesteps)
    timesteps = s * n
    if config.invert_sigmas:
        s = np.float32(1.0) - s
        timesteps = s * n
        s = np.concatenate([s, np.ones(1, np.float32)])
    else:
        s = np.concatenate([s, np.zeros(1, np.float32)])
    return Schedule(s.astype(np.float32), timesteps.astype(np.float32))


def _default_sigmas(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    # The scheduler's own training sigmas (statically shifted unless dynamic), then a
    # linspace between their extremes, as diffusers' set_timesteps does with no sigmas.
    n = config.num_train_timesteps
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    if not config.use_dynamic_shifting:
        train = _static_shift(config.shift, train).astype(np.float32)
    t = np.linspace(float(train[0]) * n, float(train[-1]) * n, num_steps)
    return (t / n).astype(np.float32)


def img2img_start_index(num_steps: int, strength: float) -> int:
    """First step to run for image-to-image at `strength` (diffusers' Flux img2img rule)."""
    init = min(num_steps * strength, num_steps)
    return int(max(num_steps - init, 0))


def euler_step(x: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """One Euler step of the flow ODE: `x + (sigma_next - sigma) * v`, in float32."""
    dt = float(np.float32(sigma_next) - np.float32(sigma))
    return x.astype(mx.float32) + dt * velocity.astype(mx.float32)


def denoised_estimate(x: mx.array, x_next: mx.array, sigma: float,
                      sigma_next: float) -> mx.array:
    """The clean latents an Euler step from `x` (at sigma) to `x_next` (at sigma_next) is
    heading for: `x - sigma * v`, v recovered from the step (after the last step, x_next)."""
    dt = float(np.float32(sigma_next) - np.float32(sigma))
    return x - sigma * ((x_next - x) / dt)


def noise_latents(z: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """Flow-matching forward process: sigma * noise + (1 - sigma) * z."""
    return sigma * noise + (1.0 - sigma) * z
