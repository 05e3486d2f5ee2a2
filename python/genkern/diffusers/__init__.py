"""Drop-in schedulers for diffusers pipelines, backed by genkern's fused steps (needs `pip install genkern[diffusers]`).

    pipe = diffusers.DDIMPipeline(unet, scheduler)
    pipe.scheduler = genkern.diffusers.from_scheduler(pipe.scheduler)    # same config, genkern's step
    images = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=50).images

`DDPMScheduler` and `DDIMScheduler` are diffusers' own classes (configuration, set_timesteps, timesteps,
init_noise_sigma, order, save/load) with `step` and `add_noise` running genkern's ops; by default they
reproduce diffusers' scheduler, bugs included, and the configuration flags `genkern_schedule` and
`genkern_timesteps` switch to genkern's definitions (docs/diffusion.md, "The diffusers drop-in").
`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler` and `FlowMatchEulerDiscreteScheduler` are
diffusers' classes with `step` in genkern's fused sigma_step; the calls the kernel does not cover (Euler's
s_churn, per-token timesteps, mixed dtypes) run diffusers' own step. `DPMSolverMultistepScheduler` is
diffusers' class with `step` in genkern's fused dpm_solver_step (DPM-Solver++ and SDE-DPM-Solver++, orders 1
and 2, its history a device tensor the scheduler owns); solver_order 3, the "dpmsolver" / "sde-dpmsolver"
algorithms, flow sigmas, learned variances and mixed dtypes run diffusers' own step (genkern.diffusers._dpm
lists them). `UniPCMultistepScheduler` is diffusers' class with `step` in genkern's fused unipc_step (the UniC
corrector and UniP predictor, bh1 and bh2, orders 1 and 2, flow sigmas included, its state a device tensor
the scheduler owns); solver_order 3, predict_x0=False and solver_p run diffusers' own step
(genkern.diffusers._unipc).

This package is the only part of genkern that imports diffusers; `import genkern` does not.
"""

from __future__ import annotations

import diffusers as _diffusers

from ._ddim import DDIMScheduler
from ._ddpm import DDPMScheduler
from ._dpm import DPMSolverMultistepScheduler
from ._euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from ._flow_match import FlowMatchEulerDiscreteScheduler
from ._unipc import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "UniPCMultistepScheduler",
    "from_scheduler",
]

_DROP_INS = (
    DDPMScheduler,
    DDIMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
# diffusers' class (and genkern's own) -> genkern's drop-in
_SUPPORTED = {**{getattr(_diffusers, c.__name__): c for c in _DROP_INS}, **{c: c for c in _DROP_INS}}


def from_scheduler(scheduler, **flags):
    """The genkern drop-in for a diffusers scheduler: genkern.diffusers.X for diffusers.X, X one of
    DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler and UniPCMultistepScheduler, built from its
    configuration (`flags`: configuration values to override, e.g. genkern_timesteps=True), its set_timesteps
    state copied (and the multistep schedulers' solver state). A TypeError for any other class (subclasses
    included: they may step differently)."""
    cls = _SUPPORTED.get(type(scheduler))
    if cls is None:
        names = ", ".join(sorted({f"diffusers.{c.__name__}" for c in _SUPPORTED}))
        raise TypeError(
            f"genkern.diffusers.from_scheduler: unsupported scheduler class {type(scheduler).__module__}."
            f"{type(scheduler).__qualname__}; supported: {names}"
        )
    return cls.from_scheduler(scheduler, **flags)
