"""Diffusion samplers as pure functions: DDIM (with eta), DDPM and DPM-Solver++ (2M).

Everything that depends only on the step count is computed once on the host, in float64, and stored as one
row of coefficients per step (:class:`Schedule`). A step is then the same small linear formula for every
sampler, a pure function of (that row, sample, model output, previous x0 prediction, noise), so the whole loop
runs inside one ``jax.lax.scan``::

    x_prev = c.x0 * x0 + c.sample * x + c.eps * eps + c.history * (x0 - x0_prev) + c.noise * z

where ``x0`` and ``eps`` are the model's predictions of the clean sample and the noise (converted from
epsilon, v or sample prediction), ``x0_prev`` is the previous step's ``x0`` (DPM-Solver++ 2M only) and ``z``
fresh standard normal noise (DDIM with eta > 0, DDPM).

Settings of the original models (read from their code and configs):

* LaVie (``base/pipelines/sample.py``): diffusers' scheduler built from Stable Diffusion 1.4's
  ``scheduler_config.json`` (``steps_offset=1``, ``set_alpha_to_one=False``, ``clip_sample=False``, spacing
  "leading" by default) with ``beta_start=0.0001, beta_end=0.02, beta_schedule="linear"`` overridden from
  ``base/configs/sample.yaml``. The shipped config samples with DDPM (``sample_method: 'ddpm'``), 50 steps,
  guidance 7.5; DDIM (eta 0) is the other option of that script. :meth:`SchedulerConfig.lavie`.
* VideoCrafter1/2 (``lvdm/models/samplers/ddim.py``, ``configs/inference_t2v_512_v*.yaml``): betas
  ``linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`` in float64 (diffusers calls this "scaled_linear"),
  DDIM timesteps ``range(0, 1000, 1000 // S) + 1`` ("uniform" here), previous alpha of the last step
  ``alphas_cumprod[0]``; ``run_text2video.sh`` uses 50 steps, eta 1.0, guidance 12, fps 28 (v2).
  :meth:`SchedulerConfig.videocrafter`.
* ModelScope T2V (``text-to-video-ms-1.7b/scheduler/scheduler_config.json``): DDIM, scaled_linear
  0.00085..0.012, ``steps_offset=1``, ``set_alpha_to_one=False``, ``clip_sample=False``, spacing "leading".
  :meth:`SchedulerConfig.modelscope`.
* DPM-Solver++ (2M) follows diffusers' ``DPMSolverMultistepScheduler`` defaults (data prediction, order 2,
  midpoint update, first-order first and last steps, final sigma 0); the presets give it "linspace" spacing,
  what ``from_config`` of the SD 1.4 / ModelScope configs (which name no spacing) yields.

Numerics: betas and their cumulative product are computed in float64 and the product rounded to float32, as
VideoCrafter stores it (diffusers makes the betas in float32 and torch's ``cumprod`` accumulates them in double:
within 1e-6 relative of ours). The per-step coefficients are formed in float64 from those float32 values and
rounded once; the originals do this scalar arithmetic in float32, which near t = 0 (``1 - 0.9999``) costs them
about 1e-5 absolute per step (see ``tests/test_schedulers.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from jaxlongvid.configs import JsonConfig

KINDS = ("ddim", "ddpm", "dpmsolver++")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace", "uniform")
SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class SchedulerConfig(JsonConfig):
    """A sampler and its noise schedule (static; usable as a ``jax.jit`` static argument)."""

    kind: str = "ddim"  # ddim | ddpm | dpmsolver++
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # linear: linspace(b0, b1); scaled_linear: linspace(sqrt b0, sqrt b1)^2; squaredcos_cap_v2: the cosine
    # schedule (Nichol & Dhariwal 2021, betas capped at 0.999; beta_start / beta_end unused)
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    timestep_spacing: str = "leading"  # leading | trailing | linspace (diffusers) | uniform (LDM/VideoCrafter)
    steps_offset: int = 1  # added to "leading" timesteps
    set_alpha_to_one: bool = False  # DDIM: previous alpha of the last step is 1 (else alphas_cumprod[0])
    clip_sample: bool = False  # clip the x0 prediction to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    eta: float = 0.0  # DDIM's default eta (sample() may override it)
    solver_type: str = "midpoint"  # DPM-Solver++ second-order update: midpoint | heun
    lower_order_final: bool = True  # DPM-Solver++: first-order last step (always, with a zero final sigma)

    def __post_init__(self):
        for attr, allowed in (("kind", KINDS), ("beta_schedule", BETA_SCHEDULES),
                              ("prediction_type", PREDICTIONS), ("timestep_spacing", SPACINGS),
                              ("solver_type", SOLVER_TYPES)):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"SchedulerConfig.{attr} must be one of {allowed}, got {getattr(self, attr)!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.kind == "dpmsolver++" and self.timestep_spacing == "uniform":
            raise ValueError("timestep_spacing='uniform' is the LDM DDIM spacing; DPM-Solver++ takes "
                             "leading, trailing or linspace")

    # ---- the originals' settings ---------------------------------------------------------------------------
    @classmethod
    def lavie(cls, kind: str = "ddim") -> "SchedulerConfig":
        """LaVie base: SD 1.4's scheduler config with linear betas 1e-4..0.02 (``kind="ddpm"`` as shipped)."""
        return cls(kind=kind, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                   timestep_spacing=_default_spacing(kind), steps_offset=1, set_alpha_to_one=False,
                   clip_sample=False)

    @classmethod
    def videocrafter(cls) -> "SchedulerConfig":
        """VideoCrafter1/2: LDM DDIM, sqrt-linear betas 0.00085..0.012, uniform spacing (+1), eta 1."""
        return cls(kind="ddim", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   timestep_spacing="uniform", set_alpha_to_one=False, clip_sample=False, eta=1.0)

    @classmethod
    def modelscope(cls, kind: str = "ddim") -> "SchedulerConfig":
        """ModelScope T2V (diffusers ``text-to-video-ms-1.7b``): DDIM, scaled_linear, leading + 1."""
        return cls(kind=kind, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   timestep_spacing=_default_spacing(kind), steps_offset=1, set_alpha_to_one=False,
                   clip_sample=False)


