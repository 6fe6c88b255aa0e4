"""Scheduler parity with diffusers' DDIMScheduler, DDPMScheduler and DPMSolverMultistepScheduler.

Each test runs a whole S-step chain on random arrays: the same model outputs (a fixed random "model" that
depends on the sample and the step) and the same noise are fed to diffusers' ``step`` and to ours, and every
intermediate sample is compared. Tolerance: 1e-5 (absolute and relative, float32).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from jaxlongvid import schedulers
from jaxlongvid.schedulers import SchedulerConfig

TOL = dict(rtol=1e-5, atol=1e-5)
SHAPE = (2, 4, 3, 5, 6)


def _diffusers(config: SchedulerConfig, float64: bool):
    common = dict(num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start,
                  beta_end=config.beta_end, beta_schedule=config.beta_schedule,
                  prediction_type=config.prediction_type, timestep_spacing=config.timestep_spacing,
                  steps_offset=config.steps_offset)
    if config.kind == "ddim":
        ref = DDIMScheduler(**common, clip_sample=config.clip_sample, set_alpha_to_one=config.set_alpha_to_one)
    elif config.kind == "ddpm":
        ref = DDPMScheduler(**common, clip_sample=config.clip_sample)
    else:
        ref = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                          solver_type=config.solver_type, lower_order_final=True)
    if float64:  # same formulas, scalar arithmetic in float64 on our float32 alphas_cumprod
        abar = torch.from_numpy(schedulers.alphas_cumprod(config).astype(np.float64))
        ref.alphas_cumprod = abar
        if config.kind == "ddim":
            ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if config.set_alpha_to_one else abar[0]
        if config.kind == "dpmsolver++":
            ref.sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    return ref


def _fake_model(x, t, prediction, alphas_cumprod, i):
    """A near-ideal denoiser for a fixed clean sample, plus a little step-dependent error."""
    rng = np.random.default_rng(100 + i)
    x0 = np.tanh(np.linspace(-2, 2, x.size)).reshape(x.shape)
    a = float(alphas_cumprod[t])
    eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    out = np.sqrt(a) * eps - np.sqrt(1 - a) * x0 if prediction == "v_prediction" else eps
    return (out + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)


def _diffusers_step(ref, config, out, t, x, eta, noise):
    out, x = torch.from_numpy(out), torch.from_numpy(x)
    if config.kind == "ddim":
        return ref.step(out, t, x, eta=eta, variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
    if config.kind == "ddpm":  # DDPM draws its own noise: hand it the same numbers
        import diffusers.schedulers.scheduling_ddpm as ddpm_module
        saved = ddpm_module.randn_tensor
        ddpm_module.randn_tensor = lambda *a, **k: torch.from_numpy(noise)
        try:
            return ref.step(out, t, x).prev_sample.numpy()
        finally:
            ddpm_module.randn_tensor = saved
    return ref.step(out, t, x).prev_sample.numpy()


def _run_both(config: SchedulerConfig, steps: int, eta: float = 0.0, float64: bool = True, tol=TOL) -> float:
    """Step by step from the same inputs (diffusers' previous output); returns the max abs difference."""
    ref = _diffusers(config, float64)
    ref.set_timesteps(steps)
    if float64 and config.kind == "dpmsolver++":  # set_timesteps rebuilt float32 sigmas: redo them in float64
        sig = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
        ref.sigmas = torch.cat([sig[ref.timesteps], torch.zeros(1, dtype=torch.float64)])
    sched = schedulers.make_schedule(config, steps, eta=eta)
    np.testing.assert_array_equal(sched.timestep, ref.timesteps.numpy())
    abar = ref.alphas_cumprod.numpy()
    rng = np.random.default_rng(0)
    x_ref = rng.standard_normal(SHAPE).astype(np.float32)
    prev_x0 = jnp.zeros(SHAPE, jnp.float32)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        out = _fake_model(x_ref, int(t), config.prediction_type, abar, i)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        expected = _diffusers_step(ref, config, out, t, x_ref, eta, noise)
        got, prev_x0 = schedulers.step(config, schedulers.row_at(sched, i), jnp.asarray(x_ref), jnp.asarray(out),
                                       prev_x0, jnp.asarray(noise) if sched.stochastic else None)
        np.testing.assert_allclose(np.asarray(got), expected, **tol, err_msg=f"step {i} (t={int(t)})")
        worst = max(worst, float(np.max(np.abs(np.asarray(got) - expected))))
        x_ref = expected
    return worst


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_lavie_matches_diffusers(prediction, eta):
    config = SchedulerConfig.lavie().replace(prediction_type=prediction)
    assert _run_both(config, 10, eta) < 1e-5


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_other_spacings_match_diffusers(spacing):
    config = SchedulerConfig.modelscope().replace(timestep_spacing=spacing, steps_offset=0, clip_sample=True)
    _run_both(config, 7, eta=0.5)


def test_ddim_cosine_v_prediction_matches_diffusers():
    """The bundled tiny model's sampler: cosine betas, v-prediction, trailing spacing, x0 clipping."""
    config = SchedulerConfig(kind="ddim", beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                             timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True, clip_sample=True)
    assert _run_both(config, 25) < 1e-5


def test_ddpm_lavie_matches_diffusers():
    _run_both(SchedulerConfig.lavie(kind="ddpm"), 10)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmsolver_matches_diffusers(prediction, spacing):
    config = SchedulerConfig.modelscope(kind="dpmsolver++").replace(prediction_type=prediction,
                                                                    timestep_spacing=spacing)
    _run_both(config, 8)


def test_dpmsolver_heun_many_steps_matches_diffusers():
    config = SchedulerConfig.modelscope(kind="dpmsolver++").replace(solver_type="heun")
    _run_both(config, 20)


def test_videocrafter_uniform_spacing_is_ldm_ddim():
    """VideoCrafter's LDM DDIM, written out from lvdm/models/samplers/ddim.py in float64."""
    config = SchedulerConfig.videocrafter()
    steps = 25
    sched = schedulers.make_schedule(config, steps)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphacums = np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)
    ddim_t = np.arange(0, 1000, 1000 // steps) + 1
    alphas = alphacums[ddim_t]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_t[:-1]].tolist())
    sigmas = 1.0 * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    np.testing.assert_array_equal(sched.timestep, ddim_t[::-1])
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE)
    e = rng.standard_normal(SHAPE)
    z = rng.standard_normal(SHAPE)
    for i, index in enumerate(range(steps - 1, -1, -1)):
        a_t, a_prev, s = alphas[index], alphas_prev[index], sigmas[index]
        pred_x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
        expected = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev - s ** 2) * e + s * z
        got, _ = schedulers.step(config, schedulers.row_at(sched, i), x.astype(np.float32),
                                 e.astype(np.float32), None, z.astype(np.float32))
        np.testing.assert_allclose(np.asarray(got), expected, **TOL)


