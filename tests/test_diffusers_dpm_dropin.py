"""genkern.diffusers.DPMSolverMultistepScheduler against diffusers' own DPMSolverMultistepScheduler, step by step,
over whole loops, on its fallback paths, and in a real pipeline (DDPMPipeline on a tiny random UNet).

Parity is measured as in tests/test_diffusers_sigma_dropin.py: both schedulers get the same model output,
sample and SDE noise (variance_noise) at every step (the sample carried on is diffusers'), and a step's error is
the norm-wise relative error max |ours - theirs| / max |theirs| of prev_sample, in float32 against diffusers'
float32 step, bound 1e-5. The kernel evaluates diffusers' float32 formulas on the same float32 sigma table
(alpha, sigma and lambda computed from it per step), so the only differences are rounding: the compiled CPU
kernel is bit-equal to diffusers on most axes and within 4e-7 on the others; the bound leaves room for other
hardware and compilers (fused multiply-adds on CUDA, exp and log of other math libraries), a few float32 ulps
of the sample's scale, and for the quantile of dynamic thresholding. The full loops, each scheduler carrying
its own sample, are held to the same 1e-5. The SDE noise without a generator is genkern's Philox stream: it is
tested against genkern.randn at the seed and offsets the scheduler documents, distributionally, and against
genkern's own DPMSolverMultistepSampler with the same seed.
"""

import importlib.util

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="genkern.diffusers is a drop-in for diffusers' schedulers")
import test_diffusers_dropin as dropin_tests  # noqa: E402
import test_diffusers_sigma_dropin as sigma_dropin_tests  # noqa: E402
from diffusers.schedulers import scheduling_dpmsolver_multistep  # noqa: E402

import genkern  # noqa: E402
import genkern.diffusers as gd  # noqa: E402
from genkern.diffusers import _dpm  # noqa: E402

