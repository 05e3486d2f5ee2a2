"""genkern.diffusers, the drop-in DDPM and DDIM schedulers, against diffusers' own schedulers and pipelines.

Parity is measured over full sampling loops, step by step: both schedulers get the same model output, sample
and noise at every step (the sample carried on is diffusers'), and the error of a step is the norm-wise
relative error max |ours - theirs| / max |theirs| of prev_sample and of pred_original_sample.

DDPM at float32 is compared with diffusers' step evaluated in float64 on diffusers' own (float32) alpha-bar,
at 1e-5: diffusers' float32 step forms beta' = 1 - ab_t / ab_prev by a subtraction that cancels where
ab_t / ab_prev is close to 1 (small t, and every step of a 1000-step loop), and is itself up to ~1e-4 off
that float64 value there, while genkern's kernel forms beta' from the table's columns without the
cancellation. Against diffusers' float32 step the bound is DDPM_FLOAT32_TOLERANCE, and the test checks that
genkern is the closer of the two to the float64 value. DDIM has no such cancellation and is compared with
diffusers' float32 step at 1e-5.
"""

import subprocess
import sys

import pytest
import torch
from conftest import KERNEL_BACKENDS, interpreted

diffusers = pytest.importorskip("diffusers", reason="genkern.diffusers is a drop-in for diffusers' schedulers")
from diffusers.schedulers import scheduling_ddpm  # noqa: E402

import genkern  # noqa: E402
import genkern.diffusers as gd  # noqa: E402

