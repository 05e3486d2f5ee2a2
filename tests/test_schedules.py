"""genkern.diffusion.schedules.NoiseSchedule: betas and alpha-bar against diffusers' schedulers, inference timesteps
against their set_timesteps for every spacing and offset, the float32 lookup table, and bad arguments."""

import math

import numpy as np
import pytest
import torch

from genkern.diffusion.schedules import NoiseSchedule, rescale_zero_terminal_snr

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test oracle for the noise schedules")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale  # noqa: E402

# (our beta_schedule, diffusers' beta_schedule, beta_start/beta_end)
SCHEDULES = [
    ("linear", "linear", {}),
    ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("cosine", "squaredcos_cap_v2", {}),
]
SCHEDULE_IDS = [s[0] for s in SCHEDULES]


def test_diffusers_builds_its_schedules_in_float32():
    """Why the comparisons below are at float32 precision: diffusers' betas and cumulative product are
    float32 (trained_betas too), while ours are float64."""
    for cls in (DDPMScheduler, DDIMScheduler):
        for _, name, kw in SCHEDULES:
            s = cls(beta_schedule=name, **kw)
            assert s.betas.dtype == torch.float32 and s.alphas_cumprod.dtype == torch.float32
    assert DDPMScheduler(trained_betas=[0.1, 0.2]).betas.dtype == torch.float32


@pytest.mark.parametrize("ours,theirs,kw", SCHEDULES, ids=SCHEDULE_IDS)
@pytest.mark.parametrize("T", [1000, 37])
def test_betas_and_alphas_cumprod_match_diffusers(ours, theirs, kw, T):
    s = NoiseSchedule(ours, num_train_timesteps=T, **kw)
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float64
    assert s.betas.device.type == "cpu" and s.num_train_timesteps == T
    for cls in (DDPMScheduler, DDIMScheduler):
        d = cls(num_train_timesteps=T, beta_schedule=theirs, **kw)
        if ours == "cosine":
            # diffusers evaluates the cosine betas in Python floats, then rounds them to float32.
            assert torch.equal(s.betas.float(), d.betas)
        else:
            # its float32 linspace is within an ulp or two of the float64 one.
            torch.testing.assert_close(s.betas, d.betas.double(), rtol=3e-7, atol=0)
        # float32 cumprod over T factors.
        torch.testing.assert_close(s.alphas_cumprod, d.alphas_cumprod.double(), rtol=0, atol=2e-6)
        torch.testing.assert_close(s.alphas, d.alphas.double(), rtol=0, atol=1e-7)
    # In float64 the definitions hold to rounding.
    torch.testing.assert_close(s.alphas, 1.0 - s.betas, rtol=0, atol=0)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1.0 - s.betas, 0), rtol=1e-14, atol=0)


def test_linear_schedules_in_float64():
    s = NoiseSchedule("linear", num_train_timesteps=11, beta_start=0.001, beta_end=0.011)
    torch.testing.assert_close(
        s.betas, torch.tensor([0.001 + 0.001 * i for i in range(11)], dtype=torch.float64), rtol=1e-13, atol=0
    )
    s = NoiseSchedule("scaled_linear", num_train_timesteps=3, beta_start=0.01, beta_end=0.09)
    torch.testing.assert_close(s.betas, torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64), rtol=1e-13, atol=0)


