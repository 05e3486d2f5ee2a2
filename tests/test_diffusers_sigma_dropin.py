"""genkern.diffusers' sigma-space drop-ins (EulerDiscrete, EulerAncestralDiscrete, FlowMatchEulerDiscrete)
against diffusers' own schedulers, step by step and in model loops shaped like diffusers' pipelines.

Parity is measured as in tests/test_diffusers_dropin.py: both schedulers get the same model output, sample and
noise at every step (the sample carried on is diffusers'), and a step's error is the norm-wise relative error
max |ours - theirs| / max |theirs| of prev_sample (and pred_original_sample where the scheduler returns it),
in float32 against diffusers' float32 step, bound 1e-5.
"""

import importlib
import importlib.util

import numpy as np
import pytest
import torch
from conftest import KERNEL_BACKENDS, interpreted

diffusers = pytest.importorskip("diffusers", reason="genkern.diffusers is a drop-in for diffusers' schedulers")

import test_diffusers_dropin as dropin_tests  # noqa: E402

import genkern.diffusers as gd  # noqa: E402

TOLERANCE = 1e-5  # float32, norm-wise relative
BACKENDS = ["reference", *KERNEL_BACKENDS]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NEEDS_SCIPY = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="diffusers' beta sigmas need scipy")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.double()
    return float((ours.double() - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))


def make(kind: str, backend: str | None = "cpu", **config):
    """(diffusers' scheduler, genkern's from it) for a config."""
    theirs = getattr(diffusers, kind)(**config)
    ours = gd.from_scheduler(theirs, backend=backend)
    assert type(ours) is getattr(gd, kind)
    return theirs, ours


def randn(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_loop(kind, backend, config, num_steps, shape=(2, 4, 8, 8), set_timesteps=None, monkeypatch=None, first=0):
    """Worst (prev_sample, pred_original) errors of a loop against diffusers' float32 step, from step `first`
    on; with monkeypatch, the noise of each step is given (variance_noise to genkern, diffusers' randn_tensor
    patched to return it)."""
    theirs, ours = make(kind, backend, **config)
    for s in (theirs, ours):
        s.set_timesteps(num_steps, **(set_timesteps or {}))
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    x = randn(0, shape) * float(ours.init_noise_sigma)  # diffusers: none on its flow scheduler, 1 in its pipelines
    worst = [0.0, 0.0]
    for i, t in enumerate(theirs.timesteps):
        if hasattr(theirs, "scale_model_input") and kind != "FlowMatchEulerDiscreteScheduler":
            assert torch.equal(ours.scale_model_input(x, t), theirs.scale_model_input(x, t))
        m = randn(100 + i, shape)
        kwargs = {}
        if monkeypatch is not None:
            z = randn(1000 + i, shape)
            module = importlib.import_module(type(theirs).__module__)
            monkeypatch.setattr(module, "randn_tensor", lambda *a, dtype=None, **k: z.to(dtype))
            kwargs = dict(variance_noise=z)
        a = theirs.step(m, t, x)
        b = ours.step(m, t, x, **kwargs)
        assert b.prev_sample.dtype == torch.float32 and b.prev_sample.shape == x.shape
        if i < first:
            x = a.prev_sample
            continue
        worst[0] = max(worst[0], relative_error(b.prev_sample, a.prev_sample))
        if hasattr(a, "pred_original_sample"):
            worst[1] = max(worst[1], relative_error(b.pred_original_sample, a.pred_original_sample))
        x = a.prev_sample
    assert ours.step_index == theirs.step_index == len(theirs.timesteps)
    return worst


# ------------------------------------------------------------------------------------------------ Euler
EULER_CASES = {
    # name: (config, num_steps)
    "linspace-epsilon": (dict(), 20),
    "leading-v-scaled_linear-offset": (dict(**SD, prediction_type="v_prediction", timestep_spacing="leading",
                                            steps_offset=1), 20),
    "trailing-sample-cosine": (dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                    timestep_spacing="trailing"), 15),
    "original_sample": (dict(prediction_type="original_sample"), 10),
    "karras": (dict(**SD, use_karras_sigmas=True), 20),
    "exponential": (dict(**SD, use_exponential_sigmas=True), 20),
    "beta": (dict(**SD, use_beta_sigmas=True), 20),
    "final-sigma_min": (dict(**SD, final_sigmas_type="sigma_min"), 20),
    "karras-sigma_min-trailing": (dict(**SD, use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                       timestep_spacing="trailing"), 15),
    "log_linear": (dict(**SD, interpolation_type="log_linear"), 20),
    "zero_snr-v-trailing": (dict(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                 timestep_spacing="trailing"), 15),
    "continuous-v": (dict(**SD, prediction_type="v_prediction", timestep_type="continuous"), 20),
    "sigma_min_max-karras": (dict(**SD, use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0), 20),
}  # fmt: skip
EULER_A_CASES = {
    "linspace-epsilon": (dict(), 20),
    "leading-v-scaled_linear": (dict(**SD, prediction_type="v_prediction", timestep_spacing="leading",
                                     steps_offset=1), 20),
    "trailing-epsilon-cosine": (dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), 15),
    "zero_snr-v-trailing": (dict(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                 timestep_spacing="trailing"), 15),  # its first step: the test below
}  # fmt: skip
FLOW_CASES = {
    # name: (config, num_steps, set_timesteps kwargs)
    "shift1": (dict(), 20, {}),
    "shift3-sd3": (dict(shift=3.0), 28, {}),
    "dynamic-exponential-flux": (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 20,
                                 dict(mu=0.9)),
    "dynamic-linear": (dict(use_dynamic_shifting=True, time_shift_type="linear"), 20, dict(mu=1.2)),
    "shift_terminal": (dict(shift=3.0, shift_terminal=0.1), 20, {}),
    "karras": (dict(shift=3.0, use_karras_sigmas=True), 20, {}),
    "exponential": (dict(shift=3.0, use_exponential_sigmas=True), 20, {}),
    "beta": (dict(shift=3.0, use_beta_sigmas=True), 20, {}),
    "invert_sigmas": (dict(invert_sigmas=True), 20, {}),
    "custom-sigmas": (dict(use_dynamic_shifting=True), 10, dict(mu=0.7, sigmas=list(np.linspace(1.0, 0.1, 10)))),
}  # fmt: skip


