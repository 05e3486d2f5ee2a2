"""The diffusion reference (genkern.diffusion.reference) against diffusers' DDPMScheduler and DDIMScheduler
(add_noise, get_velocity, step) and against the definitions of docs/math.md where diffusers is wrong;
the loss against an explicit computation; per-sample timesteps; the noise stream; bad arguments.

For tight comparisons the diffusers schedulers are given our float64 alpha-bar (theirs is float32, see
test_schedules.py) and float64 inputs, which their step functions keep in float64.
"""

import math

import pytest
import torch

from genkern.diffusion import reference as ref
from genkern.diffusion.schedules import NoiseSchedule
from genkern.random.reference import randn

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test oracle for the diffusion reference")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.guiders.guider_utils import rescale_noise_cfg  # noqa: E402
from diffusers.schedulers import scheduling_ddpm  # noqa: E402
from diffusers.training_utils import compute_snr  # noqa: E402

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-12)
SHAPE = (3, 4, 5, 6)  # (B, C, H, W)
T = 1000
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SCHEDULES = {
    "linear": ("linear", "linear", {}),
    "scaled_linear": ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    "cosine": ("cosine", "squaredcos_cap_v2", {}),
}
# (our clip_sample, dynamic_threshold) -> diffusers' config
THRESHOLDS = {
    "none": (None, None, {"clip_sample": False}),
    "clip": (1.0, None, {"clip_sample": True, "clip_sample_range": 1.0}),
    "clip2.5": (2.5, None, {"clip_sample": True, "clip_sample_range": 2.5}),
    "dynamic": (None, (0.9, 3.0), {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0}),
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=gen(seed), dtype=F64) * scale


def ours_and_config(kind="linear", **schedule_kw):
    ours, theirs, kw = SCHEDULES[kind]
    return NoiseSchedule(ours, num_train_timesteps=T, **kw, **schedule_kw), dict(
        num_train_timesteps=T, beta_schedule=theirs, **kw
    )


def inject(sched, schedule):
    """Make a diffusers scheduler compute with our float64 alpha-bar (and final alpha)."""
    sched.betas, sched.alphas, sched.alphas_cumprod = schedule.betas, schedule.alphas, schedule.alphas_cumprod
    sched.one = torch.tensor(1.0, dtype=F64)
    sched.final_alpha_cumprod = torch.tensor(schedule.final_alpha_cumprod, dtype=F64)
    return sched


def ddpm(schedule, config, **kw):
    return inject(DDPMScheduler(**config, **kw), schedule)


def ddim(schedule, config, **kw):
    return inject(DDIMScheduler(**config, set_alpha_to_one=schedule.final_alpha_one, **kw), schedule)


def ddpm_with_noise(monkeypatch, sched, noise, *args):
    """DDPMScheduler.step draws its own noise: hand it ours."""
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: noise)
    return sched.step(*args, return_dict=False)


def explicit_prev_ddim(m, t, x, schedule, prev_t, eta, prediction_type, noise, clip=None):
    """DDIM eq. 12 written out with Python floats (the definition the trailing/linspace tests use)."""
    ab = float(schedule.alphas_cumprod[t])
    ab_prev = float(schedule.alphas_cumprod[prev_t]) if prev_t >= 0 else schedule.final_alpha_cumprod
    if prediction_type == "epsilon":
        x0, eps = (x - math.sqrt(1 - ab) * m) / math.sqrt(ab), m
    elif prediction_type == "sample":
        x0, eps = m, (x - math.sqrt(ab) * m) / math.sqrt(1 - ab)
    else:
        x0, eps = math.sqrt(ab) * x - math.sqrt(1 - ab) * m, math.sqrt(ab) * m + math.sqrt(1 - ab) * x
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    return math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps + sigma * noise, x0


# ============================================================================================ forward process


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_q_sample_and_velocity_match_diffusers(kind):
    schedule, config = ours_and_config(kind)
    x0, noise = rand(SHAPE, 0), rand(SHAPE, 1)
    t = torch.tensor([999, 500, 0])
    for cls in (DDPMScheduler, DDIMScheduler):
        sched = inject(cls(**config), schedule)
        torch.testing.assert_close(ref.q_sample(x0, t, schedule, noise=noise), sched.add_noise(x0, noise, t), **TIGHT)
        torch.testing.assert_close(
            ref.get_velocity(x0, t, schedule, noise=noise), sched.get_velocity(x0, noise, t), **TIGHT
        )
        for ti in (0, 17, 999):  # a scalar t, diffusers with a 1-element tensor
            torch.testing.assert_close(
                ref.q_sample(x0, ti, schedule, noise=noise), sched.add_noise(x0, noise, torch.tensor([ti])), **TIGHT
            )
    # Against diffusers' own float32 schedule, at float32 precision.
    d = DDPMScheduler(**config)
    x32, n32 = x0.float(), noise.float()
    torch.testing.assert_close(
        ref.q_sample(x32, t, schedule, noise=n32), d.add_noise(x32, n32, t), rtol=1e-5, atol=1e-5
    )


def test_q_sample_draws_the_stream_over_the_output():
    schedule, _ = ours_and_config()
    x0, t = rand(SHAPE, 0), torch.tensor([3, 400, 999])
    for dtype in (torch.float32, F64):
        x = x0.to(dtype)
        eps = randn(SHAPE, 11, 5, dtype=dtype)
        assert torch.equal(ref.q_sample(x, t, schedule, seed=11, offset=5), ref.q_sample(x, t, schedule, noise=eps))
        assert torch.equal(
            ref.get_velocity(x, t, schedule, seed=11, offset=5), ref.get_velocity(x, t, schedule, noise=eps)
        )
    assert not torch.equal(ref.q_sample(x0, t, schedule, seed=11, offset=5), ref.q_sample(x0, t, schedule, seed=11))


