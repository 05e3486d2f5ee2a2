"""genkern: compiled kernels for the hot computations of generative models.

Backends: `cpu` (C++/OpenMP), `cuda` (CUDA C++), `triton`, `reference` (eager PyTorch, the spec).
"""
from . import models, nn, random, schedules
from .backend import backends, get_backend, set_backend
from .causal_conv1d import causal_conv1d, causal_conv1d_update, gated_activation
from .diffusion import ddim_step, ddpm_step, diffusion_loss, q_sample
from .masked_conv import masked_conv2d
from .nade import nade_log_prob, nade_sample
from .random import randn
from .reparam import gaussian_kl, gaussian_log_prob, iwae_bound, reparameterize, reparameterize_kl

__version__ = "0.1.0"

__all__ = [
    "backends",
    "causal_conv1d",
    "causal_conv1d_update",
    "ddim_step",
    "ddpm_step",
    "diffusion_loss",
    "gaussian_kl",
    "gaussian_log_prob",
    "gated_activation",
    "get_backend",
    "iwae_bound",
    "masked_conv2d",
    "models",
    "nade_log_prob",
    "nade_sample",
    "nn",
    "q_sample",
    "randn",
    "random",
    "reparameterize",
    "reparameterize_kl",
    "schedules",
    "set_backend",
]