def _marks(name):
    return [NEEDS_SCIPY] if name.startswith("beta") else []


def _steps(backend, n):
    return min(n, 6) if interpreted(backend) else n  # the Triton interpreter is slow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, marks=_marks(c)) for c in EULER_CASES])
def test_euler_loop_matches_diffusers(case, backend):
    config, num_steps = EULER_CASES[case]
    errors = run_loop("EulerDiscreteScheduler", backend, config, _steps(backend, num_steps))
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(EULER_A_CASES))
def test_euler_ancestral_loop_matches_diffusers(case, backend, monkeypatch):
    config, num_steps = EULER_A_CASES[case]
    n = _steps(backend, num_steps)
    first = 1 if case.startswith("zero_snr") else 0
    errors = run_loop("EulerAncestralDiscreteScheduler", backend, config, n, monkeypatch=monkeypatch, first=first)
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_euler_ancestral_zero_snr_first_step_is_as_close_to_float64_as_diffusers(backend):
    """Zero terminal SNR starts at sigma = 4096 (alpha-bar 2^-24), where the ancestral step is ill-conditioned:
    sigma_down = sqrt(next^2 - sigma_up^2) cancels (next^2 ~ 840, sigma_down ~ 0.2) and x + d (sigma_down -
    sigma) cancels x (~4096) to the next sample (~29). Any float32 evaluation is ~1e-5 off the float64 value
    there; the kernel's rounding (fused multiply-adds) is not diffusers', so the test bounds both against the
    float64 step: genkern's error at most diffusers' own, plus a margin."""
    config = dict(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    theirs, ours = make("EulerAncestralDiscreteScheduler", backend, **config)
    for s in (theirs, ours):
        s.set_timesteps(15)
    shape = (2, 4, 8, 8)
    x, m, z = randn(0, shape) * float(theirs.init_noise_sigma), randn(1, shape), randn(2, shape)
    t = theirs.timesteps[0]
    a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(2)).prev_sample  # draws z = randn(2, shape)
    b = ours.step(m, t, x, variance_noise=z).prev_sample
    sigma, nxt = theirs.sigmas[0].double(), theirs.sigmas[1].double()
    xd, md = x.double(), m.double()
    x0 = md * (-sigma / (sigma**2 + 1) ** 0.5) + xd / (sigma**2 + 1)
    up = (nxt**2 * (sigma**2 - nxt**2) / sigma**2) ** 0.5
    exact = xd + (xd - x0) / sigma * ((nxt**2 - up**2) ** 0.5 - sigma) + z.double() * up
    theirs_error, ours_error = relative_error(a, exact), relative_error(b, exact)
    assert ours_error <= max(1.5 * theirs_error, TOLERANCE), (ours_error, theirs_error)
    assert ours_error <= 3 * TOLERANCE, ours_error


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "stochastic"])
@pytest.mark.parametrize("case", [pytest.param(c, marks=_marks(c)) for c in FLOW_CASES])
def test_flow_match_loop_matches_diffusers(case, stochastic, backend, monkeypatch):
    config, num_steps, kwargs = FLOW_CASES[case]
    if "sigmas" in kwargs:
        num_steps = None
    config = dict(config, stochastic_sampling=stochastic)
    n = num_steps if num_steps is None else _steps(backend, num_steps)
    noise = monkeypatch if stochastic else None
    errors = run_loop("FlowMatchEulerDiscreteScheduler", backend, config, n, set_timesteps=kwargs, monkeypatch=noise)
    assert errors[0] <= TOLERANCE, errors