def test_uniform_spacing_keeps_ldm_step_count():
    """LDM's range(0, T, T // S) gives 31 steps for S = 30: kept as the original does."""
    ts = schedulers.timesteps(SchedulerConfig.videocrafter(), 30)
    assert len(ts) == len(range(0, 1000, 33)) == 31
    assert ts[0] == 991 and ts[-1] == 1


def test_beta_schedules():
    lavie = schedulers.betas(SchedulerConfig.lavie())
    np.testing.assert_allclose(lavie[[0, -1]], [1e-4, 0.02])
    np.testing.assert_allclose(np.diff(lavie), (0.02 - 1e-4) / 999, rtol=1e-9)
    vc = schedulers.betas(SchedulerConfig.videocrafter())
    np.testing.assert_allclose(np.sqrt(vc)[[0, -1]], [0.00085 ** 0.5, 0.012 ** 0.5])
    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.numpy()
    np.testing.assert_allclose(schedulers.alphas_cumprod(SchedulerConfig.videocrafter()), ref, rtol=2e-6)
    cosine = SchedulerConfig(beta_schedule="squaredcos_cap_v2")
    ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.numpy()
    np.testing.assert_allclose(schedulers.alphas_cumprod(cosine), ref, rtol=2e-6, atol=1e-9)
    assert schedulers.betas(cosine).max() == 0.999 and schedulers.alphas_cumprod(cosine)[-1] < 1e-8


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        SchedulerConfig(kind="euler")
    with pytest.raises(ValueError, match="prediction_type"):
        SchedulerConfig(prediction_type="x0")
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.make_schedule(SchedulerConfig(), 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.make_schedule(SchedulerConfig(), 1001)
    with pytest.raises(ValueError, match="outside"):  # leading + offset 1 at S = T reaches t = T
        schedulers.make_schedule(SchedulerConfig(), 1000)
    with pytest.raises(ValueError, match="eta"):
        schedulers.make_schedule(SchedulerConfig(), 10, eta=-1)


def test_config_round_trip():
    config = SchedulerConfig.videocrafter()
    assert SchedulerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        SchedulerConfig.from_dict({"kind": "ddim", "bogus": 1})


@pytest.mark.parametrize("config", [SchedulerConfig.lavie(), SchedulerConfig.lavie(kind="ddpm"),
                                    SchedulerConfig.modelscope(kind="dpmsolver++")], ids=["ddim", "ddpm", "dpm"])
def test_stock_float32_diffusers(config):
    """Against diffusers as shipped, whose scalar arithmetic is float32: ``1 - alphas_cumprod`` near t = 0
    loses about 4 digits there (1 - 0.9999 in float32), so the last steps differ by up to ~2e-5."""
    worst = _run_both(config, 10, eta=0.0, float64=False, tol=dict(rtol=1e-4, atol=5e-5))
    print(f"max |ours - diffusers float32| = {worst:.2e}")