def test_velocity_and_q_sample_are_consistent():
    """x0 = sqrt(ab) x_t - sqrt(1 - ab) v: the v_prediction inversion used by the steps."""
    schedule, _ = ours_and_config("cosine")
    x0, t = rand(SHAPE, 0), torch.tensor([1, 600, 999])
    xt = ref.q_sample(x0, t, schedule, seed=3)
    v = ref.get_velocity(x0, t, schedule, seed=3)
    ab = schedule.alpha_cumprod(t)
    x0_hat, eps_hat = ref.predict_x0_eps(v, xt, ab, "v_prediction")
    torch.testing.assert_close(x0_hat, x0, **TIGHT)
    torch.testing.assert_close(eps_hat, randn(SHAPE, 3, 0, dtype=F64), **TIGHT)


# ============================================================================================ thresholding


def test_thresholds_match_diffusers():
    schedule, config = ours_and_config()
    x0 = rand((4, 3, 8, 8), 0) * torch.tensor([0.5, 1.0, 1.5, 10.0], dtype=F64).reshape(-1, 1, 1, 1)
    sched = DDPMScheduler(**config, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=4.0)
    ours = ref.threshold_x0(x0, dynamic_threshold=(0.95, 4.0))
    torch.testing.assert_close(ours, sched._threshold_sample(x0), **TIGHT)
    # per-sample q: clamped to 1 (plain clipping), inside (1, 4) (rescaled to [-1, 1]), clamped to 4
    q = torch.quantile(x0.reshape(4, -1).abs(), 0.95, dim=1)
    assert q[0] < 1 and 1 < q[1] < 4 and 1 < q[2] < 4 and q[3] > 4
    assert torch.equal(ours[0], x0[0].clamp(-1, 1))
    torch.testing.assert_close(ours[1].abs().max(), torch.tensor(1.0, dtype=F64), **TIGHT)
    torch.testing.assert_close(ours[3], x0[3].clamp(-4, 4) / 4, **TIGHT)
    assert torch.equal(ref.threshold_x0(x0, clip_sample=2.0), x0.clamp(-2, 2))
    assert ref.threshold_x0(x0) is x0


# ============================================================================================ DDPM


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("threshold", list(THRESHOLDS))
@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_ddpm_step_matches_diffusers(monkeypatch, variance_type, prediction_type, threshold, kind):
    clip, dyn, dconfig = THRESHOLDS[threshold]
    schedule, config = ours_and_config(kind)
    sched = ddpm(schedule, config, variance_type=variance_type, prediction_type=prediction_type, **dconfig)
    learned = variance_type == "learned_range"
    for i, t in enumerate([999, 500, 10, 1, 0]):
        x, noise = rand(SHAPE, 10 + i, 1.5), rand(SHAPE, 20 + i)
        m = rand((3, 8 if learned else 4, 5, 6), 30 + i)
        if learned:
            m[:, 4:] = torch.rand((3, 4, 5, 6), generator=gen(i), dtype=F64) * 2 - 1  # v in [-1, 1]
        theirs = ddpm_with_noise(monkeypatch, sched, noise, m, t, x)
        assert theirs[0].dtype == theirs[1].dtype == F64  # diffusers kept our float64 throughout
        ours = ref.ddpm_step(
            m,
            t,
            x,
            schedule,
            variance_type=variance_type,
            prediction_type=prediction_type,
            clip_sample=clip,
            dynamic_threshold=dyn,
            noise=noise,
        )
        torch.testing.assert_close(ours[1], theirs[1], **TIGHT)
        torch.testing.assert_close(ours[0], theirs[0], **TIGHT)


