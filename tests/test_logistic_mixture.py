"""The discretised logistic mixture (PixelCNN++'s head): the reference against values derived by hand and
against the paper's reference code, its written-out backward against autograd, every backend with kernels
against the reference (log p and gradients, across dtypes, layouts and sizes), float64 gradcheck, sampling
(bits against the reference, independence of the batch, chi-square tests against the exact level
probabilities), opcheck, torch.compile, bad input, and the head in PixelCNN."""

import math

import pytest
import torch
from conftest import KERNEL_BACKENDS, assert_close, backend_dtype_params, device_for, interpreted

import genkern
from genkern import backend as gk_backend
from genkern.autoregressive import reference as ref
from genkern.autoregressive.bench_cases import eager_mixture_log_prob

FAMILY = "logistic_mixture"
MIX_BACKENDS = [b for b in KERNEL_BACKENDS if gk_backend.has_family(b, FAMILY)]
ALL_BACKENDS = MIX_BACKENDS + ["reference"]
PARAMS = backend_dtype_params(MIX_BACKENDS) + backend_dtype_params(["reference"])
nll = genkern.discretized_logistic_mixture_nll
sample = genkern.discretized_logistic_mixture_sample

# (B, C, K, H, W, coupled, levels): odd sizes, one of everything, an empty batch, grayscale and uncoupled
# colour (C = 2, C = 4), two levels (every pixel an edge), a run of pixels past the CPU's 64-pixel tasks.
CASES = [
    (2, 3, 3, 5, 7, True, 256),
    (1, 1, 1, 1, 1, False, 256),
    (0, 3, 2, 3, 3, True, 256),
    (3, 1, 4, 4, 33, False, 16),
    (2, 2, 2, 3, 5, False, 2),
    (2, 4, 2, 3, 3, False, 256),
    (2, 3, 10, 9, 9, True, 256),
]
INTERPRETED_CASES = [CASES[0], CASES[1], CASES[2], CASES[4], CASES[5]]


def _cases(backend):
    return INTERPRETED_CASES if interpreted(backend) else CASES


def _device(backend):
    return device_for(backend) if backend != "reference" else torch.device("cpu")


def make_params(batch, colors, k, height, width, coupled, dtype=torch.float64, device="cpu", seed=0):
    """PixelCNN++-like outputs: logits and means of unit spread, log-scales in [-5, 0.5] (one per image below -7,
    to reach the clamp), coefficients of unit spread."""
    g = torch.Generator().manual_seed(seed)
    p = ref.mixture_param_channels(colors, k, coupled)
    params = torch.randn(batch, p, height, width, generator=g, dtype=torch.float64)
    _, means, log_scales, _ = ref.mixture_parts(params, k, coupled)
    means.mul_(0.5)
    log_scales.uniform_(-5.0, 0.5, generator=g)
    if log_scales.numel():
        log_scales[:, 0, 0, 0, 0] = -8.0
    return params.to(device=device, dtype=dtype)


def make_levels(batch, colors, height, width, levels, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (batch, colors, height, width), generator=g)
    if x.numel():  # both edges appear
        x.view(-1)[0] = 0
        x.view(-1)[-1] = levels - 1
    return x.to(device)


def _log_p(params, x, levels, k, coupled):
    return ref.logistic_mixture_log_prob(params.cpu().double(), x.cpu(), levels, k, coupled)


# ===================================================================== the reference is the paper's model


def _softplus(z):
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _one_channel(x, mean, log_scale, levels=256):
    """log P(x) of one discretised logistic, by hand (docs/math.md, section 6.1)."""
    s = max(log_scale, -7.0)
    y = 2 * x / (levels - 1) - 1
    e, u, h = math.exp(-s), y - mean, 1 / (levels - 1)
    plus, minus, mid = e * (u + h), e * (u - h), e * u
    if x == 0:
        return plus - _softplus(plus)
    if x == levels - 1:
        return -_softplus(minus)
    delta = _sigmoid(plus) - _sigmoid(minus)
    if delta > 1e-5:
        return math.log(max(delta, 1e-12))
    return mid - s - 2 * _softplus(mid) - math.log((levels - 1) / 2)


