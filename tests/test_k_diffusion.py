"""k-diffusion's Euler and Euler ancestral steps and sigma schedules (docs/math.md 5.2) against diffusers'
EulerDiscreteScheduler and EulerAncestralDiscreteScheduler, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import device_for, interpreted
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

import genkern
from genkern.diffusion import EulerSampler, NoiseSchedule, euler_sigmas, scale_model_input

BACKENDS = genkern.backends()
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def diffusers_scheduler(cls, **kw):
    sched = cls(**CONFIG, **kw)
    sched.is_scale_input_called = True  # the loops below call the steps directly
    return sched


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_sigmas_are_diffusers(spacing, karras, final):
    """Within 1e-5: genkern's alpha-bars are float64 (diffusers' float32), so the sigmas differ in the 7th digit."""
    sched = diffusers_scheduler(
        EulerDiscreteScheduler, timestep_spacing=spacing, use_karras_sigmas=karras, final_sigmas_type=final
    )
    sched.set_timesteps(25)
    sigmas, timesteps = euler_sigmas(SCHEDULE, 25, spacing=spacing, use_karras_sigmas=karras, final_sigma=final)
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(timesteps, sched.timesteps, rtol=1e-5, atol=1e-3 if karras else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("ancestral", [False, True])
def test_loop_is_diffusers(backend, prediction, ancestral):
    """A 10-step loop of each step on diffusers' own sigmas, the ancestral noise drawn as diffusers draws it:
    every step within 1e-6 of diffusers' (float32), 1e-5 for the ancestral step (its sigma_up and sigma_down
    come from torch's pow where the kernels take a square root)."""
    if ancestral and prediction == "sample":
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler does not implement prediction_type='sample'")
    device = device_for(backend)
    cls = EulerAncestralDiscreteScheduler if ancestral else EulerDiscreteScheduler
    sched = diffusers_scheduler(cls, prediction_type=prediction)
    sched.set_timesteps(10)
    theirs = ours = rand((2, 3, 5), 0)
    generator, ours_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, t in enumerate(sched.timesteps):
        theirs = sched.step(0.3 * theirs, t, theirs, generator=generator).prev_sample
        s, s_next = sched.sigmas[i], sched.sigmas[i + 1]
        m, x = (0.3 * ours).to(device), ours.to(device)
        if ancestral:
            z = torch.randn(ours.shape, generator=ours_generator).to(device)
            step = genkern.euler_ancestral_step(m, s, s_next, x, prediction_type=prediction, noise=z, backend=backend)
        else:
            step = genkern.euler_step(m, s, s_next, x, prediction_type=prediction, backend=backend)
        ours = step.cpu()
        tol = 1e-5 if ancestral or interpreted(backend) else 1e-6
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_agree_with_the_reference(backend, dtype):
    """In-kernel ancestral noise, per-sample sigmas (the last step to 0), guidance, pred_original."""
    device = device_for(backend)
    x, m = rand((3, 7), 1, dtype).to(device), rand((6, 7), 2, dtype).to(device)
    sigma, sigma_next = torch.tensor([14.6, 3.0, 0.5]).to(device), torch.tensor([9.0, 1.0, 0.0]).to(device)
    for prediction in ("epsilon", "v_prediction"):
        for fn, kw in ((genkern.euler_step, {}), (genkern.euler_ancestral_step, dict(seed=5, offset=2))):
            for mo, guidance in ((m[:3], None), (m, 3.0)):
                step = dict(prediction_type=prediction, guidance_scale=guidance, return_pred_original=True, **kw)
                got = fn(mo, sigma, sigma_next, x, backend=backend, **step)
                want = fn(mo, sigma, sigma_next, x, backend="reference", **step)
                # float64 ancestral: the kernels' normals are float32 values widened (docs/random.md)
                tol = 1e-6 if dtype == torch.float32 or kw else 1e-12
                tol = 1e-5 if interpreted(backend) and dtype == torch.float32 else tol
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_sampler_is_a_diffusers_loop():
    """EulerSampler against the loop a diffusers pipeline runs (scale_model_input, the model, step)."""

    def model(x, t):
        return 0.2 * x - t.view(-1, 1, 1) / 2000

    sched = diffusers_scheduler(EulerDiscreteScheduler, use_karras_sigmas=True)
    sched.set_timesteps(12)
    x = genkern.randn((3, 2, 4), seed=8) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t.expand(3)), t, x).prev_sample
    got = EulerSampler(SCHEDULE, use_karras_sigmas=True).sample(model, (3, 2, 4), 12, seed=8)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)  # float64 vs float32 alpha-bars: see the sigmas
    ancestral = EulerSampler(SCHEDULE, ancestral=True)
    a = ancestral.sample(model, (4, 2, 4), 6, seed=1)
    assert torch.equal(a[:2], ancestral.sample(model, (2, 2, 4), 6, seed=1))  # only (seed, sample index)


def test_scale_model_input_is_diffusers():
    sched = diffusers_scheduler(EulerDiscreteScheduler)
    sched.set_timesteps(5)
    x = rand((2, 3), 4)
    t = sched.timesteps[1]
    torch.testing.assert_close(scale_model_input(x, sched.sigmas[1]), sched.scale_model_input(x, t), rtol=0, atol=0)


def test_opcheck_and_bad_arguments():
    x, m = rand((2, 3), 5), rand((2, 3), 6)
    s, s_next = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0])
    for kind in (1, 2):
        args = (m, x, s, s_next, None, 1, 1, kind, 1, None, 0.0, False, True)
        torch.library.opcheck(torch.ops.genkern.sigma_step, args)
    with pytest.raises(ValueError, match="prediction_type"):
        genkern.euler_step(m, 1.0, 0.5, x, prediction_type="flow")
    with pytest.raises(ValueError, match="stochastic"):
        torch.ops.genkern.sigma_step(m, x, s, s_next, None, 0, 0, 1, 0, None, 0.0, True, False)
    with pytest.raises(ValueError, match="kind"):
        torch.ops.genkern.sigma_step(m, x, s, s_next, None, 0, 0, 3, 0, None, 0.0, False, False)
    with pytest.raises(ValueError, match="num_steps"):
        euler_sigmas(SCHEDULE, 2000)
