"""The reparam family: every kernel backend against the reference and against torch.distributions,
forward and backward, across dtypes, shapes and layouts; gradcheck, opcheck, torch.compile, bad input."""

import math

import pytest
import torch
from conftest import KERNEL_BACKENDS, assert_close, backend_dtype_params, device_for, dtypes_for, interpreted
from torch.distributions import Normal, kl_divergence

import genkern
from genkern import backend as gk_backend
from genkern.reparam import reference as ref

SHAPES = [(0,), (1,), (7,), (3, 5), (4, 0), (2, 3, 129)]
BIG_SHAPE = (37, 4099)  # odd sizes crossing every chunk boundary of the CPU and GPU kernels


def make(shape, dtype, device, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (mu, logvar)]


def shapes_for(backend):
    return SHAPES if interpreted(backend) else SHAPES + [BIG_SHAPE]


def noise_tol(dtype):
    """Kernel noise is float32 (a few ulp from exact Box-Muller): compare float64 results at float32 tolerance."""
    return torch.float32 if dtype == torch.float64 else dtype


def as_compute(*xs):
    """Tensors as the kernels compute them: float32 for half types."""
    return [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs]


# ----------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_reparameterize_with_eps_is_exactly_the_formula(backend, dtype):
    device = device_for(backend)
    for shape in shapes_for(backend):
        mu, logvar = make(shape, dtype, device)
        eps = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
        z = genkern.reparameterize(mu, logvar, eps=eps, backend=backend)
        m, lv, e = as_compute(mu, logvar, eps)
        assert z.shape == mu.shape and z.dtype == dtype
        assert_close(z, m + torch.exp(0.5 * lv) * e, dtype)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_reparameterize_draws_the_stream(backend, dtype):
    device = device_for(backend)
    for shape in shapes_for(backend):
        mu, logvar = make(shape, dtype, device)
        for seed, offset in ((17, 3), (2**63 + 5, 2**64 - 1)):
            z = genkern.reparameterize(mu, logvar, seed=seed, offset=offset, backend=backend)
            expected = ref.reparameterize(mu.cpu(), logvar.cpu(), seed=seed, offset=offset)
            assert_close(z.cpu(), expected, noise_tol(dtype))


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_num_samples(backend, dtype):
    device = device_for(backend)
    mu, logvar = make((3, 7), dtype, device)
    z = genkern.reparameterize(mu, logvar, seed=5, num_samples=4, backend=backend)
    assert z.shape == (4, 3, 7)
    eps = genkern.randn((4, 3, 7), seed=5, dtype=torch.float64)  # sample k uses elements k*21 ...
    m, lv = as_compute(mu.cpu(), logvar.cpu())
    assert_close(z.cpu(), m + torch.exp(0.5 * lv) * eps.to(m.dtype), dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    base_mu, base_lv = make((9, 14), torch.float32, device)
    for view in (lambda t: t.t(), lambda t: t[::2, 1::3], lambda t: t.unsqueeze(0).expand(3, 9, 14)[1]):
        mu, logvar = view(base_mu), view(base_lv)
        z = genkern.reparameterize(mu, logvar, seed=1, backend=backend)
        assert_close(
            z.cpu(), ref.reparameterize(mu.cpu().contiguous(), logvar.cpu().contiguous(), seed=1), torch.float32
        )
        z, kl = genkern.reparameterize_kl(mu, logvar, seed=1, dim=0, backend=backend)
        assert_close(kl.cpu(), ref.gaussian_kl(mu.cpu(), logvar.cpu(), 0), torch.float32, scale=10)


DIMS = [-1, 0, (1, 2), None, (0, 2), 1]


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_gaussian_kl_matches_torch_distributions(backend, dtype):
    device = device_for(backend)
    shape = (5, 6, 7) if interpreted(backend) else (5, 66, 1031)
    mu, logvar = make(shape, dtype, device)
    m, lv = (t.cpu().double() for t in (mu, logvar))
    for dim in DIMS:
        kl = genkern.gaussian_kl(mu, logvar, dim=dim, backend=backend)
        dims = tuple(range(3)) if dim is None else dim
        expected = kl_divergence(Normal(m, torch.exp(0.5 * lv)), Normal(0.0, 1.0)).sum(dims)
        assert kl.shape == expected.shape and kl.dtype == dtype
        n = math.prod(shape) // max(expected.numel(), 1)
        assert_close(kl.cpu(), expected, dtype, scale=max(1.0, math.sqrt(n)))


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_gaussian_kl_edge_shapes(backend, dtype):
    device = device_for(backend)
    for shape, dim in [((0, 4), -1), ((4, 0), -1), ((1,), -1), ((3, 1), 0), ((2, 3, 1), 2), ((1, 2000), -1)]:
        mu, logvar = make(shape, dtype, device)
        kl = genkern.gaussian_kl(mu, logvar, dim=dim, backend=backend)
        assert_close(kl.cpu(), ref.gaussian_kl(mu.cpu(), logvar.cpu(), dim), dtype, scale=50)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_reparameterize_kl_is_both_ops_in_one(backend, dtype):
    device = device_for(backend)
    for shape in shapes_for(backend):
        if len(shape) < 1 or 0 in shape[:-1]:
            continue
        mu, logvar = make(shape, dtype, device)
        for dim in (-1, 0):
            z, kl = genkern.reparameterize_kl(mu, logvar, seed=9, offset=2, dim=dim, backend=backend)
            assert torch.equal(z, genkern.reparameterize(mu, logvar, seed=9, offset=2, backend=backend))
            n = shape[dim]
            assert_close(kl.cpu(), ref.gaussian_kl(mu.cpu(), logvar.cpu(), dim), dtype, scale=max(1, math.sqrt(n)) * 4)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_gaussian_log_prob_matches_torch_distributions(backend, dtype):
    device = device_for(backend)
    z, mu = make((4, 3, 33), dtype, device, seed=1)
    logvar = make((4, 3, 33), dtype, device, seed=2)[1]
    zc, m, lv = (t.cpu().double() for t in (z, mu, logvar))
    for dim in (-1, (1, 2), 0):
        got = genkern.gaussian_log_prob(z, mu, logvar, dim=dim, backend=backend)
        expected = Normal(m, torch.exp(0.5 * lv)).log_prob(zc).sum(dim)
        assert_close(got.cpu(), expected, dtype, scale=30)
        got = genkern.gaussian_log_prob(z, dim=dim, backend=backend)
        assert_close(got.cpu(), Normal(0.0, 1.0).log_prob(zc).sum(dim), dtype, scale=30)
    got = genkern.gaussian_log_prob(z, mu, None, backend=backend)
    assert_close(got.cpu(), Normal(m, 1.0).log_prob(zc).sum(-1), dtype, scale=30)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_gaussian_log_prob_broadcasts_parameters(backend, dtype):
    device = device_for(backend)
    z = make((5, 3, 17), dtype, device, seed=3)[0]
    mu, logvar = make((3, 17), dtype, device, seed=4)
    expected = Normal(mu.cpu().double(), torch.exp(0.5 * logvar.cpu().double())).log_prob(z.cpu().double()).sum(-1)
    assert_close(genkern.gaussian_log_prob(z, mu, logvar, backend=backend).cpu(), expected, dtype, scale=30)
    for dim in ((0, 2), 0):  # reduced dims that are not the trailing ones
        expected = Normal(mu.cpu().double(), torch.exp(0.5 * logvar.cpu().double())).log_prob(z.cpu().double()).sum(dim)
        assert_close(
            genkern.gaussian_log_prob(z, mu, logvar, dim=dim, backend=backend).cpu(), expected, dtype, scale=30
        )
    one = make((1, 17), dtype, device, seed=5)[0]  # a broadcast that needs expanding
    expected = Normal(one.cpu().double(), 1.0).log_prob(z.cpu().double()).sum(-1)
    assert_close(genkern.gaussian_log_prob(z, one, backend=backend).cpu(), expected, dtype, scale=30)


def _iwae_inputs(k, b, d, dtype, device, seed=0):
    mu, logvar = make((b, d), dtype, device, seed=seed)
    z = genkern.reparameterize(mu, logvar, seed=seed, num_samples=k, backend="reference")
    log_px_z = make((k, b), dtype, device, seed=seed + 1)[0] * 3 - 20
    return log_px_z, z, mu, logvar


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_iwae_bound(backend, dtype):
    device = device_for(backend)
    for k, b, d in [(1, 3, 4), (5, 2, 7), (64, 3, 33), (3, 0, 5), (2, 4, 0)]:
        log_px_z, z, mu, logvar = _iwae_inputs(k, b, d, dtype, device)
        got = genkern.iwae_bound(log_px_z, z, mu, logvar, backend=backend)
        lp, zz, m, lv = (t.cpu().double() for t in (log_px_z, z, mu, logvar))
        q = Normal(m, torch.exp(0.5 * lv))
        log_w = lp + Normal(0.0, 1.0).log_prob(zz).sum(-1) - q.log_prob(zz).sum(-1)
        expected = torch.logsumexp(log_w, 0) - math.log(k)
        assert got.shape == (b,)
        assert_close(got.cpu(), expected, dtype, scale=30)


def test_iwae_with_one_sample_is_the_elbo_term():
    log_px_z, z, mu, logvar = _iwae_inputs(1, 4, 6, torch.float64, "cpu")
    elbo = log_px_z[0] + genkern.gaussian_log_prob(z[0]) - genkern.gaussian_log_prob(z[0], mu, logvar)
    torch.testing.assert_close(genkern.iwae_bound(log_px_z, z, mu, logvar), elbo)


def test_iwae_event_dims_are_flattened():
    log_px_z, z, mu, logvar = _iwae_inputs(3, 2, 12, torch.float64, "cpu")
    flat = genkern.iwae_bound(log_px_z, z, mu, logvar)
    torch.testing.assert_close(
        genkern.iwae_bound(log_px_z, z.reshape(3, 2, 3, 4), mu.reshape(2, 3, 4), logvar.reshape(2, 3, 4)), flat
    )


# ---------------------------------------------------------------------------------------------- backward


def _grads(fn, inputs, backend):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    outputs = fn(*inputs, backend=backend)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(1)
    seeds = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
    torch.autograd.backward(outputs, seeds)
    return [x.grad for x in inputs]


BACKWARD_CASES = {
    "reparameterize": (lambda mu, lv, backend: genkern.reparameterize(mu, lv, seed=3, offset=1, backend=backend), 2),
    "reparameterize_k": (
        lambda mu, lv, backend: genkern.reparameterize(mu, lv, seed=3, num_samples=3, backend=backend),
        2,
    ),
    "reparameterize_eps": (lambda mu, lv, eps, backend: genkern.reparameterize(mu, lv, eps=eps, backend=backend), 3),
    "gaussian_kl": (lambda mu, lv, backend: genkern.gaussian_kl(mu, lv, backend=backend), 2),
    "gaussian_kl_dim0": (lambda mu, lv, backend: genkern.gaussian_kl(mu, lv, dim=0, backend=backend), 2),
    "reparameterize_kl": (lambda mu, lv, backend: genkern.reparameterize_kl(mu, lv, seed=4, backend=backend), 2),
    "reparameterize_kl_dim0": (
        lambda mu, lv, backend: genkern.reparameterize_kl(mu, lv, seed=4, dim=0, backend=backend),
        2,
    ),
    "log_prob": (lambda z, mu, lv, backend: genkern.gaussian_log_prob(z, mu, lv, backend=backend), 3),
    "log_prob_std": (lambda z, backend: genkern.gaussian_log_prob(z, backend=backend), 1),
    "log_prob_broadcast": (
        lambda z, mu, lv, backend: genkern.gaussian_log_prob(z.reshape(2, *mu.shape), mu, lv, backend=backend),
        3,
    ),
}


def _case_inputs(name, dtype, device, cols=7):
    a, b = make((6, cols), dtype, device, seed=1)
    c = make((6, cols), dtype, device, seed=2)[0]
    if name == "log_prob_broadcast":
        z = make((12, cols), dtype, device, seed=3)[0]
        return [z, a, b]
    return [a, b, c][: BACKWARD_CASES[name][1]]


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("case", sorted(BACKWARD_CASES))
def test_backward_matches_reference(backend, dtype, case):
    fn, _ = BACKWARD_CASES[case]
    inputs = _case_inputs(case, dtype, device_for(backend))
    got = _grads(fn, inputs, backend)
    expected = _grads(fn, [x.cpu() for x in inputs], "reference")
    random = case.startswith("reparameterize") and not case.endswith("eps")
    for g, e in zip(got, expected):
        assert_close(g.cpu(), e, noise_tol(dtype) if random else dtype, scale=10)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_iwae_backward_matches_reference(backend, dtype):
    inputs = _iwae_inputs(4, 3, 5, dtype, device_for(backend))
    got = _grads(genkern.iwae_bound, inputs, backend)
    expected = _grads(genkern.iwae_bound, [x.cpu() for x in inputs], "reference")
    for g, e in zip(got, expected):
        assert_close(g.cpu(), e, dtype, scale=10)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("used", ["z", "kl"])
def test_reparameterize_kl_with_one_output_used(backend, used):
    mu, logvar = make((5, 9), torch.float64 if backend != "triton" else torch.float32, device_for(backend))

    def loss(m, lv, b):
        z, kl = genkern.reparameterize_kl(m, lv, seed=2, backend=b)
        return (z if used == "z" else kl).pow(2).sum()

    got = _grads(lambda m, lv, backend: loss(m, lv, backend), [mu, logvar], backend)
    expected = _grads(lambda m, lv, backend: loss(m, lv, backend), [mu.cpu(), logvar.cpu()], "reference")
    for g, e in zip(got, expected):
        assert_close(g.cpu(), e, torch.float32, scale=10)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("scale", [1e6, 1e7])
def test_iwae_softmax_weights_sum_to_one_at_large_log_likelihoods(backend, scale):
    # float32, K = 16, log p(x|z) ~ -scale: the bound is rounded (ulp(1e7) = 1), so weights formed from it as
    # exp(log w - bound - log K) summed to 0.95 (1e6) and 1.56 (1e7); a softmax of log w itself sums to 1.
    log_px_z, z, mu, logvar = _iwae_inputs(16, 5, 3, torch.float32, device_for(backend))
    log_px_z = (log_px_z - scale + torch.linspace(0, 4, 16, device=log_px_z.device)[:, None]).detach()
    log_px_z.requires_grad_(True)
    genkern.iwae_bound(log_px_z, z, mu, logvar, backend=backend).sum().backward()
    w = log_px_z.grad.cpu().double()
    torch.testing.assert_close(w.sum(0), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-5)
    # log w itself has a resolution of ulp(scale) in float32 (the reference rounds its sum differently), so
    # the weights are compared with the softmax of the kernel's own log w.
    with genkern.set_backend(backend):
        _, log_w = torch.ops.genkern.iwae_bound(log_px_z.detach(), z, mu, logvar)
    torch.testing.assert_close(w, torch.softmax(log_w.cpu().double(), 0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("used", ["z", "kl"])
def test_reparameterize_kl_unused_output_adds_no_term(backend, used):
    # exp(100) overflows float32: kl's d/dlogvar is inf, z's is 2.57e21 * eps. The unused output's gradient
    # must be absent, not a zero multiplied in (0 * inf = NaN); likewise an inf mu with only z used.
    device = device_for(backend)
    mu = torch.tensor([[0.5, math.inf, -1.0]], device=device)
    logvar = torch.tensor([[100.0, 0.0, -100.0]], device=device)
    if used == "kl":
        mu = mu.nan_to_num(posinf=2.0)  # kl's d/dmu is mu itself: an inf there is no defect
    grads = {}
    for b in (backend, "reference"):
        m, lv = mu.cpu() if b == "reference" else mu, logvar.cpu() if b == "reference" else logvar
        m, lv = m.clone().requires_grad_(True), lv.clone().requires_grad_(True)
        z, kl = genkern.reparameterize_kl(m, lv, seed=3, backend=b)
        (z if used == "z" else kl).sum().backward()
        grads[b] = (m.grad.cpu(), lv.grad.cpu())
    for g, e in zip(grads[backend], grads["reference"]):
        assert not g.isnan().any(), g
        torch.testing.assert_close(g, e, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if torch.float16 in dtypes_for(b)] or ["reference"])
def test_iwae_half_precision_gradients_at_realistic_log_likelihoods(backend):
    # log p(x|z) around -1000 (a decoder over hundreds of pixels): the softmax weights must still be right.
    log_px_z, z, mu, logvar = _iwae_inputs(8, 3, 6, torch.float32, "cpu")
    log_px_z = log_px_z * 20 - 1000
    inputs = [t.to(device_for(backend), torch.float16) for t in (log_px_z, z, mu, logvar)]
    got = _grads(genkern.iwae_bound, inputs, backend)
    expected = _grads(genkern.iwae_bound, [t.cpu().double() for t in inputs], "reference")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().double(), e, atol=2e-3, rtol=2e-2)


def test_zero_dimensional_tensors():
    mu, logvar = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.2, dtype=torch.float64)
    for backend in GRADCHECK_BACKENDS:
        kl = genkern.gaussian_kl(mu, logvar, dim=None, backend=backend)
        assert kl.shape == ()
        torch.testing.assert_close(kl, 0.5 * (mu * mu + logvar.exp() - 1 - logvar))
        z, kl2 = genkern.reparameterize_kl(mu, logvar, seed=1, backend=backend)
        assert z.shape == () and kl2.shape == ()
        assert genkern.gaussian_log_prob(z, mu, logvar, backend=backend).shape == ()
        assert torch.autograd.gradcheck(
            lambda m, lv: genkern.gaussian_kl(m, lv, dim=None, backend=backend),
            (mu.clone().requires_grad_(), logvar.clone().requires_grad_()),
        )