# ------------------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("kind", ["EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_generator_noise_is_diffusers_noise(kind):
    """With a generator, the noise is drawn as diffusers draws it (randn_tensor on the same shape and dtype),
    so the samples match and the generators end in the same state."""
    config = dict(stochastic_sampling=True, shift=3.0) if kind.startswith("Flow") else {}
    theirs, ours = make(kind, "cpu", **config)
    for s in (theirs, ours):
        s.set_timesteps(10)
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    x = [randn(0, (1, 4, 8, 8))] * 2
    for i, t in enumerate(theirs.timesteps):
        m = randn(100 + i, (1, 4, 8, 8))
        x = [s.step(m, t, xi, generator=g).prev_sample for s, xi, g in zip((theirs, ours), x, gens)]
        assert relative_error(x[1], x[0]) <= TOLERANCE
    assert torch.equal(gens[0].get_state(), gens[1].get_state())


@pytest.mark.parametrize("kind", ["EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_philox_noise_without_generator_follows_torch_seed(kind):
    """Neither generator nor variance_noise: genkern's in-kernel noise, its seed drawn from torch's default
    generator, so torch.manual_seed makes a loop reproducible (with other values than diffusers')."""
    config = dict(stochastic_sampling=True) if kind.startswith("Flow") else {}
    _, ours = make(kind, "cpu", **config)
    runs = []
    for _ in range(2):
        ours.set_timesteps(5)
        torch.manual_seed(3)
        x = torch.zeros(1, 4, 8, 8)
        for t in ours.timesteps:
            x = ours.step(torch.zeros_like(x), t, x).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1]) and runs[0].abs().sum() > 0
    with pytest.raises(ValueError, match="generator and variance_noise"):
        ours.set_timesteps(5)
        ours.step(x, ours.timesteps[0], x, generator=torch.Generator(), variance_noise=x)


