"""The causal_conv1d family: every backend with its kernels against the reference (and the reference
against F.conv1d's definition), forward and backward, across dtypes, kernel sizes, dilations and layouts;
the step-by-step update against the full convolution; gradcheck, opcheck, determinism, backend routing,
bad input. Kernel backends run on their device (cuda and triton on the GPU when there is one; without one,
triton runs on CPU tensors under TRITON_INTERPRET=1, where each operation is slow, so a few loops there
take a subset: see _bias_options and the gradcheck's fast mode)."""

import pytest
import torch
from conftest import KERNEL_BACKENDS, assert_close, backend_dtype_params, device_for, interpreted

import genkern
from genkern import backend as gk_backend
from genkern.autoregressive import reference as ref

FAMILY = "causal_conv1d"
CONV_BACKENDS = [b for b in KERNEL_BACKENDS if gk_backend.has_family(b, FAMILY)]
ALL_BACKENDS = CONV_BACKENDS + ["reference"]  # 'reference' too runs through the op
PARAMS = backend_dtype_params(CONV_BACKENDS) + backend_dtype_params(["reference"])
ACTIVATIONS = [None, "silu", "tanh"]

# (B, C_in, C_out or None for depthwise, L, K, dilation): odd sizes, L below the receptive field, K = 1.
CASES = [
    (2, 3, None, 17, 4, 1),
    (1, 5, None, 9, 1, 1),
    (3, 4, None, 5, 7, 2),  # L = 5 < receptive field 12
    (2, 3, 5, 13, 3, 3),
    (1, 2, 3, 1, 16, 1),
    (2, 3, 4, 600, 3, 2),  # full, B * L past the Triton kernels' 1024-position gradient segments
    (2, 6, None, 1030, 16, 3),  # crosses the CPU kernels' 1024 tile
    (0, 3, None, 7, 3, 1),  # empty batch
    (2, 3, 4, 0, 2, 1),  # empty length
]


def _device(backend):
    return device_for(backend) if backend != "reference" else torch.device("cpu")


def _bias_options(backend, index):
    """With and without a bias for each case; under the interpreter one of the two, alternating over the
    cases, so that both are still covered."""
    return (index % 2 == 0,) if interpreted(backend) else (True, False)


def make_case(case, dtype, device, seed=0, bias=True):
    b, c_in, c_out, length, k, _ = case
    g = torch.Generator().manual_seed(seed)
    w_shape = (c_in, k) if c_out is None else (c_out, c_in, k)
    x = torch.randn(b, c_in, length, generator=g, dtype=torch.float64)
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64) / k**0.5
    bb = torch.randn(w_shape[0], generator=g, dtype=torch.float64) if bias else None
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, w, bb)]


def _scale(case):
    return max(1.0, (case[4] * (case[2] or 1)) ** 0.5) * 4


def by_definition(x, w, bias, dilation):
    """The spec written as the sum it is, independent of F.conv1d: checks the reference itself."""
    depthwise = w.dim() == 2
    b, c_in, length = x.shape
    k = w.shape[-1]
    y = torch.zeros(b, w.shape[0], length, dtype=torch.float64)
    for o in range(w.shape[0]):
        for i in [o] if depthwise else range(c_in):
            for kk in range(k):
                shift = (k - 1 - kk) * dilation
                if shift < length:
                    wk = w[o, kk] if depthwise else w[o, i, kk]
                    y[:, o, shift:] += wk * x[:, i, : length - shift].double()
        if bias is not None:
            y[:, o] += bias[o]
    return y


@pytest.mark.parametrize("case", CASES[:5])
def test_reference_is_the_definition(case):
    x, w, b = make_case(case, torch.float64, "cpu")
    torch.testing.assert_close(ref.causal_conv1d(x, w, b, case[5]), by_definition(x, w, b, case[5]))