def test_reparameterize_gradient_is_the_analytic_one():
    mu, logvar = make((50,), torch.float64, "cpu", requires_grad=True)
    z = genkern.reparameterize(mu, logvar, seed=1)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * (z - mu).detach())  # d z / d logvar = (z - mu) / 2


# float64: cpu and reference, and triton where it runs float64 (on a GPU, or under the interpreter).
GRADCHECK_BACKENDS = [b for b in ("cpu", "triton", "reference") if b in genkern.backends()]


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("case", sorted(BACKWARD_CASES))
def test_gradcheck_float64(backend, case):
    fn, _ = BACKWARD_CASES[case]
    cols = 1 if interpreted(backend) else 7  # the interpreter pays per launch: fewer perturbations
    inputs = [x.requires_grad_(True) for x in _case_inputs(case, torch.float64, device_for(backend), cols)]
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs, backend=backend), inputs)


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_iwae(backend):
    k, b, d = (2, 2, 2) if interpreted(backend) else (4, 3, 5)
    inputs = [x.requires_grad_(True) for x in _iwae_inputs(k, b, d, torch.float64, device_for(backend))]
    assert torch.autograd.gradcheck(lambda *xs: genkern.iwae_bound(*xs, backend=backend), inputs)


# ------------------------------------------------------------------------------------- torch integration