# ------------------------------------------------------------------------------------------------ coverage
def _count_op_calls(monkeypatch):
    from genkern.diffusers import _sigma

    calls = []
    real = _sigma._backend.call
    monkeypatch.setattr(_sigma._backend, "call", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize(
    "kind", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"]
)
def test_later_steps_skip_the_op_dispatch(kind, monkeypatch):
    """The first step of a signature goes through the op (every check); the later ones launch the kernel."""
    calls = _count_op_calls(monkeypatch)
    theirs, ours = make(kind, "cpu")
    for s in (theirs, ours):
        s.set_timesteps(6)
    x = randn(0, (1, 4, 8, 8))
    for i, t in enumerate(theirs.timesteps):
        m = randn(100 + i, x.shape)
        a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(i))
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(i))
        assert relative_error(b.prev_sample, a.prev_sample) <= TOLERANCE
        x = a.prev_sample
    assert len(calls) == 1
    x = randn(1, (2, 4, 8, 8))  # another batch: checked by the op again, once
    ours.set_timesteps(6)
    for t in ours.timesteps[:3]:
        x = ours.step(torch.zeros_like(x), t, x).prev_sample
    assert len(calls) == 2


def test_non_contiguous_inputs_after_the_first_step():
    theirs, ours = make("EulerAncestralDiscreteScheduler", "cpu")
    for s in (theirs, ours):
        s.set_timesteps(4)
    for i, t in enumerate(theirs.timesteps):
        x = randn(i, (2, 8, 8, 4)).permute(0, 3, 1, 2)
        m = randn(100 + i, (2, 8, 8, 4)).permute(0, 3, 1, 2)
        assert not x.is_contiguous()
        a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(i))
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(i))
        assert relative_error(b.prev_sample, a.prev_sample) <= TOLERANCE
        assert relative_error(b.pred_original_sample, a.pred_original_sample) <= TOLERANCE


def test_churned_euler_step_is_diffusers_step(monkeypatch):
    """s_churn > 0 inside [s_tmin, s_tmax] (gamma > 0) is not the kernel's step: diffusers' own runs, drawing its
    noise from the generator; outside the window the kernel runs."""
    calls = _count_op_calls(monkeypatch)
    theirs, ours = make("EulerDiscreteScheduler", "cpu")
    for s in (theirs, ours):
        s.set_timesteps(8)
    churn = dict(s_churn=0.5, s_tmin=0.5, s_tmax=5.0)
    x, covered = randn(0, (1, 4, 8, 8)) * float(theirs.init_noise_sigma), []
    for i, t in enumerate(theirs.timesteps):
        m = randn(100 + i, x.shape)
        covered.append(ours.genkern_covers(m, x, **churn))
        a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(i), **churn)
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(i), **churn)
        assert relative_error(b.prev_sample, a.prev_sample) <= TOLERANCE
        x = a.prev_sample
    sigmas = theirs.sigmas[:-1].tolist()
    assert covered == [not (0.5 <= s <= 5.0) for s in sigmas] and True in covered and False in covered
    assert len(calls) == 1  # the covered steps: one op call, then the direct kernel


def test_mixed_dtypes_and_per_token_timesteps_are_diffusers_steps():
    theirs, ours = make("EulerDiscreteScheduler", "cpu")
    for s in (theirs, ours):
        s.set_timesteps(4)
    x, m = randn(0, (1, 4, 8, 8)), randn(1, (1, 4, 8, 8)).double()
    t = theirs.timesteps[0]
    assert not ours.genkern_covers(m, x)
    assert torch.equal(ours.step(m, t, x).prev_sample, theirs.step(m, t, x).prev_sample)
    theirs, ours = make("FlowMatchEulerDiscreteScheduler", "cpu")
    for s in (theirs, ours):
        s.set_timesteps(4)
    x, m = randn(0, (1, 16, 8)), randn(1, (1, 16, 8))  # (B, tokens, C) latents, one sigma per token
    per_token = torch.full((1, 16), float(theirs.timesteps[0])) - torch.arange(16.0)
    a = theirs.step(m, theirs.timesteps[0], x, per_token_timesteps=per_token).prev_sample
    b = ours.step(m, ours.timesteps[0], x, per_token_timesteps=per_token).prev_sample
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ set-up
def test_from_scheduler_maps_each_class_and_copies_the_set_timesteps_state():
    for kind in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"):
        theirs = getattr(diffusers, kind)()
        assert type(gd.from_scheduler(theirs)) is getattr(gd, kind)
        assert type(gd.from_scheduler(gd.from_scheduler(theirs))) is getattr(gd, kind)
    flux = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    flux.set_timesteps(sigmas=list(np.linspace(1.0, 0.05, 7)), mu=1.1)  # set_timesteps(N) alone would raise
    flux.set_begin_index(2)
    copied = gd.from_scheduler(flux)
    assert torch.equal(copied.sigmas, flux.sigmas) and torch.equal(copied.timesteps, flux.timesteps)
    assert copied.begin_index == 2 and copied.num_inference_steps == flux.num_inference_steps
    sd3 = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3.set_shift(2.0)
    assert gd.from_scheduler(sd3).shift == 2.0
    euler = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    euler.set_timesteps(12)
    copied = gd.from_scheduler(euler, timestep_spacing="trailing")
    assert copied.config.timestep_spacing == "trailing" and copied.config.use_karras_sigmas
    assert torch.equal(copied.sigmas, euler.sigmas) and copied.init_noise_sigma == euler.init_noise_sigma