@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_matches_reference(backend, dtype, activation):
    device = _device(backend)
    for index, case in enumerate(CASES):
        for bias in _bias_options(backend, index):
            x, w, b = make_case(case, dtype, device, bias=bias)
            y = genkern.causal_conv1d(x, w, b, dilation=case[5], activation=activation, backend=backend)
            expected = ref.causal_conv1d(
                x.cpu().double(),
                w.cpu().double(),
                None if b is None else b.cpu().double(),
                case[5],
                activation or "none",
            )
            assert y.shape == expected.shape and y.dtype == dtype
            assert_close(y.cpu(), expected, dtype, scale=_scale(case))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_kernel_size_and_dilation(backend):
    device = _device(backend)
    for k in range(1, 17):
        for dilation in (1, 2, 3):
            case = (1, 2, None if k % 2 else 3, 11, k, dilation)
            x, w, b = make_case(case, torch.float64, device, seed=k)
            y = genkern.causal_conv1d(x, w, b, dilation=dilation, backend=backend)
            torch.testing.assert_close(y.cpu(), by_definition(x.cpu(), w.cpu(), b.cpu(), dilation))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend):
    device = _device(backend)
    base = torch.randn(9, 4, 3, dtype=torch.float64, device=device)
    w = torch.randn(8, 4, 3, dtype=torch.float64, device=device)[::2]  # (4, 4, 3), strided
    bias = torch.randn(8, dtype=torch.float64, device=device)[1::2]
    for x in (base.permute(2, 1, 0), base.transpose(0, 2)[:, :, ::2]):
        y = genkern.causal_conv1d(x, w, bias, dilation=2, activation="tanh", backend=backend)
        expected = ref.causal_conv1d(x.contiguous(), w.contiguous(), bias.contiguous(), 2, "tanh")
        torch.testing.assert_close(y, expected)


def _grads(x, w, b, dilation, activation, backend):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y = genkern.causal_conv1d(*inputs, dilation=dilation, activation=activation, backend=backend)
    seed = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
    y.backward(seed)
    return [t.grad if t is not None else None for t in inputs]


@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_reference(backend, dtype, activation):
    device = _device(backend)
    for index, case in enumerate(CASES):
        for bias in _bias_options(backend, index):
            x, w, b = make_case(case, dtype, device, bias=bias)
            got = _grads(x, w, b, case[5], activation, backend)
            expected = _grads(
                *(t.cpu().double() if t is not None else None for t in (x, w, b)), case[5], activation, "reference"
            )
            for g, e in zip(got, expected):
                if e is None:
                    assert g is None
                    continue
                scale = _scale(case) * max(1.0, (case[0] * case[3]) ** 0.5)  # weight gradients sum over B * L
                assert_close(g.cpu(), e, dtype, scale=scale)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", [(2, 3, None, 6, 3, 2), (1, 2, 3, 5, 2, 1), (1, 2, None, 3, 4, 1)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(backend, case, activation):
    inputs = [t.requires_grad_(True) for t in make_case(case, torch.float64, _device(backend))]
    assert torch.autograd.gradcheck(
        lambda x, w, b: genkern.causal_conv1d(x, w, b, dilation=case[5], activation=activation, backend=backend),
        inputs,
        fast_mode=interpreted(backend),
    )


# Large enough for several segments of the weight-gradient sums on every kernel backend (the CUDA kernels
# cut them at 4096 positions, Triton's at 1024) and several tiles of every convolution kernel.
BIG_CASES = [(3, 16, None, 3000, 4, 1), (2, 8, 24, 2500, 5, 2), (2, 40, 36, 700, 3, 3)]
INTERPRETED_BIG_CASES = [(2, 3, None, 700, 4, 1), (2, 3, 4, 700, 3, 2)]


def _big_cases(backend):
    return INTERPRETED_BIG_CASES if interpreted(backend) else BIG_CASES


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_backward_is_deterministic(backend):
    """No atomics: the same inputs give the same bits, also where the sums are split over many threads."""
    device = _device(backend)
    cases = [(3, 8, 8, 2000, 5, 2)] if backend == "cpu" else _big_cases(backend)
    for case in cases:
        x, w, b = make_case(case, torch.float32, device)
        first = _grads(x, w, b, case[5], "silu", backend)
        for _ in range(2):
            assert all(torch.equal(g, f) for g, f in zip(_grads(x, w, b, case[5], "silu", backend), first))


