"""The multistep solvers' steps as torch ops: `genkern::dpm_solver_step` (DPM-Solver++ 1 and 2M, ODE and SDE;
docs/math.md 5.3) and `genkern::unipc_step` (UniPC bh1/bh2 of order 1 and 2, 5.5).

The step of sample b is the step index step[b] of a loop whose float32 sigma table `sigmas` (num_steps + 1
k-diffusion sigmas, the final one last) lives on the data's device: the kernel reads sigmas[i - 1], sigmas[i]
and sigmas[i + 1] and computes alpha, sigma and lambda there, so a loop passes the same table at every step and
a captured CUDA graph replays with new step indices. The solver's history (the previous data prediction) is a
tensor the caller owns: the kernel reads it and overwrites it with this step's data prediction in the same
pass (the op mutates `history`). Checks, reference body, kernel registration and fake follow _ops.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _checks, _native
from .. import backend as _backend
from .._kernels import to_unsigned
from . import _ops
from . import reference as ref

DPM_SOLVER_TYPES = ref.DPM_SOLVER_TYPES  # the kernels' codes 0, 1 (gk::diffusion::DpmSolverType)


def _check_sigma_table(sigmas, like: Tensor) -> None:
    if isinstance(sigmas, Tensor) and sigmas.dtype != torch.float32:
        raise TypeError(f"sigmas must be a float32 tensor (dpm_solver_sigmas' table), got {sigmas.dtype}")
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2 or sigmas.device != like.device:
        got = (
            f"dtype {sigmas.dtype}, shape {tuple(sigmas.shape)} on {sigmas.device}"
            if isinstance(sigmas, Tensor)
            else type(sigmas).__name__
        )
        raise ValueError(
            f"sigmas must be a float32 (num_steps + 1,) tensor (num_steps >= 1) on {like.device}, got {got}"
        )  # fmt: skip


def _check_dpm_solver_step(
    model_output, sample, history, sigmas, step, noise, seed, offset, prediction, solver_type, solver_order, sde,
    final_first_order, guidance_scale, guidance_rescale, dynamic_ratio, dynamic_max,
) -> None:  # fmt: skip
    _ops._check_code("prediction", prediction, _ops.PREDICTIONS)
    _ops._check_code("solver_type", solver_type, DPM_SOLVER_TYPES)
    if solver_order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2, got {solver_order}")
    _ops._check_batched("sample", sample)
    try:
        ref._check_model_output(model_output, sample, guidance_scale is not None, False)
    except ValueError as exc:
        raise ValueError(f"{exc}, for sample of shape {tuple(sample.shape)}") from None
    _checks.like("history", history, "sample", sample)
    if not history.is_contiguous():
        raise ValueError("history must be contiguous (the kernel writes it in place)")
    _check_sigma_table(sigmas, sample)
    _ops._check_timesteps("step", step, sample, 0, sigmas.shape[0] - 2)
    _ops._check_noise(noise, "sample", sample)
    if noise is not None and not sde:
        raise ValueError("noise is the SDE variant's (sde=True)")
    ref.check_guidance(guidance_scale, guidance_rescale)
    ref.check_threshold(None, None if dynamic_ratio is None else (dynamic_ratio, dynamic_max))


def _step_rows(sigmas: Tensor, step: Tensor, solver_order: int, final_first_order: bool):
    """(sigma_s1, sigma_s0, sigma_t, second) of each sample, as gk::diffusion::dpm_coefficients reads them."""
    last = sigmas.shape[0] - 2
    i = step.clamp(0, last)
    second = (i > 0) & (solver_order == 2)
    if final_first_order:
        second = second & (i != last)
    return sigmas[(i - 1).clamp(min=0)], sigmas[i], sigmas[i + 1], second


@torch.library.custom_op("genkern::dpm_solver_step", mutates_args=("history",))
def dpm_solver_step(
    model_output: Tensor,
    sample: Tensor,
    history: Tensor,
    sigmas: Tensor,
    step: Tensor,
    noise: Optional[Tensor],
    seed: int,
    offset: int,
    prediction: int,
    solver_type: int,
    solver_order: int,
    sde: bool,
    final_first_order: bool,
    guidance_scale: Optional[float],
    guidance_rescale: float,
    dynamic_ratio: Optional[float],
    dynamic_max: float,
) -> Tensor:
    """x_t of step step[b] of each sample; history (sample's shape) holds x0_hat of the step before and is
    overwritten with this step's. prediction: a PREDICTIONS code; solver_type: a DPM_SOLVER_TYPES code;
    solver_order 1 or 2 (first order on step 0, and on the last step with final_first_order); sde: the
    SDE-DPM-Solver++ step, its noise `noise` or the genkern stream for (seed, offset). Guidance as sigma_step;
    dynamic_ratio: Imagen's dynamic thresholding of x0_hat (with dynamic_max)."""
    args = (model_output, sample, history, sigmas, step, noise, seed, offset, prediction, solver_type, solver_order)
    extra = (sde, final_first_order, guidance_scale, guidance_rescale, dynamic_ratio, dynamic_max)
    _check_dpm_solver_step(*args, *extra)
    s1, s0, t, second = _step_rows(sigmas, step, solver_order, final_first_order)
    prev, x0 = ref.dpm_solver_update(
        model_output, sample, history, s1, s0, t, second, prediction_type=_ops.PREDICTIONS[prediction],
        solver_type=DPM_SOLVER_TYPES[solver_type], sde=sde, noise=noise, seed=to_unsigned(seed),
        offset=to_unsigned(offset), guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        dynamic_threshold=None if dynamic_ratio is None else (dynamic_ratio, dynamic_max),
    )  # fmt: skip
    history.copy_(x0)
    return prev.contiguous()


def _dpm_thresholds(model_output, sample, sigmas, step, prediction, scale, rescale, ratio, max_value) -> Tensor:
    """Each sample's dynamic threshold clamp(quantile(|x0_hat|, ratio), 1, max_value), float32 (B,): a pre-pass
    computing x0_hat as the kernel does (guidance, rescale, prediction) before thresholding."""
    B = sample.shape[0]
    ct = _ops._compute_dtype(sample)
    x = sample.to(ct).reshape(B, -1)
    if scale is not None:
        m, _ = _ops._guided_prediction(model_output, B, False, scale)
        m = m if rescale is None else m * rescale.to(ct)[:, None]
    else:
        m = model_output.to(ct).reshape(B, -1)
    alpha, sigma, _ = ref.dpm_alpha_sigma_lambda(sigmas[step.clamp(0, sigmas.shape[0] - 2)].to(ct))
    x0 = ref.dpm_predict_x0(m, x, alpha, sigma, _ops.PREDICTIONS[prediction])
    return _ops._quantile_rows(x0.abs(), ratio).clamp(min=1.0, max=max_value).float().contiguous()


@_ops.KERNELS.register(dpm_solver_step, check=_check_dpm_solver_step)
def _(kernels, model_output, sample, history, sigmas, step, noise, seed, offset, prediction, solver_type,
      solver_order, sde, final_first_order, scale, phi, dynamic_ratio, dynamic_max):  # fmt: skip
    B, guided = sample.shape[0], scale is not None
    rescale = thresholds = None
    if guided and phi != 0.0 and sample.numel():
        rescale = _ops._rescale_factors(model_output, B, False, scale, phi)
    if dynamic_ratio is not None and sample.numel():
        thresholds = _dpm_thresholds(
            model_output, sample, sigmas, step, prediction, scale, rescale, dynamic_ratio, dynamic_max
        )
    prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    kernels.dpm_step(
        model_output.contiguous(), sample.contiguous(), None if noise is None else noise.contiguous(), history,
        sigmas.contiguous(), step.contiguous(), rescale, thresholds, prev, prediction, solver_type, solver_order, sde,
        final_first_order, guided, _ops._or_zero(scale), to_unsigned(seed), to_unsigned(offset),
    )  # fmt: skip
    return prev


@dpm_solver_step.register_fake
def _(*args):
    _check_dpm_solver_step(*args)
    sample = args[1]
    return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)


