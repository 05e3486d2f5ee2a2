"""Fused DDPM and DDIM steps on every kernel backend against genkern.diffusion.reference (itself tested
against diffusers in test_diffusion_reference.py)."""

import itertools

import pytest
import torch
from conftest import KERNEL_BACKENDS, TOLERANCE, assert_close, backend_dtype_params, device_for, interpreted

import genkern
from genkern import backend as gk_backend
from genkern.diffusion import reference as ref
from genkern.diffusion._ops import StepOptions
from genkern.diffusion.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule("cosine", num_train_timesteps=1000)
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
# The kernels compute the step's coefficients in float32 from the float32 table (float64 data too), and a
# strided step's beta' = (ab_prev - ab_t) / ab_prev loses a few bits to the difference: results agree with
# the float64 reference to a few float32 ulps of the largest term, hence the scale.
SCALE = 40


def table_tol(dtype):
    return torch.float32 if dtype == torch.float64 else dtype


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def step_timesteps(batch, device, strided=True):
    """Per-sample (t, prev_t): both ends of the schedule, a strided step and the last step to -1."""
    pairs = [(0, -1), (999, 979), (500, 499), (1, 0), (250, 120), (10, -1)]
    pairs = [pairs[i % len(pairs)] for i in range(batch)]
    t = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=device)
    prev = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=device)
    return t, (prev if strided else None)


def shapes_for(backend):
    small = [(1, 1), (3, 5), (2, 3, 4, 5), (4, 3, 3, 3), (0, 3)]
    return small if interpreted(backend) else small + [(3, 4, 33, 31), (2, 70001)]


def model_output_for(sample, guided, learned, seed=1):
    shape = list(sample.shape)
    shape[0] *= 2 if guided else 1
    if learned:
        shape[1] *= 2
    m = make(shape, sample.dtype, sample.device, seed)
    if learned:  # the variance half lies in [-1, 1]
        C = sample.shape[1]
        m[:, C:] = torch.tanh(m[:, C:])
    return m