@pytest.mark.parametrize(
    "kind", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"]
)
def test_save_and_load_round_trip(kind, tmp_path):
    config = (
        dict(shift=3.0, use_karras_sigmas=True)
        if kind.startswith("Flow")
        else dict(**SD, prediction_type="v_prediction")
    )
    ours = getattr(gd, kind)(**config)
    ours.save_pretrained(tmp_path)
    loaded = getattr(gd, kind).from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded) is type(ours) and public(loaded.config) == public(ours.config)
    theirs = getattr(diffusers, kind).from_pretrained(tmp_path)
    assert public(theirs.config) == public(ours.config)
    assert public(getattr(gd, kind).from_config(theirs.config).config) == public(theirs.config)


def test_bad_prediction_type_is_a_value_error_naming_the_key():
    for kind in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        with pytest.raises(ValueError, match="prediction_type"):
            getattr(gd, kind)(prediction_type="flow")


def test_step_errors():
    _, ours = make("EulerDiscreteScheduler")
    ours.set_timesteps(3)
    x = randn(0, (1, 4, 4, 4))
    with pytest.raises(ValueError, match="integer indices"):
        ours.step(x, 1, x)
    for t in ours.timesteps:
        ours.step(x, t, x)
    with pytest.raises(IndexError, match="past the last"):
        ours.step(x, ours.timesteps[-1], x)


# ------------------------------------------------------------------------------------------------ pipelines
def tiny_unet(num_class_embeds=None):
    return dropin_tests.tiny_unet(channels=4, num_class_embeds=num_class_embeds)


@pytest.mark.parametrize(
    "kind, config, steps",
    [
        ("EulerDiscreteScheduler", {}, 10),
        ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="trailing"), 8),
        ("EulerAncestralDiscreteScheduler", {}, 10),
        ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="leading"), 8),
    ],
    ids=["euler", "euler-karras-trailing", "euler_a", "euler_a-v-leading"],
)
def test_ddpm_pipeline_with_a_sigma_scheduler_matches(kind, config, steps):
    """diffusers' DDPMPipeline driving an Euler scheduler (its loop: model, step with the generator): the
    pipeline's own scheduler, then genkern's from it, give the same images from the same generator."""
    unet = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=getattr(diffusers, kind)(**config))
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=steps, output_type="np")
    theirs = pipe(generator=torch.Generator().manual_seed(0), **call).images
    pipe.scheduler = gd.from_scheduler(pipe.scheduler)
    assert type(pipe.scheduler) is getattr(gd, kind)
    ours = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert ours.shape == theirs.shape == (1, 8, 8, 4)
    assert abs(ours - theirs).max() <= TOLERANCE, abs(ours - theirs).max()