TOLERANCE = 1e-5  # float32, norm-wise relative
DDPM_FLOAT32_TOLERANCE = 2e-4  # diffusers' own float32 rounding of beta' (module notes)
BACKENDS = ["reference", *KERNEL_BACKENDS]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# name -> diffusers config (clip_sample is diffusers' default True unless given)
SCHEDULES = {
    "linear": dict(),
    "scaled_linear": SD,
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(**SD, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = theirs.double()
    return float((ours.double() - theirs).abs().max() / theirs.abs().max().clamp(min=1e-30))


def make(kind: str, backend: str, **config):
    """(diffusers' scheduler, genkern's from it) for a config."""
    theirs = (diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler)(**config)
    ours = gd.from_scheduler(theirs, backend=backend)
    return theirs, ours


def float64_twin(scheduler):
    """The diffusers scheduler computing in float64 on its own float32 alpha-bar values."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "one"):
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def noise_for(step: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + step))


def run_ddim(backend, config, num_steps, eta, shape=(2, 3, 8, 8), use_clipped=False):
    """Worst (prev_sample, pred_original) error of a DDIM loop against diffusers' float32 step."""
    theirs, ours = make("ddim", backend, **config)
    theirs.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    worst = [0.0, 0.0]
    for i, t in enumerate(theirs.timesteps):
        m = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        z = noise_for(i, shape) if eta > 0 else None
        kwargs = dict(eta=eta, use_clipped_model_output=use_clipped, variance_noise=z)
        a = theirs.step(m, t, x, **kwargs)
        b = ours.step(m, t, x, **kwargs)
        assert b.prev_sample.dtype == torch.float32 and b.prev_sample.shape == x.shape
        worst[0] = max(worst[0], relative_error(b.prev_sample, a.prev_sample))
        worst[1] = max(worst[1], relative_error(b.pred_original_sample, a.pred_original_sample))
        x = a.prev_sample
    return worst


def run_ddpm(backend, config, num_steps, shape=(2, 3, 8, 8), monkeypatch=None):
    """Worst errors of a DDPM loop: (against diffusers' float64 step, against its float32 step, diffusers'
    float32 step against its float64 step), each over prev_sample and pred_original."""
    theirs, ours = make("ddpm", backend, **config)
    twin = float64_twin(type(theirs)(**config))
    for s in (theirs, ours, twin):
        if num_steps is not None:
            s.set_timesteps(num_steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    worst64, worst32, diffusers32 = [0.0, 0.0], [0.0, 0.0], 0.0
    for i, t in enumerate(theirs.timesteps):
        m = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        z = noise_for(i, shape)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, dtype=None, **k: z.to(dtype))
        a = theirs.step(m, t, x)
        c = twin.step(m.double(), t, x.double())
        b = ours.step(m, t, x, variance_noise=z)
        for worst, ref in ((worst64, c), (worst32, a)):
            worst[0] = max(worst[0], relative_error(b.prev_sample, ref.prev_sample))
            worst[1] = max(worst[1], relative_error(b.pred_original_sample, ref.pred_original_sample))
        diffusers32 = max(diffusers32, relative_error(a.prev_sample, c.prev_sample))
        x = a.prev_sample
    return worst64, worst32, diffusers32


# ------------------------------------------------------------------------------------------------ parity: DDIM
DDIM_CASES = {
    # name: (config, num_steps, eta); trailing with N = 15, where diffusers' t - T // N is not the next timestep
    "leading-epsilon-clip": (dict(), 20, 0.0),
    "trailing-epsilon-noclip": (dict(timestep_spacing="trailing", clip_sample=False), 15, 0.0),
    "linspace-epsilon-noclip": (dict(timestep_spacing="linspace", clip_sample=False), 20, 0.0),
    "leading-v-scaled_linear": (dict(**SD, prediction_type="v_prediction", clip_sample=False), 20, 0.0),
    "trailing-sample-cosine": (dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                    timestep_spacing="trailing"), 15, 0.0),
    "trailing-zero_snr-v": (dict(**SCHEDULES["zero_snr"], timestep_spacing="trailing", clip_sample=False), 15, 0.0),
    "leading-eta0.5-clip": (dict(), 20, 0.5),
    "trailing-eta0.5-zero_snr": (dict(**SCHEDULES["zero_snr"], timestep_spacing="trailing", clip_sample=False),
                                 15, 0.5),
    "leading-thresholding": (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                                  prediction_type="sample"), 20, 0.5),
    "leading-set_alpha_to_one_false-offset": (dict(set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                                                 clip_sample_range=0.8), 20, 0.0),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_loop_matches_diffusers(case, backend):
    config, num_steps, eta = DDIM_CASES[case]
    if interpreted(backend):
        num_steps = min(num_steps, 8)  # the Triton interpreter is slow
    prev_error, x0_error = run_ddim(backend, config, num_steps, eta)
    assert prev_error <= TOLERANCE and x0_error <= TOLERANCE, (prev_error, x0_error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_use_clipped_model_output_matches_diffusers(backend):
    errors = run_ddim(backend, dict(clip_sample_range=0.5), 4 if interpreted(backend) else 10, 0.5, use_clipped=True)
    assert max(errors) <= TOLERANCE, errors


# ------------------------------------------------------------------------------------------------ parity: DDPM
DDPM_CASES = {
    # name: (config, num_steps (None: all T, without set_timesteps))
    "leading-fixed_small-clip": (dict(), 25),
    "trailing-fixed_large": (dict(timestep_spacing="trailing", variance_type="fixed_large", clip_sample=False), 25),
    "linspace-fixed_small_log-v": (dict(timestep_spacing="linspace", variance_type="fixed_small_log",
                                        prediction_type="v_prediction", **SD), 25),
    "leading-sample-cosine": (dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"), 25),
    "trailing-zero_snr": (dict(**SCHEDULES["zero_snr"], timestep_spacing="trailing", clip_sample=False), 25),
    "thresholding": (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), 25),
    "all-1000-steps": (dict(clip_sample=False), None),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DDPM_CASES))
def test_ddpm_loop_matches_diffusers(case, backend, monkeypatch):
    config, num_steps = DDPM_CASES[case]
    if interpreted(backend):
        if num_steps is None:
            pytest.skip("1000 interpreted Triton steps: the cpu and reference backends cover it")
        num_steps = 8
    worst64, worst32, diffusers32 = run_ddpm(backend, config, num_steps, monkeypatch=monkeypatch)
    assert max(worst64) <= TOLERANCE, worst64
    assert max(worst32) <= DDPM_FLOAT32_TOLERANCE, worst32
    # Where genkern and diffusers' float32 step differ by more than the tolerance, diffusers' is the one off.
    if worst32[0] > TOLERANCE:
        assert diffusers32 > 10 * worst64[0], (worst32, worst64, diffusers32)


def test_ddpm_learned_range_matches_diffusers(monkeypatch):
    """learned_range: the model output has 2C channels; diffusers splits it, as the op does."""
    config = dict(variance_type="learned_range", clip_sample=False)
    theirs, ours = make("ddpm", "cpu", **config)
    for s in (theirs, ours):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(theirs.timesteps):
        m = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(100 + i))
        m[:, 3:] = m[:, 3:].tanh()
        z = noise_for(i, x.shape)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, dtype=None, **k: z.to(dtype))
        a, b = theirs.step(m, t, x), ours.step(m, t, x, variance_noise=z)
        assert relative_error(b.prev_sample, a.prev_sample) <= 2e-5  # learned_range exp/log: libm vs torch
        x = a.prev_sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_after_the_first_step(backend):
    """The direct kernel path (every step after the first) copies strided inputs and keeps the copies alive."""
    theirs, ours = make("ddim", backend, clip_sample=False)
    for s in (theirs, ours):
        s.set_timesteps(4)
    for i, t in enumerate(theirs.timesteps):
        x = torch.randn(2, 8, 8, 3, generator=torch.Generator().manual_seed(i)).permute(0, 3, 1, 2)
        m = torch.randn(2, 8, 8, 3, generator=torch.Generator().manual_seed(100 + i)).permute(0, 3, 1, 2)
        z = torch.randn(2, 8, 8, 3, generator=torch.Generator().manual_seed(200 + i)).permute(0, 3, 1, 2)
        assert not x.is_contiguous()
        a = theirs.step(m, t, x, eta=0.5, variance_noise=z)
        b = ours.step(m, t, x, eta=0.5, variance_noise=z)
        assert relative_error(b.prev_sample, a.prev_sample) <= TOLERANCE
        assert relative_error(b.pred_original_sample, a.pred_original_sample) <= TOLERANCE


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_generator_noise_is_diffusers_noise(kind):
    """With a generator, the noise is drawn as diffusers draws it (randn_tensor, only where the step adds
    noise), so the generators end in the same state and the samples match."""
    theirs, ours = make(kind, "cpu", clip_sample=False)
    for s in (theirs, ours):
        s.set_timesteps(10)
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    x = [torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))] * 2
    kwargs = dict(eta=0.5) if kind == "ddim" else {}
    for i, t in enumerate(theirs.timesteps):
        m = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(100 + i))
        x = [s.step(m, t, xi, generator=g, **kwargs).prev_sample for s, xi, g in zip((theirs, ours), x, gens)]
        assert relative_error(x[1], x[0]) <= (DDPM_FLOAT32_TOLERANCE if kind == "ddpm" else TOLERANCE)
    assert torch.equal(gens[0].get_state(), gens[1].get_state())


