"""genkern.diffusers.UniPCMultistepScheduler against diffusers' own UniPCMultistepScheduler, step by step, over
whole loops, on its fallback paths, and in real pipelines (DDPMPipeline on a tiny random UNet, Stable
Diffusion's loop).

Parity is measured as in tests/test_diffusers_dpm_dropin.py: both schedulers get the same model output and
sample at every step (the sample carried on is diffusers'; each scheduler keeps its own corrector state), and a
step's error is the norm-wise relative error max |ours - theirs| / max |theirs| of prev_sample, in float32
against diffusers' float32 step, bound 1e-5. The full loops, each scheduler carrying its own sample, are held
to the same 1e-5.
"""

import importlib.util

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="genkern.diffusers is a drop-in for diffusers' schedulers")
import test_diffusers_dpm_dropin as dpm_tests  # noqa: E402
import test_diffusers_dropin as dropin_tests  # noqa: E402
from diffusers.schedulers import scheduling_unipc_multistep  # noqa: E402

import genkern  # noqa: E402
import genkern.diffusers as gd  # noqa: E402
from genkern.diffusers import _unipc  # noqa: E402

TOLERANCE = 1e-5  # float32, norm-wise relative (module notes)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 4, 8, 8)
NEEDS_SCIPY = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="diffusers' beta sigmas need scipy")


# The DPM drop-in tests' helpers: the error measure, seeded normals, model outputs, the kernel-call counter.
relative_error, randn, model_output = dpm_tests.relative_error, dpm_tests.randn, dpm_tests.model_output


def make(backend="cpu", **config):
    """(diffusers' scheduler, genkern's from it) for a config."""
    theirs = diffusers.UniPCMultistepScheduler(**config)
    ours = gd.from_scheduler(theirs, backend=backend)
    assert type(ours) is gd.UniPCMultistepScheduler
    return theirs, ours


def Counter(monkeypatch):  # noqa: N802 - used as the DPM tests' class
    return dpm_tests.Counter(monkeypatch, _unipc)


def step_errors(config, num_steps, backend="cpu", set_timesteps=None, monkeypatch=None):
    """The largest per-step error of prev_sample against diffusers' along diffusers' trajectory, and the
    largest error of the full loop's final sample, each scheduler carrying its own sample. Checks the state
    (step_index, lower_order_nums, this_order, model_outputs[-1], last_sample) after every step, and that every
    step ran the kernel."""
    counter = Counter(monkeypatch) if monkeypatch is not None else None
    theirs, ours = make(backend, **config)
    loop_theirs, loop_ours = make(backend, **config)
    kwargs = set_timesteps or dict(num_inference_steps=num_steps)
    for s in (theirs, ours, loop_theirs, loop_ours):
        s.set_timesteps(**kwargs)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    x = randn(0)
    a_loop = b_loop = x
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        m = model_output(config, i)
        assert torch.equal(ours.scale_model_input(x, t), theirs.scale_model_input(x, t))
        assert ours.genkern_covers(m, x)
        a = theirs.step(m, t, x).prev_sample
        b = ours.step(m, t, x).prev_sample
        assert b.dtype == torch.float32 and b.shape == x.shape
        worst = max(worst, relative_error(b, a))
        assert ours.step_index == theirs.step_index == i + 1
        assert ours.lower_order_nums == theirs.lower_order_nums and ours.this_order == theirs.this_order
        assert relative_error(ours.model_outputs[-1], theirs.model_outputs[-1]) <= TOLERANCE
        assert relative_error(ours.last_sample, theirs.last_sample) <= TOLERANCE
        a_loop = loop_theirs.step(m, t, a_loop).prev_sample
        b_loop = loop_ours.step(m, t, b_loop).prev_sample
        x = a
    if counter is not None:
        assert counter.total == 2 * num_steps
    return worst, relative_error(b_loop, a_loop)