def test_cosine_schedule_is_the_formula():
    T, s_ = 50, 0.008
    f = lambda t: math.cos(((t / T + s_) / (1 + s_)) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(NoiseSchedule("cosine", num_train_timesteps=T).betas, expected, rtol=1e-14, atol=0)
    assert NoiseSchedule("cosine", num_train_timesteps=T).betas[-1] == 0.999  # the cap


@pytest.mark.parametrize("ours,theirs,kw", SCHEDULES, ids=SCHEDULE_IDS)
def test_zero_terminal_snr_matches_diffusers(ours, theirs, kw):
    s = NoiseSchedule(ours, rescale_zero_terminal_snr=True, **kw)
    plain = NoiseSchedule(ours, **kw)
    # diffusers' rescale function is dtype-generic: on our float64 betas it must agree to rounding.
    torch.testing.assert_close(s.betas, diffusers_rescale(plain.betas), rtol=1e-12, atol=1e-15)
    # Its float32 scheduler: alpha-bar to float32 precision (the recovered betas lose more to cancellation).
    d = DDPMScheduler(beta_schedule=theirs, rescale_betas_zero_snr=True, **kw)
    torch.testing.assert_close(s.alphas_cumprod, d.alphas_cumprod.double(), rtol=0, atol=2e-6)
    # Lin et al.: alpha-bar_{T-1} = 0 (beta = 1), alpha-bar_0 unchanged.
    assert s.alphas_cumprod[-1] == 0.0 and s.betas[-1] == 1.0
    torch.testing.assert_close(s.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(
        s.alphas_cumprod.sqrt(),
        (plain.alphas_cumprod.sqrt() - plain.alphas_cumprod[-1].sqrt())
        * plain.alphas_cumprod[0].sqrt()
        / (plain.alphas_cumprod[0].sqrt() - plain.alphas_cumprod[-1].sqrt()),
        rtol=1e-12,
        atol=1e-15,
    )


def test_explicit_betas_override_the_named_schedule():
    betas = [0.1, 0.2, 0.3, 0.4]
    for given in (betas, np.array(betas), torch.tensor(betas, dtype=torch.float64), torch.tensor(betas)):
        s = NoiseSchedule("cosine", betas=given)
        assert s.num_train_timesteps == 4
        exact = (
            torch.tensor(betas, dtype=torch.float64)
            if not (isinstance(given, torch.Tensor) and given.dtype == torch.float32)
            else given.double()
        )
        assert torch.equal(s.betas, exact)
        torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - exact, 0), rtol=1e-15, atol=0)
    assert NoiseSchedule(betas=betas, num_train_timesteps=4).num_train_timesteps == 4
    d = DDPMScheduler(num_train_timesteps=4, trained_betas=betas)
    torch.testing.assert_close(NoiseSchedule(betas=betas).alphas_cumprod, d.alphas_cumprod.double(), rtol=1e-6, atol=0)
    # Rescaling applies to explicit betas too.
    torch.testing.assert_close(
        NoiseSchedule(betas=betas, rescale_zero_terminal_snr=True).betas,
        rescale_zero_terminal_snr(torch.tensor(betas, dtype=torch.float64)),
        rtol=0,
        atol=0,
    )


def test_properties_are_copies_and_final_alpha():
    s = NoiseSchedule(num_train_timesteps=10)
    s.betas[0] = 0.5
    s.alphas_cumprod[0] = 0.5
    assert s.betas[0] == 1e-4 and s.alphas_cumprod[0] == 1 - 1e-4
    assert s.final_alpha_cumprod == 1.0 and s.final_alpha_one
    s = NoiseSchedule(num_train_timesteps=10, final_alpha_one=False)
    assert s.final_alpha_cumprod == float(s.alphas_cumprod[0])
    assert DDIMScheduler(set_alpha_to_one=False).final_alpha_cumprod == DDIMScheduler().alphas_cumprod[0]


@pytest.mark.parametrize("final_alpha_one", [True, False])
def test_table_layout_and_cache(final_alpha_one):
    s = NoiseSchedule(
        "scaled_linear", num_train_timesteps=20, beta_start=0.00085, beta_end=0.012, final_alpha_one=final_alpha_one
    )
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        table = s.table(device)
        assert table.dtype == torch.float32 and table.shape == (21, 4) and table.device.type == device
        assert table[0, 0].item() == (1.0 if final_alpha_one else s.alphas_cumprod[0].float().item())
        ab = s.alphas_cumprod
        expected = torch.stack((ab, 1 - ab, ab.sqrt(), (1 - ab).sqrt()), 1).float()
        assert torch.equal(table[1:].cpu(), expected)
        assert s.table(device) is table  # cached per device
        assert s.table(torch.device(device)) is table
        # index with t + 1, t in [-1, T)
        t = torch.tensor([-1, 0, 7, 19], device=device)
        assert torch.equal(table[t + 1, 0].cpu(), s.alpha_cumprod(t).float().cpu())
    assert s.table() is s.table("cpu")


