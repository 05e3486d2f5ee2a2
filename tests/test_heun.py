"""Heun's step (docs/math.md 5.2, kinds 3 and 4 of the sigma-space step kernel) against diffusers'
HeunDiscreteScheduler over whole loops, every backend against the reference, opcheck and torch.compile, and
HeunSampler against a diffusers loop."""

from __future__ import annotations

import pytest
import torch
from conftest import device_for, interpreted
from diffusers import HeunDiscreteScheduler

import genkern
from genkern.diffusion import HeunSampler, NoiseSchedule

BACKENDS = genkern.backends()
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 3, 5)


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def loop_error(backend: str, steps: int, **config) -> float:
    """The largest relative error over every call of a diffusers Heun loop (2 steps - 1 calls), the model
    outputs a fixed sequence; genkern runs the halves on the distinct sigmas of diffusers' interleaved table."""
    device = device_for(backend)
    sched = HeunDiscreteScheduler(**CONFIG, **config)
    sched.set_timesteps(steps)
    sigmas = torch.cat([sched.sigmas[:1], sched.sigmas[1::2]]).to(device)  # sigma_0, ..., sigma_{N-1}, 0
    theirs = ours = rand(SHAPE, 0) * sched.init_noise_sigma
    derivative, origin = torch.zeros(SHAPE, device=device), None
    worst = 0.0
    for k, t in enumerate(sched.timesteps):
        m = rand(SHAPE, 100 + k)
        first = sched.state_in_first_order
        theirs = sched.step(m, t, theirs).prev_sample
        i = (k + 1) // 2  # calls: 0 (first half of step 0), then second half of step i - 1, first of step i
        s, s_next = (sigmas[i], sigmas[i + 1]) if first else (sigmas[i - 1], sigmas[i])
        x = ours.to(device)
        kw = dict(prediction_type=config.get("prediction_type", "epsilon"), backend=backend)
        if first:
            origin = x
            step = genkern.heun_step(m.to(device), s, s_next, x, derivative, **kw)
        else:
            step = genkern.heun_step(m.to(device), s, s_next, x, derivative, origin=origin, **kw)
        ours = step.cpu()
        worst = max(worst, ((ours - theirs).abs().max() / theirs.abs().max()).item())
    return worst


