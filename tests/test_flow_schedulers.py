"""Flow-matching samplers (Wan) against diffusers' ``UniPCMultistepScheduler`` (flow sigmas, as the Wan
pipeline configures it) and ``FlowMatchEulerDiscreteScheduler``: timesteps, sigmas and every step's sample for a
fixed stand-in velocity field. Measured max |ours - diffusers| / max |diffusers| over all steps is printed in
the assertion messages; the bound is the issue's 1e-6."""

from __future__ import annotations

import numpy as np
import pytest

from jaxlongvid import schedulers
from jaxlongvid.schedulers import SchedulerConfig, flow_sigmas, flow_step, make_schedule, row_at

torch = pytest.importorskip("torch")
STEP_RTOL = 1e-6


def diffusers_scheduler(config: SchedulerConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if config.kind == "unipc-flow":  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=config.flow_shift, solver_order=2,
                                       solver_type="bh2", predict_x0=True, lower_order_final=True,
                                       final_sigmas_type="zero", disable_corrector=[])
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.flow_shift)


def velocity(x: np.ndarray, t: float, w: np.ndarray) -> np.ndarray:
    """A smooth stand-in for the model: depends on the sample and the timestep."""
    return (np.tanh(x) * 0.7 + w * (t / 1000.0) - 0.3 * x).astype(np.float32)


def run_both(config: SchedulerConfig, steps: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    ref = diffusers_scheduler(config)
    ref.set_timesteps(steps)
    schedule = make_schedule(config, steps)
    carry = (x, np.zeros_like(x), np.zeros_like(x), np.zeros_like(x))
    xt = torch.from_numpy(x.copy())
    errs = []
    for i, t in enumerate(ref.timesteps):
        row = row_at(schedule, i)
        assert float(row.timestep) == float(t), (i, float(row.timestep), float(t))
        v_ref = velocity(xt.numpy(), float(t), w)
        xt = ref.step(torch.from_numpy(v_ref), t, xt, return_dict=False)[0]
        carry = flow_step(row, carry, velocity(np.asarray(carry[0]), float(row.timestep), w))
        got, want = np.asarray(carry[0]), xt.numpy()
        errs.append(float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
    return schedule, ref, errs


@pytest.mark.parametrize("kind,shift,steps", [("unipc-flow", 3.0, 10), ("unipc-flow", 5.0, 4),
                                              ("unipc-flow", 1.0, 2), ("euler-flow", 3.0, 10),
                                              ("euler-flow", 1.0, 3)])
def test_flow_steps_match_diffusers(kind, shift, steps):
    config = SchedulerConfig.wan(kind, shift)
    schedule, ref, errs = run_both(config, steps)
    np.testing.assert_allclose(flow_sigmas(config, steps), ref.sigmas.numpy(), rtol=1e-7, atol=0)
    assert schedule.num_steps == steps and len(errs) == steps
    assert max(errs) < STEP_RTOL, errs


def test_one_unipc_step_is_euler_to_x0_for_one_step():
    # a single UniPC step is first order to sigma 0: the result is the x0 prediction x - sigma v
    config = SchedulerConfig.wan()
    row = row_at(make_schedule(config, 1), 0)
    x = np.ones((2, 2), np.float32)
    v = np.full((2, 2), 0.25, np.float32)
    out = np.asarray(flow_step(row, (x, 0 * x, 0 * x, 0 * x), v)[0])
    np.testing.assert_allclose(out, x - float(row.sigma) * v, rtol=1e-7)


def test_flow_kinds_need_flow_prediction():
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        SchedulerConfig(kind="unipc-flow")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        SchedulerConfig(kind="ddim", prediction_type="flow")
    with pytest.raises(ValueError, match="flow_shift"):
        SchedulerConfig.wan(flow_shift=0.0)
    assert schedulers.timesteps(SchedulerConfig.wan(), 50).dtype == np.int64
