"""Cached sampling of PixelCNN with the logistic-mixture head (docs/math.md, section 6.1): the cached sampler
(cpu, cuda, reference) against naive sampling bit for bit, batch independence, first_sample, the stream's
bound, the draws' distribution, and the program's and the compiled runner's checks of the head."""

import pytest
import torch
from conftest import device_for

import genkern
from genkern.autoregressive import Program
from genkern.autoregressive import reference as ref
from genkern.models import PixelCNN

SAMPLER_BACKENDS = genkern.backends("pixelcnn_sampling")
LEVELS = 9  # 2 / (L - 1) = 1/4: the network's inputs are exact binary fractions (see dyadic_model)


def dyadic_model(colors, k, coupled=None, levels=LEVELS, size=(3, 4), seed=0):
    """A small mixture PixelCNN whose weights and biases (masked entries too) are multiples of 1/8 in
    [-1/2, 1/2]: every activation is then an exact binary fraction of a few bits in float32, whatever the
    summation order, so the cached sampler and the network's forward give the very same params and the
    samples must agree bit for bit (not merely up to float near-ties at a level boundary)."""
    torch.manual_seed(seed)
    model = PixelCNN(
        colors,
        levels,
        size,
        hidden_channels=8,
        n_layers=2,
        kernel_size=3,
        head="logistic_mixture",
        num_mixtures=k,
        rgb_coupling=coupled,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 2).round().clamp(-4, 4) / 8)
    # the premise: float32 and float64 forwards agree exactly (no rounding anywhere)
    x = torch.randint(0, levels, (4, colors, *size))
    assert torch.equal(model(x).double(), model.double()(x))
    return model.float()


CASES = [(1, 1, None), (1, 3, None), (3, 2, None), (3, 1, False), (3, 3, False)]  # (colours, K, rgb_coupling)


@pytest.mark.parametrize("backend", SAMPLER_BACKENDS)
@pytest.mark.parametrize("colors, k, coupled", CASES)
def test_cached_sampling_is_naive_sampling_bit_for_bit(backend, colors, k, coupled):
    model = dyadic_model(colors, k, coupled).to(device_for(backend))
    assert model.rgb_coupling == (colors == 3 and coupled is None)
    kwargs = dict(seed=7, offset=3, first_sample=2, backend=backend)
    cached = model.sample(4, **kwargs)
    naive = model.sample(4, method="naive", **kwargs)
    assert cached.dtype == torch.int64 and cached.shape == (4, colors, 3, 4)
    assert torch.equal(cached, naive)
    assert cached.unique().numel() >= LEVELS - 2  # the test is not trivial: the draws spread over the levels


@pytest.mark.parametrize("backend", SAMPLER_BACKENDS)
def test_a_sample_does_not_depend_on_its_batch(backend):
    model = dyadic_model(3, 2).to(device_for(backend))
    whole = model.sample(7, seed=9, backend=backend)
    parts = torch.cat(
        [model.sample(3, seed=9, backend=backend), model.sample(4, seed=9, first_sample=3, backend=backend)]
    )
    assert torch.equal(whole, parts)
    assert torch.equal(whole[5:6], model.sample(1, seed=9, first_sample=5, method="naive", backend=backend))
    assert not torch.equal(whole, model.sample(7, seed=10, backend=backend))
    assert not torch.equal(whole, model.sample(7, seed=9, offset=1, backend=backend))


def test_the_compiled_samplers_match_the_reference_sampler():
    """The cached reference runs the same program in torch: the cpu sampler's levels from the same params
    (the logistic noise in float32 there, in float64 rounded in the reference: equal but at a boundary)."""
    model = dyadic_model(3, 3)
    want = model.sample(5, seed=1, first_sample=4, backend="reference")
    for backend in [b for b in SAMPLER_BACKENDS if b != "reference"]:
        got = model.to(device_for(backend)).sample(5, seed=1, first_sample=4, backend=backend).cpu()
        assert (got != want).float().mean() < 0.02
        model.cpu()


def test_first_sample_is_bounded_by_the_mixtures_stream():
    """Draw t of pixel p of sample s is stream element ((first_sample + s) H W + p)(K + C) + t: a first_sample
    past the categorical bound (dims x levels per sample) but inside the mixture's samples, equal to naive."""
    model = dyadic_model(3, 2, levels=17)  # 12 pixels x 5 draws per sample; the categorical bound: 36 x 17
    first = (2**63 - 1) // 60 - 2
    cached = model.sample(2, seed=3, first_sample=first)
    assert torch.equal(cached, model.sample(2, seed=3, first_sample=first, method="naive"))
    with pytest.raises(ValueError, match="first_sample"):
        model.sample(3, seed=3, first_sample=first)


def test_a_float64_model_samples_its_float32_params():
    model = dyadic_model(3, 2)
    want = model.sample(3, seed=5)
    assert torch.equal(model.double().sample(3, seed=5), want)


def test_no_triton_sampler():
    model = dyadic_model(1, 2)
    with pytest.raises(ValueError, match="triton"):
        model.sample(2, seed=0, backend="triton")


