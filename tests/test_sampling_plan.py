"""The cached sampler's colour plan (genkern.autoregressive.sampling_plan): with colour groups each group of
each layer is computed once per pixel, at the sub-step of the colour it needs; every backend follows the
plan, and RGB samples stay those of naive sampling."""

import pytest
import torch
from conftest import device_for
from test_pixelcnn import make, randomize
from test_pixelcnn_sampling import conv_node, run_raw

import genkern
from genkern.autoregressive import Program, sampling_plan
from genkern.autoregressive import reference as ref
from genkern.models import GatedPixelCNN, PixelCNN

MODELS = [PixelCNN, GatedPixelCNN]
SAMPLER_BACKENDS = genkern.backends("pixelcnn_sampling")
KERNELS = [b for b in SAMPLER_BACKENDS if b != "reference"]


def channel_steps(segments, channels):
    steps = torch.full((channels,), -1)
    for step, lo, hi, _ in segments:
        assert bool((steps[lo:hi] == -1).all()), "a channel is computed twice"
        steps[lo:hi] = step
    assert bool((steps >= 0).all()), "a channel is never computed"
    return steps


@pytest.mark.parametrize("cls", MODELS)
def test_each_colour_group_of_each_layer_is_computed_once_at_its_colour(cls):
    hidden, levels = 12, 5
    m = make(cls, 3, levels=levels, hidden=hidden)
    p = m.program(1, None)
    segments = p.segments(levels)
    group = hidden // 3
    for node, segs in zip(p.nodes, segments):
        if node[1]:
            assert segs == []  # the vertical stack: once per row
            continue
        channels = p.channels[node[3]]
        steps = channel_steps(segs, channels)
        o = torch.arange(channels)
        if node[3] == p.logits:
            want = o // levels  # colour c's logits at sub-step c
        else:  # a hidden layer, or a gated layer's pre-activation (both gate halves keep the grouping)
            want = (o % hidden) // group
        assert torch.equal(steps, want), (node[:4], segs)
        assert [s for s, *_ in segs] == sorted(s for s, *_ in segs)
    planned, full = sampling_plan.multiply_adds(p.nodes, segments, 3)
    # Once per channel is a third of recomputing everything at each sub-step; the masked rows a group never
    # reads (the later input groups at the pixel) take off more.
    assert planned < full / 3
    print(f"\n{cls.__name__}: {planned} of {full} multiply-adds per pixel ({planned / full:.3f})")


@pytest.mark.parametrize("cls", MODELS)
def test_a_masked_convolution_stops_at_the_rows_its_group_reads(cls):
    m = make(cls, 3, levels=4, hidden=12)
    p = m.program(1, None)
    head = next(k for k, n in enumerate(p.nodes) if n[3] == p.logits)
    # The 1x1 mask-B output layer: colour c's logits read hidden groups 0 .. c, 4 channels each.
    assert [rows for *_, rows in p.segments(4)[head]] == [4, 8, 12]


@pytest.mark.parametrize("cls", MODELS)
def test_a_grey_model_has_one_step_per_pixel(cls):
    p = make(cls, 1, levels=4).program(1, None)
    for node, segs in zip(p.nodes, p.segments(4)):
        if not node[1]:
            assert [s for s, *_ in segs] == [0] * len(segs)


@pytest.mark.parametrize("backend", SAMPLER_BACKENDS)
@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize(
    "batch, size, seed", [(1, (3, 5), 0), (4, (5, 3), 1), (5, (4, 4), 2), (3, (1, 1), 3), (2, (2, 7), 4)]
)
def test_rgb_cached_sampling_equals_naive_sampling(backend, cls, batch, size, seed):
    m = randomize(make(cls, 3, levels=6, size=size, hidden=9, n_layers=3, kernel_size=3, seed=seed), 0.5)
    cached = m.to(device_for(backend)).sample(batch, seed=seed, offset=2, backend=backend).cpu()
    naive = m.cpu().sample(batch, seed=seed, offset=2, method="naive")
    assert torch.equal(cached, naive)


def rgb_program(seed=0):
    return randomize(make(PixelCNN, 3, levels=6, size=(3, 4), hidden=9, n_layers=2, seed=seed), 0.5).program(2, None)


def run(p, segments, backend, batch=2):
    out = torch.zeros(batch, 3, 3, 4, dtype=torch.int64, device=device_for(backend))
    caches = [torch.zeros(batch, 3, 4, c, device=out.device) for c in p.channels]
    nodes = [tuple(v.to(out.device) if isinstance(v, torch.Tensor) else v for v in n) for n in p.nodes]
    args = (p.logits, 6, 0.4, -1.0, 3, 0, 0)
    genkern.backend.call(backend, genkern.autoregressive._ops.run_program, caches, nodes, segments, out, *args)
    return out.cpu()


@pytest.mark.parametrize("backend", KERNELS)
def test_every_backend_follows_the_plan(backend):
    """A plan with bounds the runners accept but the wrong steps (everything before the pixel's first draw)
    or too few rows (the logits from the bias only) changes the samples, the same way on every backend."""
    p = rgb_program()
    right = p.segments(6)
    early = [[(0, lo, hi, rows) for _, lo, hi, rows in segs] for segs in right]
    logits = next(k for k, n in enumerate(p.nodes) if n[3] == p.logits)
    short = [[(s, lo, hi, 0 if k == logits else rows) for s, lo, hi, rows in segs] for k, segs in enumerate(right)]
    want = run(p, right, "reference")
    assert torch.equal(run(p, right, backend), want)
    for plan in (early, short):
        got = run(p, plan, backend)
        assert torch.equal(got, run(p, plan, "reference"))
        assert not torch.equal(got, want)
    # rows = 0: the logits are the output layer's bias, as with its weight zeroed
    zeroed = list(p.nodes[logits])
    zeroed[9] = torch.zeros_like(zeroed[9])
    p.nodes[logits] = tuple(zeroed)
    assert torch.equal(run(p, short, backend), run(p, right, backend))


