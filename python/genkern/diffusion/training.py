"""The diffusion training objective around a model, on the fused ops.

    loss = training_loss(model, x0, schedule, seed=step)
    loss.backward()

x_t comes from genkern.q_sample and the loss from genkern.diffusion_loss with the same (seed, offset), so
the noise is drawn inside the first kernel and regenerated inside the second: it is never stored.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ..random import resolve_seed
from .schedules import NoiseSchedule


def training_loss(
    model,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    t=None,
    seed: int | None = None,
    offset: int = 0,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    model_kwargs: dict | None = None,
    cond_drop_prob: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """The mean simplified diffusion loss of `model` on the batch x0 (B, ...).

    t: per-sample timesteps (an int or a (B,) integer tensor); None draws them uniformly from [0, T) with
        torch's default generator on x0's device (torch.manual_seed makes it reproducible).
    seed, offset: the noise of x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (seed None: drawn from torch's
        default generator, once, for both kernels).
    prediction_type, snr_gamma: the target and the min-SNR-gamma weighting, as genkern.diffusion_loss.
    model_kwargs: extra arguments of model(x_t, t, **model_kwargs).
    cond_drop_prob: for classifier-free guidance training, the probability of replacing each sample's
        model_kwargs["class_labels"] by the null class model.num_classes (genkern.models.UNet's convention).
    """
    from . import diffusion_loss, q_sample  # genkern.diffusion may import this module while initialising

    if not callable(model):
        raise TypeError(f"model must be callable as model(x_t, t, **model_kwargs), got {type(model).__name__}")
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() == 0:
        raise ValueError("x0 must have a batch dimension (dim 0), got a 0-dim tensor")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    if t is None:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(
                f"schedule must be a genkern.diffusion.schedules.NoiseSchedule, got {type(schedule).__name__}"
            )
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), device=x0.device)
    if isinstance(cond_drop_prob, bool) or not isinstance(cond_drop_prob, numbers.Real):
        raise TypeError(f"cond_drop_prob must be a real number, got {type(cond_drop_prob).__name__}")
    if not 0.0 <= cond_drop_prob <= 1.0:
        raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
    if cond_drop_prob > 0:
        model_kwargs = {**model_kwargs, "class_labels": _drop_labels(model, model_kwargs, cond_drop_prob)}
    seed = resolve_seed(seed)

    x_t = q_sample(x0, t, schedule, seed=seed, offset=offset, backend=backend)
    out = model(x_t, t, **model_kwargs)
    return diffusion_loss(
        out,
        x0,
        t,
        schedule,
        seed=seed,
        offset=offset,
        prediction_type=prediction_type,
        snr_gamma=snr_gamma,
        backend=backend,
    )


def _drop_labels(model, model_kwargs: dict, p: float) -> Tensor:
    """class_labels with each entry replaced by the null class with probability p."""
    null = getattr(model, "num_classes", None)
    if not isinstance(null, int):
        raise ValueError(
            "cond_drop_prob needs a class-conditional model with an int attribute num_classes "
            "(the null class label, as genkern.models.UNet has)"
        )
    labels = model_kwargs.get("class_labels")
    if not isinstance(labels, Tensor):
        raise ValueError("cond_drop_prob needs model_kwargs['class_labels'], a tensor of labels")
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)