def test_hand_derived_values_one_component():
    """K = 1 (log_softmax = 0): mean 0, scale 1 at x = 0 and 255, log sigmoid(-1 + 1/255) both (the edges are
    mirror images); in the middle x = 127, y = -1/255, the bin's mass sigmoid(0) - sigmoid(-2/255); and a
    bin far in the tail of a sharp logistic (mean -1, log-scale -7), the density branch."""
    params = torch.zeros(4, 3, 1, 1, dtype=torch.float64)
    params[3, 1], params[3, 2] = -1.0, -7.0
    x = torch.tensor([0, 255, 127, 200]).view(4, 1, 1, 1)
    got = ref.logistic_mixture_log_prob(params, x, 256, 1, False).flatten()
    edge = -math.log1p(math.exp(1 - 1 / 255))
    middle = math.log(0.5 - 1 / (1 + math.exp(2 / 255)))
    y = 2 * 200 / 255 - 1
    mid = math.exp(7) * (y + 1)
    tail = mid + 7 - 2 * _softplus(mid) - math.log(127.5)
    want = torch.tensor([edge, edge, middle, tail], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[3] < -1000  # the density branch really ran (the mass is below 1e-5)
    for backend in MIX_BACKENDS:
        out = nll(params.to(_device(backend)), x.to(_device(backend)), num_mixtures=1, backend=backend)
        torch.testing.assert_close(out.cpu(), -want, rtol=1e-12, atol=1e-10)


def test_hand_derived_values_coupled_mixture():
    """K = 2, C = 3 with coupling: the mixture of the per-channel terms by hand, mu_G and mu_B coupled to the
    true y_R, y_G through tanh of the coefficients."""
    k = 2
    params = torch.zeros(1, 10 * k, 1, 1, dtype=torch.float64)
    logits = [0.3, -0.4]
    means = [[0.1, -0.2], [0.0, 0.3], [-0.5, 0.2]]  # [colour][component]
    scales = [[-1.0, -2.0], [-0.5, -8.0], [-3.0, 0.2]]
    coeffs = [[0.7, -0.3], [0.2, 0.9], [-1.1, 0.4]]  # [coefficient j][component]
    params[0, :k, 0, 0] = torch.tensor(logits, dtype=torch.float64)
    for c in range(3):
        start = k + 3 * k * c
        params[0, start : start + k, 0, 0] = torch.tensor(means[c], dtype=torch.float64)
        params[0, start + k : start + 2 * k, 0, 0] = torch.tensor(scales[c], dtype=torch.float64)
        params[0, start + 2 * k : start + 3 * k, 0, 0] = torch.tensor(coeffs[c], dtype=torch.float64)
    x = [30, 255, 140]
    y = [2 * v / 255 - 1 for v in x]
    lse_logits = math.log(sum(math.exp(v) for v in logits))
    terms = []
    for j in range(k):
        a0, a1, a2 = (math.tanh(coeffs[i][j]) for i in range(3))
        mu = [means[0][j], means[1][j] + a0 * y[0], means[2][j] + a1 * y[0] + a2 * y[1]]
        lp = sum(_one_channel(x[c], mu[c], scales[c][j]) for c in range(3))
        terms.append(logits[j] - lse_logits + lp)
    want = math.log(sum(math.exp(t) for t in terms))
    got = ref.logistic_mixture_log_prob(params, torch.tensor(x).view(1, 3, 1, 1), 256, k, True)
    assert abs(got.item() - want) < 1e-12
    for backend in MIX_BACKENDS:
        out = nll(params.to(_device(backend)), torch.tensor(x).view(1, 3, 1, 1).to(_device(backend)), backend=backend)
        assert abs(out.item() + want) < 1e-10


def test_reference_is_the_papers_loss():
    """Against the paper's loss written eagerly (the bench's baseline) in float64, where its sigma(p+) - sigma(p-)
    does not cancel badly, with the clamp, the edges and the low-probability branch all reached (F.softplus's
    threshold of 20 costs it ~2e-9 where its argument passes 20)."""
    params = make_params(3, 3, 5, 6, 7, True)
    x = make_levels(3, 3, 6, 7, 256)
    got = ref.logistic_mixture_log_prob(params, x, 256, 5, True)
    want = eager_mixture_log_prob(params, x.double() * 2 / 255 - 1)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    *_, delta, branch = ref._mixture_terms(params, x, 256, 5, True)
    assert set(branch.unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]])