# ---------------------------------------------------------------------------------------------------------
# unipc_step: UniPC's corrector of the previous step and predictor of the next one, fused (docs/math.md 5.5).
# The history (slots, *sample.shape) holds the previous corrected sample, its x0_hat and (slots 3, for a
# second-order step) the x0_hat before it; the kernel reads and overwrites it in the same pass.
# ---------------------------------------------------------------------------------------------------------
UNIPC_SOLVER_TYPES = ref.UNIPC_SOLVER_TYPES  # the kernels' codes 0, 1 (gk::diffusion::UniPcSolverType)
UNIPC_PREDICTIONS = ref.UNIPC_PREDICTIONS  # PREDICTIONS' codes and 3, flow_prediction (kFlowPrediction)


def _check_unipc_step(
    model_output, sample, history, sigmas, step, prediction, solver_type, predictor_order, corrector_order,
    final_first_order, corrector, flow_sigmas, guidance_scale, guidance_rescale, dynamic_ratio, dynamic_max,
) -> None:  # fmt: skip
    _ops._check_code("prediction", prediction, UNIPC_PREDICTIONS)
    _ops._check_code("solver_type", solver_type, UNIPC_SOLVER_TYPES)
    for name, order in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
        if order not in (1, 2):
            raise ValueError(f"{name} must be 1 or 2, got {order}")
    _ops._check_batched("sample", sample)
    try:
        ref._check_model_output(model_output, sample, guidance_scale is not None, False)
    except ValueError as exc:
        raise ValueError(f"{exc}, for sample of shape {tuple(sample.shape)}") from None
    slots = 3 if 2 in (predictor_order, corrector_order) else 2
    if not isinstance(history, Tensor) or history.dim() < 1 or history.shape[0] not in (slots, 3):
        got = tuple(history.shape) if isinstance(history, Tensor) else type(history).__name__
        raise ValueError(
            f"history must have shape (slots, *sample.shape) with slots 3 (2 for first-order orders only), "
            f"got {got} for sample of shape {tuple(sample.shape)}"
        )
    _checks.like("history", history, "sample", sample, shape=(history.shape[0], *sample.shape))
    if not history.is_contiguous():
        raise ValueError("history must be contiguous (the kernel writes it in place)")
    _check_sigma_table(sigmas, sample)
    _ops._check_timesteps("step", step, sample, 0, sigmas.shape[0] - 2)
    ref.check_guidance(guidance_scale, guidance_rescale)
    ref.check_threshold(None, None if dynamic_ratio is None else (dynamic_ratio, dynamic_max))