@pytest.mark.parametrize("backend", [b for b in CONV_BACKENDS if b != "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_inputs(backend, dtype):
    """Many tiles and gradient segments, forward and backward, against the float64 reference."""
    device = _device(backend)
    for case in _big_cases(backend):
        x, w, b = make_case(case, dtype, device)
        y = genkern.causal_conv1d(x, w, b, dilation=case[5], activation="tanh", backend=backend)
        expected = ref.causal_conv1d(x.cpu().double(), w.cpu().double(), b.cpu().double(), case[5], "tanh")
        assert_close(y.cpu(), expected, dtype, scale=_scale(case))
        got = _grads(x, w, b, case[5], "tanh", backend)
        want = _grads(*(t.cpu().double() for t in (x, w, b)), case[5], "tanh", "reference")
        for g, e in zip(got, want):
            assert_close(g.cpu(), e, dtype, scale=_scale(case) * (case[0] * case[3]) ** 0.5)


# ------------------------------------------------------------------------------------------ update


@pytest.mark.parametrize("backend,dtype", PARAMS)
@pytest.mark.parametrize(
    "case", [(2, 3, None, 9, 4, 2), (1, 4, 2, 7, 3, 1), (3, 2, None, 5, 1, 1), (1, 3, 3, 6, 16, 3)]
)
def test_update_step_by_step_equals_the_convolution(backend, dtype, case):
    device = _device(backend)
    x, w, b = make_case(case, dtype, device)
    activation = "silu"
    full = genkern.causal_conv1d(x, w, b, dilation=case[5], activation=activation, backend=backend)
    for extra in (0, 2):  # the minimal state, and one with older entries it must ignore
        state = torch.zeros(
            x.shape[0], x.shape[1], ref.receptive_field(case[4], case[5]) + extra, dtype=dtype, device=device
        )
        steps = [
            genkern.causal_conv1d_update(
                x[:, :, t], state, w, b, dilation=case[5], activation=activation, backend=backend
            )
            for t in range(x.shape[2])
        ]
        assert_close(torch.stack(steps, dim=-1).cpu(), full.cpu(), dtype, scale=4)
        window = state.shape[2]
        expected = torch.nn.functional.pad(x, (window, 0))[:, :, -window:] if window else state
        assert torch.equal(state, expected)  # the last `window` inputs, oldest first


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_update_with_non_contiguous_state_updates_it_in_place(backend):
    device = _device(backend)
    x, w, b = make_case((2, 3, None, 4, 3, 1), torch.float64, device)
    s = torch.zeros(2, 2, 3, dtype=torch.float64, device=device).transpose(1, 2)  # (2, 3, 2), channels innermost
    assert not s.is_contiguous()
    for t in range(4):
        genkern.causal_conv1d_update(x[:, :, t], s, w, b, backend=backend)
    torch.testing.assert_close(s, x[:, :, 2:])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_update_with_a_long_state(backend):
    """A state far wider than one thread's share of the shift (WaveNet's dilations): every entry moves."""
    device = _device(backend)
    for case, width in (((2, 3, None, 5, 3, 300), 1500), ((1, 2, 3, 4, 2, 1), 2049)):
        x, w, b = make_case(case, torch.float64, device)
        state = torch.randn(case[0], case[1], width, dtype=torch.float64, device=device)
        expected_y, expected_state = ref.causal_conv1d_update(x[:, :, 0], state, w, b, case[5], "tanh")
        y = genkern.causal_conv1d_update(x[:, :, 0], state, w, b, dilation=case[5], activation="tanh", backend=backend)
        torch.testing.assert_close(y, expected_y)
        assert torch.equal(state, expected_state)


# ----------------------------------------------------------------------------------------- gated


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_gated_activation(backend, dtype):
    device = _device(backend)
    for shape, dim in [((2, 6, 5), 1), ((3, 8), 1), ((4, 3, 10), -1), ((0, 4, 3), 1), ((5, 2, 1031), 1), ((6,), 0)]:
        x = (torch.randn(shape, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
        y = genkern.gated_activation(x, dim, backend=backend)
        a, bb = x.cpu().double().chunk(2, dim=dim)
        assert_close(y.cpu(), torch.tanh(a) * torch.sigmoid(bb), dtype, scale=2)
        xg = x.detach().clone().requires_grad_(True)
        g = torch.randn(y.shape, dtype=torch.float64).to(y)
        genkern.gated_activation(xg, dim, backend=backend).backward(g)
        xr = x.cpu().double().requires_grad_(True)
        a, bb = xr.chunk(2, dim=dim)
        (torch.tanh(a) * torch.sigmoid(bb)).backward(g.cpu().double())
        assert_close(xg.grad.cpu(), xr.grad, dtype, scale=4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: exp -> inf
def test_gated_activation_extreme_inputs(backend):
    x = torch.tensor([[-1e4, 1e4, 0.0, 30.0, -1e4, 1e4, -200.0, 50.0]], dtype=torch.float32).reshape(1, 8)
    y = genkern.gated_activation(x.to(_device(backend)), backend=backend)
    torch.testing.assert_close(y.cpu(), ref.gated_activation(x.double()).float())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_gated(backend):
    device = _device(backend)
    x = torch.randn(2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: genkern.gated_activation(t, backend=backend), (x,))
    xt = torch.randn(3, 4, dtype=torch.float64, device=device).t().requires_grad_(True)  # non-contiguous
    assert torch.autograd.gradcheck(lambda t: genkern.gated_activation(t, 0, backend=backend), (xt,))


# ------------------------------------------------------------------------------------- torch integration


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck(backend):
    ops = torch.ops.genkern
    device = _device(backend)

    def randn(*shape):
        return torch.randn(*shape, device=device)

    x, w, b = make_case((2, 3, None, 7, 3, 2), torch.float32, device)
    xf, wf, bf = make_case((2, 3, 4, 5, 2, 1), torch.float32, device)
    x_t = randn(7, 3, 2).permute(2, 1, 0)
    for t in (x, w, b, wf, bf):
        t.requires_grad_(True)
    samples = [
        (ops.causal_conv1d, (x, w, b, 2, "silu")),
        (ops.causal_conv1d, (x_t, w, None, 1, "none")),
        (ops.causal_conv1d, (xf, wf, bf, 3, "tanh")),
        (ops.causal_conv1d_backward, (randn(2, 3, 7), x.detach(), w.detach(), b.detach(), 2, "tanh")),
        (ops.causal_conv1d_backward, (randn(2, 4, 5), xf, wf.detach(), None, 1, "none")),
        (ops.causal_conv1d_update, (randn(2, 3), randn(2, 3, 5), w.detach(), b.detach(), 2, "silu")),
        (ops.causal_conv1d_update, (randn(2, 3), randn(2, 3, 1), wf.detach(), None, 1, "none")),
        (ops.gated_activation, (randn(2, 6, 3).requires_grad_(True), 1)),
        (ops.gated_activation, (randn(4, 5).requires_grad_(True).t(), 1)),
        (ops.gated_activation_backward, (randn(2, 3, 3), randn(2, 6, 3), 1)),
    ]
    with gk_backend.scoped(backend):
        for op, args in samples:
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_wavenet_block():
    def block(x, w, b, w_out):
        h = genkern.gated_activation(genkern.causal_conv1d(x, w, b, dilation=2))
        return (x + genkern.causal_conv1d(h, w_out, activation="tanh")).square().mean()

    x, w, b = make_case((2, 4, 8, 9, 2, 2), torch.float32, "cpu")
    w_out = torch.randn(4, 4, 1)
    for t in (x, w, b, w_out):
        t.requires_grad_(True)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, w, b, w_out)
    grads = torch.autograd.grad(out, (x, w, b, w_out))
    expected = block(x, w, b, w_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (x, w, b, w_out)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensors_run_on_a_gpu_backend():
    expected = (
        "cuda" if gk_backend.is_available("cuda") else "triton" if gk_backend.is_available("triton") else "reference"
    )
    assert gk_backend.auto(torch.device("cuda"), torch.float32, FAMILY) == expected
    x, w, b = make_case((2, 3, None, 7, 3, 2), torch.float32, "cuda")
    y = genkern.causal_conv1d(x, w, b, dilation=2, activation="silu")
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), ref.causal_conv1d(x.cpu(), w.cpu(), b.cpu(), 2, "silu"))
    state = torch.zeros(2, 3, 4, device="cuda")
    step = genkern.causal_conv1d_update(x[:, :, 0], state, w, b, dilation=2, activation="silu")
    torch.testing.assert_close(step, y[:, :, 0])
    assert genkern.gated_activation(y).device.type == "cuda"


def test_every_backend_has_the_family():
    """No per-family restriction: the automatic choice and a process-wide one apply as for any family."""
    assert all(gk_backend.has_family(name, FAMILY) for name in gk_backend.BACKENDS)
    for device in (torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 0)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert gk_backend.auto(device, dtype, FAMILY) == gk_backend.auto(device, dtype)
    assert gk_backend.resolve(None, torch.device("cpu"), torch.float32, FAMILY) == "cpu"
    for name in gk_backend.backends(FAMILY):
        if gk_backend.runs_on(name, torch.device("cpu"), torch.float32, FAMILY):
            with genkern.set_backend(name):
                assert gk_backend.resolve(None, torch.device("cpu"), torch.float32, FAMILY) == name


# ----------------------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected_before_any_kernel(monkeypatch):
    from genkern import _kernels as _backends

    def no_kernels(*args):
        raise AssertionError("a kernel was asked for despite bad input")

    monkeypatch.setattr(_backends.KernelGroup, "on", no_kernels)
    x, w, b = make_case((2, 3, None, 7, 3, 1), torch.float32, "cpu")
    state = torch.zeros(2, 3, 2)
    conv, update = genkern.causal_conv1d, genkern.causal_conv1d_update
    cases = [
        (lambda: conv(x[0], w), ValueError, "x"),
        (lambda: conv(x.long(), w), TypeError, "x"),
        (lambda: conv([1.0], w), TypeError, "x"),
        (lambda: conv(x, w.double()), TypeError, "weight"),
        (lambda: conv(x, w[:2]), ValueError, "weight"),
        (lambda: conv(x, w[:, :0]), ValueError, "weight"),
        (lambda: conv(x, w[None, None]), ValueError, "weight"),
        (lambda: conv(x, torch.randn(4, 2, 3)), ValueError, "weight"),
        (lambda: conv(x, w, b[:2]), ValueError, "bias"),
        (lambda: conv(x, w, b.double()), TypeError, "bias"),
        (lambda: conv(x, w, dilation=0), ValueError, "dilation"),
        (lambda: conv(x, w, dilation=1.5), TypeError, "dilation"),
        (lambda: conv(x, w, dilation=2**40), ValueError, "dilation"),
        (lambda: conv(x, w, activation="relu"), ValueError, "activation"),
        (lambda: conv(x, w, activation=1), TypeError, "activation"),
        (lambda: conv(x, w, backend="cuda"), ValueError, "cuda"),
        (lambda: conv(x, w, backend="tpu"), ValueError, "backend"),
        (lambda: conv(x.half(), w.half(), backend="cpu"), ValueError, "cpu"),
        (lambda: update(x[:, :, 0], state[:, :, :1], w, dilation=1), ValueError, "state"),
        (lambda: update(x[:, :, 0], state, w, dilation=2), ValueError, "state"),
        (lambda: update(x[:, :, 0], state.double(), w), TypeError, "state"),
        # x (B, C, L) is causal-conv1d's multi-position update, depthwise weights only
        (lambda: update(x, state, torch.randn(3, 3, 3)), ValueError, "depthwise"),
        (lambda: update(x[None], state, w), ValueError, "x"),
        (lambda: update(x[:, :, 0], state[:1], w), ValueError, "state"),
        (lambda: genkern.gated_activation(torch.randn(2, 3)), ValueError, "halves"),
        (lambda: genkern.gated_activation(torch.randn(2, 4), dim=2), ValueError, "dim"),
        (lambda: genkern.gated_activation(torch.randn(2, 4), dim=None), TypeError, "dim"),
        (lambda: genkern.gated_activation(torch.zeros(2, 4, dtype=torch.int32)), TypeError, "x"),
    ]
    for index, (fn, error, word) in enumerate(cases):
        with pytest.raises(error, match=word):
            fn()
            pytest.fail(f"case {index} raised nothing")
    # The ops themselves check what the kernels rely on, whoever calls them.
    ops = torch.ops.genkern
    with gk_backend.scoped("cpu"):
        with pytest.raises(ValueError, match="weight"):
            ops.causal_conv1d(x, w[:2], None, 1, "none")
        with pytest.raises(ValueError, match="activation"):
            ops.causal_conv1d(x, w, None, 1, "relu")
        with pytest.raises(ValueError, match="dilation"):
            ops.causal_conv1d(x, w, None, 0, "none")
        with pytest.raises(ValueError, match="state"):
            ops.causal_conv1d_update(x[:, :, 0], state, w, None, 5, "none")
        with pytest.raises(ValueError, match="grad_y"):
            ops.causal_conv1d_backward(x[:, :, :5], x, w, None, 1, "none")
        with pytest.raises(ValueError, match="odd"):
            ops.gated_activation(torch.randn(3, 3), 1)


def test_native_checks_guard_the_kernels():
    """The compiled entry points check shapes themselves (they are reachable without the ops)."""
    from genkern import _native

    x, w, b = make_case((2, 3, None, 7, 3, 1), torch.float32, "cpu")
    fam = _native.Kernels(_native._C.causal_conv1d)
    with pytest.raises(ValueError, match="y"):
        fam.forward(x, w, b, torch.empty(2, 3, 6), 1, 0)
    with pytest.raises(ValueError, match="state"):
        fam.update(x[:, :, 0].contiguous(), torch.zeros(2, 3, 1), w, b, torch.empty(2, 3), 1, 0)
    with pytest.raises(ValueError, match="activation"):
        fam.forward(x, w, b, torch.empty(2, 3, 7), 1, 7)
    with pytest.raises(ValueError, match="contiguous"):
        fam.forward(x.transpose(1, 2), w, b, torch.empty(2, 3, 7), 1, 0)


def test_reference_padding_contributes_nothing():
    """The NaN rule (issue 16): the causal zero padding is not data, so an inf weight reaches only the outputs
    whose tap reads a real input (it made NaN, inf * 0, at the start through F.pad), as on the cpu backend;
    its gradient sums real inputs only."""
    x = torch.ones(1, 1, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[float("inf"), 1.0, 1.0]], dtype=torch.float64, requires_grad=True)  # depthwise, K = 3
    y = ref.causal_conv1d(x, weight, None, 1, "none")
    assert torch.equal(y[0, 0, :2], torch.tensor([1.0, 2.0], dtype=torch.float64)) and y[0, 0, 2] == float("inf")
    gy = torch.tensor([[[1.0, 1.0, 0.0]]], dtype=torch.float64)
    gx, gw, _ = ref.causal_conv1d_backward(gy, x.detach(), weight.detach(), None, 1, "none")
    assert torch.equal(gw, torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64))  # tap 0 met the padding only
    # x_0 meets the inf weight through output 2, whose gradient is 0: 0 * inf = NaN there, a real product.
    assert gx[0, 0, 0].isnan() and torch.equal(gx[0, 0, 1:], torch.tensor([1.0, 0.0], dtype=torch.float64))
    if "cpu" in genkern.backends():
        torch.testing.assert_close(genkern.causal_conv1d(x, weight, backend="cpu"), y)