def test_a_non_causal_program_is_refused():
    m = make(PixelCNN, 3, levels=4, hidden=6, n_layers=1)
    m.input.mask_type = "B"  # the first layer sees the colour it predicts
    with pytest.raises(ValueError, match="logits of colour 0 depend on colour 0"):
        m.program(1, None).segments(4)
    with pytest.raises(ValueError, match="not causal"):
        m.sample(1, seed=0)


def test_a_read_before_the_last_write_is_refused():
    p = Program(1)
    a, b = p.cache(2), p.cache(2)
    p.conv(0, a, torch.ones(2, 1, 1, 1), anchor=(0, 0))  # the pixel's own colour: step 1
    p.conv(a, b, torch.ones(2, 2, 1, 1))
    p.conv(0, a, torch.ones(2, 1, 2, 1), anchor=(1, 0), accumulate=True)
    p.logits = b
    with pytest.raises(ValueError, match="reads cache 1 at its pixel before node 2 writes it"):
        p.segments(1)


def test_channels_seeing_the_last_colour_run_after_the_last_draw():
    """Step `colours`: a channel that reads the pixel's last colour is computed after its draw, for the
    pixels after it (the recompute-everything sampler left it stale)."""
    p = Program(2)
    seen = p.cache(2)
    p.conv(0, seen, torch.ones(2, 2, 1, 1), anchor=(0, 0))
    p.logits = p.cache(2 * 3)
    p.conv(seen, p.logits, torch.randn(6, 2, 1, 1), anchor=(0, 1))  # the pixel to the left only
    segments = p.segments(3)
    assert segments == [[(2, 0, 2, 2)], [(0, 0, 6, 2)]]
    for backend in KERNELS:
        kwargs = dict(levels=3, scale=1.0, shift=0.0, seed=1, offset=0, first_sample=0)
        got = p.run(torch.zeros(3, 2, 2, 5, dtype=torch.int64, device=device_for(backend)), backend=backend, **kwargs)
        want = p.run(torch.zeros(3, 2, 2, 5, dtype=torch.int64), backend="reference", **kwargs)
        assert torch.equal(got.cpu(), want)


# -------------------------------------------------------------------------------------------------------
# The compiled entry checks the plan's bounds (a wrong plan gives wrong samples, never a stray access).
# -------------------------------------------------------------------------------------------------------
NODES = [conv_node(0, 1, 1, 4), conv_node(1, 2, 4, 2)]


@pytest.mark.skipif("cpu" not in KERNELS, reason="the compiled runner's own checks")
@pytest.mark.parametrize(
    "segments, match",
    [
        ([[(0, 0, 4, 1)]], "one list per node"),
        ([[(0, 0, 4, 1)], [(0, 0, 1, 4), (0, 1, 2, 4)]], None),
        ([[(0, 0, 4, 1)], [(0, 0, 2, 5)]], "rows are outside"),
        ([[(0, 0, 4, 1)], [(0, 0, 2, -1)]], "rows are outside"),
        ([[(0, 0, 4, 1)], [(0, 0, 3, 4)]], "channels are outside"),
        ([[(0, 2, 2, 1), (0, 0, 4, 1)], [(0, 0, 2, 4)]], "channels are outside"),
        ([[(0, 0, 3, 1), (0, 2, 4, 1)], [(0, 0, 2, 4)]], "overlap"),
        ([[(0, 0, 3, 1)], [(0, 0, 2, 4)]], "cover every output channel"),
        ([[(1, 0, 2, 1), (0, 2, 4, 1)], [(0, 0, 2, 4)]], "in order"),
        ([[(2, 0, 4, 1)], [(0, 0, 2, 4)]], "in order"),
        ([[(-1, 0, 4, 1)], [(0, 0, 2, 4)]], "in order"),
        ([[(0, 0, 4)], [(0, 0, 2, 4)]], r"\(step, lo, hi, rows\)"),
    ],
)
def test_the_plan_bounds_are_checked(segments, match):
    if match is None:
        run_raw(NODES, segments=segments)
        return
    with pytest.raises(ValueError, match=match):
        run_raw(NODES, segments=segments)


@pytest.mark.skipif("cpu" not in KERNELS, reason="the compiled runner's own checks")
def test_a_row_node_takes_no_segments():
    nodes = [conv_node(0, 1, 1, 4, row=True), conv_node(1, 2, 4, 2)]
    run_raw(nodes, segments=[[], [(0, 0, 2, 4)]])
    with pytest.raises(ValueError, match="a row node has no segments"):
        run_raw(nodes, segments=[[(0, 0, 4, 1)], [(0, 0, 2, 4)]])


def test_plan_multiply_adds_counts_the_pixel_convolutions():
    nodes = [conv_node(0, 1, 1, 4), (ref.GATE, False, 1, 2, -1, False, False, [], [], None, None, None)]
    assert sampling_plan.multiply_adds(nodes, [[(0, 0, 2, 1), (1, 2, 4, 0)], [(0, 0, 2, 0)]], 2) == (2, 8)
