"""Every public op with every class of bad input, on every backend: a TypeError or ValueError naming the
argument, raised before anything is allocated or launched (never a crash, a torch message or a C++ one).

The table below lists, per op, its good call and, per argument, the bad values tried: wrong Python types (str,
float for int, bool, list), wrong dtype, rank, shape, device (a meta tensor among CPU ones), absurd sizes
(2**40, 2**61 + 7, 2**63, negative). `test_bad_input_is_refused` runs each on each backend the op's family has;
`test_counts` checks the table covers every op and prints how many bad inputs were tried. All-meta calls (as
under torch.compile) skip the data-dependent checks instead of reading a meta tensor's values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import genkern
from genkern.diffusion.schedules import NoiseSchedule
from genkern.models import NADE, GatedPixelCNN, PixelCNN

F32 = torch.float32
SCHEDULE = NoiseSchedule("linear")
T = SCHEDULE.num_train_timesteps


def _r(*shape, dtype=F32, device="cpu"):
    return torch.randn(*shape, dtype=dtype) if device == "cpu" else torch.empty(*shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------
# Good calls: op name -> (family for genkern.backends, function(backend, **overrides) making the call)
# ---------------------------------------------------------------------------------------------------------
def _call(fn, defaults: Callable[[], dict], **fixed):
    def call(backend, **over):
        kwargs = defaults()
        kwargs.update(over)
        return fn(**kwargs, **fixed, backend=backend)

    return call


def _reparam_defaults():
    return dict(mu=_r(3, 4), logvar=_r(3, 4), seed=1, offset=0)


def _bits(shape=(8,), **kw):
    return genkern.random.bits(shape, **kw)


def _nade_params(d=5, h=3):
    return dict(weight=_r(h, d), c=_r(h), v=_r(d, h), b=_r(d))


def _diffusion_defaults():
    return dict(x0=_r(2, 3, 4), t=torch.tensor([3, 500]), schedule=SCHEDULE, seed=0)


def _step_defaults():
    return dict(model_output=_r(2, 3, 4), sample=_r(2, 3, 4), t=torch.tensor([10, 500]), schedule=SCHEDULE, seed=0)


def _ddpm(**kw):
    return genkern.ddpm_step(**kw)


def _ddim(**kw):
    kw.setdefault("prev_t", torch.tensor([5, 400]))
    return genkern.ddim_step(**kw)


def _flow_defaults():
    return dict(x0=_r(2, 3, 4), sigma=torch.tensor([0.3, 0.9]), seed=0)


def _sigma_step_defaults():
    return dict(model_output=_r(2, 3, 4), sample=_r(2, 3, 4), sigma=torch.tensor([0.9, 0.5]), sigma_next=0.2)


def _dpm_defaults():
    sigmas, _ = genkern.diffusion.dpm_solver_sigmas(SCHEDULE, 10)
    return dict(
        model_output=_r(2, 3, 4), sigmas=sigmas, step=torch.tensor([1, 2]), sample=_r(2, 3, 4), history=_r(2, 3, 4)
    )


def _unipc_defaults():
    sigmas, _ = genkern.diffusion.unipc_sigmas(SCHEDULE, 10)
    return dict(
        model_output=_r(2, 3, 4), sigmas=sigmas, step=torch.tensor([1, 2]), sample=_r(2, 3, 4), history=_r(3, 2, 3, 4)
    )


def _heun_defaults():
    return dict(_sigma_step_defaults(), derivative=_r(2, 3, 4))


def _levels(shape=(2, 3, 3, 4)):
    return torch.randint(0, 256, shape)


def _model_sample(model_cls):
    def sample(backend, n=2, model=None, **kw):
        kw.setdefault("seed", 0)
        if model_cls is NADE:
            return (model or NADE(6, 3, backend=backend)).sample(n, **kw)
        model = model or _MODELS[model_cls]()
        return model.sample(n, backend=backend, **kw)

    return sample


_MODELS = {
    PixelCNN: lambda: PixelCNN(1, 4, 4, hidden_channels=4, n_layers=2, kernel_size=3),
    GatedPixelCNN: lambda: GatedPixelCNN(1, 4, 4, hidden_channels=4, n_layers=2, kernel_size=3),
}

OPS = {
    "reparameterize": ("reparam", _call(genkern.reparameterize, _reparam_defaults)),
    "reparameterize_kl": ("reparam", _call(genkern.reparameterize_kl, _reparam_defaults)),
    "gaussian_kl": ("reparam", _call(genkern.gaussian_kl, lambda: dict(mu=_r(3, 4), logvar=_r(3, 4)))),
    "gaussian_log_prob": (
        "reparam",
        _call(genkern.gaussian_log_prob, lambda: dict(z=_r(3, 4), mu=_r(3, 4), logvar=_r(3, 4))),
    ),
    "iwae_bound": (
        "reparam",
        _call(genkern.iwae_bound, lambda: dict(log_px_z=_r(5, 3), z=_r(5, 3, 4), mu=_r(3, 4), logvar=_r(3, 4))),
    ),
    "randn": ("random", _call(genkern.randn, lambda: dict(shape=(3, 4), seed=0))),
    "random.bits": ("random", _call(_bits, lambda: dict(shape=(8,), seed=0))),
    "q_sample": ("diffusion", _call(genkern.q_sample, _diffusion_defaults)),
    "diffusion_loss": (
        "diffusion",
        _call(genkern.diffusion_loss, lambda: dict(_diffusion_defaults(), model_output=_r(2, 3, 4))),
    ),
    "ddpm_step": ("diffusion", _call(_ddpm, _step_defaults)),
    "ddim_step": ("diffusion", _call(_ddim, _step_defaults)),
    "flow_sample": ("diffusion", _call(genkern.flow_sample, _flow_defaults)),
    "flow_matching_loss": (
        "diffusion",
        _call(genkern.flow_matching_loss, lambda: dict(model_output=_r(2, 3, 4), **_flow_defaults())),
    ),
    "flow_euler_step": (
        "diffusion",
        _call(genkern.flow_euler_step, lambda: dict(**_sigma_step_defaults(), seed=0), stochastic=True),
    ),
    "euler_step": ("diffusion", _call(genkern.euler_step, _sigma_step_defaults)),
    "euler_ancestral_step": (
        "diffusion",
        _call(genkern.euler_ancestral_step, lambda: dict(**_sigma_step_defaults(), seed=0)),
    ),
    "dpm_solver_step": ("diffusion", _call(genkern.dpm_solver_step, _dpm_defaults)),
    "unipc_step": ("diffusion", _call(genkern.unipc_step, _unipc_defaults)),
    "heun_step": ("diffusion", _call(genkern.heun_step, _heun_defaults)),
    "heun_step(origin=)": ("diffusion", _call(genkern.heun_step, lambda: dict(_heun_defaults(), origin=_r(2, 3, 4)))),
    "ddpm_step(out=)": ("diffusion", _call(_ddpm, lambda: dict(_step_defaults(), out=(_r(2, 3, 4), _r(2, 3, 4))))),
    "ddim_step(out=)": ("diffusion", _call(_ddim, lambda: dict(_step_defaults(), out=(_r(2, 3, 4), _r(2, 3, 4))))),
    "causal_conv1d": (
        "causal_conv1d",
        _call(genkern.causal_conv1d, lambda: dict(x=_r(2, 3, 7), weight=_r(4, 3, 3), bias=_r(4), dilation=2)),
    ),
    "causal_conv1d_update": (
        "causal_conv1d",
        _call(
            genkern.causal_conv1d_update,
            lambda: dict(x=_r(2, 3), state=_r(2, 3, 4), weight=_r(4, 3, 3), bias=_r(4), dilation=2),
        ),
    ),
    # causal-conv1d's state API: depthwise weight (C, K), packed sequences, continuous batching
    "causal_conv1d(states)": (
        "causal_conv1d",
        _call(
            genkern.causal_conv1d,
            lambda: dict(
                x=_r(2, 3, 7),
                weight=_r(3, 3),
                initial_states=_r(2, 3, 2),
                return_final_states=True,
                seq_idx=torch.tensor([[0, 0, 0, 1, 1, -1, 2]] * 2, dtype=torch.int32),
            ),
        ),
    ),
    "causal_conv1d_update(states)": (
        "causal_conv1d",
        _call(
            genkern.causal_conv1d_update,
            lambda: dict(
                x=_r(2, 3, 2),
                state=_r(4, 3, 3),
                weight=_r(3, 3),
                cache_seqlens=torch.tensor([1, 5], dtype=torch.int32),
                conv_state_indices=torch.tensor([3, -1], dtype=torch.int32),
            ),
        ),
    ),
    "causal_conv1d_varlen_states": (
        "causal_conv1d",
        _call(
            genkern.causal_conv1d_varlen_states,
            lambda: dict(x=_r(9, 3), cu_seqlens=torch.tensor([0, 2, 9], dtype=torch.int32), state_len=3),
        ),
    ),
    "gated_activation": ("causal_conv1d", _call(genkern.gated_activation, lambda: dict(x=_r(2, 4, 3), dim=1))),
    "masked_conv2d": (
        "masked_conv",
        _call(genkern.masked_conv2d, lambda: dict(x=_r(2, 3, 5, 6), weight=_r(6, 3, 3, 3), bias=_r(6), color_groups=3)),
    ),
    "nade_log_prob": (
        "nade",
        _call(genkern.nade_log_prob, lambda: dict(x=torch.randint(0, 2, (4, 5)).float(), **_nade_params())),
    ),
    "nade_sample": ("nade", _call(genkern.nade_sample, lambda: dict(num_samples=3, seed=0, **_nade_params()))),
    "discretized_logistic_mixture_nll": (
        "logistic_mixture",
        _call(genkern.discretized_logistic_mixture_nll, lambda: dict(params=_r(2, 20, 3, 4), x=_levels())),
    ),
    # the training loss (gradients needed): genkern::logistic_mixture_nll_loss
    "discretized_logistic_mixture_nll_loss": (
        "logistic_mixture",
        _call(
            genkern.discretized_logistic_mixture_nll,
            lambda: dict(params=_r(2, 20, 3, 4).requires_grad_(), x=_levels()),
            reduction="sum",
        ),
    ),
    "discretized_logistic_mixture_sample": (
        "logistic_mixture",
        _call(genkern.discretized_logistic_mixture_sample, lambda: dict(params=_r(2, 20, 3, 4), seed=0)),
    ),
    "gumbel_argmax": (
        "pixelcnn_sampling",
        _call(genkern.gumbel_argmax, lambda: dict(logits=_r(3, 5), base=torch.tensor([0, 5, 10]), seed=0)),
    ),
    "sample_logits": (
        "sampling_head",
        _call(genkern.sample_logits, lambda: dict(logits=_r(3, 5), seed=0, temperature=0.8, top_k=3, top_p=0.9)),
    ),
    "PixelCNN.sample": ("pixelcnn_sampling", _model_sample(PixelCNN)),
    "GatedPixelCNN.sample": ("pixelcnn_sampling", _model_sample(GatedPixelCNN)),
    "NADE.sample": ("nade", _model_sample(NADE)),
}


# ---------------------------------------------------------------------------------------------------------
# Bad values, by class
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    op: str
    arg: str  # the keyword overridden
    label: str  # the class of bad input
    value: Callable[[], object]  # made fresh per call
    error: type  # TypeError or ValueError
    names: str = ""  # what the message must name (default: arg)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.arg}-{self.label}"


HUGE = {"2**40": 2**40, "2**61+7": 2**61 + 7, "2**63": 2**63}
PY_TYPES = {"str": "3", "float": 2.0, "bool": True, "list": [1]}


def ints(op, arg, *, low=None, huge=True, types=True, names="", extra=()):
    """A count, size or index argument: wrong Python types, below `low`, absurd sizes."""
    rows = []
    if types:
        rows += [Bad(op, arg, k, (lambda v=v: v), TypeError, names) for k, v in PY_TYPES.items()]
    if low is not None:
        rows.append(Bad(op, arg, f"below {low}", (lambda v=low - 1: v), ValueError, names))
        rows.append(Bad(op, arg, "negative", (lambda: -(2**63) - 1), ValueError, names))
    if huge:
        rows += [Bad(op, arg, k, (lambda v=v: v), ValueError, names) for k, v in HUGE.items()]
    rows += [Bad(op, arg, k, (lambda v=v: v), e, names) for k, v, e in extra]
    return rows


def seed_offset(op, arg):
    """A seed or offset: any uint64, nothing else."""
    return [
        *ints(op, arg, types=True, huge=False),
        Bad(op, arg, "negative", lambda: -1, ValueError),
        Bad(op, arg, "2**64", lambda: 2**64, ValueError),
    ]


def tensors(op, arg, shape, *, dtype=F32, skip=(), names="", other_dtype=True, meta=True, wrong_shape=None):
    """A tensor argument of `shape`: not a tensor, wrong dtype, rank, shape (the last dim one larger, unless
    given), device."""
    wrong_shape = wrong_shape or ((*shape[:-1], shape[-1] + 1) if shape else (2,))
    other = torch.float64 if dtype == F32 else F32
    table = {
        "not a tensor: list": (lambda: [[0.0]], TypeError),
        "not a tensor: str": (lambda: "x", TypeError),
        "not a tensor: float": (lambda: 1.0, TypeError),
        "dtype int64": (lambda: torch.zeros(shape, dtype=torch.int64 if dtype != torch.int64 else F32), TypeError),
        "dtype complex": (lambda: torch.zeros(shape, dtype=torch.complex64), TypeError),
        "rank + 1": (lambda: torch.zeros((2, *shape), dtype=dtype), ValueError),
        "0-dim": (lambda: torch.zeros((), dtype=dtype), ValueError),
        "shape": (lambda: torch.zeros(wrong_shape, dtype=dtype), ValueError),
    }
    if other_dtype:
        table["other float dtype"] = (lambda: torch.zeros(shape, dtype=other), TypeError)
    if meta:
        table["meta tensor"] = (lambda: torch.empty(shape, dtype=dtype, device="meta"), ValueError)
    return [Bad(op, arg, k, v, e, names) for k, (v, e) in table.items() if k not in skip]


def values(op, arg, *rows):
    """Hand-picked bad values: (label, value, error)."""
    return [Bad(op, arg, label, (lambda v=v: v() if callable(v) else v), e) for label, v, e in rows]


BAD: list[Bad] = []

# --- reparam
for op in ("reparameterize", "reparameterize_kl", "gaussian_kl"):
    BAD += tensors(op, "mu", (3, 4), names="mu", skip=("0-dim",) if op == "gaussian_kl" else ())
    BAD += tensors(op, "logvar", (3, 4))
for op in ("reparameterize", "reparameterize_kl"):
    BAD += tensors(op, "eps", (3, 4), skip=("not a tensor: float",))
    BAD += seed_offset(op, "seed") + seed_offset(op, "offset")
BAD += ints("reparameterize", "num_samples", low=1)
for op in ("reparameterize_kl", "gaussian_kl", "gaussian_log_prob"):
    BAD += ints(op, "dim", types=False, huge=True)
    BAD += values(op, "dim", ("str", "3", TypeError), ("float", 2.0, TypeError), ("bool", True, TypeError))
    BAD += values(op, "dim", ("list of str", ["a"], TypeError), ("repeated", [1, 1], ValueError))
    BAD += values(op, "dim", ("out of range", 2, ValueError), ("empty", [], ValueError))
BAD += tensors("gaussian_log_prob", "z", (3, 4), skip=("0-dim", "rank + 1"))  # mu (3, 4) fits z (2, 3, 4)
for arg in ("mu", "logvar"):
    # A broadcastable shape is valid: (4,) and () broadcast to z's (3, 4).
    BAD += tensors("gaussian_log_prob", arg, (3, 4), skip=("0-dim",))
BAD += tensors("iwae_bound", "z", (5, 3, 4), names="z", skip=("rank + 1",))
BAD += tensors("iwae_bound", "log_px_z", (5, 3))
BAD += tensors("iwae_bound", "mu", (3, 4))
BAD += tensors("iwae_bound", "logvar", (3, 4))

# --- random
for op in ("randn", "random.bits"):
    BAD += seed_offset(op, "seed") + seed_offset(op, "offset")
    BAD += values(
        op,
        "shape",
        ("str", "3", TypeError),
        ("float", 2.0, TypeError),
        ("bool", True, TypeError),
        ("list of float", [2.0], TypeError),
        ("tensor", lambda: torch.tensor(3.0), TypeError),
        ("negative", (-1,), ValueError),
        ("2**40", (2**40,), ValueError),
        ("2**61+7", (2**61 + 7,), ValueError),
        ("2**63", (2**63,), ValueError),
        ("product 2**80", (2**40, 2**40), ValueError),
    )
    BAD += values(op, "device", ("str", "nowhere", ValueError), ("int", 1.5, ValueError))
BAD += values("randn", "dtype", ("int64", torch.int64, TypeError), ("str", "float32", TypeError))

# --- diffusion
# q_sample's x0 is its only data tensor: any float shape (with batch 2, t's) on any device is valid.
BAD += tensors("q_sample", "x0", (2, 3, 4), skip=("0-dim", "rank + 1", "shape", "other float dtype", "meta tensor"))
BAD += values(
    "q_sample", "x0", ("batch", lambda: _r(3, 3, 4), ValueError), ("0-dim", lambda: torch.zeros(()), ValueError)
)
BAD += tensors("diffusion_loss", "x0", (2, 3, 4))
for op in ("q_sample", "diffusion_loss"):
    BAD += tensors(op, "noise", (2, 3, 4), skip=("not a tensor: float",))
    BAD += seed_offset(op, "seed") + seed_offset(op, "offset")
BAD += tensors("diffusion_loss", "model_output", (2, 3, 4))
BAD += values("diffusion_loss", "prediction_type", ("unknown", "x", ValueError), ("int", 1, TypeError))
BAD += values("diffusion_loss", "snr_gamma", ("str", "5", TypeError), ("negative", -1.0, ValueError))
BAD += values("diffusion_loss", "snr_gamma", ("nan", float("nan"), ValueError), ("inf", float("inf"), ValueError))
BAD += values("diffusion_loss", "reduction", ("unknown", "max", ValueError))
STEPS = ("ddpm_step", "ddim_step", "ddpm_step(out=)", "ddim_step(out=)")
for op in ("q_sample", "diffusion_loss", *STEPS):
    BAD += ints(op, "t", low=0, extra=[("T", T, ValueError)])
    BAD += values(
        op,
        "t",
        ("float tensor", lambda: torch.tensor([1.0, 2.0]), TypeError),
        ("bool tensor", lambda: torch.tensor([True, False]), TypeError),
        ("shape", lambda: torch.tensor([1, 2, 3]), ValueError),
        ("values", lambda: torch.tensor([1, T]), ValueError),
        ("negative values", lambda: torch.tensor([-99, 0]), ValueError),
        ("meta tensor", lambda: torch.empty(2, dtype=torch.int64, device="meta"), ValueError),
    )
    BAD += values(op, "schedule", ("str", "linear", TypeError), ("table", lambda: SCHEDULE.table(), TypeError))
for op in STEPS:
    BAD += tensors(op, "model_output", (2, 3, 4))
    BAD += tensors(op, "sample", (2, 3, 4), skip=("0-dim",))
    BAD += tensors(op, "noise", (2, 3, 4), skip=("not a tensor: float",))
    BAD += seed_offset(op, "seed") + seed_offset(op, "offset")
    BAD += ints(op, "prev_t", low=-1, extra=[("T - 1", T - 1, ValueError)])
    BAD += values(op, "prev_t", ("not below t", lambda: torch.tensor([10, 600]), ValueError))
    BAD += values(op, "prediction_type", ("unknown", "x", ValueError), ("int", 0, TypeError))
    BAD += values(op, "clip_sample", ("str", "1", TypeError), ("negative", -1.0, ValueError))
    BAD += values(op, "guidance_scale", ("str", "1", TypeError), ("nan", float("nan"), ValueError))
    BAD += values(op, "guidance_rescale", ("str", "1", TypeError), ("2", 2.0, ValueError))
    BAD += values(op, "dynamic_threshold", ("float", 0.9, TypeError), ("ratio 2", (2.0, 1.0), ValueError))
for op in ("ddpm_step", "ddpm_step(out=)"):
    BAD += values(op, "variance_type", ("unknown", "x", ValueError), ("int", 0, TypeError))
for op in ("ddim_step", "ddim_step(out=)"):
    BAD += values(op, "eta", ("str", "1", TypeError), ("negative", -1.0, ValueError), ("nan", float("nan"), ValueError))
    BAD += values(op, "use_clipped_model_output", ("int", 1, TypeError))
for op in ("ddpm_step(out=)", "ddim_step(out=)"):
    BAD += values(
        op,
        "out",
        ("str", "x", TypeError),
        ("triple", lambda: (_r(2, 3, 4),) * 3, TypeError),
        ("shape", lambda: (_r(2, 3, 5), None), ValueError),
        ("dtype", lambda: (_r(2, 3, 4, dtype=torch.float64), None), TypeError),
        ("meta", lambda: (_r(2, 3, 4, device="meta"), None), ValueError),
        ("not contiguous", lambda: (_r(2, 4, 3).transpose(1, 2), None), ValueError),
        ("pred_original shape", lambda: (_r(2, 3, 4), _r(2, 3)), ValueError),
    )

# flow matching and the sigma-space steps (genkern::q_sample, diffusion_loss and sigma_step underneath)
for op in ("flow_sample", "flow_matching_loss"):
    BAD += tensors(op, "x0", (2, 3, 4), skip=("0-dim", "rank + 1", "shape", "other float dtype", "meta tensor"))
    BAD += values(op, "x0", ("batch", lambda: _r(3, 3, 4), ValueError))
    BAD += tensors(op, "noise", (2, 3, 4), skip=("not a tensor: float",))
    BAD += seed_offset(op, "seed") + seed_offset(op, "offset")
BAD += tensors("flow_matching_loss", "model_output", (2, 3, 4))
BAD += values("flow_matching_loss", "weighting", ("unknown", "x", ValueError), ("int", 1, TypeError))
SIGMA_STEPS = ("flow_euler_step", "euler_step", "euler_ancestral_step")
for op in ("flow_sample", "flow_matching_loss", *SIGMA_STEPS):
    sigma_args = ("sigma",) if op.startswith("flow_") and op != "flow_euler_step" else ("sigma", "sigma_next")
    for arg in sigma_args:
        BAD += values(
            op,
            arg,
            ("str", "0.5", TypeError),
            ("int tensor", lambda: torch.tensor([1, 0]), TypeError),
            ("shape", lambda: torch.tensor([0.5, 0.4, 0.3]), ValueError),
            ("rank 2", lambda: torch.full((2, 1), 0.5), ValueError),
            ("negative", -0.5, ValueError),
            ("nan", float("nan"), ValueError),
            ("meta tensor", lambda: torch.empty(2, device="meta"), ValueError),
        )
for op in SIGMA_STEPS:
    BAD += tensors(op, "model_output", (2, 3, 4))
    BAD += tensors(op, "sample", (2, 3, 4), skip=("0-dim",))
    BAD += values(op, "guidance_scale", ("str", "1", TypeError), ("nan", float("nan"), ValueError))
    BAD += values(op, "guidance_rescale", ("str", "1", TypeError), ("2", 2.0, ValueError))
    BAD += values(op, "return_pred_original", ("int", 1, TypeError))
for op in ("euler_step", "euler_ancestral_step"):
    BAD += values(op, "prediction_type", ("unknown", "x", ValueError), ("int", 0, TypeError))
for op in ("flow_euler_step", "euler_ancestral_step"):
    BAD += tensors(op, "noise", (2, 3, 4), skip=("not a tensor: float",))
    BAD += seed_offset(op, "seed") + seed_offset(op, "offset")
BAD += values("flow_euler_step", "stochastic", ("int", 1, TypeError))
for op in ("heun_step", "heun_step(origin=)"):
    BAD += tensors(op, "model_output", (2, 3, 4))
    BAD += tensors(op, "sample", (2, 3, 4), skip=("0-dim",))
    BAD += tensors(op, "derivative", (2, 3, 4))
    BAD += values(op, "prediction_type", ("unknown", "x", ValueError), ("int", 0, TypeError))
    BAD += values(op, "guidance_scale", ("str", "1", TypeError), ("nan", float("nan"), ValueError))
    BAD += values(op, "guidance_rescale", ("str", "1", TypeError), ("2", 2.0, ValueError))
    for arg in ("sigma", "sigma_next"):
        BAD += values(
            op, arg, ("str", "0.5", TypeError), ("negative", -0.5, ValueError), ("nan", float("nan"), ValueError)
        )
BAD += tensors("heun_step(origin=)", "origin", (2, 3, 4))
for arg in ("model_output", "sample", "history"):
    BAD += tensors("dpm_solver_step", arg, (2, 3, 4), skip=("0-dim",) if arg == "sample" else ())
BAD += tensors("dpm_solver_step", "sigmas", (11,), skip=("not a tensor: float", "rank + 1", "shape"))
BAD += values("dpm_solver_step", "sigmas", ("one sigma", lambda: torch.ones(1), ValueError))
BAD += values(
    "dpm_solver_step",
    "step",
    ("str", "1", TypeError),
    ("negative", -1, ValueError),
    ("past the table", 10, ValueError),
    ("float tensor", lambda: torch.tensor([1.0, 2.0]), TypeError),
    ("shape", lambda: torch.tensor([1, 2, 3]), ValueError),
)
BAD += values("dpm_solver_step", "prediction_type", ("unknown", "x", ValueError), ("int", 0, TypeError))
BAD += values("dpm_solver_step", "solver_type", ("unknown", "x", ValueError), ("int", 0, TypeError))
BAD += values("dpm_solver_step", "algorithm_type", ("unknown", "dpmsolver", ValueError), ("int", 0, TypeError))
BAD += values("dpm_solver_step", "solver_order", ("3", 3, ValueError), ("str", "2", TypeError), ("0", 0, ValueError))
BAD += values("dpm_solver_step", "final_first_order", ("int", 1, TypeError))
BAD += values("dpm_solver_step", "guidance_scale", ("str", "1", TypeError), ("nan", float("nan"), ValueError))
BAD += values("dpm_solver_step", "guidance_rescale", ("str", "1", TypeError), ("2", 2.0, ValueError))
BAD += values("dpm_solver_step", "dynamic_threshold", ("str", "x", TypeError), ("ratio 2", (2.0, 1.0), ValueError))
for arg in ("model_output", "sample"):
    BAD += tensors("unipc_step", arg, (2, 3, 4), skip=("0-dim",) if arg == "sample" else ())
BAD += tensors("unipc_step", "history", (3, 2, 3, 4))
BAD += values("unipc_step", "history", ("two slots for order 2", lambda: _r(2, 2, 3, 4), ValueError))
BAD += tensors("unipc_step", "sigmas", (11,), skip=("not a tensor: float", "rank + 1", "shape"))
BAD += values("unipc_step", "sigmas", ("one sigma", lambda: torch.ones(1), ValueError))
BAD += values(
    "unipc_step",
    "step",
    ("str", "1", TypeError),
    ("negative", -1, ValueError),
    ("past the table", 10, ValueError),
    ("float tensor", lambda: torch.tensor([1.0, 2.0]), TypeError),
    ("shape", lambda: torch.tensor([1, 2, 3]), ValueError),
)
BAD += values("unipc_step", "prediction_type", ("unknown", "x", ValueError), ("int", 0, TypeError))
BAD += values("unipc_step", "solver_type", ("unknown", "midpoint", ValueError), ("int", 1, TypeError))
BAD += values("unipc_step", "solver_order", ("3", 3, ValueError), ("str", "2", TypeError), ("0", 0, ValueError))
BAD += values("unipc_step", "corrector_order", ("3", 3, ValueError), ("str", "2", TypeError))
BAD += values("unipc_step", "final_first_order", ("int", 1, TypeError))
BAD += values("unipc_step", "use_corrector", ("int", 1, TypeError))
BAD += values("unipc_step", "flow_sigmas", ("int", 1, TypeError), ("None", None, TypeError))
BAD += values("unipc_step", "guidance_scale", ("str", "1", TypeError), ("nan", float("nan"), ValueError))
BAD += values("unipc_step", "guidance_rescale", ("str", "1", TypeError), ("2", 2.0, ValueError))
BAD += values("unipc_step", "dynamic_threshold", ("str", "x", TypeError), ("ratio 2", (2.0, 1.0), ValueError))

# --- autoregressive
BAD += tensors("causal_conv1d", "x", (2, 3, 7), wrong_shape=(2, 4, 7))  # any length L
BAD += tensors("causal_conv1d", "weight", (4, 3, 3), skip=("rank + 1",), wrong_shape=(4, 2, 3))  # any K
BAD += tensors("causal_conv1d", "bias", (4,), skip=("not a tensor: float",))
BAD += tensors("causal_conv1d_update", "x", (2, 3))
BAD += tensors("causal_conv1d_update", "state", (2, 3, 4), skip=("shape",))
BAD += values("causal_conv1d_update", "state", ("too short", lambda: _r(2, 3, 3), ValueError))
BAD += tensors("causal_conv1d_update", "weight", (4, 3, 3), skip=("rank + 1",))
BAD += tensors("causal_conv1d_update", "bias", (4,), skip=("not a tensor: float",))
for op in ("causal_conv1d", "causal_conv1d_update"):
    BAD += ints(op, "dilation", low=1)
    BAD += values(op, "activation", ("unknown", "relu", ValueError), ("int", 1, TypeError))
BAD += values(
    "causal_conv1d(states)",
    "seq_idx",
    ("decreasing", lambda: torch.tensor([[0, 1, 1, 0, 2, 2, 2]] * 2, dtype=torch.int32), ValueError),
)
BAD += values(
    "causal_conv1d_update(states)",
    "conv_state_indices",
    ("out of range", lambda: torch.tensor([4, 0], dtype=torch.int32), ValueError),
)
BAD += values("causal_conv1d_update(states)", "state", ("too short", lambda: _r(4, 3, 1), ValueError))
# Any (tokens, C) float tensor is a valid x; cu_seqlens is an int index tensor checked against x's tokens.
BAD += tensors("causal_conv1d_varlen_states", "x", (9, 3), skip=("shape", "other float dtype"))
BAD += values("causal_conv1d_varlen_states", "x", ("rank 3", lambda: _r(1, 9, 3), ValueError))
BAD += values(
    "causal_conv1d_varlen_states",
    "cu_seqlens",
    ("not a tensor: list", [0, 2, 9], TypeError),
    ("float tensor", lambda: torch.tensor([0.0, 2.0, 9.0]), TypeError),
    ("rank 2", lambda: torch.tensor([[0, 2, 9]], dtype=torch.int32), ValueError),
    ("empty", lambda: torch.zeros(0, dtype=torch.int32), ValueError),
    ("negative start", lambda: torch.tensor([-1, 2, 9], dtype=torch.int32), ValueError),
    ("decreasing", lambda: torch.tensor([0, 5, 2], dtype=torch.int32), ValueError),
    ("past the tokens", lambda: torch.tensor([0, 2, 10], dtype=torch.int32), ValueError),
    ("meta tensor", lambda: torch.zeros(3, dtype=torch.int32, device="meta"), ValueError),
)
BAD += ints("causal_conv1d_varlen_states", "state_len", low=0)
BAD += tensors("gated_activation", "x", (2, 4, 3), other_dtype=False, meta=False, skip=("rank + 1", "shape"))
BAD += values("gated_activation", "x", ("odd", lambda: _r(2, 5, 3), ValueError))
BAD += ints("gated_activation", "dim", extra=[("3", 3, ValueError), ("-4", -4, ValueError)])
BAD += tensors("masked_conv2d", "x", (2, 3, 5, 6), wrong_shape=(2, 4, 5, 6))  # any H, W
BAD += tensors("masked_conv2d", "weight", (6, 3, 3, 3))
BAD += values("masked_conv2d", "weight", ("even kernel", lambda: _r(6, 3, 2, 2), ValueError))
BAD += values("masked_conv2d", "weight", ("not square", lambda: _r(6, 3, 3, 5), ValueError))
BAD += tensors("masked_conv2d", "bias", (6,), skip=("not a tensor: float",))
BAD += ints("masked_conv2d", "dilation", low=1)
BAD += values("masked_conv2d", "dilation", ("2**20: a padded copy beyond memory", 2**20, ValueError))
BAD += ints("masked_conv2d", "color_groups", low=1, extra=[("not dividing", 2, ValueError)])
BAD += values("masked_conv2d", "mask_type", ("unknown", "C", ValueError), ("int", 1, ValueError))
BAD += tensors("nade_log_prob", "x", (4, 5), skip=("dtype int64", "other float dtype"))
BAD += values("nade_log_prob", "x", ("not binary", lambda: torch.full((4, 5), 0.5), ValueError))
for op in ("nade_log_prob", "nade_sample"):
    BAD += tensors(op, "weight", (3, 5), names="weight")
    BAD += tensors(op, "c", (3,))
    BAD += tensors(op, "v", (5, 3))
    BAD += tensors(op, "b", (5,))
BAD += ints("nade_sample", "num_samples", low=0)
BAD += ints("nade_sample", "first", low=0, huge=False)
BAD += values("nade_sample", "first", ("2**61+7", 2**61 + 7, ValueError), ("2**63", 2**63, ValueError))
BAD += seed_offset("nade_sample", "seed") + seed_offset("nade_sample", "offset")
BAD += tensors("gumbel_argmax", "logits", (3, 5), other_dtype=False, wrong_shape=(4, 5))  # any levels
BAD += tensors("gumbel_argmax", "base", (3,), dtype=torch.int64, other_dtype=False)
BAD += values(
    "gumbel_argmax",
    "base",
    ("negative", lambda: torch.tensor([0, -5, 10]), ValueError),
    ("past 2**63 with the levels", lambda: torch.tensor([0, 2**63 - 3, 10]), ValueError),
)
BAD += seed_offset("gumbel_argmax", "seed") + seed_offset("gumbel_argmax", "offset")
# sample_logits takes any (rows, vocab) logits, on any device (meta included: the draw's shape is known)
BAD += tensors("sample_logits", "logits", (3, 5), other_dtype=False, skip=("shape", "meta tensor"))
BAD += seed_offset("sample_logits", "seed") + seed_offset("sample_logits", "offset")
BAD += ints("sample_logits", "top_k", low=0, huge=False)
for arg, low, high in (("temperature", -0.5, float("inf")), ("top_p", 0.0, 1.5), ("min_p", -0.1, 1.5)):
    BAD += values(
        "sample_logits",
        arg,
        ("str", "0.5", TypeError),
        ("bool", True, TypeError),
        ("int tensor", lambda: torch.tensor([1, 0, 1]), TypeError),
        ("below", low, ValueError),
        ("above", high, ValueError),
        ("nan", float("nan"), ValueError),
        ("nan in a row", lambda: torch.tensor([0.5, float("nan"), 0.5]), ValueError),
        ("shape", lambda: torch.full((2,), 0.5), ValueError),
        ("rank 2", lambda: torch.full((3, 1), 0.5), ValueError),
        ("meta tensor", lambda: torch.empty(3, device="meta"), ValueError),
    )
BAD += values(
    "sample_logits",
    "top_k",
    ("float tensor", lambda: torch.tensor([1.0, 2.0, 3.0]), TypeError),
    ("negative in a row", lambda: torch.tensor([3, -2, 1]), ValueError),
    ("shape", lambda: torch.tensor([1, 2]), ValueError),
    ("meta tensor", lambda: torch.empty(3, dtype=torch.int64, device="meta"), ValueError),
)

# params: any float dtype (float64 computes in float64); a meta params alone is a valid (compile-time) sample call
BAD += tensors(
    "discretized_logistic_mixture_nll", "params", (2, 20, 3, 4), other_dtype=False, wrong_shape=(2, 21, 3, 4)
)
BAD += tensors(
    "discretized_logistic_mixture_nll",
    "x",
    (2, 3, 3, 4),
    dtype=torch.int64,
    other_dtype=False,
    skip=("dtype int64",),  # floats holding whole levels are valid x
    wrong_shape=(2, 3, 3, 5),
)
BAD += values(
    "discretized_logistic_mixture_nll",
    "x",
    ("bool", lambda: torch.zeros(2, 3, 3, 4, dtype=torch.bool), TypeError),
    ("level 256", lambda: torch.full((2, 3, 3, 4), 256), ValueError),
    ("negative level", lambda: torch.full((2, 3, 3, 4), -1), ValueError),
    ("not whole", lambda: torch.full((2, 3, 3, 4), 0.5), ValueError),
)
BAD += values("discretized_logistic_mixture_nll", "reduction", ("unknown", "max", ValueError))
BAD += tensors(
    "discretized_logistic_mixture_nll_loss",
    "x",
    (2, 3, 3, 4),
    dtype=torch.int64,
    other_dtype=False,
    skip=("dtype int64",),
    wrong_shape=(2, 3, 3, 5),
)
BAD += values(
    "discretized_logistic_mixture_nll_loss",
    "x",
    ("level 256", lambda: torch.full((2, 3, 3, 4), 256), ValueError),
    ("not whole", lambda: torch.full((2, 3, 3, 4), 0.5), ValueError),
)
BAD += ints("discretized_logistic_mixture_nll_loss", "levels", low=2, extra=[("2**24 + 1", 2**24 + 1, ValueError)])
BAD += tensors(
    "discretized_logistic_mixture_sample",
    "params",
    (2, 20, 3, 4),
    other_dtype=False,
    meta=False,
    wrong_shape=(2, 21, 3, 4),
)
BAD += seed_offset("discretized_logistic_mixture_sample", "seed")
BAD += seed_offset("discretized_logistic_mixture_sample", "offset")
BAD += ints("discretized_logistic_mixture_sample", "first", low=0, huge=False)
BAD += values("discretized_logistic_mixture_sample", "first", ("2**62", 2**62, ValueError))
BAD += ints("discretized_logistic_mixture_sample", "channels", low=1)
for op in ("discretized_logistic_mixture_nll", "discretized_logistic_mixture_sample"):
    BAD += ints(op, "levels", low=2, huge=False)
    BAD += ints(op, "num_mixtures", low=1, extra=[("3: params of 2", 3, ValueError)])
    BAD += values(op, "rgb_coupling", ("str", "yes", TypeError), ("int", 1, TypeError))

# --- models
for op in ("PixelCNN.sample", "GatedPixelCNN.sample", "NADE.sample"):
    BAD += ints(op, "n", low=0)
    BAD += seed_offset(op, "seed") + seed_offset(op, "offset")
for op in ("PixelCNN.sample", "GatedPixelCNN.sample"):
    BAD += ints(op, "first_sample", low=0, huge=False)
    BAD += values(op, "first_sample", ("2**61+7", 2**61 + 7, ValueError), ("2**63", 2**63, ValueError))
    # dims * levels = 16 * 4: the last draw's stream index passes 2**63 - 1.
    BAD += values(op, "first_sample", ("stream past 2**63", 2**63 // 64 - 1, ValueError))
    BAD += values(op, "method", ("unknown", "fast", ValueError))


def _backends(family: str) -> list[str]:
    return genkern.backends(family)


PARAMS = [pytest.param(b, backend, id=f"{b.id}-{backend}") for b in BAD for backend in _backends(OPS[b.op][0])]


def _names(message: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


@pytest.mark.parametrize(("bad", "backend"), PARAMS)
def test_bad_input_is_refused(bad: Bad, backend: str):
    _, call = OPS[bad.op]
    with pytest.raises((TypeError, ValueError)) as info:
        call(backend, **{bad.arg: bad.value()})
    message = str(info.value)
    assert type(info.value) in (TypeError, ValueError), f"{type(info.value).__name__}: {message}"
    assert isinstance(info.value, bad.error), (
        f"expected {bad.error.__name__}, got {type(info.value).__name__}: {message}"
    )
    name = bad.names or bad.arg
    assert _names(message, name), f"the message does not name {name!r}: {message}"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", genkern.backends())
def test_good_call_runs(op: str, backend: str):
    """The table's good calls are good: each bad input differs from a working call in one argument."""
    family, call = OPS[op]
    if backend not in _backends(family):
        pytest.skip(f"no {family} kernels on {backend}")
    call(backend)


