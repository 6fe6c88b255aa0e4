"""Diffusion samplers as pure functions: DDIM (with eta), DDPM and DPM-Solver++ (2M); and for flow-matching
models (Wan) UniPC and Euler on shifted flow sigmas (:class:`FlowSchedule`, :func:`flow_step`, at the end).

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

FLOW_KINDS = ("unipc-flow", "euler-flow")  # flow matching (Wan): see "flow matching" below
KINDS = ("ddim", "ddpm", "dpmsolver++") + FLOW_KINDS
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
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
    flow_shift: float = 1.0  # flow matching: sigma -> shift sigma / (1 + (shift - 1) sigma) (Wan 480p: 3.0)

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
        if (self.kind in FLOW_KINDS) != (self.prediction_type == "flow"):
            raise ValueError(f"prediction_type 'flow' goes with the flow-matching kinds {FLOW_KINDS} and only "
                             f"with them; got kind={self.kind!r}, prediction_type={self.prediction_type!r}")
        if not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift}")
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

    @classmethod
    def wan(cls, kind: str = "unipc-flow", flow_shift: float = 3.0) -> "SchedulerConfig":
        """Wan2.1 T2V (diffusers ``Wan2.1-T2V-*-Diffusers/scheduler``): UniPC on flow sigmas, shift 3 (480p;
        the original uses 5 at 720p); ``kind="euler-flow"`` for flow-matching Euler."""
        return cls(kind=kind, prediction_type="flow", flow_shift=flow_shift)


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
    """The model timesteps of an S-step run, descending, int64 (as the original scheduler sets them; float32 for
    ``euler-flow``, see :func:`flow_timesteps`).

    DPM-Solver++ spaces S + 1 points and drops the last (diffusers' ``DPMSolverMultistepScheduler``); "uniform"
    is LDM's ``range(0, T, T // S) + 1``, which has more than S entries when S does not divide T.
    """
    s = _check_steps(config, num_inference_steps)
    if config.kind in FLOW_KINDS:
        return flow_timesteps(config, s)
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
    if config.kind in FLOW_KINDS:
        return make_flow_schedule(config, num_inference_steps)
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
    return type(schedule)(*(np.asarray(field)[i] for field in schedule))


# ---- flow matching (Wan) --------------------------------------------------------------------------------------------
# The sample is x_sigma = (1 - sigma) x0 + sigma noise and the model predicts the velocity v = noise - x0, so
# x0 = x - sigma v. Sigmas are shifted, sigma -> shift sigma / (1 + (shift - 1) sigma), and the model is called at
# timestep 1000 sigma. Two samplers, each as diffusers' Wan pipeline runs it:
#
# * "unipc-flow": ``UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
#   solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")``
#   (Zhao et al. 2023, UniPC-2 with the B(h) = e^h - 1 variant) with sigmas ``linspace(1, 1/T, S + 1)[:-1]``,
#   shifted, the first lowered by 1e-6, integer timesteps ``int(1000 sigma)``, a final sigma 0. Each step first
#   corrects the previous predictor's output with the new x0 prediction (UniC, from the second step on), then
#   predicts (UniP; first order on the first and last steps). Both are linear in the stored samples, so a row
#   holds their coefficients:
#       x_c    = c.sample x + c.last x_last + c.this x0 + c.prev x0_prev + c.prev2 x0_prev2
#       x_next = p.sample x_c + p.this x0 + p.prev x0_prev + p.velocity v
#   with ``x_last`` the previous step's corrected sample and ``x0_prev``, ``x0_prev2`` the two previous x0s.
# * "euler-flow": ``FlowMatchEulerDiscreteScheduler(shift=...)``: ``x_next = x + (sigma' - sigma) v`` (the same
#   rows with only ``c.sample = p.sample = 1`` and ``p.velocity = sigma' - sigma``); its sigmas are diffusers',
#   float timesteps ``linspace(1000 sigma_max, 1000 sigma_min, S)`` shifted (sigma_min is itself the shifted
#   ``1 / T``, so it is shifted twice, as there), float timesteps ``1000 sigma``.
#
# Coefficients are formed in float64 from diffusers' float32 sigmas and rounded once.


class FlowSchedule(NamedTuple):
    """One row per flow-matching step (float32 ``[S]``; see the notes above)."""

    timestep: np.ndarray  # what the model is called with (float32; integer-valued for UniPC)
    sigma: np.ndarray  # converts the velocity to x0: x0 = x - sigma v
    c_sample: np.ndarray
    c_last: np.ndarray
    c_this: np.ndarray
    c_prev: np.ndarray
    c_prev2: np.ndarray
    p_sample: np.ndarray
    p_this: np.ndarray
    p_prev: np.ndarray
    p_velocity: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.timestep.shape[0])

    @property
    def stochastic(self) -> bool:
        return False


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow-matching time shift ``shift sigma / (1 + (shift - 1) sigma)`` (SD3 / Wan)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _unipc_sigmas64(config: SchedulerConfig, s: int) -> np.ndarray:
    """UniPC's shifted flow sigmas in float64 (before the final 0), the first lowered by 1e-6 if it is 1."""
    sig = shift_sigmas(np.linspace(1, 1 / config.num_train_timesteps, s + 1)[:-1], config.flow_shift)
    if abs(sig[0] - 1) < 1e-6:
        sig[0] -= 1e-6  # as diffusers: keeps log(alpha) finite
    return sig


def flow_sigmas(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """float32 ``[S + 1]``: the sigmas of an S-step run of ``config.kind``, ending with 0 (see the notes)."""
    s, t_max = _check_steps(config, num_inference_steps), config.num_train_timesteps
    if config.kind == "unipc-flow":
        sig = _unipc_sigmas64(config, s)
    else:
        train = np.linspace(1, t_max, t_max, dtype=np.float32)[::-1] / np.float32(t_max)
        train = shift_sigmas(train, np.float32(config.flow_shift)).astype(np.float32)
        ends = np.float64(train[0]) * t_max, np.float64(train[-1]) * t_max  # diffusers: float64 from here
        sig = shift_sigmas(np.linspace(*ends, s) / t_max, float(config.flow_shift))
    return np.concatenate([np.asarray(sig, np.float32), [np.float32(0)]]).astype(np.float32)


def flow_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """Model timesteps of an S-step flow run: ``int64(1000 sigma)`` for UniPC (as diffusers casts them), float32
    ``1000 sigma`` for Euler."""
    if config.kind == "unipc-flow":  # diffusers: from the float64 shifted sigmas, truncated
        sig = _unipc_sigmas64(config, _check_steps(config, num_inference_steps))
        return (sig * config.num_train_timesteps).astype(np.int64)
    sig = flow_sigmas(config, num_inference_steps)[:-1]
    return (sig.astype(np.float32) * np.float32(config.num_train_timesteps)).astype(np.float32)


def _lambda(sigma: float) -> float:
    """log(alpha / sigma) of the flow path (alpha = 1 - sigma); +inf at sigma 0."""
    with np.errstate(divide="ignore"):
        return float(np.log(1.0 - sigma) - np.log(sigma))


def _unipc_coefficients(sig: np.ndarray, i: int, order: int, corrector: bool) -> dict:
    """UniP (``corrector=False``: from step i to i+1) or UniC (re-doing step i-1 -> i) coefficients, bh2, x0 form.

    With target sigma ``st``, source ``s0``, ``h = lambda_t - lambda_s0``, ``phi = expm1(-h)``, ``B = phi``:
    ``x_t = (st / s0) x - a_t phi m0 - a_t B sum_k rho_k D_k`` where ``D_k = (m_k - m0) / r_k`` are the scaled
    differences to earlier x0s (``r_k = (lambda_k - lambda_s0) / h``); UniC adds ``rho_last (m_this - m0)``.
    """
    t, s0 = (i, i - 1) if corrector else (i + 1, i)
    st, ss0 = float(sig[t]), float(sig[s0])
    alpha_t = 1.0 - st
    h = _lambda(st) - _lambda(ss0)
    phi = np.expm1(-h)
    out = dict(sample=st / ss0, m0=-alpha_t * phi, m1=0.0, this=0.0)
    if corrector:
        if order == 1:
            rho_last, rho = 0.5, None
        else:  # order 2: solve R rho = b for the two UniC weights
            rk = (_lambda(float(sig[s0 - 1])) - _lambda(ss0)) / h
            hh = -h
            b1 = (phi / hh - 1) / phi
            b2 = ((phi / hh - 1) / hh - 0.5) * 2 / phi
            rho, rho_last = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
            out["m1"] += -alpha_t * phi * rho / rk
            out["m0"] += alpha_t * phi * rho / rk
        out["this"] = -alpha_t * phi * rho_last
        out["m0"] += alpha_t * phi * rho_last
    elif order == 2:
        rk = (_lambda(float(sig[s0 - 1])) - _lambda(ss0)) / h
        out["m1"] = -alpha_t * phi * 0.5 / rk
        out["m0"] += alpha_t * phi * 0.5 / rk
    return out


def make_flow_schedule(config: SchedulerConfig, num_inference_steps: int) -> FlowSchedule:
    """Per-step rows of an S-step flow-matching run (``unipc-flow`` or ``euler-flow``)."""
    sig = flow_sigmas(config, num_inference_steps).astype(np.float64)
    n = len(sig) - 1
    rows = {name: np.zeros(n) for name in FlowSchedule._fields}
    rows["timestep"] = flow_timesteps(config, num_inference_steps).astype(np.float64)
    rows["sigma"] = sig[:-1]
    rows["c_sample"][:] = 1.0
    rows["p_sample"][:] = 1.0
    if config.kind == "euler-flow":
        rows["p_velocity"] = sig[1:] - sig[:-1]
    else:
        for i in range(n):
            if i > 0:  # UniC of the previous step's prediction, at that step's order
                c = _unipc_coefficients(sig, i, 1 if i == 1 else 2, corrector=True)
                rows["c_sample"][i], rows["c_last"][i] = 0.0, c["sample"]
                rows["c_prev"][i], rows["c_prev2"][i], rows["c_this"][i] = c["m0"], c["m1"], c["this"]
            p = _unipc_coefficients(sig, i, 1 if i in (0, n - 1) else 2, corrector=False)
            rows["p_sample"][i], rows["p_this"][i], rows["p_prev"][i] = p["sample"], p["m0"], p["m1"]
    return FlowSchedule(**{k: np.asarray(v, np.float64).astype(np.float32) for k, v in rows.items()})


def flow_step(row: FlowSchedule, carry, velocity):
    """One flow-matching update. ``carry = (x, x_last, x0_prev, x0_prev2)`` (start: ``(noise, 0, 0, 0)``);
    returns the next carry, whose first entry is the new sample."""
    x, last, prev, prev2 = (jnp.asarray(a, jnp.float32) for a in carry)
    v = jnp.asarray(velocity, jnp.float32)
    x0 = x - row.sigma * v
    x_c = row.c_sample * x + row.c_last * last + row.c_this * x0 + row.c_prev * prev + row.c_prev2 * prev2
    x_next = row.p_sample * x_c + row.p_this * x0 + row.p_prev * prev + row.p_velocity * v
    return x_next, x_c, x0, prev


# ---- one interface for the sampling loop ----------------------------------------------------------------------
def init_carry(schedule, latents):
    """The loop's starting state for ``schedule``'s sampler: ``(x, x0_prev)`` for :class:`Schedule`,
    ``(x, x_last, x0_prev, x0_prev2)`` for :class:`FlowSchedule`; the first entry is always the sample."""
    x = jnp.asarray(latents, jnp.float32)
    extra = 3 if isinstance(schedule, FlowSchedule) else 1
    return (x,) + tuple(jnp.zeros_like(x) for _ in range(extra))


def advance(config: SchedulerConfig, row, carry, model_output, noise=None):
    """One update of the state from :func:`init_carry` with this step's ``row`` and model output."""
    if isinstance(row, FlowSchedule):
        return flow_step(row, carry, model_output)
    x, x0 = step(config, row, carry[0], model_output, carry[1], noise)
    return x, x0