@pytest.mark.parametrize("spacing,steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_strided_ddpm_steps_match_diffusers(monkeypatch, spacing, steps_offset, variance_type):
    """Strided steps t -> prev_t with alpha' = ab_t / ab_prev; DDPMScheduler looks the previous timestep up in
    its list, so it agrees for every spacing."""
    schedule, config = ours_and_config("scaled_linear")
    sched = ddpm(
        schedule,
        config,
        variance_type=variance_type,
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
    )
    N = 10
    sched.set_timesteps(N)
    ts, prevs = schedule.timesteps(N, spacing, steps_offset)
    assert torch.equal(sched.timesteps, ts)
    C = 8 if variance_type == "learned_range" else 4
    for i, (t, p) in enumerate(zip(ts.tolist(), prevs.tolist())):
        x, noise, m = rand(SHAPE, i), rand(SHAPE, 100 + i), rand((3, C, 5, 6), 200 + i).clamp(-1, 1)
        theirs = ddpm_with_noise(monkeypatch, sched, noise, m, t, x)
        ours = ref.ddpm_step(
            m, t, x, schedule, prev_t=p, variance_type=variance_type, prediction_type="v_prediction", noise=noise
        )
        torch.testing.assert_close(ours[0], theirs[0], **TIGHT)
        torch.testing.assert_close(ours[1], theirs[1], **TIGHT)


def test_ddpm_adds_no_noise_where_t_is_zero():
    schedule, _ = ours_and_config()
    x, m, noise = rand(SHAPE, 0), rand(SHAPE, 1), rand(SHAPE, 2)
    t = torch.tensor([0, 5, 0])
    with_noise = ref.ddpm_step(m, t, x, schedule, noise=noise)[0]
    without = ref.ddpm_step(m, t, x, schedule, noise=torch.zeros_like(noise))[0]
    assert torch.equal(with_noise[[0, 2]], without[[0, 2]])
    assert not torch.allclose(with_noise[1], without[1])
    # t = 0 with the final alpha not set to one: beta' = 0, the step leaves x_t as is (and no NaN from log 0).
    s0 = NoiseSchedule(num_train_timesteps=T, final_alpha_one=False)
    for vt in ("fixed_small", "fixed_large", "learned_range"):
        mo = torch.cat([m, m.clamp(-1, 1)], 1) if vt == "learned_range" else m
        out = ref.ddpm_step(mo, 0, x, s0, variance_type=vt, seed=1)[0]
        torch.testing.assert_close(out, x, **TIGHT)


def test_ddpm_draws_the_stream_over_the_output():
    schedule, _ = ours_and_config()
    x, m = rand(SHAPE, 0), rand(SHAPE, 1)
    t = torch.tensor([7, 300, 999])
    z = randn(SHAPE, 5, 9, dtype=F64)
    assert torch.equal(
        ref.ddpm_step(m, t, x, schedule, seed=5, offset=9)[0], ref.ddpm_step(m, t, x, schedule, noise=z)[0]
    )
    # with guidance the output, hence the noise, has the (B, ...) shape of sample
    m2 = rand((6, 4, 5, 6), 2)
    assert torch.equal(
        ref.ddpm_step(m2, t, x, schedule, seed=5, offset=9, guidance_scale=3.0)[0],
        ref.ddpm_step(m2, t, x, schedule, noise=z, guidance_scale=3.0)[0],
    )


# ============================================================================================ DDIM


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("threshold", list(THRESHOLDS))
@pytest.mark.parametrize("eta,use_clipped", [(0.0, False), (0.5, False), (1.0, True), (0.3, True)])
def test_ddim_step_matches_diffusers_leading(prediction_type, threshold, eta, use_clipped):
    clip, dyn, dconfig = THRESHOLDS[threshold]
    schedule, config = ours_and_config("scaled_linear")
    sched = ddim(schedule, config, prediction_type=prediction_type, **dconfig)
    N = 8
    sched.set_timesteps(N)
    ts, prevs = schedule.timesteps(N, "leading")
    for i, (t, p) in enumerate(zip(ts.tolist(), prevs.tolist())):
        assert t - T // N == p or p == -1  # diffusers' rule is right for leading spacing
        x, noise, m = rand(SHAPE, i, 1.5), rand(SHAPE, 100 + i), rand(SHAPE, 200 + i)
        theirs = sched.step(
            m, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise, return_dict=False
        )
        assert theirs[0].dtype == theirs[1].dtype == F64
        ours = ref.ddim_step(
            m,
            t,
            x,
            schedule,
            prev_t=p,
            eta=eta,
            prediction_type=prediction_type,
            clip_sample=clip,
            dynamic_threshold=dyn,
            use_clipped_model_output=use_clipped,
            noise=noise,
        )
        torch.testing.assert_close(ours[1], theirs[1], **TIGHT)
        torch.testing.assert_close(ours[0], theirs[0], **TIGHT)


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_steps_match_diffusers_native_float32(monkeypatch, kind):
    """diffusers as shipped (its float32 schedule) on float32 inputs: agreement to float32 precision."""
    schedule, config = ours_and_config(kind)
    ddpm_sched = DDPMScheduler(**config, prediction_type="v_prediction", clip_sample=False)
    ddim_sched = DDIMScheduler(**config, prediction_type="v_prediction", clip_sample=False)
    ddim_sched.set_timesteps(20)
    for i, t in enumerate([950, 500, 50]):
        x, noise, m = (rand(SHAPE, 10 * i + k).float() for k in range(3))
        theirs = ddpm_with_noise(monkeypatch, ddpm_sched, noise, m, t, x)
        ours = ref.ddpm_step(m, t, x, schedule, prediction_type="v_prediction", noise=noise)
        assert ours[0].dtype == torch.float32
        torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=2e-5)
        theirs = ddim_sched.step(m, t, x, eta=0.5, variance_noise=noise, return_dict=False)
        ours = ref.ddim_step(m, t, x, schedule, prev_t=t - 50, eta=0.5, prediction_type="v_prediction", noise=noise)
        torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("final_alpha_one", [True, False])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_final_alpha_and_offset_match_diffusers(final_alpha_one, steps_offset, kind):
    schedule, config = ours_and_config(kind, final_alpha_one=final_alpha_one)
    sched = ddim(schedule, config, prediction_type="epsilon", clip_sample=False, steps_offset=steps_offset)
    N = 20
    sched.set_timesteps(N)
    ts, prevs = schedule.timesteps(N, "leading", steps_offset)
    assert torch.equal(sched.timesteps, ts)
    for i in (0, N - 2, N - 1):  # the last step goes to prev_t = -1
        t, p = int(ts[i]), int(prevs[i])
        x, noise, m = rand(SHAPE, i), rand(SHAPE, 100 + i), rand(SHAPE, 200 + i)
        theirs = sched.step(m, t, x, eta=0.7, variance_noise=noise, return_dict=False)
        ours = ref.ddim_step(m, t, x, schedule, prev_t=p, eta=0.7, noise=noise)
        torch.testing.assert_close(ours[0], theirs[0], **TIGHT)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_with_diffusers_zero_snr_v_prediction(eta):
    """Zero terminal SNR from t = 999 (alpha-bar 0): trailing spacing with N dividing T, where diffusers'
    t - T // N is the next timestep too."""
    schedule, config = ours_and_config("scaled_linear", rescale_zero_terminal_snr=True)
    sched = ddim(
        schedule,
        config,
        prediction_type="v_prediction",
        clip_sample=False,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    sched.set_timesteps(4)
    ts, prevs = schedule.timesteps(4, "trailing")
    assert ts.tolist() == [999, 749, 499, 249] and torch.equal(sched.timesteps, ts)
    for i, (t, p) in enumerate(zip(ts.tolist(), prevs.tolist())):
        x, m, noise = rand(SHAPE, i), rand(SHAPE, 10 + i), rand(SHAPE, 20 + i)
        theirs = sched.step(m, t, x, eta=eta, variance_noise=noise, return_dict=False)
        ours = ref.ddim_step(m, t, x, schedule, prev_t=p, eta=eta, prediction_type="v_prediction", noise=noise)
        torch.testing.assert_close(ours[0], theirs[0], **TIGHT)
        torch.testing.assert_close(ours[1], theirs[1], **TIGHT)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_trailing_and_linspace_follow_the_definition(spacing, prediction_type, eta):
    """diffusers' DDIM steps to t - T // N whatever the spacing (see the next test), so these spacings are
    checked against eq. 12 written out, with prev_t the next entry of the timestep sequence."""
    schedule, _ = ours_and_config("linear", rescale_zero_terminal_snr=False)
    ts, prevs = schedule.timesteps(7, spacing)
    for i, (t, p) in enumerate(zip(ts.tolist(), prevs.tolist())):
        x, noise, m = rand(SHAPE, i), rand(SHAPE, 100 + i), rand(SHAPE, 200 + i)
        expected = explicit_prev_ddim(m, t, x, schedule, p, eta, prediction_type, noise, clip=1.0)
        ours = ref.ddim_step(
            m, t, x, schedule, prev_t=p, eta=eta, prediction_type=prediction_type, clip_sample=1.0, noise=noise
        )
        torch.testing.assert_close(ours[0], expected[0], **TIGHT)
        torch.testing.assert_close(ours[1], expected[1], **TIGHT)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_eta_one_is_diffusers_ddpm_at_every_spacing(monkeypatch, spacing):
    """An independent oracle for the strided DDIM steps: with eta = 1, DDIM's step is DDPM's fixed_small
    posterior (same mean, same sigma), and DDPMScheduler does use the next timestep of the sequence. (The
    identity is algebraic: rounding differs, and the cosine schedule's tiny alpha-bar_999 would amplify it.)"""
    schedule, config = ours_and_config("scaled_linear")
    sched = ddpm(
        schedule,
        config,
        variance_type="fixed_small",
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing=spacing,
    )
    N = 9
    sched.set_timesteps(N)
    ts, prevs = schedule.timesteps(N, spacing)
    for i, (t, p) in enumerate(zip(ts.tolist(), prevs.tolist())):
        x, noise, m = rand(SHAPE, i), rand(SHAPE, 100 + i), rand(SHAPE, 200 + i)
        theirs = ddpm_with_noise(monkeypatch, sched, noise, m, t, x)
        ours = ref.ddim_step(m, t, x, schedule, prev_t=p, eta=1.0, noise=noise)
        if p == -1 and t > 0:  # DDIM's sigma is 0 there; DDPM's fixed_small variance is floored at 1e-20
            theirs = (theirs[0] - 1e-10 * noise, theirs[1])
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_diffusers_ddim_previous_timestep_is_wrong_for_trailing_and_linspace(spacing):
    """Documents diffusers' bug: DDIMScheduler.step uses prev = t - T // N for every spacing, which is not
    the next entry of its own timestep list for trailing and linspace spacing. Its result equals ours with
    that (wrong) prev_t, and differs from ours with the right one."""
    schedule, config = ours_and_config("linear")
    sched = ddim(schedule, config, clip_sample=False, timestep_spacing=spacing)
    N = 3
    sched.set_timesteps(N)
    ts, prevs = schedule.timesteps(N, spacing)
    assert torch.equal(sched.timesteps, ts)
    expected_lists = {"trailing": [999, 666, 332], "linspace": [999, 500, 0]}
    assert ts.tolist() == expected_lists[spacing]
    wrong_steps = 0
    for i, (t, p) in enumerate(zip(ts.tolist(), prevs.tolist())):
        diffusers_prev = t - T // N
        x, m = rand(SHAPE, i), rand(SHAPE, 10 + i)
        theirs = sched.step(m, t, x, return_dict=False)[0]
        torch.testing.assert_close(ref.ddim_step(m, t, x, schedule, prev_t=max(diffusers_prev, -1))[0], theirs, **TIGHT)
        if diffusers_prev != p and (diffusers_prev >= 0 or p >= 0):
            wrong_steps += 1
            assert not torch.allclose(ref.ddim_step(m, t, x, schedule, prev_t=p)[0], theirs)
    assert wrong_steps == {"trailing": 1, "linspace": 2}[spacing]  # 666 -> 333 (not 332); 999 -> 666, 500 -> 167


def test_ddim_draws_the_stream_only_with_eta():
    schedule, _ = ours_and_config()
    x, m = rand(SHAPE, 0), rand(SHAPE, 1)
    z = randn(SHAPE, 4, 2, dtype=F64)
    t, p = torch.tensor([999, 500, 20]), torch.tensor([899, 400, -1])
    assert torch.equal(
        ref.ddim_step(m, t, x, schedule, prev_t=p, eta=0.5, seed=4, offset=2)[0],
        ref.ddim_step(m, t, x, schedule, prev_t=p, eta=0.5, noise=z)[0],
    )
    assert torch.equal(
        ref.ddim_step(m, t, x, schedule, prev_t=p, seed=4)[0], ref.ddim_step(m, t, x, schedule, prev_t=p, seed=5)[0]
    )


def test_ddim_direction_coefficient_floored_at_zero():
    """Zero terminal SNR, eta = 1, the first step from t = 999 (alpha-bar 0): 1 - ab_prev - sigma^2 is 0 in
    exact arithmetic and can round below it, where diffusers' sqrt gives NaN (e.g. its float32 scheduler,
    trailing spacing, N = 10: step 999 -> 899, on some CPUs). Here the coefficient is 0:
    x_prev = sqrt(ab_prev) x0 + sigma z."""
    config = dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
    )
    sched = DDIMScheduler(**config)
    sched.set_timesteps(10)
    assert sched.timesteps[:2].tolist() == [999, 899]
    x, m, z = rand(SHAPE, 0).float(), rand(SHAPE, 1).float(), rand(SHAPE, 2).float()
    # diffusers' float32 coefficient is 0 or rounds below it (NaN everywhere) depending on the CPU's rounding of
    # its torch ops (both seen on x86 machines): where it is finite, ours must agree with it.
    theirs = sched.step(m, 999, x, eta=1.0, variance_noise=z).prev_sample

    schedule = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True)
    ab = schedule.alpha_cumprod(torch.arange(-1, 999))
    c = ref.ddim_coefficients(schedule.alpha_cumprod(999), ab, 1.0)
    assert bool((1 - ab - c["sigma"] ** 2 < 0).any())  # rounding does go below 0 in float64 too
    assert bool((c["eps_coef"] >= 0).all()) and float(c["eps_coef"].max()) < 1e-7  # sqrt of a rounding error
    for dtype in (torch.float32, F64):
        prev, x0 = ref.ddim_step(
            m.to(dtype),
            999,
            x.to(dtype),
            schedule,
            prev_t=899,
            eta=1.0,
            prediction_type="v_prediction",
            noise=z.to(dtype),
        )
        ab_prev = float(schedule.alphas_cumprod[899])
        expected = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * z.to(dtype)
        assert torch.isfinite(prev).all()
        torch.testing.assert_close(prev, expected, rtol=1e-6, atol=1e-6)
        if dtype == torch.float32 and torch.isfinite(theirs).all():  # its own float32 zero-SNR alpha-bars
            torch.testing.assert_close(prev, theirs, rtol=2e-3, atol=2e-3)