# name: (config, num_steps); the axes of UniPCMultistepScheduler the kernel covers, around the default
CASES = {
    "default-20": (dict(), 20),
    "sd-bh2-25": (SD, 25),
    "sd-50": (SD, 50),
    "v_prediction": (dict(**SD, prediction_type="v_prediction"), 12),
    "sample": (dict(prediction_type="sample"), 10),
    "bh1-sigma_min": (dict(**SD, solver_type="bh1", final_sigmas_type="sigma_min"), 12),
    "bh1-v-sigma_min-25": (dict(**SD, solver_type="bh1", prediction_type="v_prediction",
                                final_sigmas_type="sigma_min"), 25),
    "order1": (dict(**SD, solver_order=1), 10),
    "order1-bh1-sigma_min": (dict(**SD, solver_order=1, solver_type="bh1", final_sigmas_type="sigma_min"), 10),
    "disable_corrector": (dict(**SD, disable_corrector=[0, 1, 5]), 12),
    "disable_corrector-all-but-one": (dict(**SD, disable_corrector=list(range(1, 9))), 10),
    "karras": (dict(**SD, use_karras_sigmas=True), 15),
    "karras-sigma_min": (dict(**SD, use_karras_sigmas=True, final_sigmas_type="sigma_min"), 15),
    "exponential": (dict(**SD, use_exponential_sigmas=True), 15),
    "beta": (dict(**SD, use_beta_sigmas=True), 15),
    "sigma_min": (dict(**SD, final_sigmas_type="sigma_min"), 10),
    "sigma_min-no-lower_order_final": (dict(**SD, final_sigmas_type="sigma_min", lower_order_final=False), 10),
    "thresholding": (dict(thresholding=True), 15),
    "thresholding-sample-max2": (dict(thresholding=True, prediction_type="sample", sample_max_value=2.0), 12),
    "leading-offset": (dict(**SD, timestep_spacing="leading", steps_offset=1), 20),
    "trailing": (dict(**SD, timestep_spacing="trailing"), 20),
    "cosine": (dict(beta_schedule="squaredcos_cap_v2"), 12),
    "zero_snr-v-trailing": (dict(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                 timestep_spacing="trailing"), 12),
    # Wan's configuration (flow matching sigmas, flow_prediction) and its variants
    "flow-shift5": (dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0), 20),
    "flow-shift3-50": (dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0), 50),
    "flow-bh1-sigma_min": (dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                solver_type="bh1", final_sigmas_type="sigma_min"), 12),
    "flow-order1-disable_corrector": (dict(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=1,
                                           disable_corrector=[2]), 10),
    "flow-karras": (dict(prediction_type="flow_prediction", use_flow_sigmas=True, use_karras_sigmas=True), 12),
    "flow-on-vp-sigmas": (dict(**SD, prediction_type="flow_prediction"), 10),
}  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, marks=[NEEDS_SCIPY] if c == "beta" else []) for c in CASES])
def test_steps_and_loops_match_diffusers(case, monkeypatch):
    config, num_steps = CASES[case]
    per_step, loop = step_errors(config, num_steps, monkeypatch=monkeypatch)
    assert per_step <= TOLERANCE and loop <= TOLERANCE, (per_step, loop)


def test_flow_dynamic_shift_and_custom_sigmas_match_diffusers(monkeypatch):
    """use_dynamic_shifting's mu and custom sigmas given to set_timesteps, on flow sigmas (Flux / Wan style)."""
    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
    shifted = dict(**flow, use_dynamic_shifting=True)
    per_step, loop = step_errors(shifted, 12, set_timesteps=dict(num_inference_steps=12, mu=1.1))
    assert per_step <= TOLERANCE and loop <= TOLERANCE, (per_step, loop)
    sigmas = np.array([0.98, 0.9, 0.75, 0.6, 0.42, 0.3, 0.17, 0.08])  # diffusers shifts them as an array
    per_step, loop = step_errors(flow, len(sigmas), set_timesteps=dict(sigmas=sigmas), monkeypatch=monkeypatch)
    assert per_step <= TOLERANCE and loop <= TOLERANCE, (per_step, loop)


@pytest.mark.parametrize("case", ["default-20", "bh1-sigma_min", "thresholding-sample-max2", "disable_corrector"])
def test_reference_backend_matches_diffusers(case):
    config, num_steps = CASES[case]
    per_step, loop = step_errors(config, min(num_steps, 8), backend="reference")
    assert per_step <= TOLERANCE and loop <= TOLERANCE, (per_step, loop)