LOOPS = [
    (10, {}),
    (25, {}),
    (10, dict(prediction_type="v_prediction")),
    (10, dict(prediction_type="sample")),
    (15, dict(use_karras_sigmas=True)),
    (15, dict(use_exponential_sigmas=True, prediction_type="v_prediction")),
    (15, dict(use_beta_sigmas=True)),
    (25, dict(timestep_spacing="leading", steps_offset=1)),
    (25, dict(timestep_spacing="trailing")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "steps, config", LOOPS, ids=[f"{n}-{'-'.join(map(str, c.values())) or 'default'}" for n, c in LOOPS]
)
def test_loop_is_diffusers(backend, steps, config):
    """Every half step within 1e-5 (relative to the sample's largest value) of diffusers' in float32."""
    if interpreted(backend) and steps > 12:
        pytest.skip("the Triton interpreter runs the short loops (the long ones are the same kernel)")
    assert loop_error(backend, steps, **config) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_agree_with_the_reference(backend, dtype):
    """Both halves with per-sample sigmas (one sample into sigma 0: the second half returns x'), guidance
    with and without rescale, every prediction type, the derivative buffer."""
    device = device_for(backend)
    x, x_prime = rand((3, 7), 1, dtype).to(device), rand((3, 7), 2, dtype).to(device)
    m = rand((6, 7), 3, dtype).to(device)
    sigma, sigma_next = torch.tensor([14.6, 3.0, 0.5]).to(device), torch.tensor([9.0, 1.0, 0.0]).to(device)
    for prediction in ("epsilon", "v_prediction", "sample"):
        for mo, g in ((m[:3], {}), (m, dict(guidance_scale=3.0)), (m, dict(guidance_scale=2.0, guidance_rescale=0.7))):
            tol = 1e-10 if dtype == torch.float64 and "guidance_rescale" not in g else 1e-6
            tol = 1e-5 if interpreted(backend) and dtype == torch.float32 else tol
            kw = dict(prediction_type=prediction, **g)
            d_got, d_want = torch.zeros_like(x), torch.zeros_like(x)
            got = genkern.heun_step(mo, sigma, sigma_next, x, d_got, backend=backend, **kw)
            want = genkern.heun_step(mo, sigma, sigma_next, x, d_want, backend="reference", **kw)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            torch.testing.assert_close(d_got, d_want, rtol=tol, atol=tol)
            d_first = d_got.clone()
            got = genkern.heun_step(mo, sigma, sigma_next, x_prime, d_got, origin=x, backend=backend, **kw)
            want = genkern.heun_step(mo, sigma, sigma_next, x_prime, d_want, origin=x, backend="reference", **kw)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            torch.testing.assert_close(got[2], x_prime[2], rtol=0, atol=0)  # sigma_next = 0: the Euler point
            assert torch.equal(d_got, d_first)  # the second half leaves d alone


def test_opcheck_compile_and_bad_arguments():
    x, m, d = rand((2, 3), 5), rand((2, 3), 6), rand((2, 3), 7)
    s, s_next = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5])
    op = torch.ops.genkern.heun_step
    torch.library.opcheck(op, (m, x, None, d.clone(), s, s_next, 1, None, 0.0))
    torch.library.opcheck(op, (m, x, x.clone(), d.clone(), s, s_next, 0, None, 0.0))
    torch.library.opcheck(op, (torch.cat([m, m + 1]), x, None, d.clone(), s, s_next, 0, 2.0, 0.5))

    def step(m, x, d):
        x_prime = op(m, x, None, d, s, s_next, 0, None, 0.0)
        return op(m, x_prime, x, d, s, s_next, 0, None, 0.0)

    d_eager, d_compiled = d.clone(), d.clone()
    want = step(m, x, d_eager)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(m, x, d_compiled), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_compiled, d_eager, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="derivative"):
        genkern.heun_step(m, s, s_next, x, d[:1])
    with pytest.raises(TypeError, match="origin"):
        genkern.heun_step(m, s, s_next, x, d, origin=x.double())
    with pytest.raises(ValueError, match="prediction_type"):
        genkern.heun_step(m, s, s_next, x, d, prediction_type="flow")
    with pytest.raises(ValueError, match="cuda_graph"):
        HeunSampler(SCHEDULE).sample(lambda x, t: x, (1, 2), 3, cuda_graph=True)  # a CPU run


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True, prediction_type="v_prediction")])
def test_sampler_is_a_diffusers_loop(config):
    """HeunSampler against the loop a diffusers pipeline runs (scale_model_input, the model, step), guided."""

    def model(x, t):
        return 0.2 * x - t.view(-1, 1, 1) / 2000

    steps, B, scale = 8, 3, 2.0
    sched = HeunDiscreteScheduler(**CONFIG, **config)
    sched.set_timesteps(steps)
    x = genkern.randn((B, 2, 4), seed=8) * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        out = model(torch.cat([x_in, x_in]), t.expand(2 * B))
        x = sched.step(out[:B] + scale * (out[B:] - out[:B]), t, x).prev_sample
    sampler = HeunSampler(SCHEDULE, **config)
    got = sampler.sample(model, (B, 2, 4), steps, seed=8, guidance_scale=scale)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)  # float64 vs float32 alpha-bars: see the sigmas
    assert torch.equal(got[:2], sampler.sample(model, (2, 2, 4), steps, seed=8, guidance_scale=scale))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_kernel_writes_the_next_model_input(backend):
    """sigma_step's model_input output (the samplers' fused scale_model_input) is prev_sample / model_scale
    to the bit, as the division done afterwards; given without model_scale it is refused."""
    from genkern.diffusion._ops import KERNELS

    device, kernels = device_for(backend), KERNELS.on(backend)
    B, n = 3, 37  # odd: a partial block and chunk
    m, x, origin, derivative = (rand((B, n), seed).to(device) for seed in (1, 2, 3, 4))
    sigma, sigma_next = rand((B,), 5).abs().to(device) + 1, rand((B,), 6).abs().to(device)
    scale = (sigma_next**2 + 1).sqrt()
    for kind, o in ((3, None), (4, origin)):
        prev, model_input = torch.empty_like(x), torch.full_like(x, float("nan"))
        args = (m, x, None, sigma, sigma_next, None, prev, None, kind, 0, False, 0.0, False, 0, 0, o, derivative)
        kernels.sigma_step(*args, model_input, scale)
        assert torch.equal(model_input, prev / scale.view(-1, 1))
        with pytest.raises(ValueError, match="model_input and model_scale"):
            kernels.sigma_step(*args, model_input, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_sampler_direct_launches_are_the_op(dtype, guidance_scale):
    """The sampler's direct launches (eager, no grad) give the op's bits (taken with grad enabled, which
    keeps every half on the op), whatever the model hands back: its input itself, a non-contiguous
    tensor; consecutive runs (one reused loop) return distinct tensors, the first left as it was."""
    shape = (2, 3, 6)
    models = {
        "scaled": lambda x, t: 0.1 * x - t.view(-1, 1, 1) / 1000,
        "its input": lambda x, t: x,  # the model output aliases the loop's model input buffer
        "transposed": lambda x, t: (0.3 * x).transpose(1, 2).contiguous().transpose(1, 2),
        "strided": lambda x, t: torch.cat([x, x], dim=2)[:, :, ::2] * 0.5,
    }
    sampler = HeunSampler(SCHEDULE)
    for name, model in models.items():
        # x_T given: the backends' normals agree to a few ulp only (test_random)
        kw = dict(x_T=genkern.randn(shape, seed=3, dtype=dtype), dtype=dtype, guidance_scale=guidance_scale)
        with torch.enable_grad():
            expected = sampler.sample(model, shape, 6, **kw)
        first = sampler.sample(model, shape, 6, **kw)
        kept = first.clone()
        second = sampler.sample(model, shape, 6, **kw)
        assert torch.equal(first, expected), name
        assert torch.equal(second, expected) and second.data_ptr() != first.data_ptr(), name
        assert torch.equal(first, kept), name
        reference = HeunSampler(SCHEDULE, backend="reference").sample(model, shape, 6, **kw)
        tol = 1e-10 if dtype == torch.float64 else 1e-5  # as test_backends_agree_with_the_reference, 6 steps
        torch.testing.assert_close(first, reference, rtol=tol, atol=tol, msg=name)