# ============================================================================================ guidance


def test_guidance_is_the_formula_on_the_plain_step(monkeypatch):
    schedule, config = ours_and_config("linear")
    x, noise = rand(SHAPE, 0), rand(SHAPE, 1)
    u, c = rand(SHAPE, 2), rand(SHAPE, 3)
    m2 = torch.cat([u, c])
    t = torch.tensor([999, 400, 3])
    p = torch.tensor([979, 380, -1])
    for s in (1.0, 7.5):
        combined = u + s * (c - u)
        for phi in (0.0, 0.7, 1.0):
            target = rescale_noise_cfg(combined, c, phi)  # diffusers' std rescale
            if phi == 0.0:
                assert torch.equal(target, combined)
            torch.testing.assert_close(ref.guide(m2, s, phi), target, **TIGHT)
            for pred in ("epsilon", "v_prediction"):
                torch.testing.assert_close(
                    ref.ddpm_step(
                        m2,
                        t,
                        x,
                        schedule,
                        prev_t=p,
                        prediction_type=pred,
                        noise=noise,
                        guidance_scale=s,
                        guidance_rescale=phi,
                        clip_sample=1.0,
                    ),
                    ref.ddpm_step(target, t, x, schedule, prev_t=p, prediction_type=pred, noise=noise, clip_sample=1.0),
                    **TIGHT,
                )
                torch.testing.assert_close(
                    ref.ddim_step(
                        m2,
                        t,
                        x,
                        schedule,
                        prev_t=p,
                        eta=0.5,
                        prediction_type=pred,
                        noise=noise,
                        guidance_scale=s,
                        guidance_rescale=phi,
                    ),
                    ref.ddim_step(target, t, x, schedule, prev_t=p, eta=0.5, prediction_type=pred, noise=noise),
                    **TIGHT,
                )
    # and through diffusers' step, as a pipeline would use it
    sched = ddpm(schedule, config, clip_sample=False)
    combined = rescale_noise_cfg(u + 5.0 * (c - u), c, 0.5)
    theirs = ddpm_with_noise(monkeypatch, sched, noise, combined, 600, x)
    torch.testing.assert_close(
        ref.ddpm_step(m2, 600, x, schedule, noise=noise, guidance_scale=5.0, guidance_rescale=0.5)[0],
        theirs[0],
        **TIGHT,
    )