def test_parity_measure_can_fail():
    """A wrong solver type and a corrector left out are far outside the bound."""
    for flags in (dict(solver_type="bh1"), dict(disable_corrector=[3])):
        theirs, _ = make(**SD)
        wrong = gd.from_scheduler(theirs, **flags)
        for s in (theirs, wrong):
            s.set_timesteps(10)
        x, worst = randn(0), 0.0
        for i, t in enumerate(theirs.timesteps[:-1]):
            m = model_output({}, i)
            a, b = theirs.step(m, t, x).prev_sample, wrong.step(m, t, x).prev_sample
            worst, x = max(worst, relative_error(b, a)), a
        assert worst > 1e-3, flags


def test_bh1_final_zero_sigma_is_x0_where_diffusers_is_nan():
    """diffusers' bh1 first-order predictor multiplies alpha_t B(h) = -inf by 0 at a final sigma of 0 (NaN);
    the kernel's last step is x0_hat, the step's limit (module docstring). The steps before match."""
    theirs, ours = make(**SD, solver_type="bh1")
    for s in (theirs, ours):
        s.set_timesteps(6)
    x = randn(0)
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        if i < 5:
            assert relative_error(b, a) <= TOLERANCE
            x = a
    assert a.isnan().all() and b.isfinite().all()
    torch.testing.assert_close(b, ours.model_outputs[-1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes_run_the_kernel_close_to_diffusers(dtype, monkeypatch):
    """Half precision: the kernel computes in float32 and rounds the state and the result to the dtype,
    diffusers computes in the dtype (bound: a few ulps of the dtype, over a loop); float64: the kernel computes
    in float64, diffusers its coefficients in float32."""
    counter = Counter(monkeypatch)
    theirs, ours = make(None, **SD)  # genkern's selection: the reference backend for half precision on a CPU
    for s in (theirs, ours):
        s.set_timesteps(10)
    bound = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float64: 1e-6}[dtype]
    x = randn(0, dtype=dtype)
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i, dtype=dtype)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert b.dtype == dtype and relative_error(b, a) <= bound, (i, relative_error(b, a))
        x = a
    assert counter.total == 10


# ------------------------------------------------------------------------------------------------ fallbacks
FALLBACKS = {
    "order3": dict(**SD, solver_order=3),
    "predict_eps": dict(**SD, predict_x0=False, final_sigmas_type="sigma_min"),
    "flow-order3": dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, solver_order=3),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_uncovered_configs_are_diffusers_steps(case, monkeypatch):
    """Exactly diffusers' step, and the kernel never runs."""
    counter = Counter(monkeypatch)
    theirs, ours = make(**FALLBACKS[case])
    for s in (theirs, ours):
        s.set_timesteps(8)
    x = [randn(0)] * 2
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i)
        assert not ours.genkern_covers(m, x[1])
        x = [s.step(m, t, xi).prev_sample for s, xi in zip((theirs, ours), x)]
        assert torch.equal(x[0], x[1])
    assert counter.total == 0 and ours.lower_order_nums == theirs.lower_order_nums


def test_mixed_dtype_steps_fall_back_and_the_loop_goes_on(monkeypatch):
    """Mixed-dtype calls in the middle of a loop run diffusers' step (two in a row: the second-order
    corrector then reads two of diffusers' data predictions); the steps around them run the kernel, sharing
    the solver state both ways."""
    counter = Counter(monkeypatch)
    theirs, ours = make(**SD)
    for s in (theirs, ours):
        s.set_timesteps(12)
    x = randn(0)
    mixed = {3, 4, 8}
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i, dtype=torch.float64 if i in mixed else torch.float32)
        assert ours.genkern_covers(m, x) is (i not in mixed)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert relative_error(b, a) <= TOLERANCE, i
        x = a.float()
    assert counter.total == 12 - len(mixed)


def test_errors_are_diffusers_errors():
    """Before set_timesteps and past the last step: diffusers' own step raises (its ValueError, and the
    AssertionError of its order check)."""
    errors = []
    for s in make():
        x = randn(0)
        with pytest.raises(ValueError, match="set_timesteps"):
            s.step(x, 999, x)
        s.set_timesteps(3)
        for t in s.timesteps:
            s.step(x, t, x)
        with pytest.raises(Exception) as info:
            s.step(x, s.timesteps[-1], x)
        errors.append(type(info.value))
    assert errors[0] is errors[1]


# ------------------------------------------------------------------------------------------------ state
def test_begin_index_img2img_start_matches_diffusers(monkeypatch):
    """An img2img loop: set_begin_index(k), add_noise, the first step first order without a corrector
    (lower_order_nums 0, no last_sample) at step_index k, then UniPC-2: all as diffusers."""
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