TOLERANCE = 1e-5  # float32, norm-wise relative (module notes)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 4, 8, 8)
NEEDS_SCIPY = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="diffusers' beta sigmas need scipy")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|; infinite unless both are finite."""
    if not (bool(ours.isfinite().all()) and bool(theirs.isfinite().all())):
        return float("inf")
    theirs = theirs.double()
    return float((ours.double() - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))


def randn(seed: int, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make(backend="cpu", **config):
    """(diffusers' scheduler, genkern's from it) for a config."""
    theirs = diffusers.DPMSolverMultistepScheduler(**config)
    ours = gd.from_scheduler(theirs, backend=backend)
    assert type(ours) is gd.DPMSolverMultistepScheduler
    return theirs, ours


class Counter:
    """Counts the calls of genkern's kernel by a drop-in module (`_dpm`, `_unipc`): through the op, and
    launched directly."""

    def __init__(self, monkeypatch, module=_dpm):
        self.op, self.native = 0, 0
        call, launch = module._backend.call, module._solver_ops.launch_native
        monkeypatch.setattr(module._backend, "call", lambda *a: setattr(self, "op", self.op + 1) or call(*a))
        monkeypatch.setattr(
            module._solver_ops, "launch_native", lambda *a: setattr(self, "native", self.native + 1) or launch(*a)
        )

    @property
    def total(self) -> int:
        return self.op + self.native


def model_output(config, i, shape=SHAPE, dtype=torch.float32):
    scale = 3.0 if config.get("prediction_type") == "sample" else 1.0  # thresholding then clips
    return randn(100 + i, shape, dtype) * scale


def step_errors(config, num_steps, backend="cpu", set_timesteps=None, monkeypatch=None):
    """The largest per-step error of prev_sample against diffusers' along diffusers' trajectory, and the
    largest error of the full loop's final sample, each scheduler carrying its own sample. Checks the state
    (step_index, lower_order_nums, model_outputs[-1]) after every step, and that every step ran the kernel."""
    counter = Counter(monkeypatch) if monkeypatch is not None else None
    theirs, ours = make(backend, **config)
    loop_theirs, loop_ours = make(backend, **config)
    kwargs = set_timesteps or dict(num_inference_steps=num_steps)
    for s in (theirs, ours, loop_theirs, loop_ours):
        s.set_timesteps(**kwargs)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    sde = config.get("algorithm_type", "dpmsolver++").startswith("sde")
    x = randn(0)
    a_loop = b_loop = x
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        m = model_output(config, i)
        z = randn(500 + i) if sde else None
        assert torch.equal(ours.scale_model_input(x, t), theirs.scale_model_input(x, t))
        assert ours.genkern_covers(m, x, z)
        a = theirs.step(m, t, x, variance_noise=z).prev_sample
        b = ours.step(m, t, x, variance_noise=z).prev_sample
        assert b.dtype == torch.float32 and b.shape == x.shape
        worst = max(worst, relative_error(b, a))
        assert ours.step_index == theirs.step_index == i + 1
        assert ours.lower_order_nums == theirs.lower_order_nums
        assert relative_error(ours.model_outputs[-1], theirs.model_outputs[-1]) <= TOLERANCE
        a_loop = loop_theirs.step(m, t, a_loop, variance_noise=z).prev_sample
        b_loop = loop_ours.step(m, t, b_loop, variance_noise=z).prev_sample
        x = a
    if counter is not None:
        assert counter.total == 2 * num_steps
    return worst, relative_error(b_loop, a_loop)


# name: (config, num_steps); the axes of DPMSolverMultistepScheduler the kernel covers, around the default
CASES = {
    "default-20": (dict(), 20),
    "sd-epsilon-25": (SD, 25),
    "v_prediction": (dict(**SD, prediction_type="v_prediction"), 12),
    "sample": (dict(prediction_type="sample"), 10),
    "heun": (dict(**SD, solver_type="heun"), 12),
    "heun-v-25": (dict(**SD, solver_type="heun", prediction_type="v_prediction"), 25),
    "order1": (dict(**SD, solver_order=1), 10),
    "karras": (dict(**SD, use_karras_sigmas=True), 15),
    "exponential": (dict(**SD, use_exponential_sigmas=True), 15),
    "beta": (dict(**SD, use_beta_sigmas=True), 15),
    "lu_lambdas": (dict(**SD, use_lu_lambdas=True), 15),
    "sigma_min": (dict(**SD, final_sigmas_type="sigma_min"), 10),
    "sigma_min-no-lower_order_final": (dict(**SD, final_sigmas_type="sigma_min", lower_order_final=False), 10),
    "sigma_min-euler_at_final-20": (dict(**SD, final_sigmas_type="sigma_min", euler_at_final=True), 20),
    # (heun there is 0/0 in diffusers' last step: its last Karras sigma is sigma_min, h = 0)
    "karras-sigma_min-no-lower_order_final-20": (dict(**SD, use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                                      lower_order_final=False), 20),
    "thresholding": (dict(thresholding=True), 15),
    "thresholding-sample-max2": (dict(thresholding=True, prediction_type="sample", sample_max_value=2.0), 12),
    "leading-offset": (dict(**SD, timestep_spacing="leading", steps_offset=1), 20),
    "trailing": (dict(**SD, timestep_spacing="trailing"), 20),
    "cosine-lambda_min_clipped": (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 12),
    "zero_snr-v-trailing": (dict(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                 timestep_spacing="trailing"), 12),
    "sde": (dict(**SD, algorithm_type="sde-dpmsolver++"), 20),
    "sde-heun-karras": (dict(**SD, algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True), 15),
    "sde-v-sigma_min": (dict(**SD, algorithm_type="sde-dpmsolver++", prediction_type="v_prediction",
                             final_sigmas_type="sigma_min"), 10),
    "sde-order1-thresholding": (dict(algorithm_type="sde-dpmsolver++", solver_order=1, thresholding=True), 10),
}  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, marks=[NEEDS_SCIPY] if c == "beta" else []) for c in CASES])
def test_steps_and_loops_match_diffusers(case, monkeypatch):
    config, num_steps = CASES[case]
    per_step, loop = step_errors(config, num_steps, monkeypatch=monkeypatch)
    assert per_step <= TOLERANCE and loop <= TOLERANCE, (per_step, loop)


@pytest.mark.parametrize("case", ["default-20", "heun", "thresholding-sample-max2", "sde-heun-karras"])
def test_reference_backend_matches_diffusers(case):
    config, num_steps = CASES[case]
    per_step, loop = step_errors(config, min(num_steps, 8), backend="reference")
    assert per_step <= TOLERANCE and loop <= TOLERANCE, (per_step, loop)


def test_custom_timesteps_match_diffusers(monkeypatch):
    timesteps = [901, 700, 520, 333, 200, 101, 40, 5]
    per_step, loop = step_errors(dict(SD), len(timesteps), set_timesteps=dict(timesteps=timesteps))
    assert per_step <= TOLERANCE and loop <= TOLERANCE, (per_step, loop)


def test_parity_measure_can_fail(monkeypatch):
    """A wrong solver type (the kernel's second-order term) is far outside the bound."""
    theirs, ours = make(**SD)
    wrong = gd.from_scheduler(theirs, solver_type="heun")
    for s in (theirs, wrong):
        s.set_timesteps(10)
    x, worst = randn(0), 0.0
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i)
        a, b = theirs.step(m, t, x).prev_sample, wrong.step(m, t, x).prev_sample
        worst, x = max(worst, relative_error(b, a)), a
    assert worst > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes_run_the_kernel_close_to_diffusers(dtype, monkeypatch):
    """Half precision: both compute the update in float32 and round x0_hat and the result to the dtype (bound:
    a few ulps of the dtype); float64: the kernel computes in float64, diffusers rounds its update to float32."""
    counter = Counter(monkeypatch)
    theirs, ours = make(None, **SD)  # genkern's selection: the reference backend for half precision on a CPU
    for s in (theirs, ours):
        s.set_timesteps(10)
    bound = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-6}[dtype]
    x = randn(0, dtype=dtype)
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i, dtype=dtype)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert b.dtype == dtype and relative_error(b, a) <= bound, (i, relative_error(b, a))
        x = a
    assert counter.total == 10