def _opcheck_samples(device):
    mu, lv = make((4, 6), torch.float32, device, requires_grad=True)
    mu_t, lv_t = (t.detach().t().requires_grad_(True) for t in make((6, 4), torch.float32, device, seed=7))
    mu4, lv4 = (
        t.to(memory_format=torch.channels_last).requires_grad_(True)
        for t in make((2, 3, 4, 5), torch.float32, device, seed=8)
    )
    z3 = make((2, 4, 6), torch.float32, device, seed=3, requires_grad=True)[0]
    lp = make((2, 4), torch.float32, device, seed=4, requires_grad=True)[0]
    g = make((4, 6), torch.float32, device, seed=5)[0]
    ops = torch.ops.genkern
    return [
        (ops.reparameterize, (mu, lv, None, 1, 2, 0)),
        (ops.reparameterize, (mu_t, lv_t, None, -5, 2**40, 3)),
        (ops.reparameterize, (mu, lv, torch.randn(4, 6, device=device, requires_grad=True), 0, 0, 0)),
        (ops.reparameterize_backward, (g.t().contiguous().t(), mu_t.detach(), lv_t.detach(), None, 1, 2)),
        (ops.gaussian_kl, (mu, lv, 1, 2)),
        (ops.gaussian_kl, (mu_t, lv_t, 0, 1)),
        (ops.gaussian_kl, (mu4, lv4, 1, 4)),
        (ops.gaussian_kl_backward, (torch.randn(2, device=device), mu4.detach(), lv4.detach(), 1, 4)),
        (ops.reparameterize_kl, (mu, lv, None, 7, 0, 1, 2)),
        (ops.reparameterize_kl, (mu4, lv4, None, 7, 3, 1, 4)),
        (
            ops.reparameterize_kl_backward,
            (None, torch.randn(2, device=device), mu4.detach(), lv4.detach(), None, 7, 3, 1, 4),
        ),
        (ops.gaussian_log_prob, (z3, mu, lv, 2, 3)),
        (ops.gaussian_log_prob, (z3.transpose(0, 1), None, None, 1, 3)),
        (
            ops.gaussian_log_prob_backward,
            (torch.randn(2, 4, device=device), z3.detach(), mu.detach(), lv.detach(), 2, 3),
        ),
        (ops.iwae_bound, (lp, z3, mu, lv)),
        (ops.iwae_bound, (lp.t().contiguous().t(), z3, mu_t.detach().contiguous(), lv_t.detach().contiguous())),
        (ops.randn, ([3, 5], 1, 2, torch.float32, torch.device(device))),
    ]