def sd_loop(unet, scheduler, steps, guidance_scale=3.0, seed=0):
    """StableDiffusionPipeline's denoising loop on a class-conditional UNet (label 0: unconditional):
    latents * init_noise_sigma, classifier-free guidance on a doubled batch, scale_model_input, step with
    the generator."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps, device="cpu")
    latents = torch.randn((2, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    labels = torch.tensor([0, 0, 1, 2])
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = unet(model_input, t, class_labels=labels).sample.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]
    return latents


@pytest.mark.parametrize(
    "kind, config",
    [
        ("EulerDiscreteScheduler", SD),
        ("EulerDiscreteScheduler", dict(**SD, use_karras_sigmas=True, final_sigmas_type="sigma_min")),
        ("EulerDiscreteScheduler", dict(**SD, prediction_type="v_prediction", timestep_spacing="trailing")),
        ("EulerAncestralDiscreteScheduler", SD),
        ("EulerAncestralDiscreteScheduler", dict(**SD, timestep_spacing="leading", steps_offset=1)),
    ],
    ids=["euler", "euler-karras-sigma_min", "euler-v-trailing", "euler_a", "euler_a-leading"],
)
def test_stable_diffusion_loop_matches(kind, config):
    unet = tiny_unet(num_class_embeds=3)
    theirs = sd_loop(unet, getattr(diffusers, kind)(**config), 8)
    ours = sd_loop(unet, gd.from_scheduler(getattr(diffusers, kind)(**config)), 8)
    assert relative_error(ours, theirs) <= TOLERANCE, relative_error(ours, theirs)


def tiny_sd3_transformer():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
    ).eval()


def sd3_loop(transformer, scheduler, steps, guidance_scale=4.0, seed=0):
    """StableDiffusion3Pipeline's denoising loop (its text encoders need downloads: random prompt embeddings
    instead): mu from the latent size under dynamic shifting, classifier-free guidance, the transformer on
    t.expand(2B), step without a generator unless the scheduler is stochastic (the pipeline passes none)."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    prompt = torch.randn((4, 5, 16), generator=generator)
    pooled = torch.randn((4, 8), generator=generator)
    kwargs = {}
    if scheduler.config.use_dynamic_shifting:
        seq = (8 // 2) * (8 // 2)
        c = scheduler.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        kwargs["mu"] = seq * slope + c.base_shift - slope * c.base_image_seq_len
    scheduler.set_timesteps(steps, device="cpu", **kwargs)
    step_kwargs = dict(generator=generator) if scheduler.config.stochastic_sampling else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2)
            noise_pred = transformer(
                hidden_states=model_input,
                timestep=t.expand(model_input.shape[0]),
                encoder_hidden_states=prompt,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]
    return latents


@pytest.mark.parametrize(
    "config",
    [
        dict(shift=3.0),
        dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        dict(shift=3.0, use_karras_sigmas=True),
        dict(shift=3.0, stochastic_sampling=True),
    ],
    ids=["sd3-shift3", "dynamic", "karras", "stochastic"],
)
def test_sd3_loop_matches(config):
    transformer = tiny_sd3_transformer()
    theirs = sd3_loop(transformer, diffusers.FlowMatchEulerDiscreteScheduler(**config), 10)
    ours = sd3_loop(transformer, gd.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(**config)), 10)
    assert relative_error(ours, theirs) <= TOLERANCE, relative_error(ours, theirs)


def test_step_output_is_diffusers_output():
    """The outputs are built without the dataclass constructor (make_output): the same mapping and fields."""
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

    _, ours = make("EulerDiscreteScheduler")
    ours.set_timesteps(3)
    x = randn(0, (1, 4, 4, 4))
    for t in ours.timesteps:  # the first step through the op, the later ones direct
        out = ours.step(x, t, x)
        expected = EulerDiscreteSchedulerOutput(
            prev_sample=out.prev_sample, pred_original_sample=out.pred_original_sample
        )
        assert type(out) is EulerDiscreteSchedulerOutput and list(out.keys()) == list(expected.keys())
        assert out[0] is out.prev_sample is out["prev_sample"] and out[1] is out.pred_original_sample
        assert len(out.to_tuple()) == 2 and out == expected
    _, flow = make("FlowMatchEulerDiscreteScheduler")
    flow.set_timesteps(2)
    out = flow.step(x, flow.timesteps[0], x)
    assert list(out.keys()) == ["prev_sample"] and out.to_tuple() == (out.prev_sample,)
    assert flow.step(x, flow.timesteps[1], x, return_dict=False)[0].shape == x.shape