# ------------------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("per_sample", [False, True], ids=["one-generator", "generator-list"])
def test_generator_noise_is_diffusers_noise(per_sample, monkeypatch):
    """With a generator (or a list of one per sample) the SDE noise is drawn as diffusers draws it: equal
    samples, generators in one state, and every step on the kernel."""
    counter = Counter(monkeypatch)
    theirs, ours = make(**SD, algorithm_type="sde-dpmsolver++")
    for s in (theirs, ours):
        s.set_timesteps(10)

    def generators():
        if per_sample:
            return [torch.Generator().manual_seed(7 + b) for b in range(SHAPE[0])]
        return torch.Generator().manual_seed(7)

    gens = [generators(), generators()]
    x = [randn(0)] * 2
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i)
        x = [s.step(m, t, xi, generator=g).prev_sample for s, xi, g in zip((theirs, ours), x, gens)]
        assert relative_error(x[1], x[0]) <= TOLERANCE
    states = [[g.get_state() for g in (gs if per_sample else [gs])] for gs in gens]
    assert all(torch.equal(a, b) for a, b in zip(*states)) and counter.total == 10


def test_variance_noise_wins_over_the_generator():
    """diffusers takes variance_noise when both are given (and leaves the generator untouched): so does genkern."""
    theirs, ours = make(**SD, algorithm_type="sde-dpmsolver++")
    for s in (theirs, ours):
        s.set_timesteps(5)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    x = randn(0)
    for i, t in enumerate(theirs.timesteps):
        m, z = model_output({}, i), randn(500 + i)
        a = theirs.step(m, t, x, generator=gens[0], variance_noise=z).prev_sample
        b = ours.step(m, t, x, generator=gens[1], variance_noise=z).prev_sample
        assert relative_error(b, a) <= TOLERANCE
        x = a
    assert torch.equal(gens[1].get_state(), torch.Generator().manual_seed(1).get_state())


def test_philox_noise_is_the_documented_stream():
    """Neither generator nor variance_noise: genkern's stream, one seed drawn from torch's default generator per
    set_timesteps, step i at offset i + 1. The step equals the step given genkern.randn(seed, offset) as
    variance_noise, is reproducible under torch.manual_seed, and its noise is standard normal."""
    from genkern.random import resolve_seed

    config = dict(**SD, algorithm_type="sde-dpmsolver++")
    _, ours = make(**config)
    _, given = make(**config)
    shape = (2, 4, 32, 32)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        seed = resolve_seed(None)
        torch.manual_seed(3)
        ours.set_timesteps(6)
        given.set_timesteps(6)
        x = randn(0, shape)
        for i, t in enumerate(ours.timesteps):
            m = model_output({}, i, shape)
            z = genkern.randn(shape, seed=seed, offset=i + 1)
            out = ours.step(m, t, x).prev_sample
            assert relative_error(out, given.step(m, t, x, variance_noise=z).prev_sample) <= TOLERANCE
            x = out
        runs.append(x)
    assert torch.equal(runs[0], runs[1])
    # the noise itself: zero model output and sample, data prediction "sample": x_t = c z
    theirs, ours = make(**config, prediction_type="sample")
    for s in (theirs, ours):
        s.set_timesteps(6)
    zero = torch.zeros(1, 4, 64, 64)
    c = theirs.step(zero, theirs.timesteps[0], zero, variance_noise=torch.ones_like(zero)).prev_sample
    z = ours.step(zero, ours.timesteps[0], zero).prev_sample / c
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.03


