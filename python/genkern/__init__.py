"""genkern: compiled kernels for the hot computations of generative models.

Families: `genkern.random` (the Philox stream), `genkern.reparam`, `genkern.diffusion` and
`genkern.autoregressive`; their public functions are re-exported here. Backends: `cpu` (C++/OpenMP),
`cuda` (CUDA C++), `triton`, `reference` (eager PyTorch, the spec).
"""

import os as _os
import sys as _sys

# OpenMP threads that finish first spin (GOMP's default: 300,000 rounds) before sleeping, waiting for the
# others. When other processes keep the cores busy the thread they wait for is descheduled, and the spinning
# only delays it: a 256K-element reparameterize under full load takes 8.0 ms at the 90th percentile with the
# default and 1.0 ms with 10,000 rounds (0.30 and 0.28 ms idle, 2-core Xeon). libgomp reads this once, when
# it loads (with torch), so it applies only when genkern is imported before torch, and never overrides a
# choice already made (GOMP_SPINCOUNT or OMP_WAIT_POLICY set). genkern's small calls never open a parallel
# region at all (the grain in csrc/core/parallel.h).
if "torch" not in _sys.modules and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "10000"

from . import autoregressive, diffusion, models, nn, random, reparam  # noqa: E402
from ._sampling import sample
from .autoregressive import (
    causal_conv1d,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
    discretized_logistic_mixture_nll,
    discretized_logistic_mixture_sample,
    gated_activation,
    gumbel_argmax,
    masked_conv2d,
    nade_log_prob,
    nade_sample,
    sample_logits,
)
from .backend import backends, get_backend, set_backend
from .diffusion import (
    ddim_step,
    ddpm_step,
    diffusion_loss,
    dpm_solver_step,
    euler_ancestral_step,
    euler_step,
    flow_euler_step,
    flow_matching_loss,
    flow_sample,
    heun_step,
    q_sample,
    schedules,
    unipc_step,
)
from .random import randn
from .reparam import gaussian_kl, gaussian_log_prob, iwae_bound, reparameterize, reparameterize_kl

__version__ = "0.1.0"

__all__ = [
    "autoregressive",
    "backends",
    "causal_conv1d",
    "causal_conv1d_update",
    "causal_conv1d_varlen_states",
    "ddim_step",
    "ddpm_step",
    "diffusion",
    "diffusion_loss",
    "dpm_solver_step",
    "discretized_logistic_mixture_nll",
    "discretized_logistic_mixture_sample",
    "euler_ancestral_step",
    "euler_step",
    "flow_euler_step",
    "flow_matching_loss",
    "flow_sample",
    "gated_activation",
    "gaussian_kl",
    "gaussian_log_prob",
    "get_backend",
    "gumbel_argmax",
    "heun_step",
    "sample_logits",
    "iwae_bound",
    "masked_conv2d",
    "models",
    "nade_log_prob",
    "nade_sample",
    "nn",
    "q_sample",
    "randn",
    "random",
    "reparam",
    "reparameterize",
    "reparameterize_kl",
    "sample",
    "schedules",
    "set_backend",
    "unipc_step",
]
