"""Property tests of the diffusion family: q_sample, diffusion_loss, ddpm_step, ddim_step, the flow-matching ops and
the sigma-space steps, cpu against the reference (strategies and the comparison rule in test_properties.py).

Ops that draw noise from (seed, offset) are compared with the reference given that stream's normals as made by
the cpu backend (genkern.randn(..., backend="cpu")): the cpu op must read exactly those stream elements, and the
normals themselves are checked against the exact Box-Muller in test_properties.test_randn.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from test_properties import (
    DTYPES,
    ELEMENTWISE,
    REDUCTION,
    both,
    check,
    dims,
    examples,
    magnitude,
    seed_or_offset,
    tensor,
)

import genkern
from genkern.diffusion import reference as spec
from genkern.diffusion.schedules import NoiseSchedule

pytestmark = pytest.mark.skipif("cpu" not in genkern.backends(), reason="needs the compiled cpu backend")

SCHEDULES = (
    NoiseSchedule("cosine", num_train_timesteps=1000),
    NoiseSchedule("linear", num_train_timesteps=7),
    NoiseSchedule("scaled_linear", num_train_timesteps=50, rescale_zero_terminal_snr=True),  # ab = 0 at T - 1
)
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _setup(data, extreme, *, min_ndim=1, channels=False, finite=False, min_batch=0):
    """(schedule, dtype, shape, x) with x (B, ...) and the timesteps t (an int, a 0-d or a (B,) tensor)."""
    schedule = data.draw(st.sampled_from(SCHEDULES), label="schedule")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    ndim = data.draw(st.integers(max(min_ndim, 2 if channels else 1), 4), label="ndim")
    shape = dims(data, ndim, label="shape")
    shape = (max(shape[0], min_batch), *shape[1:])
    T = schedule.num_train_timesteps
    t_step = st.one_of(st.sampled_from((0, T - 1)), st.integers(0, T - 1))
    kind = data.draw(st.sampled_from(("int", "0-d", "per-sample")), label="t kind")
    if kind == "per-sample":
        t = torch.tensor(
            data.draw(st.lists(t_step, min_size=shape[0], max_size=shape[0]), label="t"), dtype=torch.int64
        )
    else:
        t = data.draw(t_step, label="t")
        t = torch.tensor(t) if kind == "0-d" else t
    return schedule, dtype, shape, t


def _t_max(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.tensor(t)


def _noise_for(data, shape, dtype, extreme):
    """(noise or None, seed, offset, the noise the reference gets)."""
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    if data.draw(st.booleans(), label="noise given"):
        noise = tensor(data, shape, dtype, label="noise", extreme=extreme)
        return noise, seed, offset, noise
    return None, seed, offset, genkern.randn(shape, seed=seed, offset=offset, dtype=dtype, backend="cpu")


# The per-sample coefficients come from the schedule's float32 table on every backend, but not always from the
# same column (the kernels take sqrt(ab) from the table's rounded root, the reference's step the root of the
# rounded ab, in float64): they agree to a few float32 roundings, so float64 data agrees to float32 precision
# in the coefficients (as tests/test_diffusion.py's table_tol says): a relative 2^-21 of the terms.
COEFFICIENTS = 2.0**-21


def _per_sample_coefficients(schedule, t, shape) -> torch.Tensor:
    """max(1/sqrt(ab_t), 1/sqrt(1 - ab_t)) per sample, broadcast over a sample: how much a prediction's
    rounding is amplified (inf at ab = 0, where the result is inf or NaN on both sides)."""
    ab = schedule.alpha_cumprod(_t_max(t)).double()
    c = torch.maximum(ab.rsqrt(), (1.0 - ab).rsqrt()).nan_to_num(1e300, 1e300)
    c = c.expand(shape[0]) if c.dim() == 0 else c
    return c.reshape(shape[0], *([1] * (len(shape) - 1)))


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_q_sample(data, extreme):
    schedule, dtype, shape, t = _setup(data, extreme)
    x0 = tensor(data, shape, dtype, label="x0", extreme=extreme).requires_grad_(True)
    noise, seed, offset, ref_noise = _noise_for(data, shape, dtype, extreme)
    if noise is not None:
        noise.requires_grad_(True)
    (cpu, cpu_g, _), (ref, ref_g, _) = both(
        lambda b, x, n: genkern.q_sample(
            x,
            t,
            schedule,
            noise=n if b == "cpu" or noise is not None else ref_noise,
            seed=seed,
            offset=offset,
            backend=b,
        ),  # fmt: skip
        [x0, noise],
        grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed"),
    )
    # Both read the float32 table's coefficients: a sum of two rounded products.
    check(cpu[0], ref[0], ELEMENTWISE, magnitude(x0, ref_noise), what="x_t")  # the same two table entries
    for name, a, e in zip(("x0", "noise"), cpu_g, ref_g):
        check(a, e, ELEMENTWISE, what=f"grad {name}")


def _loss(data, extreme, *, finite, min_batch):
    schedule, dtype, shape, t = _setup(data, extreme, min_batch=min_batch)
    x0 = tensor(data, shape, dtype, label="x0", extreme=extreme, finite=finite)
    model_output = tensor(data, shape, dtype, label="model_output", extreme=extreme, finite=finite, scale=2.0)
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    noise = tensor(data, shape, dtype, label="noise", extreme=extreme, finite=finite)
    if not data.draw(st.booleans(), label="noise given"):
        noise = None
    ref_noise = (
        noise if noise is not None else genkern.randn(shape, seed=seed, offset=offset, dtype=dtype, backend="cpu")
    )
    kwargs = dict(
        prediction_type=data.draw(st.sampled_from(PREDICTIONS), label="prediction"),
        snr_gamma=data.draw(st.sampled_from((None, 0.5, 5.0)), label="snr_gamma"),
        reduction=data.draw(st.sampled_from(("none", "mean")), label="reduction"),
    )
    # The terms: (target - m)^2 with target a combination of x0 and eps (coefficients <= 1).
    terms = (magnitude(x0) + magnitude(ref_noise) + magnitude(model_output)) ** 2
    n = max(1, terms[0].numel()) if shape[0] else 1
    mag = terms.reshape(shape[0], terms[0].numel() if shape[0] else 0).sum(1) / n
    if kwargs["reduction"] == "mean":
        mag = mag.mean() if shape[0] else torch.zeros((), dtype=torch.float64)
    return schedule, dtype, shape, t, x0, model_output, noise, ref_noise, seed, offset, kwargs, mag


@examples(200)
@given(data=st.data(), extreme=st.booleans())
def test_diffusion_loss(data, extreme):
    schedule, dtype, shape, t, x0, m, noise, ref_noise, seed, offset, kwargs, mag = _loss(
        data, extreme, finite=False, min_batch=0
    )
    for x in (x0, m) + ((noise,) if noise is not None else ()):
        x.requires_grad_(True)
    (cpu, cpu_g, w), (ref, ref_g, _) = both(
        lambda b, mo, x, nz: genkern.diffusion_loss(
            mo,
            x,
            t,
            schedule,
            noise=nz if b == "cpu" or noise is not None else ref_noise,
            seed=seed,
            offset=offset,
            backend=b,
            **kwargs,
        ),  # fmt: skip
        [m, x0, noise],
        grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed"),
    )
    # A mean of non-negative terms: relative rounding, plus the cancellation in target - m.
    check(cpu[0], ref[0], REDUCTION, mag, extra=COEFFICIENTS * mag, what="loss")
    g = magnitude(w[0]).reshape(-1, *([1] * (len(shape) - 1))) if w[0].dim() else magnitude(w[0])
    gmag = g * (magnitude(x0) + magnitude(ref_noise) + magnitude(m))
    for name, a, e in zip(("model_output", "x0", "noise"), cpu_g, ref_g):
        check(a, e, ELEMENTWISE, gmag, extra=COEFFICIENTS * gmag, what=f"grad {name}")


@examples(120)
@given(data=st.data(), extreme=st.booleans())
def test_diffusion_loss_spec(data, extreme):
    """The cpu op against the spec (genkern.diffusion.reference), NaN, inf and empty batches included. The
    spec takes its coefficients from the float64 schedule, the ops from its float32 table: equal for float32
    data (the spec rounds them to the data's dtype), so this runs in float32."""
    schedule, dtype, shape, t, x0, m, noise, ref_noise, seed, offset, kwargs, mag = _loss(
        data, extreme, finite=False, min_batch=0
    )
    if dtype != torch.float32:
        x0, m, ref_noise = x0.float(), m.float(), ref_noise.float()
        noise = None if noise is None else noise.float()
    got = genkern.diffusion_loss(m, x0, t, schedule, noise=noise, seed=seed, offset=offset, backend="cpu", **kwargs)
    expected = spec.diffusion_loss(m, x0, t, schedule, noise=ref_noise, **kwargs)
    # min-SNR weights: float64 in the spec, from the float32 table in the kernel (a few float32 roundings).
    check(got, expected, REDUCTION, mag, extra=COEFFICIENTS * mag, what="loss")


def _step_setup(data, extreme, kind):
    learned = kind == "ddpm" and data.draw(st.booleans(), label="learned_range")
    schedule, dtype, shape, t = _setup(data, extreme, channels=learned)
    threshold = data.draw(st.sampled_from(("none", "clip", "dynamic")), label="threshold")
    finite = False
    sample = tensor(data, shape, dtype, label="sample", extreme=extreme, finite=finite)
    guidance = data.draw(st.sampled_from((None, 1.0, 7.5, -2.0)), label="guidance_scale")
    rescale = data.draw(st.sampled_from((0.0, 0.7, 1.0)), label="guidance_rescale") if guidance is not None else 0.0
    m_shape = [shape[0] * (2 if guidance is not None else 1), *shape[1:]]
    if learned:
        m_shape[1] *= 2
    model_output = tensor(data, m_shape, dtype, label="model_output", extreme=extreme, finite=finite)
    if learned:  # the variance half interpolates log-variances: v in [-1, 1]
        v = model_output[:, shape[1] :]
        model_output = torch.cat([model_output[:, : shape[1]], v.clamp(-1, 1) if not extreme else v], dim=1)
    options = dict(
        prediction_type=data.draw(st.sampled_from(PREDICTIONS), label="prediction"),
        clip_sample=data.draw(st.sampled_from((1.0, 0.5)), label="clip") if threshold == "clip" else None,
        dynamic_threshold=(
            (data.draw(st.sampled_from((0.0, 0.5, 0.995, 1.0)), label="ratio"), data.draw(st.sampled_from((1.0, 1.5))))
            if threshold == "dynamic"
            else None
        ),
        guidance_scale=guidance,
        guidance_rescale=rescale,
        return_pred_original=data.draw(st.booleans(), label="return_pred_original"),
    )
    if learned:
        options["variance_type"] = "learned_range"
    elif kind == "ddpm":
        options["variance_type"] = data.draw(st.sampled_from(("fixed_small", "fixed_large")), label="variance")
    T = schedule.num_train_timesteps
    t_tensor = _t_max(t)
    top = int(t_tensor.min()) if t_tensor.numel() else 0
    prev_t = None
    if kind == "ddim" or data.draw(st.booleans(), label="prev_t given"):
        if kind == "ddpm" and top == 0:
            prev_t = None
        else:
            prev_t = data.draw(st.integers(-1, max(-1, min(top - 1, T - 2))), label="prev_t")
    if kind == "ddim":
        options["eta"] = data.draw(st.sampled_from((0.0, 0.3, 1.0, 1.5)), label="eta")
        options["use_clipped_model_output"] = data.draw(st.booleans(), label="use_clipped_model_output")
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    noise = (
        tensor(data, shape, dtype, label="noise", extreme=extreme, finite=finite) if data.draw(st.booleans()) else None
    )
    ref_noise = (
        noise if noise is not None else genkern.randn(shape, seed=seed, offset=offset, dtype=dtype, backend="cpu")
    )
    # Rounding of the prediction is amplified by the per-sample coefficients (up to 1/sqrt(ab) each in
    # x0_hat and in eps_hat) and by the guidance scale.
    B = shape[0]
    mo = magnitude(model_output)
    mo = mo[:B] + mo[B:] if guidance is not None else mo
    mo = mo[:, : shape[1]] if learned else mo
    coef = _per_sample_coefficients(schedule, t, shape)
    mag = coef * coef * (1.0 + 2.0 * abs(guidance or 0.0)) * (magnitude(sample) + magnitude(ref_noise) + mo)
    # learned_range: sigma = exp(log_var / 2), log_var = f log beta' + (1 - f) log var_small with f = (v + 1) / 2:
    # float32 roundings of the coefficients' logs move sigma by a relative ~|f| (|log| <= 46) of them.
    v = magnitude(model_output[B:] if guidance is not None else model_output)[:, shape[1] :] if learned else None
    options["_sigma"] = 1.0 + 46.0 * (1.0 + v) if learned else torch.ones(())
    return schedule, dtype, shape, t, prev_t, sample, model_output, noise, ref_noise, seed, offset, options, mag


def _run_step(op, data, extreme, kind):
    schedule, dtype, shape, t, prev_t, sample, m, noise, ref_noise, seed, offset, options, mag = _step_setup(
        data, extreme, kind
    )
    sigma = options.pop("_sigma")
    (cpu, _, _), (ref, _, _) = both(
        lambda b, mo, x: op(
            mo,
            t,
            x,
            schedule,
            prev_t=prev_t,
            noise=noise if b == "cpu" else ref_noise,
            seed=seed,
            offset=offset,
            backend=b,
            **options,
        ),  # fmt: skip
        [m, sample],
    )
    # Per-sample coefficients in float64 from the float32 table on both sides; the prediction's rounding is
    # amplified by them (mag); the guidance rescale and dynamic threshold take per-sample reductions (std,
    # quantile) first.
    factor = REDUCTION * 4 if options["guidance_rescale"] or options["dynamic_threshold"] else REDUCTION
    check(cpu[0], ref[0], factor, mag, extra=COEFFICIENTS * (mag + sigma * magnitude(ref[0])), what="prev_sample")
    if options["return_pred_original"]:
        check(cpu[1], ref[1], factor, mag, extra=COEFFICIENTS * mag, what="pred_original")
    else:
        assert cpu[1] is None and ref[1] is None


@examples(200)
@given(data=st.data(), extreme=st.booleans())
def test_ddpm_step(data, extreme):
    _run_step(genkern.ddpm_step, data, extreme, "ddpm")


@examples(200)
@given(data=st.data(), extreme=st.booleans())
def test_ddim_step(data, extreme):
    _run_step(genkern.ddim_step, data, extreme, "ddim")


def test_diffusion_loss_op_reference_follows_the_spec():
    """The op's reference backend gives what genkern.diffusion.reference.diffusion_loss gives: NaN for a
    NaN model output, inf for an overflowing one, a (0,) tensor for an empty batch (it zeroed NaN with
    nan_to_num and failed on an empty batch before)."""
    schedule = SCHEDULES[0]
    x0, m = torch.zeros(2, 3), torch.tensor([[float("nan"), 0.0, 0.0], [1e30, 0.0, 0.0]])
    noise = torch.zeros(2, 3)
    got = genkern.diffusion_loss(m, x0, 5, schedule, noise=noise, reduction="none", backend="reference")
    expected = spec.diffusion_loss(m, x0, 5, schedule, noise=noise, reduction="none")
    torch.testing.assert_close(got, expected, equal_nan=True)
    empty = genkern.diffusion_loss(
        torch.zeros(0, 3), torch.zeros(0, 3), 5, schedule, seed=0, reduction="none", backend="reference"
    )
    assert empty.shape == (0,)


# ------------------------------------------------------------------ flow matching and the sigma-space steps
FLOW_SIGMAS = (0.0, 1.0, 1e-3, 0.5, 0.999)
K_SIGMAS = (0.0, 1e-3, 0.03, 1.0, 14.6, 80.0)


def _sigmas(data, B, pool, label):
    """A number, a 0-d tensor or per-sample float32 values from `pool` (or uniform in its range)."""
    value = st.one_of(st.sampled_from(pool), st.floats(min(pool), max(pool), width=32))
    kind = data.draw(st.sampled_from(("number", "0-d", "per-sample")), label=f"{label} kind")
    if kind == "per-sample":
        return torch.tensor(data.draw(st.lists(value, min_size=B, max_size=B), label=label), dtype=torch.float32)
    v = data.draw(value, label=label)
    return torch.tensor(v, dtype=torch.float32) if kind == "0-d" else v


def _flow_setup(data, extreme):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = dims(data, data.draw(st.integers(1, 4), label="ndim"))
    x0 = tensor(data, shape, dtype, label="x0", extreme=extreme).requires_grad_(True)
    noise, seed, offset, ref_noise = _noise_for(data, shape, dtype, extreme)
    return dtype, shape, x0, noise, seed, offset, ref_noise, _sigmas(data, shape[0], FLOW_SIGMAS, "sigma")


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_flow_sample(data, extreme):
    dtype, shape, x0, noise, seed, offset, ref_noise, sigma = _flow_setup(data, extreme)
    (cpu, cpu_g, _), (ref, ref_g, _) = both(
        lambda b, x: genkern.flow_sample(
            x, sigma, noise=noise if b == "cpu" else ref_noise, seed=seed, offset=offset, backend=b
        ),
        [x0],
        grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed"),
    )
    check(cpu[0], ref[0], ELEMENTWISE, magnitude(x0, ref_noise), what="x_sigma")
    check(cpu_g[0], ref_g[0], ELEMENTWISE, what="grad x0")


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_flow_matching_loss(data, extreme):
    dtype, shape, x0, noise, seed, offset, ref_noise, sigma = _flow_setup(data, extreme)
    m = tensor(data, shape, dtype, label="model_output", extreme=extreme).requires_grad_(True)
    weighting = data.draw(st.sampled_from(("none", "sigma_sqrt", "cosmap")), label="weighting")
    (cpu, cpu_g, _), (ref, ref_g, _) = both(
        lambda b, mo, x: genkern.flow_matching_loss(
            mo,
            x,
            sigma,
            noise=noise if b == "cpu" else ref_noise,
            seed=seed,
            offset=offset,
            weighting=weighting,
            backend=b,
        ),  # fmt: skip
        [m, x0],
        grad_seed=data.draw(st.integers(0, 2**31 - 1), label="grad seed"),
    )
    terms = (magnitude(x0) + magnitude(ref_noise) + magnitude(m)) ** 2
    n = max(1, terms[0].numel()) if shape[0] else 1
    mag = terms.reshape(shape[0], -1).sum(1) / n if shape[0] else torch.zeros(0, dtype=torch.float64)
    weight = genkern.diffusion.reference.flow_weight(
        genkern.diffusion.reference._sigmas(sigma, x0), weighting
    ).double()  # the weight is float32 on both sides: rounded once more where it multiplies
    check(cpu[0], ref[0], REDUCTION, mag * weight.abs().nan_to_num(0.0, 0.0, 0.0), what="loss")
    for name, a, e in zip(("model_output", "x0"), cpu_g, ref_g):
        check(a, e, REDUCTION, what=f"grad {name}")


def _sigma_step_setup(data, extreme, kind):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = dims(data, data.draw(st.integers(1, 4), label="ndim"))
    B = shape[0]
    pool = FLOW_SIGMAS if kind == "flow_euler" else K_SIGMAS
    sigma = _sigmas(data, B, pool, "sigma")
    sigma_next = _sigmas(data, B, pool, "sigma_next")
    sample = tensor(data, shape, dtype, label="sample", extreme=extreme)
    guidance = data.draw(st.sampled_from((None, 1.0, 7.5, -2.0)), label="guidance_scale")
    rescale = data.draw(st.sampled_from((0.0, 0.7, 1.0)), label="guidance_rescale") if guidance is not None else 0.0
    m_shape = (B * (2 if guidance is not None else 1), *shape[1:])
    m = tensor(data, m_shape, dtype, label="model_output", extreme=extreme)
    options = dict(guidance_scale=guidance, guidance_rescale=rescale, return_pred_original=True)
    if kind != "flow_euler":
        options["prediction_type"] = data.draw(st.sampled_from(PREDICTIONS), label="prediction")
    draws = kind == "euler_ancestral" or (kind == "flow_euler" and data.draw(st.booleans(), label="stochastic"))
    if kind == "flow_euler":
        options["stochastic"] = draws
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    noise = tensor(data, shape, dtype, label="noise", extreme=extreme) if data.draw(st.booleans()) else None
    ref_noise = (
        noise if noise is not None else genkern.randn(shape, seed=seed, offset=offset, dtype=dtype, backend="cpu")
    )
    if draws:
        options.update(seed=seed, offset=offset)
    mo = magnitude(m)
    mo = mo[:B] + mo[B:] if guidance is not None else mo
    return sample, m, sigma, sigma_next, noise if draws else None, ref_noise if draws else None, options, mo


def _per_sample(sigma, B, dtype):
    s = torch.as_tensor(sigma, dtype=torch.float32).double().reshape(-1).expand(B)
    return s.reshape(-1, *([1] * (len(dtype) - 1))) if isinstance(dtype, tuple) else s


def _run_sigma_step(op, data, extreme, kind):
    sample, m, sigma, sigma_next, noise, ref_noise, options, mo = _sigma_step_setup(data, extreme, kind)
    shape = tuple(sample.shape)
    extra_args = {} if noise is None and ref_noise is None else None
    (cpu, _, _), (ref, _, _) = both(
        lambda b, mo_, x: op(
            mo_,
            sigma,
            sigma_next,
            x,
            backend=b,
            **({} if extra_args is not None else {"noise": noise if b == "cpu" else ref_noise}),
            **options,
        ),  # fmt: skip
        [m, sample],
    )
    # The terms and their amplification: x0_hat = x - sigma m (or the v form, or m); the Euler slope divides by
    # sigma and multiplies by the step (|dt| <= sigma + sigma_next); guidance scales the model output.
    s, s_next = _per_sample(sigma, shape[0], shape), _per_sample(sigma_next, shape[0], shape)
    g = 1.0 + 2.0 * abs(options["guidance_scale"] or 0.0)
    x_mag = magnitude(sample)
    x0_mag = x_mag + (s + 1.0) * g * mo
    if kind == "flow_euler":
        step_mag = x_mag + (s + s_next) * g * mo + x0_mag + magnitude(ref_noise if ref_noise is not None else sample)
    else:
        slope = (x_mag + x0_mag) / s  # inf at sigma = 0: both sides are inf or NaN there, or exact
        step_mag = (
            x_mag
            + slope.nan_to_num(1e300, 1e300) * (s + s_next)
            + (magnitude(ref_noise) * s_next if ref_noise is not None else 0.0)
        )
    factor = REDUCTION * 4 if options["guidance_rescale"] else REDUCTION
    # The rescale factors are float32 per-sample values on every backend (as the DDPM/DDIM steps'): float64
    # data gets them to float32 precision.
    rescaled = options["guidance_rescale"] != 0.0
    check(cpu[0], ref[0], factor, step_mag, extra=COEFFICIENTS * step_mag if rescaled else None, what="prev_sample")
    check(cpu[1], ref[1], factor, x0_mag, extra=COEFFICIENTS * x0_mag if rescaled else None, what="pred_original")


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_flow_euler_step(data, extreme):
    _run_sigma_step(genkern.flow_euler_step, data, extreme, "flow_euler")


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_euler_step(data, extreme):
    _run_sigma_step(genkern.euler_step, data, extreme, "euler")


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_euler_ancestral_step(data, extreme):
    _run_sigma_step(genkern.euler_ancestral_step, data, extreme, "euler_ancestral")


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_heun_step(data, extreme):
    """Both halves of HeunDiscreteScheduler.step: the Euler half returns x' and writes the slope d into the
    caller's buffer; the second half (origin given) averages d with the slope at x'."""
    sample, m, sigma, sigma_next, _, _, options, mo = _sigma_step_setup(data, extreme, "heun")
    del options["return_pred_original"]
    shape = tuple(sample.shape)
    second = data.draw(st.booleans(), label="second half")
    derivative0 = tensor(data, shape, sample.dtype, label="derivative", extreme=extreme, allow_expand=False)
    origin = tensor(data, shape, sample.dtype, label="origin", extreme=extreme) if second else None
    buffers = {}

    def run(b, mo_, x):
        buffers[b] = d = derivative0.contiguous().clone()
        return genkern.heun_step(mo_, sigma, sigma_next, x, d, origin=origin, backend=b, **options)

    (cpu, _, _), (ref, _, _) = both(run, [m, sample])
    s, s_next = _per_sample(sigma, shape[0], shape), _per_sample(sigma_next, shape[0], shape)
    g = 1.0 + 2.0 * abs(options["guidance_scale"] or 0.0)
    x_mag = magnitude(sample)
    x0_mag = x_mag + (s + 1.0) * g * mo
    slope = ((x_mag + x0_mag) / s).nan_to_num(1e300, 1e300)  # inf at sigma = 0: inf or NaN on both sides
    if second:
        step_mag = magnitude(origin) + (magnitude(derivative0) + slope) * (s + s_next)
    else:
        step_mag = x_mag + slope * (s + s_next)
    rescaled = options["guidance_rescale"] != 0.0
    factor = REDUCTION * 4 if rescaled else REDUCTION
    check(cpu[0], ref[0], factor, step_mag, extra=COEFFICIENTS * step_mag if rescaled else None, what="sample")
    d_mag = slope if not second else buffers["reference"].abs()
    check(buffers["cpu"], buffers["reference"], factor, d_mag, what="derivative")


DPM_SCHEDULE = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_dpm_solver_step(data, extreme):
    """One DPM-Solver++ step (1st or 2nd order, midpoint or heun, ODE or SDE) of a real sigma table, a step
    index per sample; prev_sample and the history it overwrites with this step's data prediction."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = dims(data, data.draw(st.integers(1, 4), label="ndim"))
    B = shape[0]
    n = data.draw(st.sampled_from((1, 2, 5, 20)), label="num_steps")
    sigma_schedule = data.draw(st.sampled_from((None, "karras", "exponential")), label="sigma_schedule")
    final_sigma = data.draw(st.sampled_from(("zero", "sigma_min")), label="final_sigma")
    sigmas, _ = genkern.diffusion.dpm_solver_sigmas(DPM_SCHEDULE, n, sigma_schedule=sigma_schedule,
                                                    final_sigma=final_sigma)  # fmt: skip
    steps = data.draw(st.lists(st.integers(0, n - 1), min_size=B, max_size=B), label="steps")
    step = torch.tensor(steps, dtype=torch.int64) if data.draw(st.booleans(), label="per-sample steps") else None
    if step is None:
        step = data.draw(st.integers(0, n - 1), label="step")
        steps = [step] * B
    sample = tensor(data, shape, dtype, label="sample", extreme=extreme)
    history0 = tensor(data, shape, dtype, label="history", extreme=extreme, allow_expand=False).contiguous()
    guidance = data.draw(st.sampled_from((None, 1.0, 7.5, -2.0)), label="guidance_scale")
    rescale = data.draw(st.sampled_from((0.0, 0.7)), label="guidance_rescale") if guidance is not None else 0.0
    m = tensor(data, (B * (2 if guidance is not None else 1), *shape[1:]), dtype, label="model_output",
               extreme=extreme)  # fmt: skip
    sde = data.draw(st.booleans(), label="sde")
    options = dict(
        prediction_type=data.draw(st.sampled_from(PREDICTIONS), label="prediction"),
        solver_type=data.draw(st.sampled_from(("midpoint", "heun")), label="solver_type"),
        solver_order=data.draw(st.sampled_from((1, 2)), label="solver_order"),
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        final_first_order=final_sigma == "zero" or data.draw(st.booleans(), label="final_first_order"),
        guidance_scale=guidance,
        guidance_rescale=rescale,
        dynamic_threshold=data.draw(st.sampled_from((None, (0.995, 1.0), (0.9, 3.0))), label="threshold"),
    )
    seed, offset = seed_or_offset(data), seed_or_offset(data, "offset")
    noise = tensor(data, shape, dtype, label="noise", extreme=extreme) if sde and data.draw(st.booleans()) else None
    ref_noise = noise if noise is not None or not sde else genkern.randn(shape, seed=seed, offset=offset, dtype=dtype)
    histories = {}

    def run(b, mo_, x):
        histories[b] = h = history0.clone()
        return genkern.dpm_solver_step(mo_, sigmas, step, x, h, noise=noise if b == "cpu" else ref_noise,
                                       seed=seed, offset=offset, backend=b, **options)  # fmt: skip

    (cpu, _, _), (ref, _, _) = both(run, [m, sample])
    # The terms' sizes: x0_hat from the model output (eps: x sqrt(s^2 + 1) - s m; v and sample: at most |x| + |m|),
    # combined with the history as D0 + D1 / 2, D1 = (D0 - history) / r with 1/r = h / h0 from the table; the
    # sample enters with sigma_t / sigma_s <= 1 and the data terms with alpha_t (1 - e^-h) <= 1.
    s64 = sigmas.double()
    idx = torch.tensor(steps, dtype=torch.int64)
    s, t, s1 = s64[idx], s64[idx + 1], s64[(idx - 1).clamp(min=0)]
    inv_r = torch.where(idx > 0, torch.log(s / t) / torch.log(s1 / s), torch.ones(())).nan_to_num(0.0, 1e300, 0.0)
    view = (B, *([1] * (len(shape) - 1)))
    s, inv_r = s.reshape(view), inv_r.abs().reshape(view)
    mo = magnitude(m)
    mo = (mo[:B] + mo[B:]) * (1.0 + 2.0 * abs(guidance)) if guidance is not None else mo
    x_mag = magnitude(sample)
    x0_mag = x_mag * (s * s + 1).sqrt() + (s + 1.0) * mo
    step_mag = x_mag + (2.0 + 2.0 * inv_r) * (x0_mag + magnitude(history0))
    if sde:
        step_mag = step_mag + magnitude(ref_noise)
    rescaled = rescale != 0.0
    factor = REDUCTION * 4 if rescaled or options["dynamic_threshold"] else REDUCTION
    extra = COEFFICIENTS * step_mag  # the table's coefficients: float32 on every backend, rounded alike or not
    check(cpu[0], ref[0], factor, step_mag, extra=extra, what="prev_sample")
    check(histories["cpu"], histories["reference"], factor, x0_mag, extra=COEFFICIENTS * x0_mag, what="history")


def _unipc_gain(sigmas: torch.Tensor, steps: list[int], solver_type: str, orders: tuple, options: dict):
    """Per sample, the sum of |coefficients| that multiply the step's terms (the sample, the history's three
    slots, x0_hat): UniC's ratio, ah and aB (rho0 / rk + rho1), then UniP's ratio times that, ah and aB / rk,
    from the reference's float64 coefficients of the float32 table (non-finite ones as 0)."""
    s = sigmas.double()
    last = s.shape[0] - 2
    i = torch.tensor(steps, dtype=torch.int64).clamp(0, last)
    p_second = (i > 0) & (orders[0] == 2)
    if options["final_first_order"]:
        p_second = p_second & (i != last)
    c_second = (i > 1) & (orders[1] == 2)
    at = lambda k: s[k.clamp(0, last + 1)]  # noqa: E731
    flow = options["flow_sigmas"]
    c = spec.unipc_coefficients(at(i - 2), at(i - 1), at(i), solver_type, c_second, True, flow)
    p = spec.unipc_coefficients(at(i - 1), at(i), at(i + 1), solver_type, p_second, False, flow)
    finite = lambda v: v.abs().nan_to_num(0.0, 0.0, 0.0)  # noqa: E731
    corrected = (
        1.0
        + finite(c["ratio"])
        + finite(c["ah"])
        + finite(c["aB"]) * (2 * finite(c["rho0"]) * finite(1 / c["rk"]) + 2 * finite(c["rho1"]))
    )
    corrected = torch.where((i > 0) & options["use_corrector"], corrected, torch.ones(()))
    p_term = torch.where(p_second, finite(p["aB"]) * finite(1 / p["rk"]), torch.zeros(()))
    return finite(p["ratio"]) * corrected + finite(p["ah"]) + p_term + 1.0