def test_samples_follow_the_mixture():
    """A 1 x 2 grey image of 4 levels (16 values), 3 components: 8000 cached samples against the model's exact
    probabilities, chi-square at p < 1e-6 (a false failure once in a million runs of a correct sampler)."""
    chi2 = pytest.importorskip("scipy.stats").chi2
    torch.manual_seed(0)
    model = PixelCNN(
        1, 4, (1, 2), hidden_channels=8, n_layers=2, kernel_size=3, head="logistic_mixture", num_mixtures=3
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    samples = model.sample(8000, seed=11)
    grid = torch.cartesian_prod(*[torch.arange(4)] * 2).view(-1, 1, 1, 2)
    probs = model.double().log_prob(grid).exp().detach()
    counts = torch.bincount(samples[:, 0, 0, 0] * 4 + samples[:, 0, 0, 1], minlength=16).double()
    expected = probs * len(samples)
    assert expected.min() > 5  # the chi-square approximation holds
    stat = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2.sf(stat, df=15) > 1e-6


def test_model_rgb_coupling_argument():
    with pytest.raises(ValueError, match="rgb_coupling needs in_channels=3"):
        PixelCNN(1, 4, 3, head="logistic_mixture", rgb_coupling=True)
    with pytest.raises(ValueError, match="rgb_coupling is an option"):
        PixelCNN(3, 4, 3, rgb_coupling=False)
    with pytest.raises(TypeError, match="rgb_coupling"):
        PixelCNN(3, 4, 3, head="logistic_mixture", rgb_coupling=1)
    uncoupled = PixelCNN(3, 4, 3, hidden_channels=6, head="logistic_mixture", num_mixtures=2, rgb_coupling=False)
    assert uncoupled.output.out_channels == ref.mixture_param_channels(3, 2, False) == 14


# -------------------------------------------------------------------------------------------------------
# The program's and the compiled runner's checks of the head
# -------------------------------------------------------------------------------------------------------
def mixture_program(colors, k, coupled, see_centre=False):
    """cache 0 -> a 1 x 2 row conv (the left pixel, and with see_centre the pixel itself) -> params."""
    p = Program(colors)
    p.logits = p.cache(ref.mixture_param_channels(colors, k, coupled))
    keep = torch.ones(p.channels[1], colors, 1, 2)
    if not see_centre:
        keep[..., 1] = 0
    p.conv(0, p.logits, torch.randn(p.channels[1], colors, 1, 2), keep, anchor=(0, 1))
    p.mixture = (k, coupled)
    return p


def test_the_runner_checks_the_head_arguments():
    p = mixture_program(1, 2, False)
    out = torch.zeros(2, 1, 2, 3, dtype=torch.int64)
    kwargs = dict(levels=4, scale=1.0, shift=0.0, seed=0, offset=0, first_sample=0)
    for mixture, error, match in [((2.0, False), TypeError, "mixtures"), ((2, 1), TypeError, "coupled")]:
        p.mixture = mixture
        with pytest.raises(error, match=match):
            p.run(out, **kwargs)


def test_the_plan_refuses_params_that_see_their_pixel():
    out = torch.zeros(2, 1, 2, 3, dtype=torch.int64)
    kwargs = dict(levels=4, scale=1.0, shift=0.0, seed=0, offset=0, first_sample=0)
    mixture_program(1, 2, False).run(out, **kwargs)
    with pytest.raises(ValueError, match="mixture's params depend on their own pixel"):
        mixture_program(1, 2, False, see_centre=True).run(out, **kwargs)


@pytest.mark.skipif("cpu" not in SAMPLER_BACKENDS, reason="the compiled runner's own checks")
@pytest.mark.parametrize(
    "colors, params, mixtures, coupled, levels, match",
    [
        (1, 6, 2, False, 4, None),
        (3, 20, 2, True, 4, None),
        (1, 7, 2, False, 4, "mixture's"),
        (3, 14, 2, True, 4, "mixture's"),
        (1, 6, 2, True, 4, "coupled: the mixture's RGB coupling needs"),
        (1, 6, 0, True, 4, "coupled: only a logistic-mixture head"),
        (1, 6, -1, False, 4, "mixtures must be >= 0"),
        (1, 6, 2**62, False, 4, "mixture's"),  # no overflow of (1 + 2C)K
        (1, 6, 2, False, 1, "levels must be >= 2"),
    ],
)
def test_the_compiled_runner_checks_the_head(colors, params, mixtures, coupled, levels, match):
    out = torch.zeros(2, colors, 2, 3, dtype=torch.int64)
    caches = [torch.zeros(2, 2, 3, colors), torch.zeros(2, 2, 3, params)]
    node = (0, False, 0, 1, -1, False, False, [0], [-1], torch.randn(1, colors, params), None, None)
    args = (
        [genkern._native.array(c) for c in caches],
        [tuple(genkern._native.array(v) if isinstance(v, torch.Tensor) else v for v in node)],
    )
    segments = [[(0, 0, params, colors)]]

    def run():
        genkern._native._C.pixelcnn_sampling.sample(
            *args, segments, genkern._native.array(out), 1, levels, 1.0, 0.0, 0, 0, 0, mixtures, coupled
        )

    if match is None:
        run()
        assert out.min() >= 0 and out.max() < levels
        return
    with pytest.raises(ValueError, match=match):
        run()


@pytest.mark.skipif("cpu" not in SAMPLER_BACKENDS, reason="the compiled runner's own checks")
def test_the_compiled_runner_refuses_a_second_step_past_the_pixels_draw():
    out = torch.zeros(2, 1, 2, 3, dtype=torch.int64)
    caches = [torch.zeros(2, 2, 3, 1), torch.zeros(2, 2, 3, 6)]
    node = (0, False, 0, 1, -1, False, False, [0], [-1], torch.randn(1, 1, 6), None, None)
    described = [tuple(genkern._native.array(v) if isinstance(v, torch.Tensor) else v for v in node)]
    with pytest.raises(ValueError, match="segment steps"):
        genkern._native._C.pixelcnn_sampling.sample(
            [genkern._native.array(c) for c in caches],
            described,
            [[(2, 0, 6, 1)]],
            genkern._native.array(out),
            1,
            4,
            1.0,
            0.0,
            0,
            0,
            0,
            2,
            False,
        )