@pytest.mark.parametrize("backend", [b for b in genkern.backends()])
def test_opcheck(backend):
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    with gk_backend.scoped(backend):
        for op, args in _opcheck_samples(device):
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_vae_loss(compiler):
    def loss(mu, logvar, x):
        z, kl = genkern.reparameterize_kl(mu, logvar, seed=3, offset=1)
        recon = genkern.gaussian_log_prob(x, z)
        return (kl - recon).mean()

    mu, logvar = make((8, 16), torch.float32, "cpu", requires_grad=True)
    x = torch.randn(8, 16)
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    out = compiled(mu, logvar, x)
    out.backward()
    grads = mu.grad.clone(), logvar.grad.clone()
    mu.grad = logvar.grad = None
    expected = loss(mu, logvar, x)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, (mu.grad, logvar.grad))


# ----------------------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected_before_any_kernel():
    mu, logvar = make((3, 4), torch.float32, "cpu")
    cases = [
        (lambda: genkern.reparameterize(mu, logvar[:, :3]), ValueError, "logvar"),
        (lambda: genkern.reparameterize(mu, logvar.double()), TypeError, "logvar"),
        (lambda: genkern.reparameterize(mu, logvar.to("meta")), ValueError, "logvar"),
        (lambda: genkern.reparameterize(mu.long(), logvar), TypeError, "mu"),
        (lambda: genkern.reparameterize(mu, logvar, num_samples=0), ValueError, "num_samples"),
        (lambda: genkern.reparameterize(mu, logvar, num_samples=2.0), TypeError, "num_samples"),
        (lambda: genkern.reparameterize(mu, logvar, num_samples=True), TypeError, "num_samples"),
        (lambda: genkern.reparameterize(mu, logvar, eps=torch.randn(2, 4)), ValueError, "eps"),
        (lambda: genkern.reparameterize(mu, logvar, seed=-1), ValueError, "seed"),
        (lambda: genkern.reparameterize(mu, logvar, backend="tpu"), ValueError, "backend"),
        (lambda: genkern.reparameterize(mu.half(), logvar.half(), backend="cpu"), ValueError, "cpu"),
        (lambda: genkern.reparameterize([1.0], logvar), TypeError, "mu"),
        (lambda: genkern.gaussian_kl(mu, logvar, dim=2), ValueError, "dim"),
        (lambda: genkern.gaussian_kl(mu, logvar, dim=(0, 0)), ValueError, "dim"),
        (lambda: genkern.gaussian_kl(mu, logvar, dim=()), ValueError, "dim"),
        (lambda: genkern.reparameterize_kl(mu, logvar.int()), TypeError, "logvar"),
        (lambda: genkern.gaussian_log_prob(mu, torch.randn(5)), ValueError, "mu"),
        (lambda: genkern.gaussian_log_prob(mu.int()), TypeError, "z"),
        (lambda: genkern.iwae_bound(torch.randn(2, 3), torch.randn(2, 3), mu, logvar), ValueError, "z"),
        (lambda: genkern.iwae_bound(torch.randn(2, 4), torch.randn(2, 3, 4), mu, logvar), ValueError, "log_px_z"),
        (lambda: genkern.iwae_bound(torch.randn(2, 3), torch.randn(2, 3, 4), mu[:2], logvar), ValueError, "mu"),
        (lambda: genkern.iwae_bound(torch.randn(0, 3), torch.randn(0, 3, 4), mu, logvar), ValueError, "K"),
    ]
    for fn, error, word in cases:
        with pytest.raises(error, match=word):
            fn()