def test_philox_noise_without_generator_follows_torch_seed():
    """Neither generator nor variance_noise: genkern's in-kernel noise, its seed drawn from torch's default
    generator, so torch.manual_seed makes a loop reproducible (with other values than diffusers')."""
    _, ours = make("ddim", "cpu")
    ours.set_timesteps(5)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        x = torch.zeros(1, 3, 8, 8)
        for t in ours.timesteps:
            x = ours.step(torch.zeros_like(x), t, x, eta=1.0).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1]) and runs[0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_noise_matches_diffusers(backend):
    for name, config in SCHEDULES.items():
        theirs, ours = make("ddpm", backend, **config)
        x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
        t = torch.tensor([0, 17, 500, 999])
        assert relative_error(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t)) <= TOLERANCE, name
        one = torch.tensor([250])  # one timestep for the whole batch
        assert relative_error(ours.add_noise(x0, noise, one), theirs.add_noise(x0, noise, one)) <= TOLERANCE


def test_table_holds_diffusers_alphas_cumprod_exactly():
    for name, config in SCHEDULES.items():
        for kind in ("ddpm", "ddim"):
            theirs, ours = make(kind, "cpu", **config)
            table = ours.genkern_schedule.table("cpu")
            assert torch.equal(table[1:, 0], theirs.alphas_cumprod), (name, kind)
    _, ours = make("ddim", "cpu", set_alpha_to_one=False)
    assert ours.genkern_schedule.table("cpu")[0, 0] == ours.alphas_cumprod[0]