def test_reference_backward_is_autograd(case):
    b, c, k, h, w, coupled, levels = case
    params = make_params(b, c, k, h, w, coupled)
    x = make_levels(b, c, h, w, levels)
    grad = torch.randn(b, h, w, dtype=torch.float64)
    p = params.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((ref.logistic_mixture_log_prob(p, x, levels, k, coupled) * grad).sum(), p)
    log_p = ref.logistic_mixture_log_prob(params, x, levels, k, coupled)
    got = ref.logistic_mixture_log_prob_backward(grad, params, x, log_p, levels, k, coupled)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_probabilities_sum_to_one():
    """Over all L^C values of a pixel (L = 5, coupled RGB: 125; grayscale L = 9)."""
    params = make_params(1, 3, 3, 1, 1, True)
    grid = torch.cartesian_prod(*[torch.arange(5)] * 3).view(-1, 3, 1, 1)
    log_p = ref.logistic_mixture_log_prob(params.expand(len(grid), -1, -1, -1), grid, 5, 3, True)
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    params = make_params(1, 1, 2, 1, 1, False)
    grid = torch.arange(9).view(-1, 1, 1, 1)
    log_p = ref.logistic_mixture_log_prob(params.expand(9, -1, -1, -1), grid, 9, 2, False)
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


# ========================================================================= log-likelihood and gradients


def _scale(dtype):
    """The terms are ill-conditioned where e^-s is large (y e^-s with e^-s up to e^7): float32 results carry
    ~1e-6 relative error of their largest intermediates, whatever computes them (the float32 reference
    itself is 3x worse than the kernels here). Measured: under 0.3 of these bounds."""
    return 50.0 if dtype == torch.float32 else 1.0


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_log_prob_matches_reference(backend, dtype):
    device = _device(backend)
    for case in _cases(backend):
        b, c, k, h, w, coupled, levels = case
        params = make_params(b, c, k, h, w, coupled, dtype, device)
        x = make_levels(b, c, h, w, levels, device)
        got = nll(params, x, levels=levels, num_mixtures=k, rgb_coupling=coupled, reduction="pixel", backend=backend)
        want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert got.shape == (b, h, w) and got.dtype == want_dtype and got.device == params.device
        expected = -_log_p(params, x, levels, k, coupled)
        assert_close(got.cpu(), expected, dtype, scale=_scale(dtype))
        per_image = nll(params, x, levels=levels, num_mixtures=k, rgb_coupling=coupled, backend=backend)
        assert per_image.shape == (b,)
        assert_close(per_image.cpu(), expected.sum((1, 2)), dtype, scale=_scale(dtype) * h * w)


