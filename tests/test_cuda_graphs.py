"""CUDA graphs: the sampling loops captured once, replayed with new inputs, and compared with eager runs.

What a replay can change is what the API keeps in device memory:

- DDIMSampler.sample(cuda_graph=True) copies x_T and the model_kwargs tensors into the capture's static
  buffers on every call. The timesteps and, for eta > 0, the seed of the per-step noise are part of the
  capture's key: another num_steps or spacing, or another seed at eta > 0, makes another capture.
- genkern.ddim_step reads its timesteps (and `noise=`, when given) from device tensors, so a loop captured by
  hand replays with new timesteps and new noise written into those tensors. Its `seed` is a host integer,
  captured by value: new seeds reach a replay only as noise drawn outside the graph.
- The cached PixelCNN sampler: PixelCNN.sample builds its program on every call (host work that reads
  tensors, so it cannot be captured); the program's run is one launch and can be. Its seed, offset and
  first_sample are launch parameters captured by value: a replay repeats the captured draws.

Each graph is compared with the eager run of the same backend; the whole module needs a GPU.
"""

import pytest
import torch
from conftest import TOLERANCE, dtypes_for

import genkern
from genkern.diffusion import DDIMSampler
from genkern.diffusion.schedules import NoiseSchedule
from genkern.models import PixelCNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCHEDULE = NoiseSchedule("linear")
SHAPE = (4, 3, 8, 8)
CLASSES = 3
STEPS = 12
# The GPU backends of the diffusion steps; "triton" alone on a machine whose genkern was built without CUDA.
GPU_BACKENDS = [b for b in ("cuda", "triton") if b in genkern.backends()]


def _params(dtypes=None):
    params = [
        pytest.param(b, d, id=f"{b}-{str(d).split('.')[-1]}")
        for b in GPU_BACKENDS
        for d in dtypes_for(b)
        if dtypes is None or d in dtypes
    ]
    return params or [pytest.param("none", torch.float32, marks=pytest.mark.skip(reason="no GPU backend here"))]