def test_bad_input_never_reaches_a_kernel(monkeypatch):
    from genkern import _kernels as _backends

    def no_kernels(*args):
        raise AssertionError("a kernel was asked for despite bad input")

    monkeypatch.setattr(_backends.KernelGroup, "on", no_kernels)
    mu, logvar = make((3, 4), torch.float32, "cpu")
    with pytest.raises(ValueError, match="logvar"):
        genkern.reparameterize_kl(mu, logvar[:2], seed=0)
    with pytest.raises(TypeError, match="dim"):
        genkern.gaussian_kl(mu, logvar, dim=1.5)
    with pytest.raises(TypeError, match="mu"):
        genkern.gaussian_kl(mu.to(torch.float8_e4m3fn), logvar)
    # The ops themselves check what the kernels rely on, whoever calls them.
    with gk_backend.scoped("cpu"):
        with pytest.raises(ValueError, match="logvar"):
            torch.ops.genkern.reparameterize(mu, torch.zeros(5), None, 1, 0, 0)
        with pytest.raises(ValueError, match="eps"):
            torch.ops.genkern.reparameterize(mu, logvar, torch.zeros(2), 1, 0, 0)
        with pytest.raises(ValueError, match="mu"):
            torch.ops.genkern.gaussian_log_prob(torch.zeros(5, 3, 4), torch.zeros(2, 4), None, 2, 3)
    with gk_backend.scoped("reference"):
        with pytest.raises(ValueError, match="reduced dims"):
            torch.ops.genkern.gaussian_kl(mu, logvar, 1, 0)