def _grads(params, x, levels, k, coupled, backend, seed=3):
    p = params.detach().clone().requires_grad_(True)
    out = nll(p, x, levels=levels, num_mixtures=k, rgb_coupling=coupled, reduction="pixel", backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    return torch.autograd.grad(out, p, g)[0]


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_gradients_match_reference(backend, dtype):
    device = _device(backend)
    for case in _cases(backend):
        b, c, k, h, w, coupled, levels = case
        params = make_params(b, c, k, h, w, coupled, dtype, device)
        x = make_levels(b, c, h, w, levels, device)
        got = _grads(params, x, levels, k, coupled, backend)
        assert got.shape == params.shape and got.dtype == dtype
        want = _grads(params.cpu().double(), x.cpu(), levels, k, coupled, "reference")
        assert_close(got.cpu(), want, dtype, scale=_scale(dtype))


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_training_loss_is_the_per_image_loss(backend, dtype):
    """reduction "sum" / "mean" with gradients needed run genkern::logistic_mixture_nll_loss (the gradient
    computed in the forward; on the CPU from one evaluation of the terms): the loss and gradient bits of the
    per-image NLL summed, under any upstream gradient, a retained graph run twice, and create_graph (whose
    second derivative is refused as the per-pixel loss refuses it)."""
    device = _device(backend)
    for b, c, k, h, w, coupled, levels in _cases(backend):
        params = make_params(b, c, k, h, w, coupled, dtype, device).requires_grad_(True)
        x = make_levels(b, c, h, w, levels, device)
        kw = dict(levels=levels, num_mixtures=k, rgb_coupling=coupled, backend=backend)
        for reduction in ("sum", "mean"):
            per_image = nll(params, x, **kw)  # reduction "none": the forward, then the backward's recomputation
            want = per_image.sum() if reduction == "sum" else per_image.mean()
            (want_grad,) = torch.autograd.grad(want, params)
            loss = nll(params, x, reduction=reduction, **kw)
            assert loss.grad_fn is not None and "nll_loss" in type(loss.grad_fn).__name__
            exact = dict(rtol=0, atol=0, equal_nan=True)  # a case with NaN params: NaN loss and gradients
            torch.testing.assert_close(loss, want, **exact)
            first = torch.autograd.grad(loss, params, retain_graph=True)[0].clone()
            again = torch.autograd.grad(loss, params, retain_graph=True)[0]
            tol = exact if reduction == "sum" else dict(rtol=1e-6, atol=1e-12, equal_nan=True)  # 1/B rounded once
            torch.testing.assert_close(first, want_grad, **tol)
            torch.testing.assert_close(again, first, **exact)
            (scaled,) = torch.autograd.grad(loss * 3.0, params, retain_graph=True)
            torch.testing.assert_close(scaled, 3.0 * first, rtol=1e-6, atol=0, equal_nan=True)
            (graphed,) = torch.autograd.grad(loss, params, create_graph=True)
            torch.testing.assert_close(graphed, first, rtol=1e-6, atol=0, equal_nan=True)
            with pytest.raises(RuntimeError, match="no autograd formula"):
                graphed.sum().backward()
        with torch.no_grad():  # no gradient needed: the forward alone
            assert nll(params, x, reduction="sum", **kw).grad_fn is None


def test_half_types_come_back_in_float32():
    params = make_params(2, 3, 2, 3, 4, True, torch.float16)
    x = make_levels(2, 3, 3, 4, 256)
    out = nll(params, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), -_log_p(params, x, 256, 2, True).sum((1, 2)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", [(2, 3, 2, 2, 3, True, 256), (2, 1, 3, 3, 2, False, 16)])
def test_gradcheck_float64(backend, case):
    b, c, k, h, w, coupled, levels = case
    device = _device(backend)
    # log-scales in (-4, 0): the finite differences never cross the clamp or a branch threshold
    params = make_params(b, c, k, h, w, coupled, device=device)
    _, _, log_scales, _ = ref.mixture_parts(params, k, coupled)
    log_scales.clamp_(-4.0, 0.0)
    x = make_levels(b, c, h, w, levels, device)
    params.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: nll(p, x, levels=levels, num_mixtures=k, rgb_coupling=coupled, reduction="pixel", backend=backend),
        (params,),
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend):
    device = _device(backend)
    params = make_params(4, 3, 2, 5, 6, True, device=device)
    x = make_levels(4, 3, 5, 6, 256, device)
    p_s, x_s = params.transpose(2, 3).contiguous().transpose(2, 3)[::2], x.permute(0, 2, 3, 1).contiguous()
    x_s = x_s.permute(0, 3, 1, 2)[::2]
    assert not p_s.is_contiguous() and not x_s.is_contiguous()
    got = nll(p_s, x_s, reduction="pixel", backend=backend)
    torch.testing.assert_close(got.cpu(), -_log_p(params[::2], x[::2], 256, 2, True))
    torch.testing.assert_close(
        _grads(p_s, x_s, 256, 2, True, backend).cpu(),
        _grads(params[::2].cpu(), x[::2].cpu(), 256, 2, True, "reference"),
    )


def test_reductions_and_level_dtypes():
    params = make_params(3, 3, 2, 4, 5, True, torch.float32)
    x = make_levels(3, 3, 4, 5, 256)
    per_image = nll(params, x)
    torch.testing.assert_close(nll(params, x, reduction="sum"), per_image.sum())
    torch.testing.assert_close(nll(params, x, reduction="mean"), per_image.mean())
    torch.testing.assert_close(nll(params, x, reduction="pixel").sum((1, 2)), per_image)
    for dtype in (torch.uint8, torch.int32, torch.float32):
        assert torch.equal(nll(params, x.to(dtype)), per_image)
    # grayscale: C = 1, 3K channels, no coupling, K inferred
    gray = make_params(3, 1, 4, 4, 5, False, torch.float32)
    xg = make_levels(3, 1, 4, 5, 256)
    torch.testing.assert_close(nll(gray, xg), -_log_p(gray, xg, 256, 4, False).sum((1, 2)).float())


def test_deterministic_and_independent_of_the_batch():
    params = make_params(9, 3, 10, 16, 16, True, torch.float32)
    x = make_levels(9, 3, 16, 16, 256)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((nll(params, x, reduction="pixel", backend="cpu"), _grads(params, x, 256, 10, True, "cpu")))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])
    parts = torch.cat([nll(params[i : i + 4], x[i : i + 4], reduction="pixel", backend="cpu") for i in range(0, 9, 4)])
    assert torch.equal(parts, results[0][0])