def _unipc_rows(sigmas: Tensor, step: Tensor, predictor_order, corrector_order, final_first_order, corrector):
    """(sigma rows (i - 2, i - 1, i, i + 1), p_second, correct, c_second) of each sample, as
    gk::diffusion::unipc_coefficients reads them."""
    last = sigmas.shape[0] - 2
    i = step.clamp(0, last)
    p_second = (i > 0) & (predictor_order == 2)
    if final_first_order:
        p_second = p_second & (i != last)
    correct = (i > 0) & bool(corrector)
    c_second = correct & (i > 1) & (corrector_order == 2)
    rows = (sigmas[(i - 2).clamp(min=0)], sigmas[(i - 1).clamp(min=0)], sigmas[i], sigmas[i + 1])
    return rows, p_second, correct, c_second


@torch.library.custom_op("genkern::unipc_step", mutates_args=("history",))
def unipc_step(
    model_output: Tensor,
    sample: Tensor,
    history: Tensor,
    sigmas: Tensor,
    step: Tensor,
    prediction: int,
    solver_type: int,
    predictor_order: int,
    corrector_order: int,
    final_first_order: bool,
    corrector: bool,
    flow_sigmas: bool,
    guidance_scale: Optional[float],
    guidance_rescale: float,
    dynamic_ratio: Optional[float],
    dynamic_max: float,
) -> Tensor:
    """The next sample of UniPC's step step[b] of each sample: the UniC correction of `sample` (the previous
    step's prediction) with this step's x0_hat (where `corrector` and step > 0), then the UniP prediction from
    the corrected sample. history (slots, *sample.shape), overwritten with this step's state: the corrected
    sample, x0_hat and (slots 3) the previous x0_hat. prediction: a UNIPC_PREDICTIONS code; solver_type: a
    UNIPC_SOLVER_TYPES code; predictor_order 1 or 2 (first order on step 0, and on the last step with
    final_first_order); corrector_order 1 or 2 (first order on step 1); flow_sigmas: a flow-matching table
    (alpha = 1 - sigma, sigma_vp = sigma; diffusers' use_flow_sigmas). Guidance as sigma_step; dynamic_ratio:
    Imagen's dynamic thresholding of x0_hat (with dynamic_max)."""
    args = (model_output, sample, history, sigmas, step, prediction, solver_type, predictor_order, corrector_order)
    extra = (final_first_order, corrector, flow_sigmas, guidance_scale, guidance_rescale, dynamic_ratio, dynamic_max)
    _check_unipc_step(*args, *extra)
    rows, p_second, correct, c_second = _unipc_rows(
        sigmas, step, predictor_order, corrector_order, final_first_order, corrector
    )
    prev, new_history = ref.unipc_update(
        model_output, sample, history, rows, p_second, correct, c_second,
        prediction_type=UNIPC_PREDICTIONS[prediction], solver_type=UNIPC_SOLVER_TYPES[solver_type],
        flow_sigmas=flow_sigmas, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        dynamic_threshold=None if dynamic_ratio is None else (dynamic_ratio, dynamic_max),
    )  # fmt: skip
    history.copy_(new_history)
    return prev.contiguous()