def test_counts():
    ops = {b.op for b in BAD}
    assert ops == set(OPS), f"ops without bad inputs: {set(OPS) - ops}"
    per_backend = {backend: sum(backend in _backends(OPS[b.op][0]) for b in BAD) for backend in genkern.backends()}
    print(f"bad inputs: {len(BAD)} kinds; calls per backend: {per_backend}")
    assert len(BAD) > 500


class _OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "genkern":
            self.seen.add(func._opname)
        return func(*args, **(kwargs or {}))


def test_every_op_is_in_the_table():
    """Each genkern:: op (but those only the backward calls) is reached by one of the table's good calls, so
    a new op cannot go without bad-input rows."""
    registered = {
        n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("genkern::")
    }
    backward = {n for n in registered if n.endswith("_backward") or "_grad_" in n}
    with _OpsSeen() as mode:
        for _, call in OPS.values():
            call("cpu")
    missing = registered - backward - mode.seen
    assert not missing, f"genkern ops that no good call in OPS reaches: {sorted(missing)}"


# ---------------------------------------------------------------------------------------------------------
# Through the ops themselves (torch.ops.genkern.* is public)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", genkern.backends("diffusion"))
@pytest.mark.parametrize("t", [[-99, 0], [0, T], [-1, 1]])
def test_q_sample_op_out_of_range_t_is_a_value_error(backend, t):
    x0 = _r(2, 3)
    with genkern.backend.scoped(backend), pytest.raises(ValueError, match=r"\bt must be in"):
        torch.ops.genkern.q_sample(x0, torch.tensor(t), SCHEDULE.table(), None, 0, 0)