def test_dispatch_reaches_the_selected_kernels(monkeypatch):
    from genkern import _kernels

    asked = []
    on = _kernels.KernelGroup.on

    def recording(self, name):
        asked.append(name)
        return on(self, name)

    monkeypatch.setattr(_kernels.KernelGroup, "on", recording)
    mu, logvar = make((3, 4), torch.float32, "cpu", requires_grad=True)
    z, kl = genkern.reparameterize_kl(mu, logvar, seed=0, backend="cpu")
    assert asked == ["cpu"]  # the cpu kernel ran, not the reference
    expected = genkern.reparameterize_kl(mu, logvar, seed=0, backend="reference")
    assert asked == ["cpu"]  # the reference asks for no kernel
    torch.testing.assert_close((z, kl), expected)
    genkern.reparameterize_kl(mu.detach().half(), logvar.detach().half(), seed=0)
    assert asked == ["cpu"]  # float16 on the CPU: no C++ kernel, the reference runs
    # The backward runs on the forward's backend, whatever is chosen when it runs.
    with genkern.set_backend("reference"):
        (z.sum() + kl.sum()).backward()
    assert asked == ["cpu", "cpu"]
    grads = mu.grad, logvar.grad
    mu.grad = logvar.grad = None
    del asked[:]
    sum(t.sum() for t in expected).backward()
    assert asked == []  # the backward of a reference forward is the reference's
    torch.testing.assert_close((mu.grad, logvar.grad), grads)


