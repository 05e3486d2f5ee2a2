"""genkern: compiled kernels for the hot computations of generative models.

Families: `genkern.random` (the Philox stream), `genkern.reparam`, `genkern.diffusion` and
`genkern.autoregressive`; their public functions are re-exported here. Backends: `cpu` (C++/OpenMP),
`cuda` (CUDA C++), `triton`, `reference` (eager PyTorch, the spec).
"""

from . import autoregressive, diffusion, models, nn, random, reparam
from ._sampling import sample
from .autoregressive import (
    causal_conv1d,
    causal_conv1d_update,
    gated_activation,
    gumbel_argmax,
    masked_conv2d,
    nade_log_prob,
    nade_sample,
)
from .backend import backends, get_backend, set_backend
from .diffusion import (
    ddim_step,
    ddpm_step,
    diffusion_loss,
    euler_ancestral_step,
    euler_step,
    flow_euler_step,
    flow_matching_loss,
    flow_sample,
    q_sample,
    schedules,
)
from .random import randn
from .reparam import gaussian_kl, gaussian_log_prob, iwae_bound, reparameterize, reparameterize_kl

__version__ = "0.1.0"

__all__ = [
    "autoregressive",
    "backends",
    "causal_conv1d",
    "causal_conv1d_update",
    "ddim_step",
    "ddpm_step",
    "diffusion",
    "diffusion_loss",
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
]
