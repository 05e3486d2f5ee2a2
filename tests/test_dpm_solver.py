"""DPM-Solver++ (docs/math.md 5.3): the fused step against diffusers' DPMSolverMultistepScheduler over whole
loops and its config axes, every backend against the reference, the op's checks, opcheck and torch.compile,
and the sampler against a diffusers loop."""

from __future__ import annotations

import pytest
import torch
from conftest import device_for, interpreted
from diffusers import DPMSolverMultistepScheduler

import genkern
from genkern.diffusion import DPMSolverMultistepSampler, NoiseSchedule, dpm_solver_sigmas

BACKENDS = genkern.backends()
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 3, 5)


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def final_first_order(sched, steps: int) -> bool:
    c = sched.config
    return c.euler_at_final or (c.lower_order_final and steps < 15) or c.final_sigmas_type == "zero"


def loop_error(backend: str, steps: int, **config) -> float:
    """The largest relative error max|ours - theirs| / max|theirs| over the steps of a loop on diffusers' own
    sigmas, the model outputs a fixed sequence (the same for both loops), the SDE noise passed to both."""
    device = device_for(backend)
    sched = DPMSolverMultistepScheduler(**CONFIG, **config)
    sched.set_timesteps(steps)
    c = sched.config
    theirs = ours = rand(SHAPE, 0)
    history = torch.zeros(SHAPE, device=device)
    threshold = (c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else None
    sigmas = sched.sigmas.to(device)
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        m = rand(SHAPE, 100 + i) * (3.0 if c.prediction_type == "sample" else 1.0)
        z = rand(SHAPE, 500 + i) if c.algorithm_type.startswith("sde") else None
        theirs = sched.step(m, t, theirs, variance_noise=z).prev_sample
        step = genkern.dpm_solver_step(
            m.to(device), sigmas, i, ours.to(device), history, prediction_type=c.prediction_type,
            solver_type=c.solver_type, algorithm_type=c.algorithm_type, solver_order=c.solver_order,
            final_first_order=final_first_order(sched, steps), noise=None if z is None else z.to(device),
            dynamic_threshold=threshold, backend=backend,
        )  # fmt: skip
        ours = step.cpu()
        worst = max(worst, ((ours - theirs).abs().max() / theirs.abs().max()).item())
    return worst


# The config axes of DPMSolverMultistepScheduler this step covers, each against the 2M midpoint default.
LOOPS = [
    (10, {}),
    (25, {}),
    (10, dict(prediction_type="v_prediction")),
    (10, dict(prediction_type="sample")),
    (10, dict(solver_type="heun")),
    (25, dict(solver_type="heun", prediction_type="v_prediction")),
    (10, dict(lower_order_final=False, final_sigmas_type="sigma_min")),
    (10, dict(final_sigmas_type="sigma_min")),
    (20, dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_type="heun")),
    (20, dict(euler_at_final=True, final_sigmas_type="sigma_min")),
    (15, dict(use_karras_sigmas=True)),
    (15, dict(use_exponential_sigmas=True)),
    (15, dict(use_beta_sigmas=True)),
    (25, dict(thresholding=True)),
    (12, dict(thresholding=True, prediction_type="sample", sample_max_value=2.0)),
    (25, dict(timestep_spacing="leading", steps_offset=1)),
    (25, dict(timestep_spacing="trailing")),
    (10, dict(solver_order=1)),
    (20, dict(algorithm_type="sde-dpmsolver++")),
    (20, dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True)),
    (10, dict(algorithm_type="sde-dpmsolver++", prediction_type="v_prediction", final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "steps, config", LOOPS, ids=[f"{n}-{'-'.join(map(str, c.values())) or 'default'}" for n, c in LOOPS]
)
def test_loop_is_diffusers(backend, steps, config):
    """Every step within 1e-5 (relative to the sample's largest value) of diffusers' in float32; the reference
    computes diffusers' float32 operations in diffusers' order (exactly equal where it applies)."""
    if interpreted(backend) and steps > 12:
        pytest.skip("the Triton interpreter runs the short loops (the long ones are the same kernel)")
    assert loop_error(backend, steps, **config) <= 1e-5


def test_loop_comparison_can_fail():
    """The parity measure sees a wrong solver type (the kernels' second-order term)."""
    sched = DPMSolverMultistepScheduler(**CONFIG)
    sched.set_timesteps(10)
    x = rand(SHAPE, 0)
    ours, theirs, history = x, x, torch.zeros(SHAPE)
    for i, t in enumerate(sched.timesteps):
        m = rand(SHAPE, 100 + i)
        theirs = sched.step(m, t, theirs).prev_sample
        ours = genkern.dpm_solver_step(m, sched.sigmas, i, ours, history, solver_type="heun")
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() > 1e-3


def _step_args(dtype, device, guided=False):
    x = rand((3, 7), 1, dtype).to(device)
    m = rand((6 if guided else 3, 7), 2, dtype).to(device)
    history = rand((3, 7), 3, dtype).to(device)
    sigmas = torch.tensor([14.6, 6.0, 3.0, 1.0, 0.3, 0.0]).to(device)
    step = torch.tensor([0, 2, 4]).to(device)  # first order, second order, the last (first order) step
    return m, x, history, sigmas, step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_agree_with_the_reference(backend, dtype):
    """Per-sample step indices (first, second order and final steps in one batch), guidance and rescale,
    thresholding, both solver types, in-kernel SDE noise; the history written as x0_hat."""
    device = device_for(backend)
    for prediction in ("epsilon", "v_prediction", "sample"):
        for guided in (False, True):
            for kw in (
                dict(solver_type="midpoint"),
                dict(solver_type="heun", dynamic_threshold=(0.9, 3.0)),
                dict(algorithm_type="sde-dpmsolver++", seed=5, offset=2),
                dict(algorithm_type="sde-dpmsolver++", solver_type="heun", final_first_order=False, seed=1),
            ):
                m, x, history, sigmas, step = _step_args(dtype, device, guided)
                g = dict(guidance_scale=3.0, guidance_rescale=0.7) if guided else {}
                h_got, h_want = history.clone(), history.clone()
                # float64: the kernels' normals, rescale factors and thresholds are float32 values widened
                tol = 1e-10 if dtype == torch.float64 and not (guided or len(kw) > 1) else 1e-6
                tol = 1e-5 if interpreted(backend) and dtype == torch.float32 else tol
                got = genkern.dpm_solver_step(m, sigmas, step, x, h_got, prediction_type=prediction, backend=backend,
                                              **kw, **g)  # fmt: skip
                want = genkern.dpm_solver_step(m, sigmas, step, x, h_want, prediction_type=prediction,
                                               backend="reference", **kw, **g)  # fmt: skip
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
                torch.testing.assert_close(h_got, h_want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_first_order_steps_ignore_the_history_and_odd_shapes(backend):
    """A first-order step never reads the history (NaN there changes nothing); an empty batch, one element, a
    sample size not a multiple of 4 and a non-contiguous model output."""
    device = device_for(backend)
    m, x, history, sigmas, _ = _step_args(torch.float32, device)
    step = torch.zeros(3, dtype=torch.int64, device=device)
    nan = torch.full_like(history, float("nan"))
    got = genkern.dpm_solver_step(m, sigmas, step, x, nan, backend=backend)
    want = genkern.dpm_solver_step(m, sigmas, step, x, history.clone(), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for shape in ((0, 5), (1, 1), (2, 3, 3)):
        x1, m1 = rand(shape, 4).to(device), rand(shape, 5).to(device)
        h1 = torch.zeros(shape, device=device)
        got = genkern.dpm_solver_step(m1, sigmas, 1, x1, h1.clone(), backend=backend)
        want = genkern.dpm_solver_step(m1, sigmas, 1, x1, h1.clone(), backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    mt = rand((7, 3), 6).to(device).t()
    got = genkern.dpm_solver_step(mt, sigmas, 2, x, history.clone(), backend=backend)
    want = genkern.dpm_solver_step(mt.contiguous(), sigmas, 2, x, history.clone(), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sde_noise_is_the_stream():
    """The in-kernel SDE noise is the genkern stream for (seed, offset): passing that noise gives the same step."""
    m, x, history, sigmas, step = _step_args(torch.float32, "cpu")
    kw = dict(algorithm_type="sde-dpmsolver++")
    drawn = genkern.dpm_solver_step(m, sigmas, step, x, history.clone(), seed=9, offset=4, **kw)
    z = genkern.randn(x.shape, seed=9, offset=4)
    given = genkern.dpm_solver_step(m, sigmas, step, x, history.clone(), noise=z, **kw)
    torch.testing.assert_close(drawn, given, rtol=1e-6, atol=1e-6)
    other = genkern.dpm_solver_step(m, sigmas, step, x, history.clone(), seed=10, offset=4, **kw)
    assert not torch.allclose(drawn, other)


def _op_args(m, x, history, sigmas, step, **kw):
    o = dict(noise=None, seed=1, offset=1, prediction=0, solver_type=0, solver_order=2, sde=False,
             final_first_order=True, guidance_scale=None, guidance_rescale=0.0, dynamic_ratio=None,
             dynamic_max=1.0)  # fmt: skip
    o.update(kw)
    return (m, x, history, sigmas, step, *o.values())


def test_opcheck_compile_and_bad_arguments():
    m, x, history, sigmas, step = _step_args(torch.float32, "cpu")
    op = torch.ops.genkern.dpm_solver_step
    for kw in ({}, dict(sde=True, solver_type=1), dict(prediction=1, dynamic_ratio=0.9, dynamic_max=2.0)):
        torch.library.opcheck(op, _op_args(m, x, history.clone(), sigmas, step, **kw))
    guided = _op_args(rand((6, 7), 7), x, history.clone(), sigmas, step, guidance_scale=2.0, guidance_rescale=0.5)
    torch.library.opcheck(op, guided)

    def two_steps(m, x, history):
        x = op(*_op_args(m, x, history, sigmas, torch.zeros_like(step)))
        return op(*_op_args(m, x, history, sigmas, step))

    h_eager, h_compiled = history.clone(), history.clone()
    want = two_steps(m, x, h_eager)
    got = torch.compile(two_steps, fullgraph=True)(m, x, h_compiled)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h_compiled, h_eager, rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="solver_type"):
        genkern.dpm_solver_step(m, sigmas, 0, x, history, solver_type="bogus")
    with pytest.raises(ValueError, match="algorithm_type"):
        genkern.dpm_solver_step(m, sigmas, 0, x, history, algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="step"):
        genkern.dpm_solver_step(m, sigmas, 5, x, history)  # 5 sigmas steps: indices 0..4
    with pytest.raises(ValueError, match="history"):
        genkern.dpm_solver_step(m, sigmas, 0, x, history[:2])
    with pytest.raises(TypeError, match="sigmas"):
        genkern.dpm_solver_step(m, sigmas.double(), 0, x, history)
    with pytest.raises(ValueError, match="noise"):
        op(*_op_args(m, x, history, sigmas, step, noise=x))
    with pytest.raises(ValueError, match="solver_order"):
        op(*_op_args(m, x, history, sigmas, step, solver_order=3))
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverMultistepSampler(SCHEDULE, solver_order=3)
    with pytest.raises(TypeError, match="cuda_graph"):
        DPMSolverMultistepSampler(SCHEDULE).sample(lambda x, t: x, (1, 2), 3, cuda_graph=1)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("sigma_schedule", [None, "karras", "exponential", "beta"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_sigmas_are_diffusers(spacing, sigma_schedule, final):
    """Within 1e-5: genkern's alpha-bars are float64 rounded to float32, diffusers' float32 products."""
    flags = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
    config = {flags[sigma_schedule]: True} if sigma_schedule else {}
    sched = DPMSolverMultistepScheduler(**CONFIG, timestep_spacing=spacing, steps_offset=1, final_sigmas_type=final,
                                        **config)  # fmt: skip
    sched.set_timesteps(20)
    sigmas, timesteps = dpm_solver_sigmas(SCHEDULE, 20, spacing=spacing, steps_offset=1,
                                          sigma_schedule=sigma_schedule, final_sigma=final)  # fmt: skip
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=1e-5, atol=1e-6)
    # the interpolated-back timesteps are truncated to integers: a sigma 1e-6 away may land one lower
    assert (timesteps - sched.timesteps).abs().max() <= (1 if sigma_schedule else 0)


@pytest.mark.parametrize("config", [{}, dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)])
def test_sampler_is_a_diffusers_loop(config):
    """DPMSolverMultistepSampler against the loop a diffusers pipeline runs (the model, step), with guidance;
    the SDE loop given genkern's per-step noise (the stream at offset i + 1)."""

    def model(x, t):
        return 0.2 * x - t.view(-1, 1, 1).float() / 2000

    steps, B, scale = 12, 3, 2.5
    sched = DPMSolverMultistepScheduler(**CONFIG, **config)
    sched.set_timesteps(steps)
    x = genkern.randn((B, 2, 4), seed=8)
    for i, t in enumerate(sched.timesteps):
        out = model(torch.cat([x, x]), t.expand(2 * B))
        out = out[:B] + scale * (out[B:] - out[:B])
        z = genkern.randn((B, 2, 4), seed=8, offset=i + 1) if config else None
        x = sched.step(out, t, x, variance_noise=z).prev_sample
    sampler = DPMSolverMultistepSampler(SCHEDULE, **config)
    got = sampler.sample(model, (B, 2, 4), steps, seed=8, guidance_scale=scale)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)  # float64 vs float32 alpha-bars: see the sigmas
    assert torch.equal(got[:2], sampler.sample(model, (2, 2, 4), steps, seed=8, guidance_scale=scale))
