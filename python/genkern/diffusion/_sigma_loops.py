"""The loops of the sigma-space samplers (FlowMatchEulerSampler, EulerSampler), eager or captured in a CUDA
graph (`cuda_graph=True`), the way the DDPM/DDIM samplers run theirs (genkern.diffusion.samplers).

A loop object holds everything on the device that its steps read (the sigma rows, the model's timesteps, the
scales of scale_model_input), built before a capture, so a step reads nothing back from the device and makes
no host-to-device copy: the whole loop can be captured once and replayed. x_T and the model_kwargs tensors are
the graph's inputs, copied into its static buffers on each call; the seed of the in-kernel noise (flow's
stochastic sampling, Euler ancestral) is a host scalar captured by value, so it is part of the capture's key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .. import backend as _backend
from .._kernels import to_signed


def check_cuda_graph(cuda_graph, device) -> None:
    """cuda_graph must be a bool, and True needs a CUDA device."""
    _checks.boolean("cuda_graph", cuda_graph)
    if cuda_graph and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device {torch.device(device)}")


class SigmaLoop:
    """One sampling run of a sigma-space sampler from x_T: `loop(x_T, model_kwargs) -> x_0`.

    sigmas: the float32 (N + 1,) inference sigmas; timesteps: the model's (N,) timesteps; scales: None (flow:
    the model sees x), or (N,) divisors of scale_model_input; init: x_T's factor (init_noise_sigma)."""

    def __init__(self, model, kind: int, prediction: int, stochastic: bool, sigmas: Tensor, timesteps: Tensor,
                 scales: Tensor | None, init: float, batch: int, device: torch.device, dtype: torch.dtype,
                 seed: int, guidance_scale, guidance_rescale: float, backend):  # fmt: skip
        self.model, self.kind, self.prediction, self.stochastic, self.init = model, kind, prediction, stochastic, init
        self.backend, self.seed = backend, to_signed(seed)
        self.scale = None if guidance_scale is None else float(guidance_scale)
        self.rescale = float(guidance_rescale)
        # Row i: step i's value for every sample (contiguous (B,) rows, indexed without reading them).
        self.rows = sigmas.to(device)[:, None].expand(-1, batch).contiguous()
        t_model = timesteps.to(device)[:, None].expand(-1, batch).contiguous()
        self.t_model = t_model.repeat(1, 2) if guidance_scale is not None else t_model
        self.scales = None if scales is None else scales.to(device=device, dtype=dtype)[:, None].expand(-1, batch)
        self.scales = None if scales is None else self.scales.contiguous()
        self.num_steps = timesteps.shape[0]

    def __call__(self, x: Tensor, model_kwargs: dict) -> Tensor:
        guided = self.scale is not None
        view = (-1, *([1] * (x.dim() - 1)))
        op = torch.ops.genkern.sigma_step
        if self.init != 1.0:
            x = x * self.init
        for i in range(self.num_steps):
            x_in = x if self.scales is None else x / self.scales[i].view(view)
            x_in = torch.cat([x_in, x_in]) if guided else x_in
            m = self.model(x_in, self.t_model[i], **model_kwargs)
            args = (m, x, self.rows[i], self.rows[i + 1], None, self.seed, i + 1, self.kind, self.prediction)
            x = _backend.call(self.backend, op, *args, self.scale, self.rescale, self.stochastic, False)[0]
        return x


def run(sampler, loop: SigmaLoop, key: tuple, x_T: Tensor, model_kwargs: dict, cuda_graph: bool) -> Tensor:
    """loop(x_T, model_kwargs), or with cuda_graph=True its capture for `key` (plus x_T's shape, dtype and
    device, the model and the model_kwargs' key), made on the first call and replayed; the captures are kept on
    the sampler (`sampler.clear_cuda_graphs()` releases them)."""
    if not cuda_graph:
        return loop(x_T, model_kwargs)
    from .samplers import _GraphedLoop, _kwargs_key

    graphs = sampler.__dict__.setdefault("_graphs", {})
    full_key = (*key, tuple(x_T.shape), x_T.dtype, x_T.device, id(loop.model), _kwargs_key(model_kwargs))
    graphed = graphs.get(full_key)
    if graphed is None:
        graphed = graphs[full_key] = _GraphedLoop(loop, loop.model, x_T, model_kwargs)
    return graphed(x_T, model_kwargs)


def clear_cuda_graphs(sampler) -> None:
    """Release a sampler's captured graphs (and the memory pools they hold)."""
    sampler.__dict__.pop("_graphs", None)