@pytest.mark.parametrize("backend", MIX_BACKENDS)
def test_extreme_and_special_values(backend):
    device = _device(backend)
    params = make_params(2, 3, 2, 2, 3, True, torch.float32, device)
    x = make_levels(2, 3, 2, 3, 256, device)
    # a masked component (logit -inf) adds nothing; huge logits stay finite
    masked = params.clone()
    masked[:, 1] = -math.inf
    k_rest = params[:, 2:].view(2, 3, 3, 2, 2, 3)[:, :, :, :1].reshape(2, 9, 2, 3)  # component 0's channels
    single = torch.cat([params[:, :1], k_rest], 1)
    torch.testing.assert_close(nll(masked, x, backend=backend), nll(single, x, backend=backend), rtol=1e-5, atol=1e-4)
    big = params.clone()
    big[:, :2] += 1e4
    assert nll(big, x, backend=backend).isfinite().all()
    # NaN in a pixel's params gives NaN for that pixel only
    bad = params.clone()
    bad[0, 5, 1, 2] = math.nan
    out = nll(bad, x, reduction="pixel", backend=backend).cpu()
    assert out[0, 1, 2].isnan() and out.isnan().sum() == 1


# ================================================================================================ sampling


@pytest.mark.parametrize("backend", MIX_BACKENDS)
def test_sample_float64_is_the_reference_bit_for_bit(backend):
    device = _device(backend)
    for b, c, k, h, w, coupled, levels in _cases(backend):
        params = make_params(b, c, k, h, w, coupled, device=device, seed=k)
        for seed, offset, first in ((0, 0, 0), (123, 7, 5), (2**64 - 1, 2**63 + 3, 2**30)):
            got = sample(
                params,
                seed=seed,
                offset=offset,
                first=first,
                levels=levels,
                channels=c,
                num_mixtures=k,
                rgb_coupling=coupled,
                backend=backend,
            )
            want = ref.logistic_mixture_sample(params.cpu(), levels, k, coupled, seed, offset, first)
            assert got.dtype == torch.int64 and got.shape == (b, c, h, w)
            assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_sample_follows_the_reference(backend, dtype):
    """Float32 and half types draw the reference's levels but where the logistic noise or a Gumbel score is
    within rounding of a boundary: at most one level apart, and rarely."""
    device = _device(backend)
    params = make_params(4, 3, 5, 8, 8, True, dtype, device)
    got = sample(params, seed=11, offset=2, backend=backend).cpu()
    want = ref.logistic_mixture_sample(params.cpu().double(), 256, 5, True, 11, 2, 0)
    differ = got != want
    assert differ.float().mean() < 0.02
    assert ((got - want).abs() <= 1).float().mean() > 0.995


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sample_does_not_depend_on_the_batch(backend):
    device = _device(backend)
    params = make_params(10, 3, 4, 3, 5, True, torch.float32, device)
    whole = sample(params, seed=5, offset=2, backend=backend)
    split = torch.cat(
        [
            sample(params[:3], seed=5, offset=2, backend=backend),
            sample(params[3:], seed=5, offset=2, first=3, backend=backend),
        ]
    )
    assert torch.equal(whole, split)
    assert torch.equal(sample(params[6:7], seed=5, offset=2, first=6, backend=backend), whole[6:7])
    assert not torch.equal(sample(params, seed=5, offset=3, backend=backend), whole)
    assert sample(params[:0], seed=5, backend=backend).shape == (0, 3, 3, 5)


def test_sample_seed_none_follows_torch_manual_seed():
    params = make_params(2, 1, 3, 4, 4, False, torch.float32)
    torch.manual_seed(3)
    first = sample(params, channels=1)
    torch.manual_seed(3)
    assert torch.equal(sample(params, channels=1), first)


def _chi_square_p_value(values, probs):
    from scipy.stats import chi2

    counts = torch.bincount(values, minlength=len(probs)).double()
    expected = probs * len(values)
    stat = ((counts - expected) ** 2 / expected).sum().item()
    return chi2.sf(stat, df=len(probs) - 1)


def _pixel_probabilities(params, levels, colors, k, coupled):
    """The exact probability of every value of one pixel (params (1, P, 1, 1)), from the likelihood."""
    grid = torch.cartesian_prod(*[torch.arange(levels)] * colors).view(-1, colors, 1, 1)
    log_p = ref.logistic_mixture_log_prob(params.expand(len(grid), -1, -1, -1).double(), grid, levels, k, coupled)
    return log_p.exp().flatten()


def _flat_values(samples, levels):
    colors = samples.shape[1]
    weights = levels ** torch.arange(colors - 1, -1, -1)
    return (samples.flatten(2)[:, :, 0] * weights).sum(1)