@pytest.mark.parametrize("backend", genkern.backends())
def test_randn_op_refuses_absurd_shapes(backend):
    for shape in ([2**40], [-1], [2**31, 2**31, 4]):
        with genkern.backend.scoped(backend), pytest.raises(ValueError, match="shape"):
            torch.ops.genkern.randn(shape, 0, 0, F32, torch.device("cpu"))


@pytest.mark.parametrize("backend", genkern.backends("masked_conv"))
def test_masked_conv2d_grad_weight_op_refuses_absurd_kernel_size(backend):
    x, gy = _r(1, 2, 4, 4), _r(1, 2, 4, 4)
    for k in (2**40 + 1, 2**61 + 7):
        with genkern.backend.scoped(backend), pytest.raises(ValueError, match="kernel_size"):
            torch.ops.genkern.masked_conv2d_grad_weight(gy, x, k, "B", 1, 1)
    with genkern.backend.scoped(backend), pytest.raises(ValueError, match="dilation"):
        torch.ops.genkern.masked_conv2d_grad_input(gy, _r(2, 2, 3, 3), "B", 1, 2**61 + 7)


# ---------------------------------------------------------------------------------------------------------
# All-meta calls: the data-dependent checks skip (as under torch.compile), the shape checks still run
# ---------------------------------------------------------------------------------------------------------
META = "meta"


