"""The masked_conv family: every backend with its kernels against the reference (forward and backward,
every dtype it runs, with the tolerance table below), the mask against hand-written cases, masked weights
ignored, causality by perturbation, gradcheck, opcheck, the module, backend routing and bad input.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (see conftest.py), on fewer and
smaller cases; the CUDA kernels (and Triton on the GPU, bfloat16 included) are tested whenever torch sees one."""

import itertools

import pytest
import torch
from conftest import backend_dtype_params, device_for, interpreted

import genkern
from genkern import backend as gk_backend
from genkern.autoregressive import _masked_conv_dense as dense
from genkern.autoregressive import reference as ref

BACKENDS = [b for b in genkern.backends("masked_conv") if b != "reference"]
NATIVE = [b for b in BACKENDS if b in ("cpu", "cuda")]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (atol, rtol) against the float64 reference on the same (rounded) inputs. Sums of up to a few hundred terms
# of size ~1: float32 accumulation error, and for half types the rounding of the output itself.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


def make(b, c_in, c_out, k, h, w, dtype=torch.float64, seed=0, requires_grad=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) / (c_in * k)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (x, weight, bias)]


def grads(fn, x, weight, bias, seed=1):
    y = fn(x, weight, bias)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    return (y, *torch.autograd.grad(y, inputs, g.to(device=y.device, dtype=y.dtype)))


def exact(x, weight, bias):
    """The inputs as float64 CPU leaves: the reference's exact answer for what a kernel was given."""
    return [None if t is None else t.detach().cpu().double().requires_grad_(t.requires_grad) for t in (x, weight, bias)]


def check_against_reference(backend, dtype, shape, mask_type, groups, dilation, bias=True, seed=0):
    b, c_in, c_out, k, h, w = shape
    x, weight, bias_t = make(b, c_in, c_out, k, h, w, dtype, seed=seed, requires_grad=True, device=device_for(backend))
    bias_t = bias_t if bias else None
    fn = lambda *a: genkern.masked_conv2d(
        *a, mask_type=mask_type, color_groups=groups, dilation=dilation, backend=backend
    )
    got = grads(fn, x, weight, bias_t)
    want = grads(lambda *a: ref.masked_conv2d(*a, mask_type, groups, dilation), *exact(x, weight, bias_t))
    # grad_weight and grad_bias sum over every pixel: rounding errors grow like the square root of their count.
    wide = max(1.0, (b * h * w / 256) ** 0.5)
    for name, g, e in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
        assert g.dtype == dtype and g.shape == e.shape and g.device.type == x.device.type, name
        scale = wide if name in ("grad_weight", "grad_bias") else 1.0
        tol = {key: value * scale for key, value in TOL[dtype].items()}
        torch.testing.assert_close(
            g.cpu().double(), e, **tol, msg=lambda m: f"{name} {shape} {mask_type} G={groups} d={dilation}: {m}"
        )