def _unipc_thresholds(model_output, sample, sigmas, step, prediction, flow, scale, rescale, ratio, max_value):
    """Each sample's dynamic threshold as _dpm_thresholds computes it, from UniPC's x0_hat (on a flow table
    too, and flow_prediction's x - sigma m)."""
    if not flow and prediction < len(_ops.PREDICTIONS):  # DPM-Solver++'s x0_hat
        return _dpm_thresholds(model_output, sample, sigmas, step, prediction, scale, rescale, ratio, max_value)
    B = sample.shape[0]
    ct = _ops._compute_dtype(sample)
    x = sample.to(ct).reshape(B, -1)
    if scale is not None:
        m, _ = _ops._guided_prediction(model_output, B, False, scale)
        m = m if rescale is None else m * rescale.to(ct)[:, None]
    else:
        m = model_output.to(ct).reshape(B, -1)
    s = sigmas[step.clamp(0, sigmas.shape[0] - 2)].to(ct)
    alpha, sigma = ref.unipc_alpha_sigma(s, flow)
    x0 = ref.unipc_predict_x0(m, x, s, alpha, sigma, UNIPC_PREDICTIONS[prediction])
    return _ops._quantile_rows(x0.abs(), ratio).clamp(min=1.0, max=max_value).float().contiguous()


@_ops.KERNELS.register(unipc_step, check=_check_unipc_step)
def _(kernels, model_output, sample, history, sigmas, step, prediction, solver_type, predictor_order,
      corrector_order, final_first_order, corrector, flow_sigmas, scale, phi, dynamic_ratio,
      dynamic_max):  # fmt: skip
    B, guided = sample.shape[0], scale is not None
    rescale = thresholds = None
    if guided and phi != 0.0 and sample.numel():
        rescale = _ops._rescale_factors(model_output, B, False, scale, phi)
    if dynamic_ratio is not None and sample.numel():
        thresholds = _unipc_thresholds(
            model_output, sample, sigmas, step, prediction, flow_sigmas, scale, rescale, dynamic_ratio, dynamic_max
        )
    prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    kernels.unipc_step(
        model_output.contiguous(), sample.contiguous(), history, sigmas.contiguous(), step.contiguous(), rescale,
        thresholds, prev, prediction, solver_type, predictor_order, corrector_order, final_first_order, corrector,
        flow_sigmas, guided, _ops._or_zero(scale),
    )  # fmt: skip
    return prev


@unipc_step.register_fake
def _(*args):
    _check_unipc_step(*args)
    sample = args[1]
    return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)


# ---------------------------------------------------------------------------------------------------------
# heun_step: a half of Heun's step (HeunDiscreteScheduler), kinds 3 and 4 of the sigma_step kernel. The first
# half (origin None) writes d into `derivative`, the second reads it and the first half's sample `origin`.
# ---------------------------------------------------------------------------------------------------------
HEUN_FIRST, HEUN_SECOND = 3, 4  # gk::diffusion::kHeunFirst, kHeunSecond


def check_heun_step(model_output, sample, origin, derivative, sigma, sigma_next, prediction, guidance_scale,
                     guidance_rescale) -> None:  # fmt: skip
    _ops._check_code("prediction", prediction, _ops.PREDICTIONS)
    _ops._check_batched("sample", sample)
    try:
        ref._check_model_output(model_output, sample, guidance_scale is not None, False)
    except ValueError as exc:
        raise ValueError(f"{exc}, for sample of shape {tuple(sample.shape)}") from None
    for name, t in (("derivative", derivative), ("origin", origin)):
        if t is not None:
            _checks.like(name, t, "sample", sample)
    if not derivative.is_contiguous():  # written in place; origin is only read, in any layout
        raise ValueError("derivative must be contiguous")
    _ops._check_sigma("sigma", sigma, sample)
    _ops._check_sigma("sigma_next", sigma_next, sample)
    ref.check_guidance(guidance_scale, guidance_rescale)


@torch.library.custom_op("genkern::heun_step", mutates_args=("derivative",))
def heun_step(
    model_output: Tensor,
    sample: Tensor,
    origin: Optional[Tensor],
    derivative: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    prediction: int,
    guidance_scale: Optional[float],
    guidance_rescale: float,
) -> Tensor:
    """A half of Heun's step sigma -> sigma_next (float32 (B,) each; the second half takes the same two as the
    first): origin None, the first half (returns x', writes d into `derivative`); else the second half at
    sample = x' (returns the step's result from `origin`, reads `derivative`)."""
    args = (model_output, sample, origin, derivative, sigma, sigma_next, prediction, guidance_scale, guidance_rescale)
    check_heun_step(*args)
    out, _, d = ref.heun_step(
        model_output, sample, origin, derivative, sigma, sigma_next, prediction_type=_ops.PREDICTIONS[prediction],
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
    )  # fmt: skip
    if origin is None:
        derivative.copy_(d)
    return out.contiguous()