def _close(actual, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


class Denoiser(torch.nn.Module):
    """A capturable stand-in for a network: eps = tanh(w[t] x + e[label]). It indexes its tables with the
    timestep and label tensors on the device, so a replay that skipped new timesteps or labels would differ."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.rand(SCHEDULE.num_train_timesteps, generator=g) + 0.5)
        self.register_buffer("e", torch.randn(CLASSES + 1, SHAPE[1], generator=g))

    def forward(self, x, t, class_labels=None):
        y = self.w[t].to(x.dtype).reshape(-1, 1, 1, 1) * x
        if class_labels is not None:
            y = y + self.e[class_labels].to(x.dtype)[:, :, None, None]
        return torch.tanh(y)


def _labels(*rows):
    return [torch.tensor(r, device="cuda") for r in rows]


# ------------------------------------------------------------------------------------------ DDIMSampler
@pytest.mark.parametrize("backend,dtype", _params())
def test_ddim_sampler_replays_new_x_T_and_labels(backend, dtype):
    """eta = 0: one capture per configuration; each call copies its x_T (from its seed) and labels in."""
    model = Denoiser().cuda()
    sampler = DDIMSampler(SCHEDULE, backend=backend)

    def run(seed, labels, cuda_graph):
        return sampler.sample(
            model,
            SHAPE,
            STEPS,
            seed=seed,
            device="cuda",
            dtype=dtype,
            cuda_graph=cuda_graph,
            model_kwargs={"class_labels": labels},
        )

    results = []
    for seed, labels in zip((1, 1, 2, 3), _labels([0, 1, 2, 0], [2, 1, 0, 3], [0, 1, 2, 0], [3, 3, 1, 0])):
        graphed = run(seed, labels, True)
        _close(graphed, run(seed, labels, False), dtype)
        results.append(graphed)
    assert all(not torch.equal(a, b) for i, a in enumerate(results) for b in results[i + 1 :])  # all runs differ
    # An explicit x_T goes in the same way.
    x_T = genkern.randn(SHAPE, seed=9, device="cuda", dtype=dtype)
    graphed = sampler.sample(
        model,
        SHAPE,
        STEPS,
        x_T=x_T,
        dtype=dtype,
        cuda_graph=True,
        model_kwargs={"class_labels": _labels([1, 1, 1, 1])[0]},
    )
    eager = sampler.sample(
        model, SHAPE, STEPS, x_T=x_T, dtype=dtype, model_kwargs={"class_labels": _labels([1, 1, 1, 1])[0]}
    )
    _close(graphed, eager, dtype)
    sampler.clear_cuda_graphs()


@pytest.mark.parametrize("backend,dtype", _params([torch.float32]))
def test_ddim_sampler_with_noise_and_other_timesteps(backend, dtype):
    """eta > 0: the seed fixes the captured per-step noise, so a new seed is a new capture, and a replay of
    the same seed still takes a new x_T. Other timesteps (num_steps, spacing) are another capture too."""
    model = Denoiser().cuda()
    sampler = DDIMSampler(SCHEDULE, backend=backend)
    labels = _labels([0, 1, 2, 0])[0]

    def run(cuda_graph, **kwargs):
        return sampler.sample(
            model,
            SHAPE,
            device="cuda",
            dtype=dtype,
            cuda_graph=cuda_graph,
            model_kwargs={"class_labels": labels},
            **kwargs,
        )

    for kwargs in (
        dict(num_steps=STEPS, eta=1.0, seed=4),
        dict(num_steps=STEPS, eta=1.0, seed=4, x_T=genkern.randn(SHAPE, seed=8, device="cuda")),
        dict(num_steps=STEPS, eta=1.0, seed=5),
        dict(num_steps=STEPS + 3, eta=0.5, seed=5),
        dict(num_steps=STEPS, spacing="trailing", seed=5),
    ):
        _close(run(True, **kwargs), run(False, **kwargs), dtype)
    sampler.clear_cuda_graphs()


# ------------------------------------------------------------------------------ a loop captured by hand
class HandCapturedDDIM:
    """STEPS DDIM steps of `Denoiser`, captured once; timesteps, x_T and (with eta > 0) each step's noise are
    device buffers written before each replay."""

    def __init__(self, backend, dtype, eta):
        self.model, self.backend, self.dtype, self.eta = Denoiser().cuda(), backend, dtype, eta
        batch = SHAPE[0]
        self.t = torch.zeros(STEPS, batch, dtype=torch.int64, device="cuda")
        self.prev_t = torch.zeros_like(self.t)
        self.x_T = torch.zeros(SHAPE, device="cuda", dtype=dtype)
        self.noise = torch.zeros(STEPS, *SHAPE, device="cuda", dtype=dtype) if eta > 0 else None
        self.load(seed=0, spacing="leading")
        # Warm up on a side stream (Triton compilation, the schedule's device table), then capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.loop()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.loop()

    def loop(self):
        x = self.x_T
        for i in range(STEPS):
            noise = None if self.noise is None else self.noise[i]
            x, _ = genkern.ddim_step(
                self.model(x, self.t[i]),
                self.t[i],
                x,
                SCHEDULE,
                prev_t=self.prev_t[i],
                eta=self.eta,
                noise=noise,
                return_pred_original=False,
                backend=self.backend,
            )
        return x

    def load(self, seed, spacing):
        """New inputs for the next replay: the sampler's timesteps for `spacing`, x_T and the step noise of
        `seed` (the sampler's stream layout: x_T at offset 0, step i's noise at offset i + 1)."""
        ts, prev = SCHEDULE.timesteps(STEPS, spacing)
        self.t.copy_(ts[:, None].expand(-1, SHAPE[0]))
        self.prev_t.copy_(prev[:, None].expand(-1, SHAPE[0]))
        self.x_T.copy_(genkern.randn(SHAPE, seed=seed, offset=0, device="cuda", dtype=self.dtype, backend=self.backend))
        if self.noise is not None:
            for i in range(STEPS):
                self.noise[i].copy_(
                    genkern.randn(SHAPE, seed=seed, offset=i + 1, device="cuda", dtype=self.dtype, backend=self.backend)
                )

    def __call__(self, seed, spacing):
        self.load(seed, spacing)
        self.graph.replay()
        return self.out.clone()


@pytest.mark.parametrize("backend,dtype", _params())
def test_hand_captured_ddim_loop_replays_new_timesteps(backend, dtype):
    """One capture, replayed with every spacing's timesteps and new x_T: each replay is the sampler's eager run."""
    graphed = HandCapturedDDIM(backend, dtype, eta=0.0)
    sampler = DDIMSampler(SCHEDULE, backend=backend)
    runs = []
    for seed, spacing in ((1, "leading"), (1, "trailing"), (2, "linspace"), (3, "leading")):
        x_T = genkern.randn(SHAPE, seed=seed, device="cuda", dtype=dtype, backend=backend)
        eager = sampler.sample(graphed.model, SHAPE, STEPS, spacing=spacing, x_T=x_T, dtype=dtype)
        runs.append(graphed(seed, spacing))
        _close(runs[-1], eager, dtype)
    assert not torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[3])


@pytest.mark.parametrize("backend,dtype", _params([torch.float32]))
def test_hand_captured_ddim_loop_replays_new_seeds_through_noise_buffers(backend, dtype):
    """eta > 0: the step's own seed is captured by value, so new seeds reach a replay as the stream's noise
    written into the `noise=` buffers; each replay equals the sampler's eager run with that seed."""
    graphed = HandCapturedDDIM(backend, dtype, eta=0.7)
    sampler = DDIMSampler(SCHEDULE, backend=backend)
    runs = []
    for seed, spacing in ((1, "leading"), (2, "leading"), (2, "trailing")):
        eager = sampler.sample(
            graphed.model, SHAPE, STEPS, eta=0.7, seed=seed, spacing=spacing, device="cuda", dtype=dtype
        )
        runs.append(graphed(seed, spacing))
        # In-kernel noise and the drawn noise are the same stream; Triton may round an fma differently.
        _close(runs[-1], eager, dtype)
    assert not torch.equal(runs[0], runs[1]) and not torch.equal(runs[1], runs[2])


# ------------------------------------------------------------------------------------ cached PixelCNN
@pytest.mark.skipif(
    torch.cuda.is_available() and "cuda" not in genkern.backends("pixelcnn_sampling"),
    reason="needs the CUDA cached sampler (genkern built with CUDA)",
)
def test_cached_pixelcnn_sampler_captured_equals_eager():
    torch.manual_seed(0)
    model = PixelCNN(3, 16, (6, 7), hidden_channels=12, n_layers=3).cuda().eval()
    n = 5

    def capture(seed, first_sample=0):
        """The program (built outside the capture: host work) and its run, captured."""
        program = model.program(n, None)

        def run():
            out = torch.zeros(n, model.in_channels, *model.image_size, dtype=torch.int64, device="cuda")
            return program.run(
                out,
                levels=model.levels,
                scale=model.input_scale,
                shift=model.input_shift,
                seed=seed,
                offset=0,
                first_sample=first_sample,
                backend="cuda",
            )

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        return graph, out

    graph, out = capture(seed=5)
    eager = model.sample(n, seed=5, backend="cuda")
    for _ in range(3):  # each replay re-zeroes its caches and draws the captured seed's images again
        graph.replay()
        assert torch.equal(out, eager)
    assert out.unique().numel() > 1
    # Another seed or first sample is another capture (they are launch parameters).
    other, other_out = capture(seed=6, first_sample=2)
    other.replay()
    assert torch.equal(other_out, model.sample(n, seed=6, first_sample=2, backend="cuda"))
    assert not torch.equal(other_out, out)
    graph.replay()  # the first graph is untouched by the second capture
    assert torch.equal(out, eager)


# ------------------------------------------------------------------------------ the sigma-space samplers
class SigmaDenoiser(torch.nn.Module):
    """A capturable stand-in for a flow or k-diffusion network with float timesteps: tanh(a x + b t / 1000 +
    e[label]), so a replay that skipped new x_T, timesteps or labels would differ."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("a", torch.rand(SHAPE[1], generator=g) + 0.5)
        self.register_buffer("e", torch.randn(CLASSES + 1, SHAPE[1], generator=g))

    def forward(self, x, t, class_labels=None):
        y = self.a.to(x.dtype)[:, None, None] * x + (t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1)
        if class_labels is not None:
            y = y + self.e[class_labels].to(x.dtype)[:, :, None, None]
        return torch.tanh(y)


def _sigma_samplers(backend):
    from genkern.diffusion import EulerSampler, FlowMatchEulerSampler

    return {
        "flow": FlowMatchEulerSampler(shift=3.0, backend=backend),
        "flow-stochastic": FlowMatchEulerSampler(shift=3.0, stochastic=True, backend=backend),
        "euler": EulerSampler(SCHEDULE, backend=backend),
        "euler-karras-v": EulerSampler(
            SCHEDULE, prediction_type="v_prediction", use_karras_sigmas=True, backend=backend
        ),  # fmt: skip
        "euler_ancestral": EulerSampler(SCHEDULE, ancestral=True, spacing="trailing", backend=backend),
    }


@pytest.mark.parametrize("name", list(_sigma_samplers(None)))
@pytest.mark.parametrize("backend,dtype", _params())
def test_sigma_samplers_replay_new_x_T_labels_and_seeds(name, backend, dtype):
    """Each call copies its x_T (from its seed) and labels into the capture; for the samplers that draw noise
    (stochastic flow, Euler ancestral) the seed is part of the key, so a new seed is a new capture. Every
    graphed run equals the eager run, and the eager loop never synchronises with the host."""
    model = SigmaDenoiser().cuda()
    sampler = _sigma_samplers(backend)[name]

    def run(seed, labels, cuda_graph, **kwargs):
        return sampler.sample(model, SHAPE, STEPS, seed=seed, device="cuda", dtype=dtype, cuda_graph=cuda_graph,
                              model_kwargs={"class_labels": labels}, **kwargs)  # fmt: skip

    results = []
    for seed, labels in zip((1, 1, 2, 3), _labels([0, 1, 2, 0], [2, 1, 0, 3], [0, 1, 2, 0], [3, 3, 1, 0])):
        graphed = run(seed, labels, True)
        _close(graphed, run(seed, labels, False), dtype)
        results.append(graphed)
    assert all(not torch.equal(a, b) for i, a in enumerate(results) for b in results[i + 1 :])
    draws = name in ("flow-stochastic", "euler_ancestral")
    assert len(sampler._graphs) == (3 if draws else 1)
    # guidance: the model_kwargs of batch 2B, the unconditional half first
    null = torch.full((SHAPE[0],), CLASSES, device="cuda")
    labels = torch.cat([null, _labels([0, 1, 2, 0])[0]])
    _close(run(4, labels, True, guidance_scale=2.0), run(4, labels, False, guidance_scale=2.0), dtype)
    sampler.clear_cuda_graphs()
    assert "_graphs" not in vars(sampler)


@pytest.mark.parametrize("name", list(_sigma_samplers(None)))
def test_sigma_sampler_loop_never_synchronises(name, monkeypatch):
    """The loop (what a capture records) makes no synchronising CUDA call: torch's sync debug mode raises on
    one. Its set-up (the sigma rows' host-to-device copies) runs before it, outside the capture."""
    from genkern.diffusion import _sigma_loops

    model = SigmaDenoiser().cuda()
    sampler = _sigma_samplers(GPU_BACKENDS[0] if GPU_BACKENDS else None)[name]
    real = _sigma_loops.SigmaLoop.__call__

    def checked(self, x, model_kwargs):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, x, model_kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    null = torch.full((SHAPE[0],), CLASSES, device="cuda")
    kwargs = dict(seed=5, device="cuda", guidance_scale=2.0, guidance_rescale=0.5,
                  model_kwargs={"class_labels": torch.cat([null, _labels([0, 1, 2, 0])[0]])})  # fmt: skip
    warm = sampler.sample(model, SHAPE, STEPS, **kwargs)  # lazy initialisation (Triton compilation) first
    monkeypatch.setattr(_sigma_loops.SigmaLoop, "__call__", checked)
    _close(sampler.sample(model, SHAPE, STEPS, **kwargs), warm, torch.float32)
    assert not sampler._graphs if hasattr(sampler, "_graphs") else True
