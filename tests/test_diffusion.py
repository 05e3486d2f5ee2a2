"""Fused diffusion ops (training side) on every kernel backend against genkern.diffusion.reference."""

import pytest
import torch
from conftest import KERNEL_BACKENDS, assert_close, backend_dtype_params, device_for, interpreted

import genkern
from genkern import _kernels
from genkern import backend as gk_backend
from genkern.diffusion import reference as ref
from genkern.diffusion.schedules import NoiseSchedule

PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SCHEDULE = NoiseSchedule("cosine", num_train_timesteps=1000)


def table_tol(dtype):
    """Kernels read float32 coefficients (the schedule's table): float64 data agrees to float32 precision."""
    return torch.float32 if dtype == torch.float64 else dtype


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def on_backend(backend, op, *args):
    """A direct op call on `backend` (the op schemas carry no backend argument)."""
    with gk_backend.scoped(backend):
        return op(*args)


def timesteps(batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (batch,), generator=g)
    if batch:
        t[0] = 0  # the ends of the schedule
        t[-1] = 999
    return t.to(device)


def shapes_for(backend):
    small = [(1, 1), (3, 5), (2, 3, 4, 5), (4, 0), (0, 3)]
    return small if interpreted(backend) else small + [(3, 3, 33, 31), (1, 70001)]


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_q_sample_matches_reference(backend, dtype):
    device = device_for(backend)
    for shape in shapes_for(backend):
        x0 = make(shape, dtype, device)
        t = timesteps(shape[0], device)
        got = genkern.q_sample(x0, t, SCHEDULE, seed=11, offset=2, backend=backend)
        expected = ref.q_sample(x0.cpu(), t.cpu(), SCHEDULE, seed=11, offset=2)
        assert got.shape == x0.shape and got.dtype == dtype
        assert_close(got.cpu(), expected, table_tol(dtype), scale=4)
        noise = make(shape, dtype, device, seed=1)
        got = genkern.q_sample(x0, 500, SCHEDULE, noise=noise, backend=backend)
        assert_close(got.cpu(), ref.q_sample(x0.cpu(), 500, SCHEDULE, noise=noise.cpu()), table_tol(dtype), scale=4)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_diffusion_loss_matches_reference(backend, dtype, prediction_type):
    device = device_for(backend)
    for shape in shapes_for(backend):
        x0, m = make(shape, dtype, device), make(shape, dtype, device, seed=2)
        t = timesteps(shape[0], device, seed=3)
        for snr_gamma in (None, 5.0):
            kwargs = dict(prediction_type=prediction_type, snr_gamma=snr_gamma, reduction="none")
            got = genkern.diffusion_loss(m, x0, t, SCHEDULE, seed=4, offset=1, backend=backend, **kwargs)
            expected = ref.diffusion_loss(m.cpu(), x0.cpu(), t.cpu(), SCHEDULE, seed=4, offset=1, **kwargs)
            expected = expected.nan_to_num(0.0)  # a sample with no elements has loss 0 here (the mean of none)
            assert got.shape == (shape[0],)
            assert_close(got.cpu(), expected, table_tol(dtype), scale=20)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_loss_regenerates_the_noise_of_q_sample(backend):
    device = device_for(backend)
    x0 = make((4, 3, 8, 8), torch.float32, device)
    t = timesteps(4, device)
    x_t = genkern.q_sample(x0, t, SCHEDULE, seed=7, offset=3, backend=backend)
    # The exact noise, recovered from x_t: a model predicting it has zero loss (up to float rounding).
    level = SCHEDULE.table(device)[t + 1].reshape(4, 4, 1, 1, 1)
    eps = (x_t - level[:, 2] * x0) / level[:, 3]
    loss = genkern.diffusion_loss(eps, x0, t, SCHEDULE, seed=7, offset=3, reduction="none", backend=backend)
    assert float(loss[1:-1].max()) < 1e-9  # t = 0 and t = 999 lose digits in the division above
    other = genkern.diffusion_loss(eps, x0, t, SCHEDULE, seed=7, offset=4, reduction="none", backend=backend)
    assert float(other.min()) > 0.5  # another offset is other noise


def test_reduction_mean_is_the_batch_mean():
    x0, m = make((5, 6), torch.float32, "cpu"), make((5, 6), torch.float32, "cpu", seed=1)
    per_sample = genkern.diffusion_loss(m, x0, 10, SCHEDULE, seed=1, reduction="none")
    torch.testing.assert_close(genkern.diffusion_loss(m, x0, 10, SCHEDULE, seed=1), per_sample.mean())


# ----------------------------------------------------------------------------------------------- autograd