def check_step(backend, dtype, fn_name, shape, **kwargs):
    device = device_for(backend)
    sample = make(shape, dtype, device)
    guided = kwargs.get("guidance_scale") is not None
    learned = kwargs.get("variance_type") == "learned_range"
    m = model_output_for(sample, guided, learned)
    strided = kwargs.pop("strided", True)
    t, prev_t = step_timesteps(shape[0], device, strided)
    if fn_name == "ddim_step" and prev_t is None:
        prev_t = t - 1
    got = getattr(genkern, fn_name)(m, t, sample, SCHEDULE, prev_t=prev_t, seed=5, offset=3, backend=backend, **kwargs)
    expected = getattr(ref, fn_name)(
        m.cpu(),
        t.cpu(),
        sample.cpu(),
        SCHEDULE,
        prev_t=None if prev_t is None else prev_t.cpu(),
        seed=5,
        offset=3,
        **kwargs,
    )
    for g, e in zip(got, expected):
        assert g.shape == sample.shape and g.dtype == dtype and g.device == sample.device
        # NaN where the reference has NaN too: guidance rescale of a one-element sample is 0/0 (std 0).
        atol, rtol = TOLERANCE[table_tol(dtype)]
        scale = SCALE * max(1.0, float(e.nan_to_num(0.0).abs().max()) if e.numel() else 1.0)
        torch.testing.assert_close(g.cpu().double(), e.double(), atol=atol * scale, rtol=rtol * scale, equal_nan=True)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_step_matches_reference(backend, dtype, prediction_type):
    options = [
        dict(),
        dict(eta=1.0),
        dict(eta=0.3, clip_sample=1.0, use_clipped_model_output=True),
        dict(dynamic_threshold=(0.9, 3.0)),
        dict(guidance_scale=4.0),
        dict(guidance_scale=7.5, guidance_rescale=0.7, eta=0.5),
        dict(guidance_scale=2.0, dynamic_threshold=(0.95, 2.0), use_clipped_model_output=True),
    ]
    for shape, kwargs in itertools.product(shapes_for(backend), options):
        check_step(backend, dtype, "ddim_step", shape, prediction_type=prediction_type, **kwargs)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_matches_reference(backend, dtype, variance_type):
    options = [
        dict(strided=False),
        dict(prediction_type="v_prediction"),
        dict(prediction_type="sample", clip_sample=1.0),
        dict(dynamic_threshold=(0.9, 3.0), strided=False),
        dict(guidance_scale=3.0, prediction_type="v_prediction"),
        dict(guidance_scale=5.0, guidance_rescale=0.5, clip_sample=2.0),
    ]
    shapes = [s for s in shapes_for(backend) if len(s) > 1]
    for shape, kwargs in itertools.product(shapes, options):
        check_step(backend, dtype, "ddpm_step", shape, variance_type=variance_type, **kwargs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_given_noise_equals_the_stream(backend):
    device = device_for(backend)
    x, m = make((3, 2, 5), torch.float32, device), make((3, 2, 5), torch.float32, device, 1)
    t, prev = step_timesteps(3, device)
    z = genkern.randn((3, 2, 5), seed=8, offset=2, device=device)
    for fn, kwargs in ((genkern.ddpm_step, {}), (genkern.ddim_step, dict(eta=0.7))):
        a = fn(m, t, x, SCHEDULE, prev_t=prev, seed=8, offset=2, backend=backend, **kwargs)
        b = fn(m, t, x, SCHEDULE, prev_t=prev, noise=z, backend=backend, **kwargs)
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_noise_only_where_the_step_is_stochastic(backend):
    device = device_for(backend)
    x, m = make((4, 6), torch.float32, device), make((4, 6), torch.float32, device, 1)
    t = torch.tensor([0, 0, 5, 5], device=device)
    a, _ = genkern.ddpm_step(m, t, x, SCHEDULE, seed=1, backend=backend)
    b, _ = genkern.ddpm_step(m, t, x, SCHEDULE, seed=2, backend=backend)
    assert torch.equal(a[:2], b[:2])  # t = 0: the posterior mean, no noise
    assert not torch.equal(a[2:], b[2:])
    prev = t - 1
    a, _ = genkern.ddim_step(m, t, x, SCHEDULE, prev_t=prev, seed=1, backend=backend)
    b, _ = genkern.ddim_step(m, t, x, SCHEDULE, prev_t=prev, seed=2, backend=backend)
    assert torch.equal(a, b)  # eta = 0 is deterministic


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_without_pred_original(backend):
    device = device_for(backend)
    x, m = make((2, 3, 4), torch.float32, device), make((2, 3, 4), torch.float32, device, 1)
    t, prev = step_timesteps(2, device)
    full = genkern.ddim_step(m, t, x, SCHEDULE, prev_t=prev, eta=0.5, seed=1, backend=backend)
    prev_only, none = genkern.ddim_step(
        m, t, x, SCHEDULE, prev_t=prev, eta=0.5, seed=1, backend=backend, return_pred_original=False
    )
    assert none is None
    torch.testing.assert_close(prev_only, full[0], atol=0, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_scalar_timesteps_and_non_contiguous_inputs(backend):
    device = device_for(backend)
    x = make((3, 5, 4), torch.float32, device).transpose(1, 2)
    m = make((3, 5, 4), torch.float32, device, 1).transpose(1, 2)
    got = genkern.ddim_step(m, 700, x, SCHEDULE, prev_t=torch.tensor(600), eta=0.5, seed=2, backend=backend)
    expected = ref.ddim_step(m.cpu(), 700, x.cpu(), SCHEDULE, prev_t=600, eta=0.5, seed=2)
    for g, e in zip(got, expected):
        assert_close(g.cpu(), e, torch.float32, scale=SCALE)


def test_diffusers_ddim_loop_agrees():
    """A whole 10-step DDIM loop (eta = 0, leading spacing, epsilon) against diffusers' scheduler."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True
    )
    scheduler.set_timesteps(10)
    timesteps, prev_timesteps = SCHEDULE.timesteps(10, spacing="leading")
    assert timesteps.tolist() == scheduler.timesteps.tolist()

    def model(x, t):  # a fixed smooth function of (x, t)
        return torch.tanh(x) * (1.0 + float(t) / 1000.0)

    x_ours = x_theirs = make((2, 3, 8, 8), torch.float32, "cpu")
    for t, prev in zip(timesteps.tolist(), prev_timesteps.tolist()):
        x_ours, _ = genkern.ddim_step(model(x_ours, t), t, x_ours, SCHEDULE, prev_t=prev, backend="cpu")
        x_theirs = scheduler.step(model(x_theirs, t), t, x_theirs).prev_sample
    # diffusers' alpha-bars are a float32 cumulative product: agreement to float32 precision of the schedule.
    torch.testing.assert_close(x_ours, x_theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", genkern.backends())
def test_opcheck(backend):
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    x = make((2, 3, 4), torch.float32, device)
    m, m2 = make((2, 3, 4), torch.float32, device, 1), make((4, 6, 4), torch.float32, device, 2).tanh()
    t, prev = step_timesteps(2, device)
    table = SCHEDULE.table(device)
    ops = torch.ops.genkern
    for op, args in [
        (ops.ddim_step, (m, x, t, prev, table, None, 3, 1, *StepOptions().pack(), True)),
        (
            ops.ddim_step,
            (
                m,
                x,
                t,
                prev,
                table,
                None,
                3,
                1,
                *StepOptions(prediction=1, eta=0.5, use_clipped_model_output=True, clip=1.0).pack(),
                False,
            ),
        ),
        (
            ops.ddim_step,
            (
                m2[:, :3],
                x,
                t,
                prev,
                table,
                None,
                3,
                1,
                *StepOptions(dynamic_ratio=0.9, dynamic_max=2.0, guidance_scale=3.0, guidance_rescale=0.5).pack(),
                True,
            ),
        ),
        (ops.ddpm_step, (m, x, t, None, table, None, 3, 1, *StepOptions().pack(), True)),
        (
            ops.ddpm_step,
            (
                m2,
                x,
                t,
                prev,
                table,
                None,
                -3,
                2**40,
                *StepOptions(prediction=2, variance=2, clip=1.0, guidance_scale=2.0, guidance_rescale=0.3).pack(),
                True,
            ),
        ),
    ]:
        with gk_backend.scoped(backend):
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_sampling_step():
    x, m = make((2, 3, 4), torch.float32, "cpu"), make((2, 3, 4), torch.float32, "cpu", 1)

    def step(x, m, t, prev):
        x, _ = genkern.ddim_step(m, t, x, SCHEDULE, prev_t=prev, eta=0.5, seed=3, return_pred_original=False)
        return x

    t, prev = step_timesteps(2, "cpu")
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, m, t, prev), step(x, m, t, prev))


def test_bad_input_is_rejected():
    x, m = make((2, 3), torch.float32, "cpu"), make((2, 3), torch.float32, "cpu", 1)
    t = torch.tensor([5, 6])
    cases = [
        (lambda: genkern.ddpm_step(m, 1000, x, SCHEDULE), ValueError, "t"),
        (lambda: genkern.ddpm_step(m, torch.tensor([5, -1]), x, SCHEDULE), ValueError, "t"),
        (lambda: genkern.ddpm_step(m, torch.tensor([5.0, 6.0]), x, SCHEDULE), TypeError, "t"),
        (lambda: genkern.ddpm_step(m, t, x, SCHEDULE, prev_t=torch.tensor([5, 2])), ValueError, "prev_t"),
        (lambda: genkern.ddpm_step(m, t, x, SCHEDULE, prev_t=-2), ValueError, "prev_t"),
        (lambda: genkern.ddim_step(m, t, x, SCHEDULE), ValueError, "prev_t"),
        (lambda: genkern.ddim_step(m, t, x, SCHEDULE, prev_t=t - 1, eta=-0.1), ValueError, "eta"),
        (lambda: genkern.ddim_step(m[:, :2], t, x, SCHEDULE, prev_t=t - 1), ValueError, "model_output"),
        (
            lambda: genkern.ddim_step(torch.cat([m, m, m]), t, x, SCHEDULE, prev_t=t - 1, guidance_scale=2.0),
            ValueError,
            "model_output",
        ),
        (lambda: genkern.ddim_step(m, t, x, SCHEDULE, prev_t=t - 1, guidance_scale=2.0), ValueError, "model_output"),
        (lambda: genkern.ddpm_step(m, t, x, SCHEDULE, variance_type="learned_range"), ValueError, "model_output"),
        (lambda: genkern.ddpm_step(m, t, x, SCHEDULE, variance_type="fixed"), ValueError, "variance_type"),
        (
            lambda: genkern.ddim_step(m, t, x, SCHEDULE, prev_t=t - 1, prediction_type="x0"),
            ValueError,
            "prediction_type",
        ),
        (
            lambda: genkern.ddim_step(m, t, x, SCHEDULE, prev_t=t - 1, clip_sample=1.0, dynamic_threshold=(0.9, 2.0)),
            ValueError,
            "clip_sample",
        ),
        (
            lambda: genkern.ddim_step(m, t, x, SCHEDULE, prev_t=t - 1, guidance_rescale=0.5),
            ValueError,
            "guidance_rescale",
        ),
        (lambda: genkern.ddim_step(m.double(), t, x, SCHEDULE, prev_t=t - 1), TypeError, "dtype"),
    ]
    for fn, error, word in cases:
        with pytest.raises(error, match=word):
            fn()


@pytest.mark.parametrize("backend", genkern.backends())
def test_out_buffers_and_in_place(backend):
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    x, m = make((3, 2, 5), torch.float32, device), make((3, 2, 5), torch.float32, device, 1)
    t, prev_t = step_timesteps(3, device)
    for fn, kwargs in ((genkern.ddpm_step, dict(seed=4)), (genkern.ddim_step, dict(eta=0.5, seed=4))):
        expected = fn(m, t, x, SCHEDULE, prev_t=prev_t, backend=backend, **kwargs)
        prev, x0 = torch.empty_like(x), torch.empty_like(x)
        got = fn(m, t, x, SCHEDULE, prev_t=prev_t, backend=backend, out=(prev, x0), **kwargs)
        assert got[0] is prev and got[1] is x0
        torch.testing.assert_close(prev, expected[0], atol=0, rtol=0)
        torch.testing.assert_close(x0, expected[1], atol=0, rtol=0)
        got = fn(m, t, x, SCHEDULE, prev_t=prev_t, backend=backend, out=(prev, None), **kwargs)
        assert got[1] is None
        y = x.clone()  # in place: prev_sample is the sample itself
        fn(m, t, y, SCHEDULE, prev_t=prev_t, backend=backend, out=y, return_pred_original=False, **kwargs)
        torch.testing.assert_close(y, expected[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="out prev_sample"):
        genkern.ddim_step(m, t, x, SCHEDULE, prev_t=prev_t, out=torch.empty(3, 10, device=device), backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        genkern.ddim_step(
            m, t, x, SCHEDULE, prev_t=prev_t, out=torch.empty(3, 5, 2, device=device).transpose(1, 2), backend=backend
        )
    with pytest.raises(TypeError, match="out"):
        genkern.ddim_step(m, t, x, SCHEDULE, prev_t=prev_t, out=[1, 2, 3], backend=backend)
    table = SCHEDULE.table(device)
    with gk_backend.scoped(backend):
        torch.library.opcheck(
            torch.ops.genkern.ddim_step_out,
            (
                m,
                x,
                t,
                prev_t,
                table,
                None,
                3,
                1,
                *StepOptions(eta=0.5).pack(),
                torch.empty_like(x),
                torch.empty_like(x),
            ),
        )
        torch.library.opcheck(
            torch.ops.genkern.ddpm_step_out,
            (m, x, t, None, table, None, 3, 1, *StepOptions().pack(), torch.empty_like(x), None),
        )


@pytest.mark.parametrize("backend", genkern.backends())
@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step"])
def test_pred_original_is_a_new_tensor_for_prediction_sample(backend, op):
    """With prediction_type='sample' and no clipping, thresholding or guidance, x0_hat is the model output
    itself: the op must still return a new tensor (torch's custom-op rules reject an output aliasing an
    input), which the reference once did not."""
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    x, m = make((2, 3, 4), torch.float32, device), make((2, 3, 4), torch.float32, device, 1)
    t, prev = step_timesteps(2, device)
    args = (m, x, t, None if op == "ddpm_step" else prev, SCHEDULE.table(device), None, 3, 1)
    with gk_backend.scoped(backend):
        _, x0 = getattr(torch.ops.genkern, op)(*args, *StepOptions(prediction=2).pack(), True)
        torch.library.opcheck(getattr(torch.ops.genkern, op), (*args, *StepOptions(prediction=2).pack(), True))
    assert torch.equal(x0, m)
    assert x0.untyped_storage().data_ptr() != m.untyped_storage().data_ptr()


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_reference_steps_with_sample_prediction_return_new_tensors(variance_type):
    """prediction_type='sample' with no clip, threshold or guidance: x0_hat is the model output itself, which
    the reference returned as is (torch's custom-op rules reject an output aliasing an input: issue 16)."""
    schedule = NoiseSchedule("linear", num_train_timesteps=10)
    sample = torch.randn(2, 3, 4)
    channels = 6 if variance_type == "learned_range" else 3
    model_output = torch.randn(2, channels, 4).clamp(-1, 1)
    for backend in ("reference", *KERNEL_BACKENDS):
        _, x0 = genkern.ddpm_step(
            model_output, 5, sample, schedule, prediction_type="sample", variance_type=variance_type, seed=0,
            backend=backend,
        )  # fmt: skip
        assert torch.equal(x0, model_output[:, :3]) and x0.data_ptr() != model_output.data_ptr()
    _, x0 = genkern.ddim_step(
        model_output[:, :3], 5, sample, schedule, prev_t=2, prediction_type="sample", backend="reference"
    )
    assert torch.equal(x0, model_output[:, :3])
    prev, x0 = ref.ddim_step(model_output[:, :3], 5, sample, schedule, prev_t=2, prediction_type="sample")
    assert x0.data_ptr() != model_output.data_ptr()


# ------------------------------------------------------------------------------------------------ the loop's step
def _loop_step(kind, rows, **options):
    from genkern.diffusion import _prepared_step

    t, prev = SCHEDULE.timesteps(rows, "trailing")
    batch = 3
    t_rows, prev_rows = t[:, None].expand(-1, batch).contiguous(), prev[:, None].expand(-1, batch).contiguous()
    defaults = dict(prediction_type="epsilon", clip_sample=None, dynamic_threshold=None, guidance_scale=None)
    defaults.update(guidance_rescale=0.0, backend=None)
    defaults.update(options)
    return _prepared_step(kind, SCHEDULE, t_rows, prev_rows, seed=7, **defaults), t_rows, prev_rows


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("ddim", dict(eta=0.6)),
        ("ddpm", {}),
        ("ddim", dict(guidance_scale=2.0)),
        ("ddim", dict(guidance_scale=2.0, guidance_rescale=0.5, clip_sample=1.0)),
        ("ddpm", dict(dynamic_threshold=(0.9, 2.0))),
    ],
)
def test_the_loops_fast_step_gives_the_ops_bits(kind, options):
    """After its first call, a sampling loop's step skips torch's dispatch (PreparedStep): every step must still
    be the op's result, bit for bit."""
    step, t_rows, prev_rows = _loop_step(kind, 6, **options)
    op = torch.ops.genkern.ddim_step if kind == "ddim" else torch.ops.genkern.ddpm_step
    batch = 6 if options.get("guidance_scale") else 3
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(6):
            model_output = torch.randn(batch, 2, 5, generator=torch.Generator().manual_seed(i + 1))
            args = (model_output, x, t_rows[i], prev_rows[i], step.table, None, 7, i + 1, *step.options.pack())
            expected = op(*args, False)
            got = step(model_output, x, i)
            assert step._fast is not None  # the first call armed the fast path
            assert torch.equal(got, expected[0]), i
            x = got


def test_the_loops_fast_step_still_refuses_what_the_op_refuses():
    step, _, _ = _loop_step("ddim", 4, eta=0.0)
    x = torch.randn(3, 4)
    with torch.no_grad():
        step(torch.randn(3, 4), x, 0)
        with pytest.raises(ValueError, match="model_output"):
            step(torch.randn(3, 5), x, 1)  # another shape: through the op, which checks it
        with pytest.raises(ValueError, match="model_output"):
            step(torch.randn(2, 4), x, 1)
        torch.testing.assert_close(step(torch.randn(3, 4), x, 1).shape, x.shape)  # and the loop goes on


def test_the_loops_step_leaves_gradients_to_the_op():
    """The steps have no backward: with a tensor that needs gradients the call goes through the op, which says
    so at backward, instead of the fast path's result silently cut from the graph."""
    step, _, _ = _loop_step("ddim", 4, eta=0.0)
    x, m = torch.randn(3, 4), torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        step(m.detach(), x, 0)  # armed
    prev = step(m, x, 1)
    assert prev.grad_fn is not None
    with pytest.raises(RuntimeError, match="no autograd formula"):
        prev.sum().backward()


def test_the_loops_step_checks_every_timestep_row_once():
    from genkern.diffusion import _prepared_step

    t = torch.tensor([[999], [1000]])
    with pytest.raises(ValueError, match=r"t must be in \[0, 999\]"):
        _prepared_step(
            "ddim", SCHEDULE, t, torch.tensor([[500], [400]]), seed=0, prediction_type="epsilon", clip_sample=None,
            dynamic_threshold=None, guidance_scale=None, guidance_rescale=0.0, backend=None,
        )  # fmt: skip
    with pytest.raises(ValueError, match="prev_t must be smaller than t"):
        _prepared_step(
            "ddim", SCHEDULE, torch.tensor([[10], [5]]), torch.tensor([[5], [5]]), seed=0, prediction_type="epsilon",
            clip_sample=None, dynamic_threshold=None, guidance_scale=None, guidance_rescale=0.0, backend=None,
        )  # fmt: skip