def _chi_square_params(coupled):
    """One pixel: grayscale K = 3 over 16 levels, or coupled RGB K = 2 over 4 levels with zero coefficients
    (tanh 0 = 0: the channels are independent given the component, so the likelihood's probabilities are
    the sampler's exactly; with coupling the sampler conditions on the drawn y, not a level's)."""
    if coupled:
        params = make_params(1, 3, 2, 1, 1, True, seed=7)
        params.view(1, -1)[:, 2:].view(3, 3, 2)[:, 2] = 0.0
        return params, 4, 3, 2
    params = make_params(1, 1, 3, 1, 1, False, seed=7)
    params.view(-1)[3:6] = torch.tensor([-0.7, 0.1, 0.6])
    params.view(-1)[6:9] = torch.tensor([-1.5, -2.0, -1.0])
    return params, 16, 1, 3


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("coupled", [False, True])
def test_samples_pass_chi_square_against_exact_probabilities(backend, coupled):
    """60 000 draws of one pixel (reference: 20 000), Pearson's chi-square against the exact probabilities of
    its 16 (grayscale) or 64 (RGB) values; the test fails when the p-value is below 1e-6, which a correct
    sampler with a random seed does once in a million runs (the seed is fixed, so the outcome is too)."""
    pytest.importorskip("scipy")
    if interpreted(backend):
        # 20 000 interpreted draws take minutes; test_sample_float64_is_the_reference_bit_for_bit proves the
        # Triton kernel draws the reference's levels bit for bit, and the reference's draws are tested here.
        pytest.skip("the interpreted Triton kernel's draws are the reference's (tested bit for bit)")
    params, levels, colors, k = _chi_square_params(coupled)
    n = 20_000 if backend == "reference" else 60_000
    device = _device(backend)
    draws = params.expand(n, -1, -1, -1).contiguous().to(device)
    got = sample(
        draws, seed=2024, levels=levels, channels=colors, num_mixtures=k, rgb_coupling=coupled, backend=backend
    )
    probs = _pixel_probabilities(params, levels, colors, k, coupled)
    assert _chi_square_p_value(_flat_values(got.cpu(), levels), probs) > 1e-6


def test_chi_square_test_can_fail():
    """The test has power: the samples are rejected against a slightly different mixture."""
    pytest.importorskip("scipy")
    params, levels, colors, k = _chi_square_params(False)
    got = sample(params.expand(60_000, -1, -1, -1).contiguous(), seed=2024, levels=levels, channels=1)
    shifted = params.clone()
    shifted.view(-1)[3:6] += 0.03
    assert (
        _chi_square_p_value(_flat_values(got, levels), _pixel_probabilities(shifted, levels, colors, k, False)) < 1e-6
    )


# ======================================================================================= torch integration


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck(backend):
    ops = torch.ops.genkern
    device = _device(backend)
    params = make_params(2, 3, 2, 3, 4, True, torch.float32, device).requires_grad_(True)
    x = make_levels(2, 3, 3, 4, 256, device)
    gray = make_params(2, 1, 3, 2, 5, False, torch.float32, device)
    xg = make_levels(2, 1, 2, 5, 16, device)
    log_p = ops.logistic_mixture_log_prob(params.detach(), x, 256, 2, True)
    samples = [
        (ops.logistic_mixture_log_prob, (params, x, 256, 2, True)),
        (ops.logistic_mixture_log_prob, (gray.requires_grad_(True), xg, 16, 3, False)),
        (ops.logistic_mixture_log_prob_backward, (params.detach(), x, log_p, torch.randn_like(log_p), 256, 2, True)),
        (ops.logistic_mixture_nll_loss, (params, x, 256, 2, True, False)),
        (ops.logistic_mixture_nll_loss, (gray, xg, 16, 3, False, True)),
        (ops.logistic_mixture_sample, (params.detach(), 256, 2, True, 3, 1, 2, 0)),
        (ops.logistic_mixture_sample, (gray.detach(), 16, 3, False, 1, -5, 0, 7)),
    ]
    with gk_backend.scoped(backend):
        for op, args in samples:
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    params = make_params(2, 3, 3, 4, 4, True, torch.float32).requires_grad_(True)
    x = make_levels(2, 3, 4, 4, 256)

    def loss_fn(params, x):
        return nll(params, x, reduction="mean") / (3 * 16 * math.log(2))

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(params, x)
    (grad,) = torch.autograd.grad(loss, params)
    want = loss_fn(params, x)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, torch.autograd.grad(want, params)[0])
    draw = torch.compile(lambda p: sample(p, seed=3), fullgraph=True, backend="aot_eager")
    assert torch.equal(draw(params.detach()), sample(params.detach(), seed=3))


