"""Ops called from several Python threads at once give the bits they give alone, and gradients keep their
bits whatever torch's thread count.

The compiled kernels release the GIL and keep per-thread scratch memory between calls (csrc/core/memory.h),
so concurrent calls really overlap inside the C++ code: if scratch were shared, or a kernel kept state
between calls, some results here would differ from the single-threaded ones.
"""

from __future__ import annotations

import threading

import pytest
import torch

import genkern
from genkern.models import NADE, PixelCNN

THREADS = 4
ROUNDS = 3


def _vae_step(i: int):
    g = torch.Generator().manual_seed(100 + i)
    mu = torch.randn(64, 96, generator=g, requires_grad=True)
    logvar = torch.randn(64, 96, generator=g).mul(0.5).requires_grad_()
    z, kl = genkern.reparameterize_kl(mu, logvar, seed=i)
    log_px_z = -z.square().sum(-1)
    zk = genkern.reparameterize(mu, logvar, seed=i, num_samples=8)
    bound = genkern.iwae_bound(-zk.square().sum(-1), zk, mu, logvar)
    loss = (kl - log_px_z).sum() - bound.sum()
    return (z, kl, bound, *torch.autograd.grad(loss, (mu, logvar)))


_MODELS: dict[str, torch.nn.Module] = {}
_MODELS_LOCK = threading.Lock()


def _model(name: str, make) -> torch.nn.Module:
    """One model per kind, shared read-only by the threads (made under a lock: torch's global generator
    initialises the weights)."""
    with _MODELS_LOCK:
        if name not in _MODELS:
            torch.manual_seed(7)
            _MODELS[name] = make()
        return _MODELS[name]


def _pixelcnn_step(i: int):
    model = _model("pixelcnn", lambda: PixelCNN(1, 4, 8, hidden_channels=16, n_layers=3))
    x = torch.randint(0, 4, (6, 1, 8, 8), generator=torch.Generator().manual_seed(i))
    nll = model.log_prob(x).sum()
    grads = torch.autograd.grad(nll, list(model.parameters()))
    return (nll.detach(), *grads, model.sample(5, seed=i))


def _nade_step(i: int):
    model = _model("nade", lambda: NADE(30, 20).double())
    x = torch.randint(0, 2, (16, 30), generator=torch.Generator().manual_seed(i)).double()
    lp = model.log_prob(x).sum()
    return (lp.detach(), *torch.autograd.grad(lp, list(model.parameters())), model.sample(7, seed=i))


def _conv1d_step(i: int):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(3, 16, 200, generator=g, requires_grad=True)
    w = torch.randn(16, 4, generator=g, requires_grad=True)
    y = genkern.causal_conv1d(x, w, dilation=2, activation="silu")
    state = torch.randn(3, 16, 6, generator=g)
    step = genkern.causal_conv1d_update(x[:, :, -1].detach(), state, w.detach(), dilation=2)
    return (y.detach(), *torch.autograd.grad(y.square().sum(), (x, w)), step, state)


def _diffusion_step(i: int):
    g = torch.Generator().manual_seed(i)
    x0 = torch.randn(4, 3, 16, 16, generator=g)
    m = torch.randn(4, 3, 16, 16, generator=g, requires_grad=True)
    t = torch.tensor([1, 250, 500, 999])
    schedule = genkern.schedules.NoiseSchedule("cosine")
    loss = genkern.diffusion_loss(m, x0, t, schedule, seed=i).sum()
    x_t = genkern.q_sample(x0, t, schedule, seed=i)
    prev = genkern.ddim_step(m.detach(), t, x_t, schedule, prev_t=t - 1)
    return (loss.detach(), *torch.autograd.grad(loss, m), x_t, prev)


STEPS = {
    "reparam": _vae_step,
    "pixelcnn": _pixelcnn_step,
    "nade": _nade_step,
    "causal_conv1d": _conv1d_step,
    "diffusion": _diffusion_step,
}


def _flatten(result):
    return [t for t in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(STEPS))
def test_concurrent_calls_give_the_single_threaded_bits(name):
    step = STEPS[name]
    alone = {i: _flatten(step(i)) for i in range(THREADS)}
    results, errors = {}, []
    barrier = threading.Barrier(THREADS)

    def worker(i):
        try:
            for r in range(ROUNDS):
                barrier.wait()  # every round starts the threads together, so the kernels overlap
                results[(i, r)] = _flatten(step(i))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((i, repr(exc)))
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (i, r), got in results.items():
        assert len(got) == len(alone[i])
        for k, (a, b) in enumerate(zip(got, alone[i])):
            assert torch.equal(a, b), f"{name}: thread {i}, round {r}, output {k} differs from the lone call"


@pytest.mark.parametrize("name", sorted(STEPS))
def test_results_keep_their_bits_for_any_thread_count(name):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _flatten(STEPS[name](0))
        torch.set_num_threads(max(2, previous))
        many = _flatten(STEPS[name](0))
    finally:
        torch.set_num_threads(previous)
    for k, (a, b) in enumerate(zip(one, many)):
        assert torch.equal(a, b), f"{name}: output {k} depends on the thread count"