def test_guidance_with_learned_range_takes_the_conditional_variance():
    schedule, _ = ours_and_config("cosine")
    x, noise = rand(SHAPE, 0), rand(SHAPE, 1)
    u, c = rand((3, 8, 5, 6), 2).clamp(-1, 1), rand((3, 8, 5, 6), 3).clamp(-1, 1)
    s, phi = 4.0, 0.5
    mean = rescale_noise_cfg(u[:, :4] + s * (c[:, :4] - u[:, :4]), c[:, :4], phi)
    target = torch.cat([mean, c[:, 4:]], 1)
    torch.testing.assert_close(
        ref.ddpm_step(
            torch.cat([u, c]),
            500,
            x,
            schedule,
            variance_type="learned_range",
            noise=noise,
            guidance_scale=s,
            guidance_rescale=phi,
        ),
        ref.ddpm_step(target, 500, x, schedule, variance_type="learned_range", noise=noise),
        **TIGHT,
    )


# ============================================================================================ loss


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_diffusion_loss_is_the_explicit_computation(prediction_type, snr_gamma, kind):
    schedule, config = ours_and_config(kind)
    x0, noise, m = rand(SHAPE, 0), rand(SHAPE, 1), rand(SHAPE, 2)
    t = torch.tensor([999, 450, 2])
    ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = {"epsilon": noise, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0, "sample": x0}[prediction_type]
    per_sample = ((target - m) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        # SNR against diffusers' compute_snr (which returns float32), then the min-SNR weights as diffusers'
        # training scripts write them.
        snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
        torch.testing.assert_close(
            compute_snr(inject(DDPMScheduler(**config), schedule), t), snr.float(), rtol=1e-6, atol=0
        )
        base = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        weight = {"epsilon": base / snr, "v_prediction": base / (snr + 1), "sample": base}[prediction_type]
        per_sample = per_sample * weight
    kw = dict(prediction_type=prediction_type, snr_gamma=snr_gamma)
    torch.testing.assert_close(
        ref.diffusion_loss(m, x0, t, schedule, noise=noise, reduction="none", **kw), per_sample, **TIGHT
    )
    loss = ref.diffusion_loss(m, x0, t, schedule, noise=noise, **kw)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, per_sample.mean(), **TIGHT)
    # the stream's noise when none is given: the eps that q_sample used for the same (seed, offset)
    eps = randn(SHAPE, 8, 1, dtype=F64)
    assert torch.equal(
        ref.diffusion_loss(m, x0, t, schedule, seed=8, offset=1, **kw),
        ref.diffusion_loss(m, x0, t, schedule, noise=eps, **kw),
    )
    if prediction_type == "v_prediction":
        v = ref.get_velocity(x0, t, schedule, seed=8, offset=1)
        assert ref.diffusion_loss(v, x0, t, schedule, seed=8, offset=1, **kw) == 0