def test_alpha_cumprod_lookup():
    s = NoiseSchedule(num_train_timesteps=10, final_alpha_one=False)
    ab = s.alphas_cumprod
    assert s.alpha_cumprod(3).dtype == torch.float64 and s.alpha_cumprod(3).dim() == 0
    assert s.alpha_cumprod(3) == ab[3] and s.alpha_cumprod(-1) == ab[0] and s.alpha_cumprod(np.int64(9)) == ab[9]
    t = torch.tensor([[0, -1], [9, 4]], dtype=torch.int32)
    assert torch.equal(s.alpha_cumprod(t), torch.stack([ab[[0, 0]], ab[[9, 4]]]))
    assert NoiseSchedule(num_train_timesteps=10).alpha_cumprod(-1) == 1.0
    for bad in (10, -2, torch.tensor([0, 10]), torch.tensor([-2])):
        with pytest.raises(ValueError, match="t must be in"):
            s.alpha_cumprod(bad)
    for bad in (1.0, torch.tensor([1.0]), True, torch.tensor([True])):
        with pytest.raises(TypeError, match="t must be"):
            s.alpha_cumprod(bad)


# ------------------------------------------------------------------------------------------- timesteps

STEP_COUNTS = [1, 3, 7, 10, 50, 61, 333, 999, 1000]


def _diffusers_timesteps(cls, T, N, spacing, steps_offset):
    d = cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
    d.set_timesteps(N)
    return d.timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("T", [1000, 999])