# ------------------------------------------------------------------------------------------------ flags
def test_genkern_timesteps_steps_to_the_next_timestep():
    """genkern_timesteps=True: DDIM steps to the next entry of timesteps (diffusers: t - T // N), i.e. the
    reference's ddim_step with prev_t from NoiseSchedule.timesteps."""
    from genkern.diffusion import reference as ref

    config = dict(timestep_spacing="trailing", clip_sample=False)
    theirs, ours = make("ddim", "cpu", **config)
    fixed = gd.from_scheduler(theirs, genkern_timesteps=True)
    assert fixed.config.genkern_timesteps and not ours.config.genkern_timesteps
    for s in (theirs, ours, fixed):
        s.set_timesteps(3)
    assert ours.timesteps.tolist() == [999, 666, 332]
    x, m = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = ours.timesteps[1]
    diffusers_prev = ours.step(m, t, x).prev_sample  # 666 -> 333
    fixed_prev = fixed.step(m, t, x).prev_sample  # 666 -> 332
    schedule = fixed.genkern_schedule
    torch.testing.assert_close(diffusers_prev, ref.ddim_step(m, 666, x, schedule, prev_t=333)[0])
    torch.testing.assert_close(fixed_prev, ref.ddim_step(m, 666, x, schedule, prev_t=332)[0])
    # diffusers' trailing spacing has N + 1 entries for N = 61, the last -1; genkern_timesteps keeps N.
    theirs.set_timesteps(61)
    fixed.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and theirs.timesteps[-1] == -1
    assert len(fixed.timesteps) == 61 and fixed.timesteps[-1] >= 0


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_diffusers_extra_trailing_timestep_is_reproduced(kind, monkeypatch):
    """Without the flag, the step at diffusers' extra timestep -1 is diffusers' step (alphas_cumprod[-1])."""
    theirs, ours = make(kind, "cpu", timestep_spacing="trailing")
    for s in (theirs, ours):
        s.set_timesteps(61)
    x, m = torch.randn(1, 3, 4, 4) * 0.1, torch.randn(1, 3, 4, 4)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: pytest.fail("no noise at t = -1"))
    a, b = theirs.step(m, theirs.timesteps[-1], x), ours.step(m, ours.timesteps[-1], x)
    assert relative_error(b.prev_sample, a.prev_sample) <= TOLERANCE


def test_genkern_schedule_is_the_float64_schedule():
    theirs, ours = make("ddim", "cpu", **SD)
    flagged = gd.from_scheduler(theirs, genkern_schedule=True)
    expected = genkern.diffusion.NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(flagged.genkern_schedule.table("cpu"), expected.table("cpu"))
    assert not torch.equal(ours.genkern_schedule.table("cpu"), expected.table("cpu"))  # float32 cumprod
    with pytest.raises(ValueError, match="beta_schedule"):
        gd.DDPMScheduler(beta_schedule="sigmoid", genkern_schedule=True)
    gd.DDPMScheduler(beta_schedule="sigmoid")  # diffusers' own alphas_cumprod: any schedule diffusers builds


# ------------------------------------------------------------------------------------------------ pipelines
def tiny_unet(channels=3, num_class_embeds=None):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    ).eval()


@pytest.mark.parametrize(
    "pipeline, scheduler, config, call",
    [
        ("DDPMPipeline", "DDPMScheduler", {}, dict(num_inference_steps=10)),
        ("DDPMPipeline", "DDPMScheduler", dict(timestep_spacing="trailing"), dict(num_inference_steps=8)),
        ("DDIMPipeline", "DDIMScheduler", {}, dict(num_inference_steps=10)),
        ("DDIMPipeline", "DDIMScheduler", dict(timestep_spacing="trailing"), dict(num_inference_steps=7, eta=0.5)),
    ],
    ids=["ddpm-10", "ddpm-trailing-8", "ddim-eta0", "ddim-trailing-7-eta0.5"],
)
def test_pipeline_images_match(pipeline, scheduler, config, call):
    """The pipeline's own scheduler, then genkern's from it: the same images from the same generator."""
    unet = tiny_unet()
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=getattr(diffusers, scheduler)(**config))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    pipe.scheduler = gd.from_scheduler(pipe.scheduler)
    assert type(pipe.scheduler) is getattr(gd, scheduler)
    ours = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    assert ours.shape == theirs.shape == (1, 8, 8, 3)
    assert abs(ours - theirs).max() <= 1e-4, abs(ours - theirs).max()