@_ops.KERNELS.register(heun_step, check=check_heun_step)
def _(kernels, model_output, sample, origin, derivative, sigma, sigma_next, prediction, scale, phi):
    B, guided = sample.shape[0], scale is not None
    rescale = None
    if guided and phi != 0.0 and sample.numel():
        rescale = _ops._rescale_factors(model_output, B, False, scale, phi)
    prev = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    kind = HEUN_FIRST if origin is None else HEUN_SECOND
    kernels.sigma_step(
        model_output.contiguous(), sample.contiguous(), None, sigma, sigma_next, rescale, prev, None, kind, prediction,
        guided, _ops._or_zero(scale), False, 0, 0, None if origin is None else origin.contiguous(), derivative,
    )  # fmt: skip
    return prev


@heun_step.register_fake
def _(*args):
    check_heun_step(*args)
    sample = args[1]
    return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)


# ---------------------------------------------------------------------------------------------------------
# The samplers' eager fast path (as _ops.PreparedStep): a mutating custom op costs about a millisecond of
# torch dispatch a call on a CPU, ten times the fused step on a batch-1 latent.
# ---------------------------------------------------------------------------------------------------------
class LoopSteps:
    """A sampler loop's calls of one step op. `__call__(op_call, native_call, model_output, sample)` runs
    op_call() (the op: every check, any backend, tracing) unless an eager call whose tensors look like those of
    the last call the op accepted (same types, shapes, dtypes, devices: the loop's other arguments are fixed)
    may run native_call(kernel), the compiled kernel launched directly. `native` False (the Triton or reference
    backend, a pre-pass the kernel needs) keeps every call on the op."""

    def __init__(self, backend: Optional[str], like: Tensor, native: bool = True):
        name = _backend.resolve(backend, like.device, like.dtype, "diffusion")
        self.native = native and name in ("cpu", "cuda")
        self._signature = None

    @staticmethod
    def _signature_of(*tensors: Tensor) -> tuple:
        return tuple((type(t), t.shape, t.dtype, t.device) for t in tensors)

    def __call__(self, op_call, native_call, *tensors: Tensor) -> Tensor:
        eager = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        )
        signature = self._signature_of(*tensors)
        if self.native and eager and signature == self._signature:
            return native_call()
        out = op_call()
        if self.native and eager and all(type(t) is Tensor for t in tensors):
            self._signature = signature
        return out


def launch_native(kernel: str, prev: Tensor, *args) -> Tensor:
    """_C.diffusion.<kernel>(*args) on prev's device (tensors described, the rest as given); returns prev. The
    tensors stay referenced until the launch returns: a description holds no storage."""
    fn = getattr(_ops.KERNELS.native(), kernel)
    described = [_native.array(a) if isinstance(a, Tensor) else a for a in args]
    _native.launch(fn, prev.device, described)
    return prev


def run_loop(sampler, make_loop, model, x_T: Tensor, model_kwargs: dict, cuda_graph, key: tuple) -> Tensor:
    """A sampler's run: make_loop()(x_T, model_kwargs), or with cuda_graph its capture (the DDPM/DDIM samplers'
    _GraphedLoop), for `key` plus x_T's shape, dtype and device, the model and (a capture) the model_kwargs'
    key (see samplers._kwargs_key). Captures are cached in `sampler._graphs`; an eager run reuses the last
    run's loop (`sampler._last_loop`) when its key is the same, as the DDPM/DDIM samplers do: building the
    sigma rows costs as much as several steps of a batch-1 run."""
    from .samplers import _check_flag, _GraphedLoop, _kwargs_key  # samplers imports this family's ops

    _check_flag("cuda_graph", cuda_graph)
    if cuda_graph and x_T.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device {x_T.device}")
    key = (tuple(x_T.shape), x_T.dtype, x_T.device, id(model), *key)
    if not cuda_graph:
        last = sampler.__dict__.get("_last_loop")
        if last is None or last[0] != key:  # the loop holds the model: its id is not reused meanwhile
            last = sampler._last_loop = (key, make_loop())
        return last[1](x_T, model_kwargs)
    key += (_kwargs_key(model_kwargs),)
    graphed = sampler._graphs.get(key)
    if graphed is None:
        graphed = sampler._graphs[key] = _GraphedLoop(make_loop(), model, x_T, model_kwargs)
    return graphed(x_T, model_kwargs)
