"""The CPU side of the sigma-space samplers' CUDA-graph capture (genkern.diffusion._sigma_loops): the argument
checks, and which calls share a capture. tests/test_cuda_graphs.py captures and replays on a GPU.

A stand-in for the capture (FakeGraph) replays the loop object it was made with, as a graph replays what it
recorded: the sigma rows, timesteps and the seed of the in-kernel noise of the first call with its key, only
x_T and the model_kwargs tensors taken anew. If a key missed something a replay depends on (the seed of a
sampler that draws noise, the steps, the guidance), a replay would differ from the eager run of its call."""

import pytest
import torch

from genkern.diffusion import EulerSampler, FlowMatchEulerSampler, _sigma_loops, samplers
from genkern.diffusion.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule("linear")
SHAPE = (2, 3, 4, 4)


def model(x, t, class_labels=None):
    y = 0.7 * x + (t / 1000).reshape(-1, 1, 1, 1)
    if class_labels is not None:
        y = y + class_labels.reshape(-1, 1, 1, 1).to(x.dtype)
    return torch.tanh(y)


SAMPLERS = {
    "flow": lambda: FlowMatchEulerSampler(shift=3.0, backend="cpu"),
    "flow-stochastic": lambda: FlowMatchEulerSampler(stochastic=True, backend="cpu"),
    "euler": lambda: EulerSampler(SCHEDULE, use_karras_sigmas=True, backend="cpu"),
    "euler_ancestral": lambda: EulerSampler(SCHEDULE, ancestral=True, backend="cpu"),
}
DRAWS = {"flow": False, "flow-stochastic": True, "euler": False, "euler_ancestral": True}


class FakeGraph:
    """Stands in for samplers._GraphedLoop: remembers the loop of its first call and replays it."""

    made = 0

    def __init__(self, loop, model, x_T, model_kwargs):
        FakeGraph.made += 1
        self.loop = loop

    def __call__(self, x_T, model_kwargs):
        return self.loop(x_T, model_kwargs)


@pytest.fixture
def fake_capture(monkeypatch):
    FakeGraph.made = 0
    monkeypatch.setattr(samplers, "_GraphedLoop", FakeGraph)
    monkeypatch.setattr(_sigma_loops, "check_cuda_graph", lambda cuda_graph, device: None)  # CPU tensors here


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_calls_share_a_capture_exactly_when_a_replay_gives_their_result(name, fake_capture):
    sampler = SAMPLERS[name]()
    labels = torch.tensor([0, 1])
    calls = [
        dict(seed=1),
        dict(seed=1, model_kwargs={"class_labels": labels}),
        dict(seed=2, model_kwargs={"class_labels": labels + 1}),  # new x_T and labels; noise: a new capture
        dict(seed=3, model_kwargs={"class_labels": torch.cat([labels, labels])}, guidance_scale=2.0),
        dict(seed=3, model_kwargs={"class_labels": torch.cat([labels, labels])}, guidance_scale=3.0),
        dict(seed=3, model_kwargs={"class_labels": torch.cat([labels, labels])}, guidance_scale=3.0, num_steps=5),
    ]
    for kwargs in calls:
        kwargs = dict(kwargs)
        steps = kwargs.pop("num_steps", 4)
        graphed = sampler.sample(model, SHAPE, steps, cuda_graph=True, **kwargs)
        eager = sampler.sample(model, SHAPE, steps, **kwargs)
        assert torch.equal(graphed, eager), kwargs
    # no labels, labels of batch B, of batch 2B with guidance 2, guidance 3, 5 steps; seed 2 with labels of
    # batch B is one more for a sampler that draws noise
    expected = 5 + (1 if DRAWS[name] else 0)
    assert FakeGraph.made == expected == len(sampler._graphs)
    sampler.clear_cuda_graphs()
    assert "_graphs" not in vars(sampler)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cuda_graph_argument_errors(name):
    sampler = SAMPLERS[name]()
    with pytest.raises(TypeError, match="cuda_graph"):
        sampler.sample(model, SHAPE, 2, seed=0, cuda_graph=1)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        sampler.sample(model, SHAPE, 2, seed=0, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        sampler.sample(model, SHAPE, 2, seed=0, x_T=torch.zeros(SHAPE), cuda_graph=True)


def test_unhashable_model_kwargs_are_named(fake_capture):
    with pytest.raises(TypeError, match="model_kwargs\\['mask'\\]"):
        FlowMatchEulerSampler(backend="cpu").sample(
            lambda x, t, mask: x, SHAPE, 2, seed=0, cuda_graph=True, model_kwargs={"mask": [1, 2]}
        )