def test_timesteps_match_diffusers(spacing, steps_offset, T):
    s = NoiseSchedule(num_train_timesteps=T)
    for N in [n for n in STEP_COUNTS if n <= T]:
        if spacing == "leading" and (N - 1) * (T // N) + steps_offset >= T:
            with pytest.raises(ValueError, match="steps_offset"):
                s.timesteps(N, spacing, steps_offset)
            continue
        ts, prev = s.timesteps(N, spacing, steps_offset)
        assert ts.dtype == prev.dtype == torch.int64 and ts.shape == prev.shape == (N,)
        assert bool((ts[:-1] > ts[1:]).all()) and 0 <= int(ts[-1]) and int(ts[0]) < T
        assert torch.equal(prev, torch.cat([ts[1:], torch.tensor([-1])]))
        for cls in (DDPMScheduler, DDIMScheduler):
            theirs = _diffusers_timesteps(cls, T, N, spacing, steps_offset)
            # diffusers' trailing list can have an extra -1 at the end (see the next test).
            assert torch.equal(ts, theirs[:N]), (cls.__name__, N)


def test_timesteps_formulas():
    s = NoiseSchedule(num_train_timesteps=1000)
    assert s.timesteps(4, "leading", 1)[0].tolist() == [751, 501, 251, 1]
    assert s.timesteps(3, "trailing")[0].tolist() == [999, 666, 332]
    assert s.timesteps(3, "linspace")[0].tolist() == [999, 500, 0]  # 499.5 rounds half to even
    assert s.timesteps(16, "trailing")[0][:2].tolist() == [999, 937]  # 937.5 -> 938 - 1
    assert s.timesteps(1000, "trailing")[0].tolist() == list(range(999, -1, -1))
    assert s.timesteps(1, "linspace")[0].tolist() == [0]
    assert s.timesteps(1, "trailing")[0].tolist() == [999]
    assert s.timesteps(3, "trailing", steps_offset=5)[0].tolist() == [999, 666, 332]  # offset: leading only


def test_diffusers_trailing_timesteps_can_have_an_extra_minus_one():
    """diffusers' trailing spacing is np.round(np.arange(T, 0, -T/N)) - 1; float rounding of the length
    gives N + 1 entries for some N, the last one -1 (which its DDIM step would then index alpha-bar with)."""
    T, N = 1000, 61
    theirs = _diffusers_timesteps(DDIMScheduler, T, N, "trailing", 0)
    assert len(theirs) == N + 1 and int(theirs[-1]) == -1
    ts, prev = NoiseSchedule(num_train_timesteps=T).timesteps(N, "trailing")
    assert len(ts) == N and int(ts[-1]) == round(T / N) - 1 and int(prev[-1]) == -1


# ------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"beta_schedule": "quadratic"}, ValueError, "beta_schedule"),
        ({"beta_schedule": "squaredcos_cap_v2"}, ValueError, "cosine"),
        ({"beta_schedule": 3}, TypeError, "beta_schedule"),
        ({"num_train_timesteps": 0}, ValueError, "num_train_timesteps"),
        ({"num_train_timesteps": 10.0}, TypeError, "num_train_timesteps"),
        ({"beta_start": -1e-4}, ValueError, "beta_start"),
        ({"beta_start": 0.0}, ValueError, "beta_start"),
        ({"beta_end": 1.0}, ValueError, "beta_end"),
        ({"beta_end": float("nan")}, ValueError, "beta_end"),
        ({"beta_start": "0.1"}, TypeError, "beta_start"),
        ({"beta_start": 0.03, "beta_end": 0.02}, ValueError, "beta_start"),
        ({"betas": [[0.1, 0.2]]}, ValueError, "betas"),
        ({"betas": []}, ValueError, "betas"),
        ({"betas": [0.1, 0.0]}, ValueError, "betas"),
        ({"betas": [0.1, 1.5]}, ValueError, "betas"),
        ({"betas": ["a"]}, TypeError, "betas"),
        ({"betas": [0.1, 0.2], "num_train_timesteps": 3}, ValueError, "num_train_timesteps"),
        ({"betas": [0.1], "rescale_zero_terminal_snr": True}, ValueError, "rescale_zero_terminal_snr"),
        ({"rescale_zero_terminal_snr": 1}, TypeError, "rescale_zero_terminal_snr"),
        ({"final_alpha_one": None}, TypeError, "final_alpha_one"),
    ],
)
def test_bad_schedule_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        NoiseSchedule(**kwargs)


@pytest.mark.parametrize(
    "args,exc,name",
    [
        ((0,), ValueError, "num_steps"),
        ((11,), ValueError, "num_steps"),
        ((2.0,), TypeError, "num_steps"),
        ((5, "uniform"), ValueError, "spacing"),
        ((5, None), TypeError, "spacing"),
        ((5, "leading", -1), ValueError, "steps_offset"),
        ((10, "leading", 1), ValueError, "steps_offset"),  # first timestep would be 10 = T
        ((5, "leading", 1.0), TypeError, "steps_offset"),
    ],
)
def test_bad_timesteps_arguments(args, exc, name):
    with pytest.raises(exc, match=name):
        NoiseSchedule(num_train_timesteps=10).timesteps(*args)


def test_repr():
    assert repr(NoiseSchedule()) == (
        "NoiseSchedule('linear', beta_start=0.0001, beta_end=0.02, "
        "num_train_timesteps=1000; alpha-bar 0.9999 -> 4.03583e-05)"
    )
    r = repr(NoiseSchedule("cosine", num_train_timesteps=10, rescale_zero_terminal_snr=True, final_alpha_one=False))
    assert r.startswith(
        "NoiseSchedule('cosine', num_train_timesteps=10, rescale_zero_terminal_snr=True, final_alpha_one=False;"
    ) and r.endswith("-> 0)")
    assert "betas=<custom>" in repr(NoiseSchedule(betas=[0.1, 0.2]))