def _grads(fn, inputs):
    """Gradients of fn w.r.t. each input; zeros for an input the output does not depend on."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    out.backward(torch.ones_like(out) if out.dim() == 0 else torch.linspace(0.5, 1.5, out.numel()).to(out))
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs]


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_loss_backward_matches_autograd_of_the_reference(backend, dtype, prediction_type):
    device = device_for(backend)
    x0, m, noise = make((3, 2, 5), dtype, device), make((3, 2, 5), dtype, device, 1), make((3, 2, 5), dtype, device, 2)
    t = timesteps(3, device)
    kwargs = dict(prediction_type=prediction_type, snr_gamma=3.0, reduction="none")
    got = _grads(
        lambda a, b, c: genkern.diffusion_loss(a, b, t, SCHEDULE, noise=c, backend=backend, **kwargs), [m, x0, noise]
    )
    expected = _grads(
        lambda a, b, c: ref.diffusion_loss(a, b, t.cpu(), SCHEDULE, noise=c, **kwargs), [m.cpu(), x0.cpu(), noise.cpu()]
    )
    for g, e in zip(got, expected):
        assert_close(g.cpu(), e, table_tol(dtype), scale=20)
    # With the stream's noise, d/dmodel_output regenerates it.
    got = _grads(lambda a: genkern.diffusion_loss(a, x0, t, SCHEDULE, seed=5, backend=backend, **kwargs), [m])
    expected = _grads(lambda a: ref.diffusion_loss(a, x0.cpu(), t.cpu(), SCHEDULE, seed=5, **kwargs), [m.cpu()])
    assert_close(got[0].cpu(), expected[0], table_tol(dtype), scale=20)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_q_sample_backward(backend):
    device = device_for(backend)
    x0, noise = make((3, 4), torch.float32, device), make((3, 4), torch.float32, device, 1)
    t = timesteps(3, device)
    got = _grads(lambda a, b: genkern.q_sample(a, t, SCHEDULE, noise=b, backend=backend).sum(), [x0, noise])
    expected = _grads(lambda a, b: ref.q_sample(a, t.cpu(), SCHEDULE, noise=b).sum(), [x0.cpu(), noise.cpu()])
    for g, e in zip(got, expected):
        assert_close(g.cpu(), e, torch.float32, scale=4)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton", "reference") if b in genkern.backends()])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_gradcheck_float64(backend, prediction_type):
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    x0, m, noise = (make((2, 3), torch.float64, device, s).requires_grad_() for s in range(3))
    t = timesteps(2, device)
    fn = lambda a, b, c: genkern.diffusion_loss(
        a,
        b,
        t,
        SCHEDULE,
        noise=c,
        prediction_type=prediction_type,
        snr_gamma=2.0,
        reduction="none",
        backend=backend,
    )
    assert torch.autograd.gradcheck(fn, (m, x0, noise))
    assert torch.autograd.gradcheck(
        lambda a, b: genkern.q_sample(a, t, SCHEDULE, noise=b, backend=backend), (x0, noise)
    )


@pytest.mark.parametrize("backend", genkern.backends())
def test_opcheck(backend):
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    x0 = make((3, 4, 5), torch.float32, device).requires_grad_()
    m = make((3, 4, 5), torch.float32, device, 1).requires_grad_()
    t, table = timesteps(3, device), SCHEDULE.table(device)
    ops = torch.ops.genkern
    for op, args in [
        (ops.q_sample, (x0, t, table, None, 3, 1)),
        (ops.q_sample, (x0.transpose(1, 2), t, table, m.transpose(1, 2), 0, 0)),
        (ops.diffusion_loss, (m, x0, t, table, None, 3, 1, 1, 5.0)),
        (ops.diffusion_loss, (m, x0, t, table, None, -3, 2**40, 0, None)),  # snr_gamma None: no weighting
        (
            ops.diffusion_loss_backward,
            (torch.ones(3, device=device), m.detach(), x0.detach(), t, table, None, 3, 1, 2, None),
        ),
    ]:
        with gk_backend.scoped(backend):
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_training_step():
    x0 = make((4, 2, 3), torch.float32, "cpu")
    weight = torch.ones(1, requires_grad=True)

    def step(x0, t):
        x_t = genkern.q_sample(x0, t, SCHEDULE, seed=1, offset=0)
        return genkern.diffusion_loss(weight * x_t, x0, t, SCHEDULE, seed=1, offset=0)

    t = timesteps(4, "cpu")
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x0, t), step(x0, t))


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected():
    x0, m = make((2, 3), torch.float32, "cpu"), make((2, 3), torch.float32, "cpu", 1)
    cases = [
        (lambda: genkern.q_sample(x0, 1000, SCHEDULE), ValueError, "t"),
        (lambda: genkern.q_sample(x0, torch.tensor([1, -1]), SCHEDULE), ValueError, "t"),
        (lambda: genkern.q_sample(x0, torch.tensor([1.0, 2.0]), SCHEDULE), TypeError, "t"),
        (lambda: genkern.q_sample(x0, torch.tensor([1, 2, 3]), SCHEDULE), ValueError, "t"),
        (lambda: genkern.q_sample(x0.long(), 1, SCHEDULE), TypeError, "x0"),
        (lambda: genkern.q_sample(x0, 1, SCHEDULE, noise=m[:1]), ValueError, "noise"),
        (lambda: genkern.diffusion_loss(m, x0, 1, SCHEDULE, prediction_type="x"), ValueError, "prediction_type"),
        (lambda: genkern.diffusion_loss(m, x0, 1, SCHEDULE, snr_gamma=-1.0), ValueError, "snr_gamma"),
        (lambda: genkern.diffusion_loss(m, x0, 1, SCHEDULE, reduction="sum"), ValueError, "reduction"),
        (lambda: genkern.diffusion_loss(m[:, :2], x0, 1, SCHEDULE), ValueError, "model_output"),
        (lambda: genkern.diffusion_loss(m, x0, 1, "cosine"), TypeError, "schedule"),
        (
            lambda: on_backend(
                "cpu", torch.ops.genkern.q_sample, x0, torch.tensor([1, 2, 3]), SCHEDULE.table(), None, 0, 0
            ),
            ValueError,
            "t",
        ),
    ]
    for fn, error, word in cases:
        with pytest.raises(error, match=word):
            fn()


# ----------------------------------------------------------------------------------------------- dispatch


@pytest.mark.skipif("cpu" not in genkern.backends(), reason="needs the compiled core")
def test_dispatch_reaches_the_kernels_of_the_chosen_backend(monkeypatch):
    """backend="cpu" asks the diffusion kernel group for the cpu kernels, in the forward and in the backward
    (even with the reference chosen process-wide); backend="reference" runs the ops' bodies and asks for none,
    in the backward too (where the automatic choice would be cpu)."""
    asked = []
    original = _kernels.KernelGroup.on

    def on(self, backend):
        if self.family == "diffusion":
            asked.append(backend)
        return original(self, backend)

    monkeypatch.setattr(_kernels.KernelGroup, "on", on)
    x0 = make((2, 3, 4), torch.float32, "cpu")
    m = make((2, 3, 4), torch.float32, "cpu", 1).requires_grad_()
    t = torch.tensor([3, 700])

    def run(backend):
        asked.clear()
        x_t = genkern.q_sample(x0, t, SCHEDULE, seed=2, backend=backend)
        forward = list(asked)
        loss = genkern.diffusion_loss(m, x0, t, SCHEDULE, seed=2, backend=backend)
        forward += asked[len(forward) :]
        asked.clear()
        loss.backward()
        backward = list(asked)
        asked.clear()
        genkern.ddim_step(m.detach(), t, x_t, SCHEDULE, prev_t=t - 1, eta=0.5, seed=1, backend=backend)
        return forward, backward, list(asked)

    assert run("cpu") == (["cpu", "cpu"], ["cpu"], ["cpu"])
    with genkern.set_backend("reference"):  # the backward follows the forward's choice, not the process's
        assert run("cpu") == (["cpu", "cpu"], ["cpu"], ["cpu"])
    assert run("reference") == ([], [], [])
    assert m.grad is not None


# ------------------------------------------------------------------------ the reference's NaN rule (issue 16)


def test_reference_loss_propagates_nan_and_inf():
    """The spec must not hide non-finite values: a NaN model output gives a NaN loss (it was 0 where the
    reference zeroed NaN), an overflowing squared error inf (it was 3.4e38), other samples unaffected."""
    x0 = torch.zeros(3, 4)
    m = torch.zeros(3, 4)
    m[0, 1], m[1, 2] = float("nan"), 1e30
    noise = torch.zeros(3, 4)
    loss = ref.diffusion_loss(m, x0, 5, SCHEDULE, noise=noise, reduction="none")
    assert loss[0].isnan() and loss[1] == float("inf") and loss[2] == 0
    assert ref.diffusion_loss(m, x0, 5, SCHEDULE, noise=noise).isnan()
    cpu = genkern.diffusion_loss(m, x0, 5, SCHEDULE, noise=noise, reduction="none", backend="cpu")
    torch.testing.assert_close(cpu, loss, equal_nan=True)


def test_reference_loss_of_empty_samples_and_batches():
    """A sample with no elements has loss 0 (an empty sum; it was NaN, the mean of nothing), as on the kernel
    backends; an empty batch gives a (0,) tensor."""
    empty_samples = ref.diffusion_loss(torch.zeros(2, 0), torch.zeros(2, 0), 5, SCHEDULE, seed=1, reduction="none")
    assert torch.equal(empty_samples, torch.zeros(2))
    empty_batch = ref.diffusion_loss(torch.zeros(0, 3), torch.zeros(0, 3), 5, SCHEDULE, seed=1, reduction="none")
    assert empty_batch.shape == (0,)
    assert torch.equal(
        genkern.diffusion_loss(
            torch.zeros(2, 0), torch.zeros(2, 0), 5, SCHEDULE, seed=1, reduction="none", backend="cpu"
        ),
        empty_samples,
    )