def test_state_holds_the_device_history():
    """After a fused step model_outputs and last_sample are views of the scheduler's history tensor
    (diffusers' values), model_outputs[0] None after the first step; set_timesteps resets the state as
    diffusers does."""
    theirs, ours = make(**SD)
    for s in (theirs, ours):
        s.set_timesteps(5)
    x = randn(0)
    outputs = ours.model_outputs
    for i, t in enumerate(theirs.timesteps):
        m = model_output({}, i)
        theirs.step(m, t, x)
        ours.step(m, t, x)
        assert ours.model_outputs is outputs  # the list updated in place, as diffusers does
        assert (ours.model_outputs[0] is None) is (i == 0)
        assert ours.model_outputs[-1]._base is ours._history and ours.last_sample._base is ours._history
        for k in range(2):
            if theirs.model_outputs[k] is not None:
                assert relative_error(ours.model_outputs[k], theirs.model_outputs[k]) <= TOLERANCE
        assert relative_error(ours.last_sample, theirs.last_sample) <= TOLERANCE
        assert ours.timestep_list == theirs.timestep_list
    ours.set_timesteps(5)
    assert ours.model_outputs == [None, None] and ours.lower_order_nums == 0 and ours.step_index is None
    assert ours.last_sample is None


def test_state_set_by_hand_is_read():
    """A step reads model_outputs and last_sample as diffusers does, even ones that are not the history's."""
    theirs, ours = make(**SD)
    for s in (theirs, ours):
        s.set_timesteps(8)
    x = randn(0)
    for i, t in enumerate(theirs.timesteps):
        if i == 3:
            older, previous, last = randn(75), randn(76), randn(77)
            theirs.model_outputs[:] = [older, previous]
            ours.model_outputs[:] = [older.clone(), previous.clone()]
            theirs.last_sample, ours.last_sample = last, last.clone()
        m = model_output({}, i)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert relative_error(b, a) <= TOLERANCE, i
        x = a


def test_later_steps_read_nothing_back(monkeypatch):
    """After the first step (which may read its timestep to find step_index, as diffusers does) a step calls
    no host read of a tensor: on an accelerator none would synchronise."""
    theirs, ours = make(**SD)
    ours.set_timesteps(8)
    x = randn(0)
    for i, t in enumerate(ours.timesteps):  # each step's signature (orders, corrector) through the op, once
        x = ours.step(model_output({}, i), t, x).prev_sample
    ours.set_timesteps(8)
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
    assert reads == [] and ours.step_index == 8


# ------------------------------------------------------------------------------------------------ set-up
def test_from_scheduler_copies_the_loop_state():
    theirs = diffusers.UniPCMultistepScheduler(**SD, use_karras_sigmas=True)
    theirs.set_timesteps(10)
    x = randn(0)
    for i, t in enumerate(theirs.timesteps[:4]):
        x = theirs.step(model_output({}, i), t, x).prev_sample
    ours = gd.from_scheduler(theirs)
    assert type(ours) is gd.UniPCMultistepScheduler and type(gd.from_scheduler(ours)) is type(ours)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.step_index == 4 and ours.lower_order_nums == theirs.lower_order_nums == 2
    assert ours.this_order == theirs.this_order and torch.equal(ours.last_sample, theirs.last_sample)
    for i, t in enumerate(theirs.timesteps[4:]):  # the loop goes on from the copied state
        m = model_output({}, 4 + i)
        a, b = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
        assert relative_error(b, a) <= TOLERANCE
        x = a
    flagged = gd.from_scheduler(diffusers.UniPCMultistepScheduler(), solver_type="bh1")
    assert flagged.config.solver_type == "bh1"


def test_save_and_load_round_trip(tmp_path):
    ours = gd.UniPCMultistepScheduler(**SD, solver_type="bh1", use_karras_sigmas=True, disable_corrector=[2])
    ours.save_pretrained(tmp_path)
    loaded = gd.UniPCMultistepScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded) is type(ours) and public(loaded.config) == public(ours.config)
    theirs = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert public(theirs.config) == public(ours.config)
    assert public(gd.UniPCMultistepScheduler.from_config(theirs.config).config) == public(theirs.config)