def test_sde_loop_is_genkern_sampler_with_the_same_seed():
    """A diffusers-style loop on the drop-in (no generator) and genkern's DPMSolverMultistepSampler with the
    seed the scheduler drew: the same trajectory (x_T and every step's noise from one genkern stream), within
    the sigma tables' difference (genkern's float64 alpha-bars rounded vs diffusers' float32 products)."""
    from genkern.diffusion import DPMSolverMultistepSampler, NoiseSchedule
    from genkern.random import resolve_seed

    def model(x, t):
        return 0.5 * x + torch.sin(t.float() / 300.0).reshape(-1, *[1] * (x.dim() - 1))

    shape = (2, 3, 8, 8)
    _, ours = make(**SD, algorithm_type="sde-dpmsolver++", solver_type="heun")
    torch.manual_seed(11)
    seed = resolve_seed(None)
    torch.manual_seed(11)
    ours.set_timesteps(12)
    x = genkern.randn(shape, seed=seed, offset=0)
    for t in ours.timesteps:
        x = ours.step(model(x, t.expand(shape[0])), t, x).prev_sample
    sampler = DPMSolverMultistepSampler(
        NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012),
        algorithm_type="sde-dpmsolver++",
        solver_type="heun",
    )
    expected = sampler.sample(model, shape, 12, seed=seed)
    assert relative_error(x, expected) <= 1e-4, relative_error(x, expected)