def test_min_snr_epsilon_weight_at_zero_snr():
    schedule = NoiseSchedule("linear", num_train_timesteps=T, rescale_zero_terminal_snr=True)
    ab = schedule.alpha_cumprod(torch.tensor([999, 0]))
    w = ref.min_snr_weight(ab, "epsilon", 5.0)
    assert w[0] == 1.0 and w[1] == 5.0 / (ab[1] / (1 - ab[1]))
    assert ref.min_snr_weight(ab, "v_prediction", 5.0)[0] == 0 and ref.min_snr_weight(ab, "sample", 5.0)[0] == 0
    x0, m = rand(SHAPE, 0), rand(SHAPE, 1)
    assert torch.isfinite(ref.diffusion_loss(m, x0, torch.tensor([999, 999, 0]), schedule, snr_gamma=5.0))


# ============================================================================================ per-sample timesteps


def test_per_sample_timesteps_equal_single_timestep_results():
    schedule, _ = ours_and_config("scaled_linear")
    B = 4
    shape = (B, 2, 3, 5)
    x0, x, noise, m = rand(shape, 0), rand(shape, 1, 2.0), rand(shape, 2), rand(shape, 3)
    mv = torch.cat([m, rand(shape, 4).clamp(-1, 1)], 1)
    m2 = torch.cat([m, rand(shape, 5)])
    t = torch.tensor([999, 500, 0, 37])
    p = torch.tensor([900, 499, -1, 7])

    def per_sample(fn, batched):
        for b in range(B):
            one = fn(b)
            for got, want in zip(
                batched if isinstance(batched, tuple) else (batched,), one if isinstance(one, tuple) else (one,)
            ):
                torch.testing.assert_close(got[b : b + 1], want, **TIGHT)

    sl = lambda a, b: a[b : b + 1]  # noqa: E731
    per_sample(
        lambda b: ref.q_sample(sl(x0, b), int(t[b]), schedule, noise=sl(noise, b)),
        ref.q_sample(x0, t, schedule, noise=noise),
    )
    per_sample(
        lambda b: ref.get_velocity(sl(x0, b), int(t[b]), schedule, noise=sl(noise, b)),
        ref.get_velocity(x0, t, schedule, noise=noise),
    )
    for pred in PREDICTIONS:
        losses = ref.diffusion_loss(
            m, x0, t, schedule, noise=noise, prediction_type=pred, snr_gamma=3.0, reduction="none"
        )
        per_sample(
            lambda b: ref.diffusion_loss(
                sl(m, b),
                sl(x0, b),
                int(t[b]),
                schedule,
                noise=sl(noise, b),
                prediction_type=pred,
                snr_gamma=3.0,
                reduction="none",
            ),
            losses,
        )
    for vt, mo in (("fixed_small", m), ("fixed_large", m), ("learned_range", mv)):
        per_sample(
            lambda b: ref.ddpm_step(
                sl(mo, b),
                int(t[b]),
                sl(x, b),
                schedule,
                variance_type=vt,
                noise=sl(noise, b),
                dynamic_threshold=(0.7, 1.8),
            ),
            ref.ddpm_step(mo, t, x, schedule, variance_type=vt, noise=noise, dynamic_threshold=(0.7, 1.8)),
        )
        per_sample(
            lambda b: ref.ddpm_step(
                sl(mo, b), int(t[b]), sl(x, b), schedule, prev_t=int(p[b]), variance_type=vt, noise=sl(noise, b)
            ),
            ref.ddpm_step(mo, t, x, schedule, prev_t=p, variance_type=vt, noise=noise),
        )
    per_sample(
        lambda b: ref.ddim_step(
            sl(m, b),
            int(t[b]),
            sl(x, b),
            schedule,
            prev_t=int(p[b]),
            eta=0.8,
            noise=sl(noise, b),
            prediction_type="v_prediction",
            clip_sample=1.5,
        ),
        ref.ddim_step(
            m, t, x, schedule, prev_t=p, eta=0.8, noise=noise, prediction_type="v_prediction", clip_sample=1.5
        ),
    )
    # guidance: the unconditional and conditional rows of sample b are b and B + b
    per_sample(
        lambda b: ref.ddim_step(
            torch.cat([sl(m2, b), sl(m2, B + b)]),
            int(t[b]),
            sl(x, b),
            schedule,
            prev_t=int(p[b]),
            noise=sl(noise, b),
            guidance_scale=6.0,
            guidance_rescale=0.7,
        ),
        ref.ddim_step(m2, t, x, schedule, prev_t=p, noise=noise, guidance_scale=6.0, guidance_rescale=0.7),
    )
    # an int t and a 0-dim tensor t are the same
    assert torch.equal(
        ref.q_sample(x0, torch.tensor(5), schedule, noise=noise), ref.q_sample(x0, 5, schedule, noise=noise)
    )
    # int32 timesteps work like int64
    assert torch.equal(
        ref.ddim_step(m, t.int(), x, schedule, prev_t=p.int())[0], ref.ddim_step(m, t, x, schedule, prev_t=p)[0]
    )