def test_sampler_is_the_drop_in_loop():
    """genkern's UniPCMultistepSampler and the drop-in in a diffusers loop from the same x_T agree (float64
    vs float32 alpha-bars apart: see tests/test_unipc.py's sigmas)."""
    from genkern.diffusion import NoiseSchedule, UniPCMultistepSampler

    def model(x, t):
        return 0.3 * torch.tanh(x) + t.view(-1, 1, 1, 1).float() / 3000

    _, ours = make(**SD)
    ours.set_timesteps(12)
    shape = (2, 3, 4, 4)
    x = genkern.randn(shape, seed=3)
    for t in ours.timesteps:
        x = ours.step(model(x, t.expand(shape[0])), t, x).prev_sample
    sampler = UniPCMultistepSampler(NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012))
    expected = sampler.sample(model, shape, 12, seed=3)
    assert relative_error(x, expected) <= 1e-4, relative_error(x, expected)


# ------------------------------------------------------------------------------------------------ pipelines
tiny_unet = dropin_tests.tiny_unet


@pytest.mark.parametrize(
    "config, steps",
    [
        (dict(), 10),
        (
            dict(solver_type="bh1", use_karras_sigmas=True, timestep_spacing="trailing", final_sigmas_type="sigma_min"),
            8,
        ),
        (dict(prediction_type="v_prediction", disable_corrector=[2]), 10),
        (dict(thresholding=True, final_sigmas_type="sigma_min", solver_order=1), 6),
    ],
    ids=["bh2", "bh1-karras-trailing", "v-disable_corrector", "thresholding-sigma_min-order1"],
)
def test_ddpm_pipeline_images_match(config, steps, monkeypatch):
    """DDPMPipeline's loop (x_T from the generator, the UNet, step, the image mapped to [0, 1]) on a tiny random
    UNet2DModel with a UniPCMultistepScheduler, then with genkern's from it: the same images. (DDPMPipeline
    itself passes a generator to step, which UniPC's step does not take, so the loop is written out here.)"""
    counter = Counter(monkeypatch)
    unet = tiny_unet()

    def images(scheduler):
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(0)
        image = torch.randn((1, 3, 8, 8), generator=generator)
        with torch.no_grad():
            for t in scheduler.timesteps:
                image = scheduler.step(unet(image, t).sample, t, image).prev_sample
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    scheduler = diffusers.UniPCMultistepScheduler(**config)
    theirs = images(scheduler)
    ours = images(gd.from_scheduler(scheduler))
    assert ours.shape == theirs.shape == (1, 8, 8, 3)
    assert abs(ours - theirs).max() <= TOLERANCE, abs(ours - theirs).max()
    assert counter.total == steps


def sd_loop(unet, scheduler, steps, guidance_scale=3.0, seed=0):
    """StableDiffusionPipeline's denoising loop (tests/test_diffusers_sigma_dropin.py's sd_loop) as the
    pipeline runs it with UniPC: prepare_extra_step_kwargs passes no generator, which UniPC's step does not
    take."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps, device="cpu")
    latents = torch.randn((2, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    labels = torch.tensor([0, 0, 1, 2])
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = unet(model_input, t, class_labels=labels).sample.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize(
    "config",
    [SD, dict(**SD, use_karras_sigmas=True, final_sigmas_type="sigma_min"), dict(**SD, timestep_spacing="trailing")],
    ids=["sd-bh2", "sd-karras-sigma_min", "sd-trailing"],
)
def test_stable_diffusion_loop_matches(config, monkeypatch):
    counter = Counter(monkeypatch)
    unet = tiny_unet(channels=4, num_class_embeds=3)
    theirs = sd_loop(unet, diffusers.UniPCMultistepScheduler(**config), 8)
    ours = sd_loop(unet, gd.from_scheduler(diffusers.UniPCMultistepScheduler(**config)), 8)
    assert relative_error(ours, theirs) <= TOLERANCE, relative_error(ours, theirs)
    assert counter.total == 8


def test_module_docstring_names_the_fallbacks():
    doc = _unipc.__doc__
    for name in ("solver_order 3", "predict_x0=False", "solver_p", '"flow_prediction"', "use_flow_sigmas",
                 "different dtypes", '"bh1"'):  # fmt: skip
        assert name in doc, name
    assert scheduling_unipc_multistep.UniPCMultistepScheduler in gd.UniPCMultistepScheduler.__mro__