@examples(150)
@given(data=st.data(), extreme=st.booleans())
def test_unipc_step(data, extreme):
    """One UniPC step (corrector and predictor of order 1 or 2, bh1 or bh2, with or without the corrector) of a
    real sigma table (variance-preserving, or its flow-matching counterpart s / (s + 1)), a step index per sample;
    the next sample and the history it overwrites."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = dims(data, data.draw(st.integers(1, 4), label="ndim"))
    B = shape[0]
    n = data.draw(st.sampled_from((1, 2, 5, 20)), label="num_steps")
    sigma_schedule = data.draw(st.sampled_from((None, "karras", "exponential")), label="sigma_schedule")
    final_sigma = data.draw(st.sampled_from(("zero", "sigma_min")), label="final_sigma")
    sigmas, _ = genkern.diffusion.unipc_sigmas(DPM_SCHEDULE, n, sigma_schedule=sigma_schedule,
                                               final_sigma=final_sigma)  # fmt: skip
    flow = data.draw(st.booleans(), label="flow_sigmas")
    if flow:
        sigmas = (sigmas.double() / (sigmas.double() + 1)).float()
    steps = data.draw(st.lists(st.integers(0, n - 1), min_size=B, max_size=B), label="steps")
    step = torch.tensor(steps, dtype=torch.int64) if data.draw(st.booleans(), label="per-sample steps") else None
    if step is None:
        step = data.draw(st.integers(0, n - 1), label="step")
        steps = [step] * B
    order = data.draw(st.sampled_from((1, 2)), label="solver_order")
    corrector_order = data.draw(st.sampled_from((1, order)), label="corrector_order")
    sample = tensor(data, shape, dtype, label="sample", extreme=extreme)
    history0 = tensor(data, (order + 1, *shape), dtype, label="history", extreme=extreme, allow_expand=False)
    history0 = history0.contiguous()
    guidance = data.draw(st.sampled_from((None, 1.0, 7.5, -2.0)), label="guidance_scale")
    rescale = data.draw(st.sampled_from((0.0, 0.7)), label="guidance_rescale") if guidance is not None else 0.0
    m = tensor(data, (B * (2 if guidance is not None else 1), *shape[1:]), dtype, label="model_output",
               extreme=extreme)  # fmt: skip
    solver_type = data.draw(st.sampled_from(("bh1", "bh2")), label="solver_type")
    options = dict(
        prediction_type=data.draw(st.sampled_from((*PREDICTIONS, "flow_prediction")), label="prediction"),
        solver_type=solver_type,
        solver_order=order,
        corrector_order=corrector_order,
        # a second-order predictor into a final sigma of 0 divides by rk = 0 (diffusers too): lower_order_final
        final_first_order=final_sigma == "zero" or data.draw(st.booleans(), label="final_first_order"),
        use_corrector=data.draw(st.booleans(), label="use_corrector"),
        flow_sigmas=flow,
        guidance_scale=guidance,
        guidance_rescale=rescale,
        dynamic_threshold=data.draw(st.sampled_from((None, (0.995, 1.0), (0.9, 3.0))), label="threshold"),
    )
    histories = {}

    def run(b, mo_, x):
        histories[b] = h = history0.clone()
        return genkern.unipc_step(mo_, sigmas, step, x, h, backend=b, **options)

    (cpu, _, _), (ref, _, _) = both(run, [m, sample])
    # The terms' sizes: x0_hat from the model output (eps: x sqrt(s^2 + 1) - s m; v and sample: at most |x| + |m|),
    # the corrected sample and the prediction from it, the history, each times its coefficients' sizes.
    s64 = sigmas.double()
    idx = torch.tensor(steps, dtype=torch.int64)
    view = (B, *([1] * (len(shape) - 1)))
    s = s64[idx].reshape(view)
    mo = magnitude(m)
    mo = (mo[:B] + mo[B:]) * (1.0 + 2.0 * abs(guidance)) if guidance is not None else mo
    x_mag = magnitude(sample)
    alpha, sigma_vp = spec.unipc_alpha_sigma(s, flow)
    # every prediction type's x0_hat bound (eps, v, sample, flow), summed
    x0_mag = (x_mag + sigma_vp * mo) / alpha + alpha * x_mag + sigma_vp * mo + mo + x_mag + s * mo
    gain = _unipc_gain(sigmas, steps, solver_type, (order, corrector_order), options).reshape(view)
    terms = x_mag + x0_mag + magnitude(*history0.unbind(0))
    step_mag = gain * terms
    rescaled = rescale != 0.0
    factor = REDUCTION * 4 if rescaled or options["dynamic_threshold"] else REDUCTION
    extra = COEFFICIENTS * step_mag  # the coefficients: float32 on every backend, rounded alike or not
    check(cpu[0], ref[0], factor, step_mag, extra=extra, what="prev_sample")
    slot_mag = torch.stack([step_mag, x0_mag.expand(shape), terms.expand(shape)][: order + 1])
    check(histories["cpu"], histories["reference"], factor, slot_mag, extra=COEFFICIENTS * slot_mag, what="history")