def test_set_backend_process_wide_and_as_context():
    mu, logvar = make((3, 4), torch.float32, "cpu")
    assert genkern.get_backend() is None
    with genkern.set_backend("reference"):
        assert genkern.get_backend() == "reference"
        with pytest.raises(ValueError, match="cpu"):
            genkern.reparameterize(mu.half(), logvar.half(), seed=0, backend="cpu")
        genkern.reparameterize(mu.half(), logvar.half(), seed=0)  # the reference runs half on CPU
    assert genkern.get_backend() is None
    genkern.set_backend("reference")
    try:
        assert genkern.get_backend() == "reference"
    finally:
        genkern.set_backend(None)
    with pytest.raises(ValueError):
        genkern.set_backend("fast")


def test_auto_backend_is_the_compiled_one_on_cpu():
    assert genkern.backend.resolve(None, torch.device("cpu"), torch.float32) == "cpu"
    assert genkern.backend.resolve(None, torch.device("cpu"), torch.float16) == "reference"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_iwae_non_finite_weights_follow_logsumexp(backend):
    log_px_z, z, mu, logvar = _iwae_inputs(3, 4, 5, torch.float32, device_for(backend))
    log_px_z = log_px_z.clone()
    log_px_z[:, 0] = -math.inf  # every weight zero: the bound is -inf
    log_px_z[1, 1] = math.nan  # a NaN weight poisons its example
    log_px_z[0, 2] = math.inf
    log_px_z[0, 3] = -math.inf  # a zero weight among finite ones
    got = genkern.iwae_bound(log_px_z, z, mu, logvar, backend=backend).cpu()
    expected = ref.iwae_bound(log_px_z.cpu(), z.cpu(), mu.cpu(), logvar.cpu())
    torch.testing.assert_close(got, expected, equal_nan=True)


