"""Flow matching (docs/math.md 5.1): the sigmas and the Euler step against diffusers'
FlowMatchEulerDiscreteScheduler, the noising and the loss against their definitions, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import device_for, interpreted
from diffusers import FlowMatchEulerDiscreteScheduler

import genkern
from genkern.diffusion import FlowMatchEulerSampler, flow_sigmas
from genkern.diffusion import reference as ref

BACKENDS = genkern.backends()


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize(
    "config, steps, mu",
    [
        ({}, 28, None),
        ({"shift": 3.0}, 28, None),
        ({"shift": 3.0}, 1, None),
        ({"shift": 5.0, "num_train_timesteps": 500}, 7, None),
        ({"use_dynamic_shifting": True}, 20, 0.8),
        ({"use_dynamic_shifting": True}, 50, 1.15),
    ],
)
def test_sigmas_are_diffusers(config, steps, mu):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(steps, mu=mu) if mu is not None else sched.set_timesteps(steps)
    kwargs = {"mu": mu} if mu is not None else {"shift": config.get("shift", 1.0)}
    ours = flow_sigmas(steps, num_train_timesteps=config.get("num_train_timesteps", 1000), **kwargs)
    assert ours.dtype == torch.float32 and torch.equal(ours, sched.sigmas)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_loop_is_diffusers(backend, shift):
    """A whole 10-step loop with a velocity model that depends on x: every step within 1e-6 of diffusers'
    (float32; the kernels compute x + dt v in the same order, so they agree to the bit here)."""
    device = device_for(backend)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(10)
    sigmas = flow_sigmas(10, shift=shift)
    theirs = ours = rand((2, 3, 5, 7), 0)
    for i, t in enumerate(sched.timesteps):
        v = 0.3 * theirs - 0.1 * float(t) / 1000
        theirs = sched.step(v, t, theirs).prev_sample
        v_ours = (0.3 * ours - 0.1 * float(t) / 1000).to(device)
        ours = genkern.flow_euler_step(v_ours, sigmas[i], sigmas[i + 1], ours.to(device), backend=backend).cpu()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_step_is_diffusers_with_its_noise(backend):
    device = device_for(backend)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    sched.set_timesteps(6)
    x, v = rand((3, 8), 1), rand((3, 8), 2)
    sched._step_index = 2
    theirs = sched.step(v, sched.timesteps[2], x, generator=torch.Generator().manual_seed(5)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # diffusers' randn_tensor draw
    s = sched.sigmas
    ours = genkern.flow_euler_step(
        v.to(device), s[2], s[3], x.to(device), stochastic=True, noise=z.to(device), backend=backend
    )
    torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_step_backends_agree_with_the_reference(backend, dtype):
    """In-kernel noise, guidance and rescale, per-sample sigmas, an odd element count, pred_original."""
    device = device_for(backend)
    B, shape = 3, (3, 5, 3)
    x, m = rand(shape, 3, dtype).to(device), rand((2 * B, 5, 3), 4, dtype).to(device)
    sigma = torch.tensor([0.9, 0.5, 0.2]).to(device)
    sigma_next = torch.tensor([0.8, 0.3, 0.0]).to(device)
    for kwargs in (
        dict(stochastic=True, seed=7, offset=3),
        dict(guidance_scale=4.0),
        dict(guidance_scale=4.0, guidance_rescale=0.7, stochastic=True, seed=1),
    ):
        mo = m if "guidance_scale" in kwargs else m[:B]
        step = dict(return_pred_original=True, **kwargs)
        got = genkern.flow_euler_step(mo, sigma, sigma_next, x, backend=backend, **step)
        want = genkern.flow_euler_step(mo, sigma, sigma_next, x, backend="reference", **step)
        # float64: the kernels' stream normals are float32 values widened (the reference draws them in float64,
        # docs/random.md) and the rescale factors float32 per-sample values (as in the DDPM/DDIM steps): a float32
        # ulp. Without either, float64 steps agree to 1e-12.
        float32_parts = kwargs.get("stochastic") or "guidance_rescale" in kwargs
        tol = (1e-6 if float32_parts else 1e-12) if dtype == torch.float64 else 2e-6
        tol = max(tol, 1e-5) if interpreted(backend) and dtype == torch.float32 else tol
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_sample_is_the_interpolation_with_stream_noise(backend):
    device = device_for(backend)
    x0 = rand((4, 3, 9), 5).to(device).requires_grad_(True)
    sigma = torch.tensor([0.0, 0.25, 0.7, 1.0])
    x = genkern.flow_sample(x0, sigma, seed=11, offset=2, backend=backend)
    eps = genkern.randn(x0.shape, seed=11, offset=2, device=device)
    s = sigma.to(device).view(-1, 1, 1)
    torch.testing.assert_close(x, (1 - s) * x0 + s * eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x, ref.flow_sample(x0, sigma, seed=11, offset=2), rtol=1e-6, atol=1e-6)
    x.sum().backward()
    torch.testing.assert_close(x0.grad, (1 - s).expand_as(x0), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_flow_loss_regenerates_the_noise_of_flow_sample(backend, weighting):
    device = device_for(backend)
    x0, m = rand((3, 2, 6), 6).to(device), rand((3, 2, 6), 7).to(device).requires_grad_(True)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    loss = genkern.flow_matching_loss(m, x0, sigma, seed=4, offset=1, weighting=weighting, backend=backend)
    eps = (genkern.flow_sample(x0, sigma, seed=4, offset=1) - (1 - sigma.view(-1, 1, 1).to(device)) * x0) / sigma.view(
        -1, 1, 1
    ).to(device)
    m_ref = m.detach().clone().requires_grad_(True)
    expected = ref.flow_matching_loss(m_ref, x0, sigma, seed=4, offset=1, weighting=weighting)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    w = ref.flow_weight(sigma.to(device), weighting)
    torch.testing.assert_close(loss, w * ((m - (eps - x0)) ** 2).mean(dim=(1, 2)), rtol=1e-4, atol=1e-5)
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(m.grad, m_ref.grad, rtol=1e-5, atol=1e-6)


def test_flow_ops_pass_opcheck_and_compile():
    x, m = rand((2, 3, 4), 8), rand((4, 3, 4), 9)
    s, s_next = torch.tensor([0.7, 0.4]), torch.tensor([0.5, 0.2])
    for args in (
        (m[:2], x, s, s_next, None, 3, 1, 0, 0, None, 0.0, True, True),
        (m, x, s, s_next, None, 3, 1, 0, 0, 2.5, 0.5, False, False),
        (m[:2], x, s, s_next, None, 3, 1, 1, 1, None, 0.0, False, True),
        (m, x, s, s_next, None, 3, 1, 2, 0, 2.5, 0.0, False, False),
    ):
        torch.library.opcheck(torch.ops.genkern.sigma_step, args)

    @torch.compile(fullgraph=True)
    def compiled(m, x, s, s_next):
        y = genkern.flow_euler_step(m, s, s_next, x, guidance_scale=2.0)
        return genkern.flow_sample(y, s_next, seed=1)

    eager = genkern.flow_sample(genkern.flow_euler_step(m, s, s_next, x, guidance_scale=2.0), s_next, seed=1)
    torch.testing.assert_close(compiled(m, x, s, s_next), eager)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, m: genkern.flow_euler_step(m, torch.ones(3), 0.5, x), ValueError, "sigma"),
        (lambda x, m: genkern.flow_euler_step(m, "0.5", 0.4, x), TypeError, "sigma"),
        (lambda x, m: genkern.flow_euler_step(m[:, :2], 0.5, 0.4, x), ValueError, "model_output"),
        (lambda x, m: genkern.flow_euler_step(m, 0.5, 0.4, x, stochastic=1), TypeError, "stochastic"),
        (lambda x, m: genkern.flow_euler_step(m, 0.5, 0.4, x, guidance_rescale=0.5), ValueError, "guidance"),
        (lambda x, m: genkern.flow_matching_loss(m, x, 0.5, weighting="logit"), ValueError, "weighting"),
        (lambda x, m: genkern.flow_sample(x, torch.ones(2, 2)), ValueError, "sigma"),
        (lambda x, m: flow_sigmas(0), ValueError, "num_steps"),
        (lambda x, m: flow_sigmas(4, shift=-1.0), ValueError, "shift"),
    ],
)
def test_bad_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(rand((2, 3), 0), rand((2, 3), 1))


def test_sampler_is_a_diffusers_loop_and_samples_depend_only_on_the_seed():
    def model(x, t):
        return 0.5 * x + t.view(-1, *([1] * (x.dim() - 1))) / 1000

    shape = (4, 2, 3)
    got = FlowMatchEulerSampler(shift=3.0).sample(model, shape, 8, seed=3)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    x = genkern.randn(shape, seed=3)
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(4)), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)
    stochastic = FlowMatchEulerSampler(stochastic=True)
    assert torch.equal(stochastic.sample(model, shape, 5, seed=2)[:2], stochastic.sample(model, (2, 2, 3), 5, seed=2))