def _default_spacing(kind: str) -> str:
    """What diffusers' ``from_config`` picks when the config file names no spacing (SD 1.4, ModelScope):
    each scheduler class's own default."""
    return "linspace" if kind == "dpmsolver++" else "leading"


# ---- the noise schedule ---------------------------------------------------------------------------------------
def betas(config: SchedulerConfig) -> np.ndarray:
    """Training betas, float64 ``[T]``."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    if config.beta_schedule == "squaredcos_cap_v2":
        # alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2); its signal-to-noise ratio reaches ~0 at t = T,
        # so sampling from pure noise matches training (no low-frequency signal leaks through the last step)
        t = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    return np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=np.float64) ** 2


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """``prod_{s <= t} (1 - beta_s)``, computed in float64 and rounded to float32 (see module docstring)."""
    return np.cumprod(1.0 - betas(config)).astype(np.float32)


def timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """The model timesteps of an S-step run, descending, int64 (as the original scheduler sets them).

    DPM-Solver++ spaces S + 1 points and drops the last (diffusers' ``DPMSolverMultistepScheduler``); "uniform"
    is LDM's ``range(0, T, T // S) + 1``, which has more than S entries when S does not divide T.
    """
    s = _check_steps(config, num_inference_steps)
    t_max = config.num_train_timesteps
    extra = 1 if config.kind == "dpmsolver++" else 0
    spacing = config.timestep_spacing
    if spacing == "leading":
        ratio = t_max // (s + extra)
        ts = (np.arange(0, s + extra) * ratio).round()[::-1][:s].astype(np.int64) + config.steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, t_max - 1, s + extra).round()[::-1][:s].astype(np.int64)
    elif spacing == "trailing":
        ts = np.round(np.arange(t_max, 0, -t_max / s)).astype(np.int64) - 1
    else:  # uniform
        ts = (np.arange(0, t_max, t_max // s) + 1)[::-1].astype(np.int64)
    if ts.min() < 0 or ts.max() >= t_max:
        raise ValueError(f"{s} steps with spacing {spacing!r} and steps_offset {config.steps_offset} give "
                         f"timesteps outside [0, {t_max}): {ts.min()}..{ts.max()}")
    return ts.copy()


def _check_steps(config: SchedulerConfig, num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
    if not 1 <= num_inference_steps <= config.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {config.num_train_timesteps}], "
                         f"got {num_inference_steps}")
    return int(num_inference_steps)


class Schedule(NamedTuple):
    """One row per step: the model timestep and the coefficients of the update (float32 ``[S]``)."""

    timestep: np.ndarray  # int32: what the model is called with
    sqrt_alpha: np.ndarray  # sqrt(alphas_cumprod[t]): converts the model output to x0 / eps
    sqrt_one_minus_alpha: np.ndarray
    x0: np.ndarray  # coefficient of the x0 prediction
    sample: np.ndarray  # ... of the current sample
    eps: np.ndarray  # ... of the eps prediction
    history: np.ndarray  # ... of (x0 - previous x0) (DPM-Solver++ 2M)
    noise: np.ndarray  # standard deviation of fresh noise

    @property
    def num_steps(self) -> int:
        return int(self.timestep.shape[0])

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.noise > 0))


def make_schedule(config: SchedulerConfig, num_inference_steps: int, eta: Optional[float] = None) -> Schedule:
    """Per-step coefficients of an S-step run of ``config.kind`` (``eta`` overrides ``config.eta``; DDIM only)."""
    eta = config.eta if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = timesteps(config, num_inference_steps)
    abar = alphas_cumprod(config).astype(np.float64)
    build = {"ddim": _ddim_rows, "ddpm": _ddpm_rows, "dpmsolver++": _dpm_rows}[config.kind]
    rows = build(config, ts, abar, eta)
    a = abar[ts]
    f32 = lambda x: np.asarray(x, np.float64).astype(np.float32)
    return Schedule(timestep=ts.astype(np.int32), sqrt_alpha=f32(np.sqrt(a)),
                    sqrt_one_minus_alpha=f32(np.sqrt(1.0 - a)), **{k: f32(v) for k, v in rows.items()})


def _zeros(n):
    return np.zeros(n, np.float64)


def _ddim_rows(config, ts, abar, eta):
    """DDIM (Song et al. eq. 12/16): x_prev = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z."""
    if config.timestep_spacing == "uniform":  # LDM: the previous alpha is the next timestep's
        prev = np.concatenate([ts[1:], [-1]])
    else:  # diffusers: t - T // S, whatever the spacing
        prev = ts - config.num_train_timesteps // len(ts)
    final = 1.0 if config.set_alpha_to_one else abar[0]
    a = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    std = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    n = len(ts)
    return dict(x0=np.sqrt(a_prev), sample=_zeros(n), eps=np.sqrt(1 - a_prev - std ** 2), history=_zeros(n),
                noise=std)


def _ddpm_rows(config, ts, abar, eta):
    """DDPM posterior mean (Ho et al. eq. 7) between consecutive timesteps, "fixed_small" variance."""
    prev = np.concatenate([ts[1:], [-1]])
    a = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)
    beta_t = 1 - a / a_prev
    variance = np.maximum((1 - a_prev) / (1 - a) * beta_t, 1e-20)  # diffusers' clamp (noise only for t > 0)
    n = len(ts)
    return dict(x0=np.sqrt(a_prev) * beta_t / (1 - a), sample=np.sqrt(a / a_prev) * (1 - a_prev) / (1 - a),
                eps=_zeros(n), history=_zeros(n), noise=np.where(ts > 0, np.sqrt(variance), 0.0))


def _dpm_rows(config, ts, abar, eta):
    """DPM-Solver++ multistep, order 2 (Lu et al. 2022), data prediction, final sigma 0.

    With lambda = log(alpha / sigma) and h = lambda_next - lambda_now:
    first order  x' = (sigma'/sigma) x + alpha' (1 - e^-h) x0;
    second order adds (m0 - m1) / r0 times -0.5 alpha' (e^-h - 1) (midpoint) or alpha' ((e^-h - 1)/h + 1)
    (heun), r0 = h_prev / h. First order on the first step and on the last (diffusers' lower_order_final with
    final sigma 0).
    """
    sig = np.concatenate([np.sqrt((1 - abar[ts]) / abar[ts]), [0.0]])  # VP sigma ratio; final sigma 0
    alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the final sigma 0
    n = len(ts)
    x0, sample, history = _zeros(n), _zeros(n), _zeros(n)
    for i in range(n):
        h = lam[i + 1] - lam[i]
        decay = np.exp(-h)  # 0 at the final step
        sample[i] = sigma[i + 1] / sigma[i]
        x0[i] = -alpha[i + 1] * (decay - 1.0)
        last = i == n - 1
        if i == 0 or last:  # first order (lower_order_final with final sigma 0 always lowers the last step)
            continue
        r0 = (lam[i] - lam[i - 1]) / h
        if config.solver_type == "midpoint":
            history[i] = -0.5 * alpha[i + 1] * (decay - 1.0) / r0
        else:
            history[i] = alpha[i + 1] * ((decay - 1.0) / h + 1.0) / r0
    return dict(x0=x0, sample=sample, eps=_zeros(n), history=history, noise=_zeros(n))


# ---- one step -------------------------------------------------------------------------------------------------
def predict(config: SchedulerConfig, row: Schedule, sample, model_output):
    """The model output as (x0, eps) predictions at this step's timestep (float32)."""
    sa = row.sqrt_alpha
    s1 = row.sqrt_one_minus_alpha
    if config.prediction_type == "epsilon":
        x0, eps = (sample - s1 * model_output) / sa, model_output
    elif config.prediction_type == "v_prediction":
        x0, eps = sa * sample - s1 * model_output, sa * model_output + s1 * sample
    else:
        x0, eps = model_output, (sample - sa * model_output) / s1
    if config.clip_sample:
        x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0, eps


def step(config: SchedulerConfig, row: Schedule, sample, model_output, prev_x0=None, noise=None):
    """One update: ``row`` is this step's slice of a :class:`Schedule` (scalars, possibly traced).

    Returns ``(next_sample, x0)``; pass ``x0`` back as ``prev_x0`` to the next step (DPM-Solver++ needs it; on
    the first step it is ignored because that step's history coefficient is 0). ``noise`` (standard normal,
    sample's shape) is needed when the schedule is stochastic.
    """
    sample = jnp.asarray(sample, jnp.float32)
    model_output = jnp.asarray(model_output, jnp.float32)
    x0, eps = predict(config, row, sample, model_output)
    out = row.x0 * x0 + row.sample * sample + row.eps * eps
    if prev_x0 is not None:
        out = out + row.history * (x0 - prev_x0)
    if noise is not None:
        out = out + row.noise * noise
    return out, x0


def row_at(schedule: Schedule, i: int) -> Schedule:
    """Step ``i``'s row (host-side helper; inside ``lax.scan`` the rows come as the scanned slices)."""
    return Schedule(*(np.asarray(field)[i] for field in schedule))