def _float64_row_sum(fn, z, pieces=16):
    """sum of fn(z) in float64, a piece at a time (no float64 copy of the whole row)."""
    return sum(fn(p.double()).sum().item() for p in z.chunk(pieces))


@pytest.mark.slow
def test_long_row_reductions_are_accurate():
    # gaussian_log_prob over 2^28 float32 terms in one row: the kernel added its 16K-element segment sums one
    # after another (1.2e-6 relative error here, 3.3e-5 at 2.7e8 normals); summed pairwise, as torch.sum.
    n = 1 << 28
    z = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.5 + 1.0
    got = genkern.gaussian_log_prob(z, None, None, dim=-1, backend="cpu").item()
    want = _float64_row_sum(lambda t: -0.5 * (math.log(2 * math.pi) + t * t), z)
    assert abs(got - want) / abs(want) < 1e-7, (got, want)  # before: 1.2e-6; now 3e-9, as torch.sum
    del z


def test_long_reduced_dims_with_inner_rows_are_accurate():
    # A reduced dim of 2^20 with 3 inner elements each (inner > 1): terms were added to one accumulator per
    # element in sequence (~1e-4 relative error here); blocks merged pairwise keep it near float32 rounding.
    mu = torch.randn(1 << 20, 3, generator=torch.Generator().manual_seed(1)) * 0.1 + 1.0
    logvar = torch.zeros_like(mu)
    got = genkern.gaussian_kl(mu, logvar, dim=0, backend="cpu").double()
    want = (0.5 * mu.double() ** 2).sum(0)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