def _meta_calls():
    m = lambda *s, dtype=F32: torch.empty(*s, dtype=dtype, device=META)  # noqa: E731
    table = SCHEDULE.table(torch.device(META))
    t, prev_t = m(2, dtype=torch.int64), m(2, dtype=torch.int64)
    opts, codes = genkern.diffusion._ops.StepOptions().pack()
    return {
        "gumbel_argmax": lambda: genkern.gumbel_argmax(m(3, 5), m(3, dtype=torch.int64), seed=0),
        "nade_log_prob": lambda: genkern.nade_log_prob(m(4, 5), m(3, 5), m(3), m(5, 3), m(5)),
        "nade_log_prob(int x)": lambda: genkern.nade_log_prob(m(4, 5, dtype=torch.int64), m(3, 5), m(3), m(5, 3), m(5)),
        "q_sample op": lambda: torch.ops.genkern.q_sample(m(2, 3), t, table, None, 0, 0),
        "diffusion_loss op": lambda: torch.ops.genkern.diffusion_loss(m(2, 3), m(2, 3), t, table, None, 0, 0, 0, None),
        "ddim_step op": lambda: torch.ops.genkern.ddim_step(
            m(2, 3), m(2, 3), t, prev_t, table, None, 0, 0, opts, codes, True
        ),
        "ddim_step_out op": lambda: torch.ops.genkern.ddim_step_out(
            m(2, 3), m(2, 3), t, prev_t, table, None, 0, 0, opts, codes, m(2, 3), m(2, 3)
        ),
        "masked_conv2d": lambda: genkern.masked_conv2d(m(1, 2, 4, 4), m(2, 2, 3, 3)),
        "reparameterize": lambda: genkern.reparameterize(m(3, 4), m(3, 4), seed=0, num_samples=2),
        "nade_sample": lambda: genkern.nade_sample(m(3, 5), m(3), m(5, 3), m(5), 4, seed=0),
        "randn": lambda: genkern.randn((3, 4), seed=0, device=META),
    }


@pytest.mark.parametrize("name", list(_meta_calls()))
def test_all_meta_calls_skip_data_dependent_checks(name):
    out = _meta_calls()[name]()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    assert all(o is None or o.device.type == META for o in outs)


def test_meta_calls_still_check_shapes():
    m = lambda *s: torch.empty(*s, device=META)  # noqa: E731
    with pytest.raises(ValueError, match="logits"):
        genkern.gumbel_argmax(m(3), torch.empty(3, dtype=torch.int64, device=META), seed=0)
    with pytest.raises(ValueError, match="x"):
        genkern.nade_log_prob(m(4, 6), m(3, 5), m(3), m(5, 3), m(5))
    with pytest.raises(ValueError, match="dilation"):
        genkern.masked_conv2d(m(1, 2, 4, 4), m(2, 2, 3, 3), dilation=2**61 + 7)