# (k, dilation, color_groups, mask_type): every combination, on a small odd image; under the Triton
# interpreter a covering subset (every k, each value of the others with both of the rest), k = 1 mask A with
# one group (no tap at all) included.
CASES = list(itertools.product([1, 3, 5, 7], [1, 2], [1, 3], "AB"))
INTERPRETED_CASES = [
    (1, 1, 1, "A"),
    (1, 2, 3, "B"),
    (3, 1, 3, "A"),
    (3, 2, 1, "B"),
    (5, 1, 3, "B"),
    (5, 2, 1, "A"),
    (7, 1, 1, "B"),
    (7, 2, 3, "A"),
]


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(BACKENDS))
def test_matches_reference_forward_and_backward(backend, dtype):
    for k, d, groups, mask_type in INTERPRETED_CASES if interpreted(backend) else CASES:
        c_in, c_out = 3 * groups, 2 * groups + 3 * (groups == 1)  # C_out = 5 (one partial block) or 6
        check_against_reference(
            backend, dtype, (2, c_in, c_out, k, 5, 7), mask_type, groups, d, bias=(k + d) % 2 == 0, seed=k * 10 + d
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixelcnn_shapes_and_tiles(backend):
    # The 7 x 7 mask-A first layer on 28 x 28 pixels (a whole tile plus a partial one; 12 x 12 under the
    # interpreter), a row longer than two tiles, 16 output channels (two whole blocks), bias None.
    side = 12 if interpreted(backend) else 28
    for b, c_in, c_out, k, h, w, mask_type in [(2, 1, 16, 7, side, side, "A"), (1, 4, 16, 3, 3, 70, "B")]:
        check_against_reference(backend, torch.float32, (b, c_in, c_out, k, h, w), mask_type, 1, 1, bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_channels_and_pixels(backend):
    # 20 inputs (Triton's tl.dot path, CUDA's stages of input channels), 24 / 40 outputs (partial blocks),
    # rows wider than a CUDA tile, and enough pixels for grad_weight to sum several chunks.
    shapes = [((3, 20, 24, 3, 14, 14), "B", 2, 1)]
    if not interpreted(backend):
        shapes += [((2, 20, 40, 5, 11, 37), "A", 2, 2), ((4, 64, 64, 3, 28, 28), "B", 1, 1)]
    for shape, mask_type, groups, d in shapes:
        check_against_reference(backend, torch.float32, shape, mask_type, groups, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_dilations(backend):
    # A dilation reaching past the image (every tap but the centre reads zeros), and on a GPU a float64 7 x 7
    # layer whose staged weights and halo need more than the default 48 KB of CUDA shared memory, and a
    # dilation whose halo cannot be staged at all (the global-memory kernel).
    cases = [((2, 3, 4, 3, 5, 7), "B", 1, 60, torch.float64)]
    if not interpreted(backend):
        cases += [((2, 16, 40, 7, 9, 13), "A", 2, 3, torch.float64), ((1, 4, 8, 5, 40, 9), "B", 2, 150, torch.float64)]
    for shape, mask_type, groups, d, dtype in cases:
        check_against_reference(backend, dtype, shape, mask_type, groups, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_non_contiguous_input(backend):
    device = device_for(backend)
    x, w, b = make(0, 3, 6, 3, 5, 7, requires_grad=True, device=device)
    y, gx, gw, gb = grads(lambda *a: genkern.masked_conv2d(*a, mask_type="B", color_groups=3, backend=backend), x, w, b)
    assert y.shape == (0, 6, 5, 7) and gx.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))

    base, w, b = make(3, 7, 6, 3, 9, 5, seed=3, device=device)
    for x in (base.transpose(2, 3), base[:, 1:7:2], base[::2, :3], base.to(memory_format=torch.channels_last)[:, :3]):
        w_x = w[:, : x.shape[1]]
        got = genkern.masked_conv2d(x, w_x.transpose(2, 3), b, mask_type="A", backend=backend)
        want = ref.masked_conv2d(x, w_x.transpose(2, 3).contiguous(), b, "A")
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_mask_by_hand():
    # 3 x 3, 3 colour groups of one channel each: rows above and the left tap everywhere; at the centre
    # output g sees inputs h < g (A) or h <= g (B).
    spatial = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    for mask_type, centre in (("A", [[0, 0, 0], [1, 0, 0], [1, 1, 0]]), ("B", [[1, 0, 0], [1, 1, 0], [1, 1, 1]])):
        m = ref.mask(3, mask_type, 3, 3, 3)
        expected = spatial.repeat(3, 3, 1, 1)
        expected[:, :, 1, 1] = torch.tensor(centre, dtype=torch.float32)
        assert torch.equal(m, expected), mask_type
    # Groups of two channels: the centre's pattern is the 3 x 3 one with every entry a 2 x 2 block.
    m = ref.mask(3, "B", 6, 6, 3)
    assert torch.equal(
        m[:, :, 1, 1],
        torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]]).repeat_interleave(2, 0).repeat_interleave(2, 1).float(),
    )
    assert torch.equal(ref.mask(1, "A", 2, 2, 1), torch.zeros(2, 2, 1, 1))
    assert torch.equal(
        ref.mask(5, "B", 1, 1, 1)[0, 0],
        torch.tensor(
            [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32
        ),
    )


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_masked_weights_are_ignored_and_get_zero_gradient(backend):
    device = device_for(backend)
    for k, groups, mask_type in [(3, 3, "A"), (5, 1, "B"), (1, 3, "B")]:
        x, w, b = make(2, 3, 6, k, 5, 7, device=device)
        m = ref.mask(k, mask_type, x.shape[1], 6, groups, dtype=w.dtype, device=device).bool()
        garbage = torch.where(m, w, torch.tensor(float("nan"), dtype=w.dtype, device=device))
        garbage[~m & (torch.rand(w.shape, device=device) < 0.5)] = float("inf")
        clean = (w * m).requires_grad_(True)
        garbage.requires_grad_(True)
        fn = lambda wt: genkern.masked_conv2d(x, wt, b, mask_type=mask_type, color_groups=groups, backend=backend)
        y_clean, y_garbage = fn(clean), fn(garbage)
        assert torch.isfinite(y_garbage).all()
        torch.testing.assert_close(y_garbage, y_clean, **TOL[torch.float64])
        (gw,) = torch.autograd.grad(y_garbage.sum(), garbage)
        assert torch.equal(gw[~m], torch.zeros_like(gw[~m]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_a_is_causal(backend):
    # The output at pixel p of a mask-A layer (one colour group) does not move when x changes at or after p
    # in raster order, and does move when its left (or upper) neighbour changes.
    x, w, b = make(1, 2, 4, 5, 6, 7, seed=5, device=device_for(backend))
    y = genkern.masked_conv2d(x, w, b, mask_type="A", dilation=1, backend=backend)
    for p in [(0, 0), (2, 3), (5, 6), (3, 0)]:
        order = p[0] * 7 + p[1]
        for q in range(order, 6 * 7, 5):  # positions at or after p
            x2 = x.clone()
            x2[0, :, q // 7, q % 7] += 10.0
            y2 = genkern.masked_conv2d(x2, w, b, mask_type="A", backend=backend)
            assert torch.equal(y2[0, :, p[0], p[1]], y[0, :, p[0], p[1]]), (p, q)
        if order > 0:
            x2 = x.clone()
            x2[0, :, p[0] - (p[1] == 0), p[1] - (p[1] > 0)] += 10.0  # the pixel left of p, or above it
            assert not torch.equal(
                genkern.masked_conv2d(x2, w, b, mask_type="A", backend=backend)[0, :, p[0], p[1]], y[0, :, p[0], p[1]]
            )
    # With colour groups, channel group g at p does not see groups >= g of p itself (A), but sees < g.
    x, w, b = make(1, 3, 3, 3, 4, 4, seed=6, device=device_for(backend))
    y = genkern.masked_conv2d(x, w, b, mask_type="A", color_groups=3, backend=backend)
    for h in range(3):
        x2 = x.clone()
        x2[0, h, 2, 2] += 10.0
        y2 = genkern.masked_conv2d(x2, w, b, mask_type="A", color_groups=3, backend=backend)
        changed = [not torch.equal(y2[0, g, 2, 2], y[0, g, 2, 2]) for g in range(3)]
        assert changed == [g > h for g in range(3)], (h, changed)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_gradcheck_float64(backend):
    for k, d, groups, mask_type in [(3, 1, 3, "A"), (3, 2, 1, "B")]:
        inputs = make(
            1, 3, 3 * groups if groups > 1 else 2, k, 4, 5, seed=k, requires_grad=True, device=device_for(backend)
        )
        # The interpreter is slow per call: there gradcheck checks random projections of the Jacobian.
        assert torch.autograd.gradcheck(
            lambda *a: genkern.masked_conv2d(*a, mask_type=mask_type, color_groups=groups, dilation=d, backend=backend),
            inputs,
            fast_mode=interpreted(backend),
        )


@pytest.mark.parametrize("backend", genkern.backends("masked_conv"))
def test_opcheck(backend):
    device = device_for(backend)
    x, w, b = make(2, 3, 6, 3, 5, 7, torch.float32, requires_grad=True, device=device)
    gy = torch.randn(2, 6, 5, 7, device=device)
    ops = torch.ops.genkern
    samples = [
        (ops.masked_conv2d, (x, w, b, "A", 3, 1)),
        (ops.masked_conv2d, (x.detach().transpose(2, 3).requires_grad_(True), w, None, "B", 1, 2)),
        (ops.masked_conv2d_grad_input, (gy, w.detach(), "B", 3, 1)),
        (ops.masked_conv2d_grad_weight, (gy.transpose(2, 3).contiguous().transpose(2, 3), x.detach(), 3, "A", 1, 2)),
    ]
    with gk_backend.scoped(backend):
        for op, args in samples:
            torch.library.opcheck(op, args)


def test_module():
    torch.manual_seed(0)
    layer = genkern.nn.MaskedConv2d(3, 6, 5, "A", color_groups=3)
    conv = torch.nn.Conv2d(3, 6, 5)
    assert layer.weight.shape == conv.weight.shape and layer.bias.shape == conv.bias.shape
    bound = 1 / (3 * 25) ** 0.5
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    x = torch.randn(2, 3, 7, 7)
    y = layer(x)
    torch.testing.assert_close(y, ref.masked_conv2d(x, layer.weight, layer.bias, "A", 3), **TOL[torch.float32])
    y.sum().backward()
    masked = ~ref.mask(5, "A", 3, 6, 3).bool()
    assert torch.equal(layer.weight.grad[masked], torch.zeros_like(layer.weight.grad[masked]))
    assert genkern.nn.MaskedConv2d(4, 4, 3, "B", bias=False, dilation=2)(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)
    assert "mask_type='A'" in repr(layer)
    with pytest.raises(ValueError, match="kernel_size"):
        genkern.nn.MaskedConv2d(3, 6, 4, "A")
    with pytest.raises(ValueError, match="color_groups"):
        genkern.nn.MaskedConv2d(4, 6, 3, "B", color_groups=3)


def test_backend_routing():
    # Every backend has masked_conv kernels: CPU tensors go to cpu (half types to the reference), GPU
    # tensors to cuda when built with it, else triton; a process-wide choice is honoured.
    assert genkern.backends("masked_conv") == genkern.backends()
    assert all(gk_backend.has_family(b, "masked_conv") for b in gk_backend.BACKENDS)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gk_backend.resolve(None, cpu, torch.float32, family="masked_conv") == "cpu"
    assert gk_backend.resolve(None, cpu, torch.float16, family="masked_conv") == "reference"
    if torch.cuda.is_available():
        fastest = next(b for b in ("cuda", "triton", "reference") if gk_backend.runs_on(b, cuda, torch.float32))
        assert gk_backend.auto(cuda, torch.float32, family="masked_conv") == fastest
    with genkern.set_backend("reference"):
        assert gk_backend.resolve(None, cpu, torch.float32, family="masked_conv") == "reference"
    if interpreted("triton") and gk_backend.is_available("triton"):
        with genkern.set_backend("triton"):
            assert gk_backend.resolve(None, cpu, torch.float32, family="masked_conv") == "triton"
    if not torch.cuda.is_available():
        x, w, b = make(1, 2, 2, 3, 4, 4, torch.float32)
        with pytest.raises(ValueError, match="cuda"):
            genkern.masked_conv2d(x, w, b, backend="cuda")  # CPU tensors, or a build without CUDA


def test_bad_input_is_rejected_before_any_kernel(monkeypatch):
    from genkern import _kernels as _backends

    def no_kernels(*args):
        raise AssertionError("a kernel was asked for despite bad input")

    monkeypatch.setattr(_backends.KernelGroup, "on", no_kernels)
    x, w, b = make(2, 3, 6, 3, 5, 5, torch.float32)
    mc = genkern.masked_conv2d
    cases = [
        (lambda: mc(x, torch.randn(6, 3, 4, 4)), ValueError, "odd"),
        (lambda: mc(x, torch.randn(6, 3, 3, 5)), ValueError, "square"),
        (lambda: mc(x, w, color_groups=2), ValueError, "color_groups"),
        (lambda: mc(x, w, color_groups=0), ValueError, "color_groups"),
        (lambda: mc(x, w, color_groups=1.5), TypeError, "color_groups"),
        (lambda: mc(x[0], w), ValueError, "x"),
        (lambda: mc(x, w[0]), ValueError, "weight"),
        (lambda: mc(x, w[:, :2]), ValueError, "input channels"),
        (lambda: mc(x.long(), w), TypeError, "x"),
        (lambda: mc(x, w.double()), TypeError, "weight"),
        (lambda: mc(x, w, b[:5]), ValueError, "bias"),
        (lambda: mc(x, w, b.double()), TypeError, "bias"),
        (lambda: mc(x, w, mask_type="C"), ValueError, "mask_type"),
        (lambda: mc(x, w, dilation=0), ValueError, "dilation"),
        (lambda: mc(x, w, backend="tpu"), ValueError, "backend"),
        (lambda: mc(x.half(), w.half(), backend="cpu"), ValueError, "cpu"),
        (lambda: mc([1.0], w), TypeError, "x"),
        (lambda: mc(x, w.to("meta")), ValueError, "weight"),
    ]
    for fn, error, word in cases:
        with pytest.raises(error, match=word):
            fn()
    # The ops themselves check what the kernels rely on, whoever calls them.
    with gk_backend.scoped("cpu"):
        with pytest.raises(ValueError, match="odd"):
            torch.ops.genkern.masked_conv2d(x, torch.randn(6, 3, 2, 2), None, "A", 1, 1)
        with pytest.raises(ValueError, match="color_groups"):
            torch.ops.genkern.masked_conv2d_grad_input(torch.randn(2, 6, 5, 5), w, "A", 4, 1)
        with pytest.raises(ValueError, match="grad_y"):
            torch.ops.genkern.masked_conv2d_grad_weight(torch.randn(2, 6, 4, 5), x, 3, "A", 1, 1)


def test_dispatch_reaches_the_kernels(monkeypatch):
    """torch's dispatcher brings the public functions to the registered kernels of the chosen backend,
    forward and backward (the backward on the forward's backend); the reference, chosen or for a dtype
    without kernels, asks for none."""
    from genkern import _kernels

    asked = []
    on = _kernels.KernelGroup.on

    def recording(self, backend):
        asked.append((self.family, backend))
        return on(self, backend)

    monkeypatch.setattr(_kernels.KernelGroup, "on", recording)

    def run(backend, dtype):
        asked.clear()
        x, w, b = make(2, 3, 6, 3, 5, 5, dtype, requires_grad=True)
        y = genkern.masked_conv2d(x, w, b, mask_type="A", color_groups=3, backend=backend)
        torch.testing.assert_close(y, ref.masked_conv2d(x, w, b, "A", 3), **TOL[dtype])
        y.sum().backward()
        assert x.grad is not None and w.grad is not None and b.grad is not None
        xc, wc = torch.randn(2, 3, 7, dtype=dtype), torch.randn(3, 3, 2, dtype=dtype)
        torch.testing.assert_close(
            genkern.causal_conv1d(xc, wc, dilation=2, backend=backend), ref.causal_conv1d(xc, wc, None, 2), **TOL[dtype]
        )
        return list(asked)

    # forward, then the backward's grad_input and grad_weight, then the causal convolution
    assert run("cpu", torch.float32) == [("masked_conv", "cpu")] * 3 + [("causal_conv1d", "cpu")]
    assert run("reference", torch.float32) == []
    assert run(None, torch.float16) == []  # no cpu kernels for half types: the reference runs
    assert run(None, torch.float32) == [("masked_conv", "cpu")] * 3 + [("causal_conv1d", "cpu")]
    with genkern.set_backend("reference"):
        assert run(None, torch.float32) == []


@pytest.mark.parametrize("backend", NATIVE)
def test_native_entry_points_check_shapes(backend):
    from genkern import _native

    device = device_for(backend)
    x, w, _ = make(1, 2, 4, 3, 4, 4, torch.float32, device=device)
    with pytest.raises(ValueError, match="y"):
        _native.call(_native._C.masked_conv.forward, x, w, None, torch.empty(1, 4, 4, 3, device=device), False, 1, 1)
    with pytest.raises(ValueError, match="odd"):
        _native.call(
            _native._C.masked_conv.forward,
            x,
            torch.randn(4, 2, 2, 2, device=device),
            None,
            torch.empty(1, 4, 4, 4, device=device),
            False,
            1,
            1,
        )
    with pytest.raises(ValueError, match="contiguous"):
        _native.call(
            _native._C.masked_conv.grad_input,
            torch.randn(1, 4, 4, 4, device=device),
            w,
            torch.empty(1, 2, 4, 4, device=device).transpose(2, 3),
            False,
            1,
            1,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_deterministic(backend):
    # grad_weight sums in a fixed order (no atomics): repeated calls give the same bits. Under the
    # interpreter: one small case through the tl.dot path.
    shape = (2, 16, 16, 3, 5, 6) if interpreted(backend) else (4, 16, 16, 5, 9, 11)
    x, w, b = make(*shape, torch.float32, seed=9, requires_grad=True, device=device_for(backend))
    runs = [grads(lambda *a: genkern.masked_conv2d(*a, mask_type="B", backend=backend), x, w, b) for _ in range(3)]
    for other in runs[1:]:
        for g, e in zip(other, runs[0]):
            assert torch.equal(g, e)


def test_torch_compile_fullgraph():
    layer = genkern.nn.MaskedConv2d(3, 6, 3, "B", color_groups=3)
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    compiled = torch.compile(lambda t: layer(t).square().sum(), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (gx,) = torch.autograd.grad(out, x)
    expected = layer(x).square().sum()
    (ex,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, ex)


def test_reference_reads_visible_taps_inside_the_image_only():
    """The NaN rule (issue 16): masked taps and the zero padding are not read. An inf input of a colour group
    that an output group must not see leaves that output finite (F.conv2d on the masked weight made 0 * inf =
    NaN), and so does an inf weight at a tap that reads only the padding; masked taps get exactly zero gradient
    even when the input is inf."""
    x = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    x[0, 0] = float("inf")  # group 0 (R)
    weight = torch.ones(3, 3, 3, 3, dtype=torch.float64)
    weight[:, :, 0, 0] = float("inf")  # a visible tap, above and left: on a 1 x 1 image it reads padding only
    y = ref.masked_conv2d(x, weight, None, "A", 3, 1)
    # Mask A: R sees nothing at the centre, G sees R, B sees R and G.
    assert y[0, 0, 0, 0] == 0 and y[0, 1, 0, 0] == float("inf") and y[0, 2, 0, 0] == float("inf")
    gw, _ = ref.masked_conv2d_grad_weight(torch.ones(1, 3, 1, 1, dtype=torch.float64), x, weight.shape, "A", 3, 1)
    m = ref.mask(3, "A", 3, 3, 3, dtype=torch.float64)
    assert torch.equal(gw[m == 0], torch.zeros(int((m == 0).sum()), dtype=torch.float64))
    assert gw[1, 0, 1, 1] == float("inf") and torch.equal(gw[:, :, 0, 0], torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("dilation", [2**29, 2**30, 2**31, 2**31 + 1, 2**40, 2**61 + 7])
def test_the_compiled_entry_refuses_an_absurd_dilation(dilation):
    """Defence in depth below the op's check: the C++ entry itself refuses a dilation whose padded copy would
    overflow (2**61 + 7 once crashed the process; 2**29 .. 2**31 wrapped the padded plane's size in int64 and
    reached the allocator: std::bad_alloc, or a scratch-size error that did not name the argument)."""
    from genkern import _native

    x, w, y = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), torch.empty(1, 2, 5, 5)
    with pytest.raises(ValueError, match="dilation"):
        _native.call(_native._C.masked_conv.forward, x, w, None, y, False, 1, dilation)


def _conv_and_grads(backend, x, w, bias, **kwargs):
    device = device_for(backend)
    ins = [t.to(device).clone().requires_grad_(True) for t in (x, w, bias)]
    y = genkern.masked_conv2d(*ins, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(3)
    y.backward(torch.randn(y.shape, generator=g, dtype=y.dtype).to(device))
    return [y.detach().cpu()] + [t.grad.cpu() for t in ins]


def _same_with_nan(got, want):
    for name, a, e in zip(("y", "grad x", "grad weight", "grad bias"), got, want):
        assert torch.equal(a.isnan(), e.isnan()), (name, a, e)
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_taps_and_padding_contribute_nothing(backend, dtype):
    # The reference's NaN rule: masked taps and the zero padding are not read, so they never multiply an inf.
    # 1. Colour groups, mask A: output group 0 must not see input group 0 (nor 1, 2) at the centre tap; an
    #    inf there gave it NaN (a masked channel pair taken as a zero weight).
    x = torch.randn(2, 3, 4, 5, dtype=dtype)
    x[0, 2, 1, 2] = float("inf")
    x[1, 1, 3, 0] = float("nan")
    w = torch.randn(3, 3, 3, 3, dtype=dtype) * 0.5
    bias = torch.randn(3, dtype=dtype)
    for mask in ("A", "B"):
        kw = dict(mask_type=mask, color_groups=3)
        _same_with_nan(_conv_and_grads(backend, x, w, bias, **kw), _conv_and_grads("reference", x, w, bias, **kw))
    # 2. A 1 x 1 image of inf, k = 3: every tap but the centre reads only padding. grad_weight there is 0 (it
    #    was NaN: the zero border times grad_y), and the forward is NaN only through the visible centre tap.
    x = torch.full((1, 1, 1, 1), float("inf"), dtype=dtype)
    w, bias = torch.randn(1, 1, 3, 3, dtype=dtype), torch.zeros(1, dtype=dtype)
    _same_with_nan(
        _conv_and_grads(backend, x, w, bias, mask_type="B"), _conv_and_grads("reference", x, w, bias, mask_type="B")
    )
    # 3. An inf weight at the top-left tap on a 1 x 1 image meets only padding: y is the bias (it was NaN), and
    #    a masked inf weight (below the centre) is never read either.
    x = torch.randn(2, 1, 1, 1, dtype=dtype)
    w = torch.randn(1, 1, 3, 3, dtype=dtype)
    w[0, 0, 0, 0], w[0, 0, 2, 2] = float("inf"), float("nan")
    got, want = (
        _conv_and_grads(backend, x, w, bias, mask_type="A"),
        _conv_and_grads("reference", x, w, bias, mask_type="A"),
    )
    assert not got[0].isnan().any()
    _same_with_nan(got, want)


# ---------------------------------------------------------------------------------------------------------
# The cpu backend's dense path (torch's convolution on the masked weight, _masked_conv_dense) for the forward,
# grad_input and grad_weight of the shapes where it wins: the same contract as the compiled kernels.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def dense_everywhere(monkeypatch):
    """The cpu backend with its rule replaced by 'always dense'; yields the list of dense calls that kept
    their result (None: fell back to the kernels)."""
    ran = []
    monkeypatch.setattr(dense, "use_dense", lambda op, shape, dtype: True)
    for name in ("forward", "grad_input", "grad_weight"):
        original = getattr(dense, name)

        def recording(*args, _original=original, _name=name):
            out = _original(*args)
            ran.append((_name, out is not None))
            return out

        monkeypatch.setattr(dense, name, recording)
    return ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_path_matches_reference(dense_everywhere, dtype):
    for k, d, groups, mask_type in CASES:
        c_in, c_out = 3 * groups, 2 * groups + 3 * (groups == 1)
        check_against_reference("cpu", dtype, (2, c_in, c_out, k, 5, 7), mask_type, groups, d, bias=k % 2 == 1)
    check_against_reference("cpu", torch.float32, (64, 32, 32, 3, 8, 8), "B", 1, 1)
    for op in ("forward", "grad_input", "grad_weight"):
        assert (op, True) in dense_everywhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_path_follows_the_nan_rule(dense_everywhere, dtype):
    # Non-finite inputs: a non-finite dense result is thrown away and the kernels' exact path gives the
    # reference's (a finite one is the reference's sum: the skipped products were exact zeros).
    test_masked_taps_and_padding_contribute_nothing("cpu", dtype)
    assert ("forward", False) in dense_everywhere and ("grad_weight", False) in dense_everywhere


def test_dense_path_ignores_masked_weights(dense_everywhere):
    test_masked_weights_are_ignored_and_get_zero_gradient("cpu")
    assert ("forward", True) in dense_everywhere and ("grad_weight", True) in dense_everywhere


def test_dense_rule_and_what_it_routes():
    """The rule: float32 forward and grad_input of layers with >= 8 input channels on images of <= 100 pixels
    at >= 2048 pixels a call (the shipped 8 x 8 models at training batches), and grad_weight there for 1 x 1
    layers; for 1 x 1 layers that at least double the channels at >= 784 pixels a call (PixelCNN's logits
    layer), grad_weight and grad_input. The cpu backend then runs the dense path, with the same bits on
    repeated calls."""
    digits = (64, 32, 32, 3, 8, 8)
    assert dense.use_dense("forward", digits, torch.float32) and dense.use_dense("grad_input", digits, torch.float32)
    assert not dense.use_dense("grad_weight", digits, torch.float32)  # 3 x 3: the kernels
    assert dense.use_dense("grad_weight", (64, 32, 32, 1, 8, 8), torch.float32)  # the digit models' 1 x 1 head
    assert not dense.use_dense("forward", digits, torch.float64)
    assert not dense.use_dense("forward", (1, 32, 32, 3, 8, 8), torch.float32)  # one image
    assert not dense.use_dense("forward", (64, 1, 32, 5, 8, 8), torch.float32)  # a first layer
    assert not dense.use_dense("forward", (21, 64, 64, 3, 28, 28), torch.float32)  # 28 x 28
    logits = (1, 64, 256, 1, 28, 28)  # the 28 x 28 PixelCNN's logits layer, one image
    assert dense.use_dense("grad_weight", logits, torch.float32) and dense.use_dense(
        "grad_input", logits, torch.float32
    )
    assert not dense.use_dense("forward", logits, torch.float32)
    head = (21, 64, 64, 1, 28, 28)  # its 1 x 1 head: the kernels
    assert not any(dense.use_dense(op, head, torch.float32) for op in ("forward", "grad_input", "grad_weight"))
    assert not dense.use_dense("grad_weight", (1, 32, 17, 1, 8, 8), torch.float32)  # 64 pixels
    assert not dense.use_dense("grad_weight", logits, torch.float64)

    calls = []
    original = dense.forward
    x, w, b = make(64, 32, 32, 3, 8, 8, torch.float32, requires_grad=True)
    try:
        dense.forward = lambda *a: calls.append(1) or original(*a)
        runs = [grads(lambda *a: genkern.masked_conv2d(*a, mask_type="B", backend="cpu"), x, w, b) for _ in range(2)]
    finally:
        dense.forward = original
    assert len(calls) == 2
    for g, e in zip(*runs):
        assert torch.equal(g, e)