# ============================================================================================ dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_dtypes(dtype):
    schedule, _ = ours_and_config()
    x0, x, m = rand(SHAPE, 0), rand(SHAPE, 1), rand(SHAPE, 2)
    t, p = torch.tensor([999, 300, 1]), torch.tensor([950, 250, 0])
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    # rounding of the inputs is the only difference from float64 beyond the compute precision
    c = lambda a: a.to(dtype)  # noqa: E731
    r = lambda a: a.to(dtype).double()  # noqa: E731
    cases = [
        (ref.q_sample(c(x0), t, schedule, seed=1), ref.q_sample(r(x0), t, schedule, seed=1)),
        (
            ref.diffusion_loss(c(m), c(x0), t, schedule, seed=1, prediction_type="v_prediction"),
            ref.diffusion_loss(r(m), r(x0), t, schedule, seed=1, prediction_type="v_prediction"),
        ),
        (
            ref.ddpm_step(c(m), t, c(x), schedule, prev_t=p, seed=1, prediction_type="v_prediction")[0],
            ref.ddpm_step(r(m), t, r(x), schedule, prev_t=p, seed=1, prediction_type="v_prediction")[0],
        ),
        (
            ref.ddim_step(c(m), t, c(x), schedule, prev_t=p, eta=1.0, seed=1, dynamic_threshold=(0.9, 2.0))[0],
            ref.ddim_step(r(m), t, r(x), schedule, prev_t=p, eta=1.0, seed=1, dynamic_threshold=(0.9, 2.0))[0],
        ),
    ]
    for got, want in cases:
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, float(want.abs().max())))


# ============================================================================================ bad input


def _step_inputs():
    schedule = NoiseSchedule(num_train_timesteps=100)
    return schedule, rand((2, 3, 4), 0), rand((2, 3, 4), 1)