def test_backend_routing():
    cpu = torch.device("cpu")
    assert gk_backend.resolve(None, cpu, torch.float32, FAMILY) == "cpu"
    assert gk_backend.resolve(None, cpu, torch.float16, FAMILY) == "reference"


# ================================================================================================ bad input


def test_bad_input_is_rejected_before_any_kernel(monkeypatch):
    from genkern import _kernels

    def no_kernels(*args):
        raise AssertionError("a kernel was asked for despite bad input")

    monkeypatch.setattr(_kernels.KernelGroup, "on", no_kernels)
    params = make_params(2, 3, 2, 3, 4, True, torch.float32)
    x = make_levels(2, 3, 3, 4, 256)
    cases = [
        (lambda: nll(params, x + 1), ValueError, r"\[0, 256\)"),
        (lambda: nll(params, x - 1), ValueError, "levels"),
        (lambda: nll(params, x, levels=100), ValueError, "levels"),
        (lambda: nll(params, x.float() + 0.5), ValueError, "integer"),
        (lambda: nll(params, x.bool()), TypeError, "x"),
        (lambda: nll(params, x[:, :1]), ValueError, "params"),
        (lambda: nll(params, x[:1]), ValueError, "x"),
        (lambda: nll(params, x[:, :, :2]), ValueError, "x"),
        (lambda: nll(params, x[0]), ValueError, "x"),
        (lambda: nll(params[:, :19], x), ValueError, "params"),
        (lambda: nll(params, x, num_mixtures=3), ValueError, "channels"),
        (lambda: nll(params, x, num_mixtures=0), ValueError, "num_mixtures"),
        (lambda: nll(params, x, rgb_coupling=False), ValueError, "params"),
        (lambda: nll(params[:, :15], x[:, :2], num_mixtures=3, rgb_coupling=True), ValueError, "rgb_coupling"),
        (lambda: nll(params, x, rgb_coupling="yes"), TypeError, "rgb_coupling"),
        (lambda: nll(params, x, reduction="max"), ValueError, "reduction"),
        (lambda: nll(params.long(), x), TypeError, "params"),
        (lambda: nll([[0.0]], x), TypeError, "params"),
        (lambda: nll(params, x, levels=1), ValueError, "levels"),
        (lambda: nll(params, x, backend="tpu"), ValueError, "backend"),
        (lambda: nll(params.half(), x, backend="cpu"), ValueError, "cpu"),
        (lambda: sample(params, seed=-1), ValueError, "seed"),
        (lambda: sample(params, offset=2**64), ValueError, "offset"),
        (lambda: sample(params, first=-1), ValueError, "first"),
        (lambda: sample(params, first=2**62), ValueError, "first"),
        (lambda: sample(params, channels=0), ValueError, "channels"),
        (lambda: sample(params, channels=1), ValueError, "params"),
        (lambda: sample(params, levels=1), ValueError, "levels"),
    ]
    for index, (fn, error, word) in enumerate(cases):
        with pytest.raises(error, match=word):
            fn()
            pytest.fail(f"case {index} raised nothing")
    ops = torch.ops.genkern
    with gk_backend.scoped("cpu"):
        with pytest.raises(TypeError, match="int64"):
            ops.logistic_mixture_log_prob(params, x.int(), 256, 2, True)
        log_p = torch.zeros(2, 3, 4)
        with pytest.raises(ValueError, match="grad"):
            ops.logistic_mixture_log_prob_backward(params, x, log_p, torch.zeros(2, 3), 256, 2, True)
        with pytest.raises(ValueError, match="log_prob"):
            ops.logistic_mixture_log_prob_backward(params, x, log_p.double(), log_p, 256, 2, True)


