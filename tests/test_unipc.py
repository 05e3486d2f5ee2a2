"""UniPC (docs/math.md 5.5): the fused step against diffusers' UniPCMultistepScheduler over whole loops and its
config axes, every backend against the reference, the op's checks, opcheck and torch.compile, and the sampler
against a diffusers loop."""

from __future__ import annotations

import pytest
import torch
from conftest import device_for, interpreted
from diffusers import UniPCMultistepScheduler

import genkern
from genkern.diffusion import NoiseSchedule, UniPCMultistepSampler, unipc_history, unipc_sigmas

BACKENDS = genkern.backends()
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 3, 5)


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def loop_error(backend: str, steps: int, dtype=torch.float32, **config) -> float:
    """The largest relative error max|ours - theirs| / max|theirs| over the steps of a loop on diffusers' own
    sigmas, the model outputs a function of the sample (so that the corrector's model output depends on the
    predictor's result, as in a real loop)."""
    device = device_for(backend)
    sched = UniPCMultistepScheduler(**CONFIG, **config)
    sched.set_timesteps(steps)
    c = sched.config
    theirs = ours = rand(SHAPE, 0)
    history = unipc_history(ours.to(device, dtype), c.solver_order)
    threshold = (c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else None
    sigmas = sched.sigmas.to(device)
    scale = 3.0 if c.prediction_type == "sample" else 1.0
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        noise = rand(SHAPE, 100 + i)
        theirs = sched.step(scale * torch.tanh(theirs + noise), t, theirs).prev_sample
        m = (scale * torch.tanh(ours.double() + noise.double())).to(device, dtype)
        step = genkern.unipc_step(
            m, sigmas, i, ours.to(device, dtype), history, prediction_type=c.prediction_type,
            solver_type=c.solver_type, solver_order=c.solver_order, final_first_order=c.lower_order_final,
            use_corrector=(i - 1) not in c.disable_corrector, flow_sigmas=c.use_flow_sigmas,
            dynamic_threshold=threshold, backend=backend,
        )  # fmt: skip
        ours = step.cpu().to(torch.float64 if dtype == torch.float64 else torch.float32)
        assert ours.isfinite().all(), f"step {i}"
        if not theirs.isfinite().all():
            # diffusers' bh1 adds alpha_t B(h) * 0 to its first-order predictor: -inf * 0 at a final sigma of 0
            assert c.solver_type == "bh1" and i == steps - 1 and sched.sigmas[-1] == 0, f"step {i}"
            return worst
        worst = max(worst, ((ours - theirs).abs().max() / theirs.abs().max()).item())
    return worst


# The config axes of UniPCMultistepScheduler this step covers, each against the bh2 order-2 default.
LOOPS = [
    (10, {}),
    (25, {}),
    (10, dict(prediction_type="v_prediction")),
    (10, dict(prediction_type="sample")),
    (10, dict(solver_type="bh1")),
    (25, dict(solver_type="bh1", prediction_type="v_prediction")),
    (10, dict(lower_order_final=False, final_sigmas_type="sigma_min")),
    (10, dict(final_sigmas_type="sigma_min")),
    (20, dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_type="bh1")),
    (10, dict(disable_corrector=[0])),
    (12, dict(disable_corrector=[1, 4, 10])),
    (15, dict(use_karras_sigmas=True)),
    (15, dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    (15, dict(use_exponential_sigmas=True)),
    (15, dict(use_beta_sigmas=True)),
    (25, dict(thresholding=True)),
    (12, dict(thresholding=True, prediction_type="sample", sample_max_value=2.0)),
    (25, dict(timestep_spacing="leading", steps_offset=1)),
    (25, dict(timestep_spacing="trailing")),
    (10, dict(solver_order=1)),
    (10, dict(solver_order=1, solver_type="bh1", disable_corrector=[2])),
    (50, {}),
    # Wan's configuration: flow matching sigmas (shifted), flow_prediction
    (10, dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)),
    (20, dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, timestep_spacing="trailing")),
    (
        12,
        dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_type="bh1", final_sigmas_type="sigma_min"),
    ),  # fmt: skip
    (10, dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=1, disable_corrector=[3])),
    (10, dict(prediction_type="flow_prediction", use_karras_sigmas=False)),  # flow x0_hat on a VP table
]
IDS = [f"{n}-{'-'.join(map(str, c.values())) or 'default'}" for n, c in LOOPS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps, config", LOOPS, ids=IDS)
def test_loop_is_diffusers(backend, steps, config):
    """Every step within 1e-5 (relative to the sample's largest value) of diffusers' in float32; the reference
    computes diffusers' float32 operations in diffusers' order (exactly equal where it applies)."""
    if interpreted(backend) and steps > 12:
        pytest.skip("the Triton interpreter runs the short loops (the long ones are the same kernel)")
    assert loop_error(backend, steps, **config) <= 1e-5


def test_loop_comparison_can_fail():
    """The parity measure sees a wrong solver type, a missing corrector and a first-order corrector."""
    assert loop_error("cpu", 10, solver_type="bh1") <= 1e-5
    sched = UniPCMultistepScheduler(**CONFIG)
    sched.set_timesteps(10)
    for kw in (dict(solver_type="bh1"), dict(use_corrector=False), dict(corrector_order=1)):
        x = theirs = rand(SHAPE, 0)
        history = unipc_history(x)
        for i, t in enumerate(sched.timesteps):
            m = rand(SHAPE, 100 + i)
            theirs = sched.step(m, t, theirs).prev_sample
            x = genkern.unipc_step(m, sched.sigmas, i, x, history, **kw)
        sched.set_timesteps(10)
        assert ((x - theirs).abs().max() / theirs.abs().max()).item() > 1e-4, kw


def _step_args(dtype, device, guided=False, slots=3):
    x = rand((4, 7), 1, dtype).to(device)
    m = rand((8 if guided else 4, 7), 2, dtype).to(device)
    history = rand((slots, 4, 7), 3, dtype).to(device)
    sigmas = torch.tensor([14.6, 6.0, 3.0, 1.0, 0.3, 0.0]).to(device)
    # first step (no corrector), first-order corrector, second order, the last (first-order predictor) step
    step = torch.tensor([0, 1, 3, 4]).to(device)
    return m, x, history, sigmas, step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_backends_agree_with_the_reference(backend, dtype):
    """Per-sample step indices (first, second order and final steps in one batch), guidance and rescale,
    thresholding, both solver types, orders and corrector settings; the history written."""
    device = device_for(backend)
    for prediction in ("epsilon", "v_prediction", "sample", "flow_prediction"):
        for guided in (False, True):
            for kw in (
                dict(solver_type="bh2"),
                dict(solver_type="bh1", dynamic_threshold=(0.9, 3.0)),
                dict(final_first_order=False, corrector_order=1),
                dict(solver_order=1, use_corrector=False),
                dict(solver_order=1, solver_type="bh1"),
                dict(flow_sigmas=True),
                dict(flow_sigmas=True, solver_type="bh1", dynamic_threshold=(0.9, 3.0), corrector_order=1),
            ):
                slots = 2 if kw.get("solver_order") == 1 else 3
                m, x, history, sigmas, step = _step_args(dtype, device, guided, slots)
                if kw.get("flow_sigmas"):
                    sigmas = sigmas / 15  # a flow-matching table: sigmas in [0, 1)
                g = dict(guidance_scale=3.0, guidance_rescale=0.7) if guided else {}
                h_got, h_want = history.clone(), history.clone()
                # float64: the kernels' rescale factors and thresholds are float32 values widened
                tol = 1e-10 if dtype == torch.float64 and not (guided or "dynamic_threshold" in kw) else 1e-6
                tol = 1e-5 if interpreted(backend) and dtype == torch.float32 else tol
                got = genkern.unipc_step(m, sigmas, step, x, h_got, prediction_type=prediction, backend=backend,
                                         **kw, **g)  # fmt: skip
                want = genkern.unipc_step(m, sigmas, step, x, h_want, prediction_type=prediction,
                                          backend="reference", **kw, **g)  # fmt: skip
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
                torch.testing.assert_close(h_got, h_want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_loop_is_the_reference(backend):
    """A float64 loop within 1e-10 of the reference's (the reference is diffusers' float32 order in float64)."""
    if interpreted(backend):
        pytest.skip("the interpreter's float64 is the same kernel as float32's (test_backends_agree...)")
    device = device_for(backend)
    sched = UniPCMultistepScheduler(**CONFIG)
    sched.set_timesteps(15)
    sigmas = sched.sigmas.to(device)
    x = y = rand(SHAPE, 0, torch.float64).to(device)
    h_x, h_y = unipc_history(x), unipc_history(y)
    for i in range(15):
        x = genkern.unipc_step(torch.tanh(x), sigmas, i, x, h_x, backend=backend)
        y = genkern.unipc_step(torch.tanh(y), sigmas, i, y, h_y, backend="reference")
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_first_steps_ignore_the_history_and_odd_shapes(backend):
    """Step 0 never reads the history (NaN there changes nothing, and it is overwritten); an empty batch, one
    element, a sample size not a multiple of 4 and a non-contiguous model output."""
    device = device_for(backend)
    m, x, history, sigmas, _ = _step_args(torch.float32, device)
    step = torch.zeros(4, dtype=torch.int64, device=device)
    nan = torch.full_like(history, float("nan"))
    h_want = history.clone()
    got = genkern.unipc_step(m, sigmas, step, x, nan, backend=backend)
    want = genkern.unipc_step(m, sigmas, step, x, h_want, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nan[:2], h_want[:2], rtol=1e-6, atol=1e-6)  # the sample and x0_hat written
    for shape in ((0, 5), (1, 1), (2, 3, 3)):
        x1, m1 = rand(shape, 4).to(device), rand(shape, 5).to(device)
        h1 = torch.zeros((3, *shape), device=device)
        got = genkern.unipc_step(m1, sigmas, 2, x1, h1.clone(), backend=backend)
        want = genkern.unipc_step(m1, sigmas, 2, x1, h1.clone(), backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    mt = rand((7, 4), 6).to(device).t()
    got = genkern.unipc_step(mt, sigmas, 2, x, history.clone(), backend=backend)
    want = genkern.unipc_step(mt.contiguous(), sigmas, 2, x, history.clone(), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _op_args(m, x, history, sigmas, step, **kw):
    o = dict(prediction=0, solver_type=1, predictor_order=2, corrector_order=2, final_first_order=True,
             corrector=True, flow_sigmas=False, guidance_scale=None, guidance_rescale=0.0, dynamic_ratio=None,
             dynamic_max=1.0)  # fmt: skip
    o.update(kw)
    return (m, x, history, sigmas, step, *o.values())


def test_opcheck_compile_and_bad_arguments():
    m, x, history, sigmas, step = _step_args(torch.float32, "cpu")
    op = torch.ops.genkern.unipc_step
    for kw in ({}, dict(solver_type=0, corrector=False), dict(prediction=1, dynamic_ratio=0.9, dynamic_max=2.0)):
        torch.library.opcheck(op, _op_args(m, x, history.clone(), sigmas, step, **kw))
    flow = dict(prediction=3, flow_sigmas=True, dynamic_ratio=0.9, dynamic_max=2.0)
    torch.library.opcheck(op, _op_args(m, x, history.clone(), sigmas / 15, step, **flow))  # sigmas in [0, 1)
    guided = _op_args(rand((8, 7), 7), x, history.clone(), sigmas, step, guidance_scale=2.0, guidance_rescale=0.5)
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
        genkern.unipc_step(m, sigmas, 0, x, history, solver_type="midpoint")
    with pytest.raises(ValueError, match="step"):
        genkern.unipc_step(m, sigmas, 5, x, history)  # 5 sigmas steps: indices 0..4
    with pytest.raises(ValueError, match="history"):
        genkern.unipc_step(m, sigmas, 0, x, history[:2])  # order 2 needs the third slot
    with pytest.raises(ValueError, match="history"):
        genkern.unipc_step(m, sigmas, 0, x, history[:, :2])
    with pytest.raises(TypeError, match="sigmas"):
        genkern.unipc_step(m, sigmas.double(), 0, x, history)
    with pytest.raises(ValueError, match="predictor_order"):
        op(*_op_args(m, x, history, sigmas, step, predictor_order=3))
    with pytest.raises(ValueError, match="corrector_order"):
        op(*_op_args(m, x, history, sigmas, step, corrector_order=0))
    with pytest.raises(ValueError, match="solver_order"):
        UniPCMultistepSampler(SCHEDULE, solver_order=3)
    with pytest.raises(TypeError, match="disable_corrector"):
        UniPCMultistepSampler(SCHEDULE, disable_corrector=1)
    with pytest.raises(TypeError, match="cuda_graph"):
        UniPCMultistepSampler(SCHEDULE).sample(lambda x, t: x, (1, 2), 3, cuda_graph=1)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("sigma_schedule", [None, "karras", "exponential", "beta"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_sigmas_are_diffusers(spacing, sigma_schedule, final):
    """Within 1e-5: genkern's alpha-bars are float64 rounded to float32, diffusers' float32 products."""
    flags = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
    config = {flags[sigma_schedule]: True} if sigma_schedule else {}
    sched = UniPCMultistepScheduler(**CONFIG, timestep_spacing=spacing, steps_offset=1, final_sigmas_type=final,
                                    **config)  # fmt: skip
    sched.set_timesteps(20)
    sigmas, timesteps = unipc_sigmas(SCHEDULE, 20, spacing=spacing, steps_offset=1, sigma_schedule=sigma_schedule,
                                     final_sigma=final)  # fmt: skip
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=1e-5, atol=1e-6)
    # the interpolated-back timesteps are truncated to integers: a sigma 1e-6 away may land one lower
    assert (timesteps - sched.timesteps).abs().max() <= (1 if sigma_schedule else 0)


SAMPLER_CONFIGS = [
    ({}, {}),
    (
        dict(use_karras_sigmas=True, disable_corrector=[3], lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, disable_corrector=[3], lower_order_final=False, final_sigma="sigma_min"),
    ),
    (
        dict(solver_order=1, solver_type="bh1", timestep_spacing="trailing", final_sigmas_type="sigma_min"),
        dict(solver_order=1, solver_type="bh1", spacing="trailing", final_sigma="sigma_min"),
    ),
]


@pytest.mark.parametrize("config, options", SAMPLER_CONFIGS)
def test_sampler_is_a_diffusers_loop(config, options):
    """UniPCMultistepSampler against the loop a diffusers pipeline runs (the model, step), with guidance."""

    def model(x, t):
        return 0.2 * x - t.view(-1, 1, 1).float() / 2000

    steps, B, scale = 12, 3, 2.5
    sched = UniPCMultistepScheduler(**CONFIG, **config)
    sched.set_timesteps(steps)
    x = genkern.randn((B, 2, 4), seed=8)
    for t in sched.timesteps:
        out = model(torch.cat([x, x]), t.expand(2 * B))
        out = out[:B] + scale * (out[B:] - out[:B])
        x = sched.step(out, t, x).prev_sample
    sampler = UniPCMultistepSampler(SCHEDULE, **options)
    got = sampler.sample(model, (B, 2, 4), steps, seed=8, guidance_scale=scale)
    assert x.isfinite().all()
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)  # float64 vs float32 alpha-bars: see the sigmas
    assert torch.equal(got[:2], sampler.sample(model, (2, 2, 4), steps, seed=8, guidance_scale=scale))
    again = sampler.sample(model, (B, 2, 4), steps, seed=8, guidance_scale=scale)  # the reused loop
    assert torch.equal(got, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_sampler_direct_launches_are_the_op(dtype, guidance_scale):
    """The sampler's direct launches give the bits of the op called step by step, whatever the model hands
    back: its input itself, a non-contiguous tensor; consecutive runs (one reused loop) return distinct
    tensors, the first left as it was."""
    shape = (2, 3, 6)
    models = {
        "scaled": lambda x, t: 0.1 * x - t.view(-1, 1, 1) / 1000,
        "its input": lambda x, t: x,
        "strided": lambda x, t: torch.cat([x, x], dim=2)[:, :, ::2] * 0.5,
    }
    sampler = UniPCMultistepSampler(SCHEDULE, disable_corrector=[2])
    sigmas, timesteps = unipc_sigmas(SCHEDULE, 6)
    for name, model in models.items():
        x_T = genkern.randn(shape, seed=3, dtype=dtype)
        x, history = x_T, unipc_history(x_T)
        for i, t in enumerate(timesteps):
            xin = torch.cat([x, x]) if guidance_scale is not None else x
            m = model(xin, t.expand(xin.shape[0]))
            x = genkern.unipc_step(m, sigmas, i, x, history, use_corrector=i != 3, guidance_scale=guidance_scale)
        kw = dict(x_T=x_T, dtype=dtype, guidance_scale=guidance_scale)
        first = sampler.sample(model, shape, 6, **kw)
        kept = first.clone()
        second = sampler.sample(model, shape, 6, **kw)
        assert torch.equal(first, x), name
        assert torch.equal(second, x) and second.data_ptr() != first.data_ptr(), name
        assert torch.equal(first, kept), name


def test_cuda_graph_sampler():
    """cuda_graph=True needs a CUDA device; on one, the captured loop replays the eager loop's samples."""
    sampler = UniPCMultistepSampler(SCHEDULE)
    model = lambda x, t: 0.2 * x - t.view(-1, 1, 1).float() / 2000  # noqa: E731
    with pytest.raises(ValueError, match="cuda_graph"):
        sampler.sample(model, (1, 2, 3), 4, seed=0, cuda_graph=True)  # a CPU run
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    kw = dict(seed=5, device="cuda", guidance_scale=2.0)
    eager = sampler.sample(model, (2, 2, 3), 10, **kw)
    graphed = sampler.sample(model, (2, 2, 3), 10, cuda_graph=True, **kw)
    again = sampler.sample(model, (2, 2, 3), 10, cuda_graph=True, **{**kw, "seed": 6})
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(again, graphed)