# ------------------------------------------------------------------------------------------------ fallbacks
FALLBACKS = {
    "order3": dict(**SD, solver_order=3),
    "dpmsolver": dict(**SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    "sde-dpmsolver": dict(**SD, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
    "flow_prediction": dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_uncovered_configs_are_diffusers_steps(case, monkeypatch):
    """Exactly diffusers' step (same generator draws), and the kernel never runs."""
    counter = Counter(monkeypatch)
    theirs, ours = make(**FALLBACKS[case])
    for s in (theirs, ours):
        s.set_timesteps(8)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    x = [randn(0)] * 2
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i)
        assert not ours.genkern_covers(m, x[1])
        x = [s.step(m, t, xi, generator=g).prev_sample for s, xi, g in zip((theirs, ours), x, gens)]
        assert torch.equal(x[0], x[1])
    assert counter.total == 0 and ours.lower_order_nums == theirs.lower_order_nums


def test_learned_variance_is_a_diffusers_step(monkeypatch):
    counter = Counter(monkeypatch)
    theirs, ours = make(variance_type="learned_range")
    for s in (theirs, ours):
        s.set_timesteps(4)
    x = randn(0, (1, 3, 8, 8))
    for i, t in enumerate(theirs.timesteps):
        m = randn(100 + i, (1, 6, 8, 8))
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert torch.equal(a, b)
        x = a
    assert counter.total == 0


def test_mixed_dtype_steps_fall_back_and_the_loop_goes_on(monkeypatch):
    """A mixed-dtype call in the middle of a loop runs diffusers' step; the steps around it run the kernel,
    sharing the solver state both ways (diffusers' step reads the history tensor, the kernel's step copies
    diffusers' data prediction into it)."""
    counter = Counter(monkeypatch)
    theirs, ours = make(**SD)
    for s in (theirs, ours):
        s.set_timesteps(10)
    x = randn(0)
    mixed = {3, 4, 7}
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i, dtype=torch.float64 if i in mixed else torch.float32)
        assert ours.genkern_covers(m, x) is (i not in mixed)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        if i in mixed:
            assert torch.equal(a, b) and a.dtype == torch.float64  # diffusers returns model_output's dtype
        assert relative_error(b, a) <= TOLERANCE, i
        x = a.float()
    assert counter.total == 10 - len(mixed)


def test_variance_noise_of_another_shape_falls_back():
    theirs, ours = make(**SD, algorithm_type="sde-dpmsolver++")
    for s in (theirs, ours):
        s.set_timesteps(4)
    x, z = randn(0), randn(1, (1, *SHAPE[1:]))  # broadcast over the batch by diffusers
    assert not ours.genkern_covers(x, x, z)
    for t in theirs.timesteps:
        a, b = theirs.step(x, t, x, variance_noise=z).prev_sample, ours.step(x, t, x, variance_noise=z).prev_sample
        assert torch.equal(a, b)


def test_errors_are_diffusers_errors():
    _, ours = make()
    x = randn(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(x, 999, x)
    ours.set_timesteps(3)
    for t in ours.timesteps:
        ours.step(x, t, x)
    with pytest.raises(IndexError):
        ours.step(x, ours.timesteps[-1], x)


# ------------------------------------------------------------------------------------------------ state
def test_begin_index_img2img_start_matches_diffusers(monkeypatch):
    """An img2img loop: set_begin_index(k), add_noise, the first step first order (lower_order_nums 0) at
    step_index k, then 2M: all as diffusers."""
    counter = Counter(monkeypatch)
    theirs, ours = make(**SD)
    x0, noise = randn(0), randn(1)
    xs = []
    for s in (theirs, ours):
        s.set_timesteps(12)
        s.set_begin_index(4)
        xs.append(s.add_noise(x0, noise, s.timesteps[4:5]))
    assert torch.equal(xs[0], xs[1])
    x = xs[0]
    for i, t in enumerate(theirs.timesteps[4:]):
        m = model_output({}, i)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert relative_error(b, a) <= TOLERANCE and ours.step_index == theirs.step_index
        x = a
    assert counter.total == 8 and ours.begin_index == 4


def test_model_outputs_hold_the_device_history():
    """After a fused step model_outputs[-1] is the scheduler's history tensor (this step's x0_hat, diffusers'
    value), the earlier entries None; set_timesteps resets the state as diffusers does."""
    theirs, ours = make(**SD)
    for s in (theirs, ours):
        s.set_timesteps(5)
    x = randn(0)
    history, outputs = None, ours.model_outputs
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i)
        theirs.step(m, t, x)
        ours.step(m, t, x)
        assert ours.model_outputs is outputs  # the list updated in place, as diffusers does
        assert ours.model_outputs[0] is None and isinstance(ours.model_outputs[-1], torch.Tensor)
        assert history is None or ours.model_outputs[-1] is history  # one tensor, overwritten in place
        history = ours.model_outputs[-1]
        assert relative_error(history, theirs.model_outputs[-1]) <= TOLERANCE
    ours.set_timesteps(5)
    assert ours.model_outputs == [None, None] and ours.lower_order_nums == 0 and ours.step_index is None


def test_a_model_output_set_by_hand_is_read(monkeypatch):
    """A step reads model_outputs[-1] as diffusers does, even one that is not the history tensor."""
    theirs, ours = make(**SD)
    for s in (theirs, ours):
        s.set_timesteps(6)
    x = randn(0)
    for i, t in enumerate(theirs.timesteps):
        if i == 3:
            previous = randn(77)
            theirs.model_outputs[-1], ours.model_outputs[-1] = previous, previous.clone()
        m = model_output({}, i)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert relative_error(b, a) <= TOLERANCE, i
        x = a


def test_later_steps_read_nothing_back(monkeypatch):
    """After the first step (which may read its timestep to find step_index, as diffusers does) a step calls
    no host read of a tensor: on an accelerator none would synchronise."""
    theirs, ours = make(**SD, algorithm_type="sde-dpmsolver++")
    ours.set_timesteps(6)
    x = randn(0)
    x = ours.step(model_output({}, 0), ours.timesteps[0], x).prev_sample
    x = ours.step(model_output({}, 1), ours.timesteps[1], x).prev_sample  # the second-order signature, once
    ours.set_timesteps(6)
    x = ours.step(model_output({}, 0), ours.timesteps[0], x).prev_sample
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: reads.append(_n) or _r(self, *a, **k)
        )
    for i, t in enumerate(ours.timesteps[1:]):
        x = ours.step(model_output({}, i + 1), t, x).prev_sample
    monkeypatch.undo()
    assert reads == [] and ours.step_index == 6