def test_native_checks_guard_the_kernels():
    """The compiled entry points check shapes themselves (they are reachable without the ops)."""
    from genkern import _native

    fam = _native.Kernels(_native._C.logistic_mixture)
    params = make_params(2, 3, 2, 3, 4, True, torch.float32)
    x = make_levels(2, 3, 3, 4, 256)
    out = torch.empty(2, 3, 4)
    with pytest.raises(ValueError, match="out"):
        fam.log_prob(params, x, torch.empty(2, 3), 256, 2, True)
    with pytest.raises(TypeError, match="out"):
        fam.log_prob(params, x, out.double(), 256, 2, True)
    with pytest.raises(TypeError, match="x"):
        fam.log_prob(params, x.double(), out, 256, 2, True)
    with pytest.raises(ValueError, match="params"):
        fam.log_prob(params, x, out, 256, 3, True)
    with pytest.raises(ValueError, match="coupling"):
        fam.log_prob(params[:, :15].contiguous(), x[:, :2].contiguous(), out, 256, 3, True)
    with pytest.raises(ValueError, match="x"):
        fam.log_prob(params, x[:, :, :2].contiguous(), out, 256, 2, True)
    with pytest.raises(ValueError, match="contiguous"):
        fam.log_prob(params.transpose(2, 3), x, out, 256, 2, True)
    with pytest.raises(ValueError, match="grad_params"):
        fam.log_prob_backward(out, params, x, out, torch.empty(3), 256, 2, True)
    grad = torch.empty_like(params)
    with pytest.raises(ValueError, match="grad_params"):
        fam.log_prob_with_grad(params, x, out, torch.empty(3), 256, 2, True, -1.0)
    with pytest.raises(ValueError, match="log_prob"):
        fam.log_prob_with_grad(params, x, torch.empty(2, 3), grad, 256, 2, True, -1.0)
    with pytest.raises(ValueError, match="x"):
        fam.log_prob_with_grad(params, x[:, :, :2].contiguous(), out, grad, 256, 2, True, -1.0)
    with pytest.raises(ValueError, match="first"):
        fam.sample(params, torch.empty(2, 3, 3, 4, dtype=torch.int64), 256, 2, True, 0, 0, 2**62)


# ============================================================================================ PixelCNN's head


def _mixture_pixelcnn(colors, levels=4, size=(1, 2), k=2, seed=0):
    from genkern.models import PixelCNN

    torch.manual_seed(seed)
    model = PixelCNN(
        colors, levels, size, hidden_channels=8, n_layers=2, kernel_size=3, head="logistic_mixture", num_mixtures=k
    )
    with torch.no_grad():
        for p in model.parameters():  # masked weights and biases non-zero too: every path is seen
            p.add_(torch.randn_like(p) * 0.3)
    return model.double()


@pytest.mark.parametrize("colors", [1, 3])
def test_pixelcnn_mixture_head_is_a_distribution(colors):
    """Over every image of 2 pixels (4 levels: 4^6 RGB images, 16 grey): the probabilities sum to 1, which
    fails if a pixel's params saw the pixel itself or a later one."""
    model = _mixture_pixelcnn(colors)
    grid = torch.cartesian_prod(*[torch.arange(4)] * (2 * colors)).view(-1, colors, 1, 2)
    torch.testing.assert_close(model.log_prob(grid).exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_pixelcnn_mixture_head_forward_loss_and_sampling():
    model = _mixture_pixelcnn(3, levels=256, size=(4, 5), k=3).float()
    x = make_levels(2, 3, 4, 5, 256)
    params = model(x)
    assert params.shape == (2, 30, 4, 5)
    torch.testing.assert_close(model.log_prob(x), -nll(params, x))
    torch.testing.assert_close(model.bits_per_dim(x), nll(params, x) / (60 * math.log(2)))
    loss = model.bits_per_dim(x).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    # the params at a pixel depend on earlier pixels only: a change at (2, 3) moves none before it
    moved = x.clone()
    moved[:, :, 2, 3] = 255 - moved[:, :, 2, 3]
    diff = (model(moved) - params).abs().sum((0, 1)).flatten()
    assert diff[: 2 * 5 + 4].eq(0).all() and diff[2 * 5 + 4 :].gt(0).any()
    s = model.sample(3, seed=4, method="naive")
    assert s.shape == (3, 3, 4, 5) and s.dtype == torch.int64 and 0 <= s.min() and s.max() <= 255
    assert torch.equal(model.sample(2, seed=4, method="naive", first_sample=1), s[1:])
    assert torch.equal(model.sample(3, seed=4), s)  # cached (tests/test_pixelcnn_mixture_sampling.py)
    with pytest.raises(ValueError, match="head"):
        type(model)(3, 256, 4, head="gaussian")


def test_pixelcnn_mixture_head_samples_follow_the_model():
    """A 1 x 2 grey image of 4 levels (16 values): 6000 naive samples, chi-square (p < 1e-6 fails: once in
    a million runs for a correct sampler) against the model's exact probabilities."""
    pytest.importorskip("scipy")
    model = _mixture_pixelcnn(1)
    samples = model.sample(6000, seed=9, method="naive")
    grid = torch.cartesian_prod(*[torch.arange(4)] * 2).view(-1, 1, 1, 2)
    probs = model.log_prob(grid).exp().detach()
    values = samples[:, 0, 0, 0] * 4 + samples[:, 0, 0, 1]
    assert _chi_square_p_value(values, probs) > 1e-6
