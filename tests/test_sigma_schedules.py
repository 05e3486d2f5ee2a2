"""Inference sigma schedules (docs/math.md 5.4): Karras, exponential, beta and simple sigmas of the sigma-space
samplers and Karras / exponential / beta flow sigmas, against diffusers' set_timesteps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler

import genkern
from genkern.diffusion import FlowMatchEulerSampler, NoiseSchedule, euler_sigmas, flow_sigmas, sigma_schedules

CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, HeunDiscreteScheduler])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("kind", ["karras", "exponential", "beta"])
def test_sigma_space_schedules_are_diffusers(cls, spacing, kind):
    """Within 1e-5 (genkern's alpha-bars are float64 rounded to float32); Heun's table is the same sigmas,
    interleaved."""
    sched = cls(**CONFIG, timestep_spacing=spacing, steps_offset=1, **{FLAGS[kind]: True})
    sched.set_timesteps(20)
    sigmas, timesteps = euler_sigmas(SCHEDULE, 20, spacing=spacing, steps_offset=1, sigma_schedule=kind)
    theirs, their_t = sched.sigmas, sched.timesteps
    if cls is HeunDiscreteScheduler:
        theirs, their_t = torch.cat([theirs[:1], theirs[1::2]]), torch.cat([their_t[:1], their_t[1::2]])
    torch.testing.assert_close(sigmas, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(timesteps, their_t.float(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["karras", "exponential", "beta"])
def test_flow_schedules_are_diffusers(shift, kind):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, **{FLAGS[kind]: True})
    sched.set_timesteps(20)
    torch.testing.assert_close(flow_sigmas(20, shift=shift, sigma_schedule=kind), sched.sigmas, rtol=1e-6, atol=0)


def test_flow_sampler_with_karras_sigmas_is_a_diffusers_loop():
    def model(x, t):
        return 0.3 * x - t.view(-1, 1) / 1000

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True)
    sched.set_timesteps(10)
    x = genkern.randn((2, 6), seed=3)
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(2)), t, x).prev_sample
    got = FlowMatchEulerSampler(shift=3.0, sigma_schedule="karras").sample(model, (2, 6), 10, seed=3)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_simple_and_the_ramps_by_definition():
    """simple: the training sigmas at T - 1 - floor(i T / N); the ramps end at sigma_max and sigma_min,
    decrease, and Karras's is eq. 5 of Karras et al."""
    sigmas, timesteps = euler_sigmas(SCHEDULE, 8, sigma_schedule="simple")
    ab = SCHEDULE.alpha_cumprod(torch.arange(1000)).float()
    train = ((1 - ab) / ab) ** 0.5
    idx = [999 - int(i * 1000 / 8) for i in range(8)]
    torch.testing.assert_close(sigmas[:-1], train[idx], rtol=1e-6, atol=0)
    torch.testing.assert_close(timesteps, torch.tensor(idx, dtype=torch.float32), rtol=0, atol=1e-3)
    for kind in ("karras", "exponential", "beta"):
        r = sigma_schedules.ramp(kind, 0.03, 14.6, 12)
        assert r[0] == pytest.approx(14.6) and r[-1] == pytest.approx(0.03) and np.all(np.diff(r) < 0)
    i = np.arange(12) / 11
    expected = (14.6 ** (1 / 7) + i * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigma_schedules.karras(0.03, 14.6, 12), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="sigma_schedule"):
        euler_sigmas(SCHEDULE, 8, sigma_schedule="polyexponential")
    with pytest.raises(ValueError, match="conflicts"):
        euler_sigmas(SCHEDULE, 8, use_karras_sigmas=True, sigma_schedule="beta")
    with pytest.raises(ValueError, match="sigma_schedule"):
        flow_sigmas(8, sigma_schedule="simple")