@pytest.mark.parametrize("kind", ["DDPMScheduler", "DDIMScheduler"])
def test_save_and_load_round_trip(kind, tmp_path):
    ours = getattr(gd, kind)(**SD, prediction_type="v_prediction", timestep_spacing="trailing", genkern_timesteps=True)
    ours.save_pretrained(tmp_path)
    loaded = getattr(gd, kind).from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded) is type(ours) and public(loaded.config) == public(ours.config)
    assert loaded.config.genkern_timesteps is True
    # diffusers' own class loads the same directory (its step ignores genkern's keys, its config keeps them)
    theirs = getattr(diffusers, kind).from_pretrained(tmp_path)
    assert type(theirs) is getattr(diffusers, kind) and theirs.config.prediction_type == "v_prediction"
    assert gd.from_scheduler(theirs).config.genkern_timesteps is True


def test_from_config_and_set_timesteps_state():
    theirs = diffusers.DDIMScheduler(**SD)
    ours = gd.DDIMScheduler.from_config(theirs.config)
    assert type(ours) is gd.DDIMScheduler and ours.config.beta_schedule == "scaled_linear"
    assert ours.init_noise_sigma == 1.0 and ours.order == 1
    x = torch.randn(1, 3, 4, 4)
    assert ours.scale_model_input(x, 10) is x
    theirs.set_timesteps(7)
    copied = gd.from_scheduler(theirs)
    assert copied.num_inference_steps == 7 and torch.equal(copied.timesteps, theirs.timesteps)
    ddpm = diffusers.DDPMScheduler()
    ddpm.set_timesteps(timesteps=[900, 500, 10])
    assert gd.from_scheduler(ddpm).timesteps.tolist() == [900, 500, 10]


# ------------------------------------------------------------------------------------------------ errors
def test_unsupported_scheduler_is_a_type_error():
    with pytest.raises(TypeError, match="PNDMScheduler"):
        gd.from_scheduler(diffusers.PNDMScheduler())

    class MyDDIM(diffusers.DDIMScheduler):
        pass

    with pytest.raises(TypeError, match="MyDDIM"):
        gd.from_scheduler(MyDDIM())
    with pytest.raises(TypeError, match="str"):
        gd.from_scheduler("DDIMScheduler")


@pytest.mark.parametrize(
    "kind, key, value",
    [
        ("DDPMScheduler", "variance_type", "learned"),
        ("DDPMScheduler", "variance_type", "fixed_large_log"),
        ("DDPMScheduler", "prediction_type", "flow"),
        ("DDIMScheduler", "prediction_type", "flow"),
        ("DDIMScheduler", "timestep_spacing", "karras"),
        ("DDIMScheduler", "clip_sample_range", -1.0),
        ("DDPMScheduler", "dynamic_thresholding_ratio", 1.5),
        ("DDIMScheduler", "genkern_timesteps", "yes"),
    ],
)
def test_bad_config_value_is_a_value_error_naming_the_key(kind, key, value):
    config = dict(getattr(diffusers, kind)().config)
    config.pop("_use_default_values", None)  # else from_config resets the keys diffusers left at their defaults
    config[key] = value
    if key == "dynamic_thresholding_ratio":
        config["thresholding"] = True
    with pytest.raises(ValueError, match=key):
        getattr(gd, kind).from_config(config)


def test_step_errors():
    _, ours = make("ddim", "cpu")
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(x, 10, x)
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="generator and variance_noise"):
        ours.step(x, ours.timesteps[0], x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    ddpm = gd.DDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        ddpm.step(x, 17, x)
    # the pinned backend is the one that runs, on the first (checked) step and on later (direct) ones
    pinned = gd.from_scheduler(diffusers.DDIMScheduler(), backend="cpu")
    pinned.set_timesteps(10)
    for t in pinned.timesteps[:3]:
        with genkern.set_backend("reference"):
            assert genkern.backend.get_backend() == "reference"
            pinned.step(x, t, x)
    if "cuda" not in genkern.backends():
        pinned.genkern_backend = "cuda"
        with pytest.raises(ValueError, match="cuda"):
            pinned.step(x, pinned.timesteps[3], x)


def test_import_genkern_does_not_import_diffusers():
    code = "import sys, genkern; assert 'diffusers' not in sys.modules, 'diffusers imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