# ------------------------------------------------------------------------------------------------ set-up
def test_from_scheduler_copies_the_loop_state():
    theirs = diffusers.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    theirs.set_timesteps(10)
    x = randn(0)
    for i, t in enumerate(theirs.timesteps[:4]):
        x = theirs.step(model_output({}, i), t, x).prev_sample
    ours = gd.from_scheduler(theirs)
    assert type(ours) is gd.DPMSolverMultistepScheduler and type(gd.from_scheduler(ours)) is type(ours)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.step_index == 4 and ours.lower_order_nums == theirs.lower_order_nums == 2
    for i, t in enumerate(theirs.timesteps[4:]):  # the loop goes on from the copied state
        m = model_output({}, 4 + i)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert relative_error(b, a) <= TOLERANCE
        x = a
    flagged = gd.from_scheduler(diffusers.DPMSolverMultistepScheduler(), solver_type="heun")
    assert flagged.config.solver_type == "heun"


def test_save_and_load_round_trip(tmp_path):
    ours = gd.DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    ours.save_pretrained(tmp_path)
    loaded = gd.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded) is type(ours) and public(loaded.config) == public(ours.config)
    theirs = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert public(theirs.config) == public(ours.config)
    assert public(gd.DPMSolverMultistepScheduler.from_config(theirs.config).config) == public(theirs.config)


# ------------------------------------------------------------------------------------------------ pipelines
tiny_unet = dropin_tests.tiny_unet


@pytest.mark.parametrize(
    "config, steps",
    [
        (dict(), 10),
        (dict(solver_type="heun", use_karras_sigmas=True, timestep_spacing="trailing"), 8),
        (dict(algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"), 10),
        (dict(thresholding=True, final_sigmas_type="sigma_min"), 6),
    ],
    ids=["2m", "heun-karras-trailing", "sde-v", "thresholding-sigma_min"],
)
def test_ddpm_pipeline_images_match(config, steps, monkeypatch):
    """diffusers' DDPMPipeline (its loop: the UNet, step with the generator) built offline from a tiny random
    UNet2DModel with a DPMSolverMultistepScheduler: the pipeline's own scheduler, then genkern's from it, give
    the same images from the same generator (the SDE noise drawn from it as diffusers draws it)."""
    counter = Counter(monkeypatch)
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DPMSolverMultistepScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=steps, output_type="np")
    theirs = pipe(generator=torch.Generator().manual_seed(0), **call).images
    pipe.scheduler = gd.from_scheduler(pipe.scheduler)
    assert type(pipe.scheduler) is gd.DPMSolverMultistepScheduler
    ours = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert ours.shape == theirs.shape == (1, 8, 8, 3)
    assert abs(ours - theirs).max() <= TOLERANCE, abs(ours - theirs).max()
    assert counter.total == steps


sd_loop = sigma_dropin_tests.sd_loop  # StableDiffusionPipeline's denoising loop, guidance included


@pytest.mark.parametrize(
    "config",
    [
        SD,
        dict(**SD, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        dict(**SD, algorithm_type="sde-dpmsolver++", timestep_spacing="trailing"),
    ],
    ids=["sd-2m", "sd-karras-sigma_min", "sd-sde-trailing"],
)
def test_stable_diffusion_loop_matches(config, monkeypatch):
    counter = Counter(monkeypatch)
    unet = tiny_unet(channels=4, num_class_embeds=3)
    theirs = sd_loop(unet, diffusers.DPMSolverMultistepScheduler(**config), 8)
    ours = sd_loop(unet, gd.from_scheduler(diffusers.DPMSolverMultistepScheduler(**config)), 8)
    assert relative_error(ours, theirs) <= TOLERANCE, relative_error(ours, theirs)
    assert counter.total == 8


def test_module_docstring_names_the_fallbacks():
    doc = _dpm.__doc__
    for name in ("solver_order 3", '"dpmsolver"', '"sde-dpmsolver"', "flow_prediction", "use_flow_sigmas",
                 "learned_range", "different dtypes"):  # fmt: skip
        assert name in doc, name
    assert scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler in gd.DPMSolverMultistepScheduler.__mro__