BAD_DDPM = [
    (dict(t=100), ValueError, "t must be in"),
    (dict(t=-1), ValueError, "t must be in"),
    (dict(t=1.0), TypeError, "t must be"),
    (dict(t=True), TypeError, "t must be"),
    (dict(t=torch.tensor([1.0, 2.0])), TypeError, "t must be"),
    (dict(t=torch.tensor([1, 2, 3])), ValueError, "t must be"),
    (dict(t=torch.tensor([[1, 2]])), ValueError, "t must be"),
    (dict(t=torch.tensor([1, 100])), ValueError, "t must be in"),
    (dict(t=5, prev_t=5), ValueError, "prev_t"),
    (dict(t=5, prev_t=-2), ValueError, "prev_t"),
    (dict(t=torch.tensor([5, 6]), prev_t=torch.tensor([4, 6])), ValueError, "prev_t"),
    (dict(prev_t=torch.tensor([1.0, 2.0])), TypeError, "prev_t"),
    (dict(variance_type="learned"), ValueError, "variance_type"),
    (dict(prediction_type="eps"), ValueError, "prediction_type"),
    (dict(prediction_type=None), TypeError, "prediction_type"),
    (dict(variance_type="learned_range"), ValueError, "model_output"),  # needs 2C channels
    (dict(guidance_scale=7.5), ValueError, "model_output"),  # needs batch 2B
    (dict(guidance_rescale=0.5), ValueError, "guidance_rescale"),
    (dict(guidance_scale=7.5, guidance_rescale=1.5), ValueError, "guidance_rescale"),
    (dict(guidance_scale="7.5"), TypeError, "guidance_scale"),
    (dict(clip_sample=0.0), ValueError, "clip_sample"),
    (dict(clip_sample=1.0, dynamic_threshold=(0.9, 1.0)), ValueError, "clip_sample and dynamic_threshold"),
    (dict(dynamic_threshold=0.9), TypeError, "dynamic_threshold"),
    (dict(dynamic_threshold=(1.5, 1.0)), ValueError, "dynamic_threshold ratio"),
    (dict(dynamic_threshold=(0.9, -1.0)), ValueError, "dynamic_threshold max_value"),
    (dict(noise=torch.zeros(2, 3, 5, dtype=F64)), ValueError, "noise"),
    (dict(noise=torch.zeros(2, 3, 4)), TypeError, "noise"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(offset=1.5), TypeError, "offset"),
    (dict(schedule="linear"), TypeError, "schedule"),
    (dict(sample=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "sample"),
    (dict(model_output=torch.zeros(2, 3, 4)), TypeError, "model_output"),
    (dict(model_output=torch.zeros(2, 3, 5, dtype=F64)), ValueError, "model_output"),
    (dict(sample=torch.tensor(1.0, dtype=F64)), ValueError, "sample"),
]


@pytest.mark.parametrize("overrides,exc,match", BAD_DDPM, ids=[m for _, _, m in BAD_DDPM])
def test_bad_ddpm_and_ddim_arguments(overrides, exc, match):
    schedule, x, m = _step_inputs()
    args = dict(model_output=m, t=5, sample=x, schedule=schedule)
    args.update(overrides)
    ddim_only = {"variance_type"}
    kw = {k: v for k, v in args.items() if k not in ("model_output", "t", "sample", "schedule")}
    with pytest.raises(exc, match=match):
        ref.ddpm_step(args["model_output"], args["t"], args["sample"], args["schedule"], **kw)
    with pytest.raises(exc, match=match):
        ref.check_ddpm_args(args["model_output"], args["t"], args["sample"], args["schedule"], **kw)
    if not ddim_only & kw.keys():
        kw.setdefault("prev_t", -1)
        with pytest.raises(exc, match=match):
            ref.ddim_step(args["model_output"], args["t"], args["sample"], args["schedule"], **kw)


def test_bad_ddim_only_arguments():
    schedule, x, m = _step_inputs()
    with pytest.raises(ValueError, match="prev_t"):
        ref.ddim_step(m, 5, x, schedule)
    with pytest.raises(ValueError, match="prev_t"):
        ref.check_ddim_args(m, 5, x, schedule)
    with pytest.raises(ValueError, match="eta"):
        ref.ddim_step(m, 5, x, schedule, prev_t=2, eta=-0.1)
    with pytest.raises(TypeError, match="eta"):
        ref.ddim_step(m, 5, x, schedule, prev_t=2, eta=None)
    with pytest.raises(TypeError, match="use_clipped_model_output"):
        ref.ddim_step(m, 5, x, schedule, prev_t=2, use_clipped_model_output=1)
    with pytest.raises(TypeError, match="variance_type"):
        ref.ddim_step(m, 5, x, schedule, prev_t=2, variance_type="fixed_small")  # not a DDIM argument
    # check_values=False skips reading the timestep values (for device tensors), not the other checks
    ref.check_ddim_args(m, torch.tensor([100, 100]), x, schedule, prev_t=torch.tensor([200, 200]), check_values=False)
    with pytest.raises(ValueError, match="eta"):
        ref.check_ddim_args(m, torch.tensor([1, 2]), x, schedule, prev_t=-1, eta=-1.0, check_values=False)


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (dict(t=1000), ValueError, "t must be in"),
        (dict(t=torch.tensor([1, 2])), ValueError, "t must be"),
        (dict(x0=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "x0"),
        (dict(x0=torch.tensor(0.5, dtype=F64)), ValueError, "x0"),
        (dict(noise=torch.zeros(3, 5, dtype=F64)), ValueError, "noise"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(schedule=None), TypeError, "schedule"),
    ],
)
def test_bad_q_sample_and_velocity_arguments(overrides, exc, match):
    args = dict(x0=rand((3, 4), 0), t=torch.tensor([1, 2, 3]), schedule=NoiseSchedule())
    args.update(overrides)
    kw = {k: v for k, v in args.items() if k not in ("x0", "t", "schedule")}
    for fn in (ref.q_sample, ref.get_velocity, ref.check_q_sample_args, ref.check_velocity_args):
        with pytest.raises(exc, match=match):
            fn(args["x0"], args["t"], args["schedule"], **kw)


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (dict(model_output=rand((3, 5), 1)), ValueError, "model_output"),
        (dict(model_output=torch.zeros(3, 4)), TypeError, "model_output"),
        (dict(prediction_type="x0"), ValueError, "prediction_type"),
        (dict(snr_gamma=0.0), ValueError, "snr_gamma"),
        (dict(snr_gamma="5"), TypeError, "snr_gamma"),
        (dict(reduction="sum"), ValueError, "reduction"),
        (dict(t=-1), ValueError, "t must be in"),
    ],
)
def test_bad_loss_arguments(overrides, exc, match):
    args = dict(model_output=rand((3, 4), 1), x0=rand((3, 4), 0), t=torch.tensor([1, 2, 3]), schedule=NoiseSchedule())
    args.update(overrides)
    kw = {k: v for k, v in args.items() if k not in ("model_output", "x0", "t", "schedule")}
    for fn in (ref.diffusion_loss, ref.check_loss_args):
        with pytest.raises(exc, match=match):
            fn(args["model_output"], args["x0"], args["t"], args["schedule"], **kw)
