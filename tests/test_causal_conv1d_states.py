"""Causal conv1d with carried states (causal-conv1d's API, docs/math.md section 6.3): initial/final states,
seq_idx and cu_seqlens, channel-last inputs, the multi-position update with cache_seqlens and
conv_state_indices, varlen states. The reference against causal-conv1d's documented semantics written with
F.conv1d; every backend with kernels against the reference, forward and backward, over a sample of
causal-conv1d's test grid (widths 2-4 and beyond, odd lengths, bias on/off, silu/None, both layouts);
gradcheck, opcheck, torch.compile, determinism, bad input. Under TRITON_INTERPRET=1 triton takes a subset."""

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_BACKENDS, assert_close, backend_dtype_params, device_for, interpreted

import genkern
from genkern import backend as gk_backend
from genkern.autoregressive import reference as ref

FAMILY = "causal_conv1d"
BACKENDS = [b for b in KERNEL_BACKENDS if gk_backend.has_family(b, FAMILY)]
ALL_BACKENDS = BACKENDS + ["reference"]
PARAMS = backend_dtype_params(BACKENDS)


def _device(backend):
    return device_for(backend) if backend != "reference" else torch.device("cpu")


# ------------------------------------------------------------------ causal-conv1d's semantics, by F.conv1d


def conv1d_as_documented(x, w, bias, init, dilation, activation):
    """causal_conv1d_fn(x, w, bias, initial_states=init, return_final_states=True) as its documentation
    defines it: a depthwise F.conv1d over [initial_states (or the zero padding), x], output sliced to L; the
    final states are the last P entries of that input."""
    C, K = w.shape
    P = (K - 1) * dilation
    x64 = x.double()
    full = torch.cat([init.double() if init is not None else x64.new_zeros(x.shape[0], C, P), x64], dim=-1)
    y = F.conv1d(full, w.double()[:, None], bias.double() if bias is not None else None, dilation=dilation, groups=C)
    y = F.silu(y) if activation == "silu" else y
    return y, full[..., full.shape[-1] - P :]


def packed_as_documented(x, w, bias, seq_idx, activation):
    """seq_idx semantics: each run of one id is its own sequence starting from zeros; ids < 0 output 0."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        ids = seq_idx[b].tolist()
        start = 0
        for l in range(1, len(ids) + 1):
            if l == len(ids) or ids[l] != ids[start]:
                if ids[start] >= 0:
                    seg, _ = conv1d_as_documented(x[b : b + 1, :, start:l], w, bias, None, 1, activation)
                    y[b, :, start:l] = seg[0]
                start = l
    return y


def update_as_documented(x, state, w, bias, cache_seqlens, activation):
    """causal_conv1d_update_ref's documented behaviour: gather the last width - 1 (circular) entries, convolve
    with the new inputs, write the inputs back (appended, or scattered at (cache_seqlens + j) % state_len)."""
    B, C, L = x.shape
    K, S = w.shape[1], state.shape[-1]
    if cache_seqlens is None:
        window = torch.cat([state, x], dim=-1)
        new_state = window[..., -S:].clone()
    else:
        idx = (torch.arange(-(K - 1), 0)[None] + cache_seqlens[:, None].long()) % S
        window = torch.cat([state.gather(2, idx[:, None].expand(-1, C, -1)), x], dim=-1)
        new_state = state.clone()
        for b in range(B):
            for j in range(L):
                new_state[b, :, (int(cache_seqlens[b]) + j) % S] = x[b, :, j]
    y = F.conv1d(window.double(), w.double()[:, None], bias.double() if bias is not None else None, groups=C)
    y = y[..., -L:]
    return (F.silu(y) if activation == "silu" else y), new_state


def _rand(*shape, gen, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _x(B, C, L, gen, last, dtype=torch.float64, device="cpu"):
    x = _rand(B, L, C, gen=gen).transpose(1, 2) if last else _rand(B, C, L, gen=gen)
    return ref.in_layout(x.to(device=device, dtype=dtype), last)


def _seq_idx(B, L, gen, pad=True):
    ids = torch.sort(torch.randint(0, 4, (B, L), generator=gen), dim=1).values
    if pad and L > 2:
        ids[:, -2:] = -1
    return ids.to(torch.int32)


@pytest.mark.parametrize("K,dilation,L", [(2, 1, 1), (3, 1, 7), (4, 1, 64), (4, 2, 9), (5, 3, 4), (7, 1, 33)])
@pytest.mark.parametrize("with_init", [False, True])
def test_reference_is_causal_conv1d_with_states(K, dilation, L, with_init):
    gen = torch.Generator().manual_seed(K * 100 + L)
    B, C = 2, 5
    P = (K - 1) * dilation
    x, w, bias = _rand(B, C, L, gen=gen), _rand(C, K, gen=gen), _rand(C, gen=gen)
    init = _rand(B, C, P, gen=gen) if with_init else None
    for act in ("none", "silu"):
        y, fs = ref.causal_conv1d_states(x, w, bias, init, None, dilation, act)
        ey, efs = conv1d_as_documented(x, w, bias, init, dilation, act)
        assert_close(y, ey, torch.float64)
        assert_close(fs, efs, torch.float64)


def test_reference_seq_idx_is_separate_sequences():
    gen = torch.Generator().manual_seed(3)
    x, w, bias = _rand(3, 4, 41, gen=gen), _rand(4, 4, gen=gen), _rand(4, gen=gen)
    seq = _seq_idx(3, 41, gen)
    for act in ("none", "silu"):
        y, _ = ref.causal_conv1d_states(x, w, bias, None, seq, 1, act)
        assert_close(y, packed_as_documented(x, w, bias, seq, act), torch.float64)


@pytest.mark.parametrize("circular", [False, True])
def test_reference_update_is_causal_conv1d_update(circular):
    gen = torch.Generator().manual_seed(5)
    B, C, K, S = 3, 4, 4, 6
    for L in (1, 2, 5, 9):
        x, w, bias, state = _rand(B, C, L, gen=gen), _rand(C, K, gen=gen), _rand(C, gen=gen), _rand(B, C, S, gen=gen)
        lens = torch.tensor([0, 4, 13], dtype=torch.int32) if circular else None
        y, new_state = ref.causal_conv1d_update_states(x, state, w, bias, lens, None, 1, "silu")
        ey, e_state = update_as_documented(x, state, w, bias, lens, "silu")
        assert_close(y, ey, torch.float64)
        torch.testing.assert_close(new_state, e_state, rtol=0, atol=0)


# ------------------------------------------------------------------------ the kernels against the reference

# A sample of causal-conv1d's grid: (B, C, L, K, dilation); widths 2-4 and beyond, odd lengths.
GRID = list(itertools.product([2, 3, 4, 5], [1, 2, 3, 8, 37, 257, 1030], [1, 2]))
FAST_GRID = [(2, 64, L, K, d) for K, L, d in random.Random(0).sample(GRID, 10)]
SLOW_GRID = [(2, 64, L, K, 1) for L in (512, 1024, 2048, 4096) for K in (2, 3, 4)] + [(1, 4096 + 32, 259, 4, 1)]
INTERPRETER_GRID = [(2, 6, 1, 2, 1), (1, 5, 37, 4, 2), (2, 3, 1030, 3, 1)]


def _grid(backend):
    return INTERPRETER_GRID if interpreted(backend) else FAST_GRID


def _options(backend, i):
    """(channel_last, with_init, seq, bias, activation) for grid entry i: every option over the entries."""
    combos = list(itertools.product([False, True], [False, True], [False, True], [True, False], ["silu", None]))
    rnd = random.Random(i)
    return rnd.sample(combos, 2 if interpreted(backend) else 6)


def _case(shape, dtype, device, last, with_init, seq, bias, seed):
    B, C, L, K, d = shape
    gen = torch.Generator().manual_seed(seed)
    P = (K - 1) * d
    x = _x(B, C, L, gen, last, dtype, device)
    w = (_rand(C, K, gen=gen) / K**0.5).to(device=device, dtype=dtype)
    b = _rand(C, gen=gen).to(device=device, dtype=dtype) if bias else None
    init = ref.in_layout(_rand(B, C, P, gen=gen).to(device=device, dtype=dtype), last) if with_init else None
    s = _seq_idx(B, L, gen).to(device) if seq else None
    return x, w, b, init, s


def _forward_backward(backend, x, w, b, init, s, d, act):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, init)]
    y, fs = genkern.causal_conv1d(
        leaves[0],
        leaves[1],
        leaves[2],
        dilation=d,
        activation=act,
        initial_states=leaves[3],
        return_final_states=True,
        seq_idx=s,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(99)
    gy = _rand(*y.shape, gen=gen).to(y)
    gf = _rand(*fs.shape, gen=gen).to(fs)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad([y, fs], used, [gy, gf])
    return y, fs, grads


def _run_grid(backend, dtype, grid):
    device = device_for(backend)
    for i, shape in enumerate(grid):
        for last, with_init, seq, bias, act in _options(backend, i):
            case = _case(shape, dtype, device, last, with_init, seq, bias, seed=i)
            y, fs, grads = _forward_backward(backend, *case, shape[4], act)
            ey, efs, egrads = _forward_backward(
                "reference", *[t.cpu() if t is not None else None for t in case], shape[4], act
            )
            scale = 4 * shape[3] ** 0.5
            if last:
                assert ref.channel_last(y) or y.shape[1] == 1 or y.shape[2] == 1
            assert_close(y.cpu(), ey, dtype, scale)
            assert_close(fs.cpu(), efs, dtype)
            for g, e in zip(grads, egrads):
                # weight and bias gradients sum over B * L positions
                assert_close(g.cpu(), e, dtype, scale * (shape[0] * shape[2]) ** 0.5)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_forward_backward_match_reference(backend, dtype):
    _run_grid(backend, dtype, _grid(backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend,dtype", [p for p in PARAMS if not interpreted(p.values[0])])
def test_forward_backward_match_reference_long_and_wide(backend, dtype):
    _run_grid(backend, dtype, SLOW_GRID)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_last_equals_channel_first(backend):
    device = device_for(backend)
    x, w, b, init, s = _case((2, 7, 19, 4, 1), torch.float64, device, False, True, True, True, seed=1)
    y1, f1 = genkern.causal_conv1d(
        x, w, b, initial_states=init, return_final_states=True, seq_idx=s, activation="silu", backend=backend
    )
    xl, il = ref.in_layout(x, True), ref.in_layout(init, True)
    y2, f2 = genkern.causal_conv1d(
        xl, w, b, initial_states=il, return_final_states=True, seq_idx=s, activation="silu", backend=backend
    )
    assert ref.channel_last(y2) and ref.channel_last(f2)
    assert_close(y2, y1, torch.float64)
    assert_close(f2, f1, torch.float64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_cu_seqlens_is_seq_idx(backend):
    device = _device(backend)
    gen = torch.Generator().manual_seed(2)
    x, w = _x(1, 4, 20, gen, True, device=device), _rand(4, 3, gen=gen).to(device)
    cu = torch.tensor([0, 5, 6, 14, 18], dtype=torch.int32, device=device)
    seq = torch.tensor([[0] * 5 + [1] + [2] * 8 + [3] * 4 + [-1] * 2], dtype=torch.int32, device=device)
    assert torch.equal(genkern.autoregressive.seq_idx_from_cu_seqlens(cu, 20), seq)
    y1 = genkern.causal_conv1d(x, w, cu_seqlens=cu, activation="swish", backend=backend)
    y2 = genkern.causal_conv1d(x, w, seq_idx=seq, activation="silu", backend=backend)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert torch.all(y1[..., 18:] == 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_float64_with_states(backend):
    device = _device(backend)
    fast = interpreted(backend)
    for last, seq in [(False, False), (True, True)] if not fast else [(True, True)]:
        x, w, b, init, s = _case((2, 3, 6, 3, 2), torch.float64, device, last, True, seq, True, seed=4)
        leaves = [t.requires_grad_() for t in (x, w, b, init)]

        def fn(x, w, b, init):
            return genkern.causal_conv1d(
                x,
                w,
                b,
                dilation=2,
                activation="silu",
                initial_states=init,
                return_final_states=True,
                seq_idx=s,
                backend=backend,
            )

        assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    device = device_for(backend)
    case = _case((3, 5, 300, 4, 1), torch.float32, device, True, True, True, True, seed=6)
    runs = [_forward_backward(backend, *case, 1, "silu") for _ in range(2)]
    for a, b in zip([runs[0][0], *runs[0][2]], [runs[1][0], *runs[1][2]]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- generation


def _update_case(backend, last, L, seed=0, S=None, rows=None):
    device = _device(backend)
    gen = torch.Generator().manual_seed(seed)
    B, C, K = 3, 6, 4
    x = _x(B, C, L, gen, last, device=device)
    w, b = _rand(C, K, gen=gen).to(device), _rand(C, gen=gen).to(device)
    state = _rand(rows or B, C, S or K - 1, gen=gen).to(device)
    return x, w, b, state


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("last", [False, True])
def test_update_matches_reference(backend, last):
    for L, circular, indexed, S in [
        (1, False, False, None),
        (1, False, True, 6),  # the CPU's decode step on a pool row with a longer state
        (3, True, True, 7),
        (9, True, False, 5),
        (4, False, True, 11),
        (2, True, True, 3),
    ]:
        x, w, b, state = _update_case(backend, last, L, seed=L, S=S, rows=5 if indexed else None)
        lens = torch.tensor([0, 6, 23], dtype=torch.int32, device=x.device) if circular else None
        idx = torch.tensor([4, -1, 0], dtype=torch.int32, device=x.device) if indexed else None
        s1, s2 = state.clone(), state.clone()
        y = genkern.causal_conv1d_update(
            x, s1, w, b, activation="silu", cache_seqlens=lens, conv_state_indices=idx, backend=backend
        )
        ey, e_state = ref.causal_conv1d_update_states(
            x.cpu(),
            s2.cpu(),
            w.cpu(),
            b.cpu(),
            None if lens is None else lens.cpu(),
            None if idx is None else idx.cpu(),
            1,
            "silu",
        )
        assert_close(y.cpu(), ey, torch.float64)
        torch.testing.assert_close(s1.cpu(), e_state, rtol=0, atol=0)
        if indexed:
            assert torch.all(y[1] == 0)
            torch.testing.assert_close(s1[[1, 2, 3]], state[[1, 2, 3]], rtol=0, atol=0)  # untouched rows


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("circular", [False, True])
def test_chunked_updates_equal_the_convolution(backend, circular):
    """Prefill in chunks of several positions through the update (dilation 2, a circular buffer or a plain
    state): the outputs equal one convolution of the whole sequence."""
    device = _device(backend)
    gen = torch.Generator().manual_seed(8)
    B, C, K, d, L = 2, 5, 3, 2, 17
    x, w, b = _rand(B, C, L, gen=gen).to(device), _rand(C, K, gen=gen).to(device), _rand(C, gen=gen).to(device)
    S = 6 if circular else (K - 1) * d
    state = torch.zeros(B, C, S, dtype=torch.float64, device=device)
    outs, pos = [], 0
    for n in (1, 4, 2, 7, 3):
        lens = torch.full((B,), pos, dtype=torch.int32, device=device) if circular else None
        outs.append(
            genkern.causal_conv1d_update(
                x[..., pos : pos + n], state, w, b, dilation=d, cache_seqlens=lens, backend=backend
            )
        )
        pos += n
    full = genkern.causal_conv1d(x, w, b, dilation=d, backend=backend)
    assert_close(torch.cat(outs, dim=-1), full, torch.float64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_varlen_states_are_each_sequences_final_states(backend):
    device = _device(backend)
    gen = torch.Generator().manual_seed(9)
    x = _rand(30, 7, gen=gen).to(device)
    cu = torch.tensor([0, 2, 2, 11, 25, 28], dtype=torch.int32, device=device)
    w = _rand(7, 4, gen=gen).to(device)
    for S in (0, 1, 3, 5):
        states = genkern.causal_conv1d_varlen_states(x, cu, S, backend=backend)
        assert states.shape == (5, 7, S) and (S == 0 or ref.channel_last(states) or states.shape[2] == 1)
        torch.testing.assert_close(states.cpu(), ref.causal_conv1d_varlen_states(x.cpu(), cu.cpu(), S), rtol=0, atol=0)
        if S == 3:  # the conv's final states of each sequence run alone
            for i in range(5):
                seg = x[cu[i] : cu[i + 1]].T[None]
                _, fs = genkern.causal_conv1d(seg, w, return_final_states=True, backend=backend)
                torch.testing.assert_close(states[i], fs[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- torch integration


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck(backend):
    ops = torch.ops.genkern
    device = _device(backend)
    x, w, b, init, s = _case((2, 3, 7, 3, 2), torch.float32, device, False, True, True, True, seed=0)
    xl, _, _, il, _ = _case((2, 3, 7, 3, 2), torch.float32, device, True, True, False, True, seed=1)
    for t in (x, w, b, init, xl, il):
        t.requires_grad_(True)
    gy = torch.randn(2, 3, 7, device=device)
    samples = [
        (ops.causal_conv1d_states, (x, w, b, init, s.long(), 2, "silu")),
        (ops.causal_conv1d_states, (xl, w, None, il, None, 2, "none")),
        (
            ops.causal_conv1d_states_backward,
            (gy, torch.randn(2, 3, 4, device=device), x.detach(), w.detach(), b.detach(), init.detach(), s, 2, "silu"),
        ),
        (
            ops.causal_conv1d_update_states,
            (
                torch.randn(2, 3, 3, device=device),
                torch.randn(4, 3, 5, device=device),
                w.detach(),
                b.detach(),
                torch.tensor([1, 7], dtype=torch.int32, device=device),
                torch.tensor([3, -1], dtype=torch.int32, device=device),
                2,
                "silu",
            ),
        ),
        (
            ops.causal_conv1d_varlen_states,
            (torch.randn(9, 3, device=device), torch.tensor([0, 4, 9], dtype=torch.int32, device=device), 3),
        ),
    ]
    with gk_backend.scoped(backend):
        for op, args in samples:
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    def step(x, w, b, init, s, state, lens, idx):
        y, fs = genkern.causal_conv1d(
            x, w, b, activation="silu", initial_states=init, return_final_states=True, seq_idx=s
        )
        z = genkern.causal_conv1d_update(
            y.detach()[..., -2:], state, w.detach(), b.detach(), cache_seqlens=lens, conv_state_indices=idx
        )
        return y.square().mean() + fs.sum() + z.sum()

    x, w, b, init, s = _case((2, 4, 9, 3, 1), torch.float32, "cpu", True, True, True, True, seed=3)
    for t in (x, w, b, init):
        t.requires_grad_(True)
    state = torch.randn(3, 4, 4)
    lens, idx = torch.tensor([1, 5], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    s_eager, s_comp = state.clone(), state.clone()
    eager = step(x, w, b, init, s, s_eager, lens, idx)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, b, init, s, s_comp, lens, idx)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(s_comp, s_eager)
    g1 = torch.autograd.grad(eager, (x, w, b, init))
    g2 = torch.autograd.grad(compiled, (x, w, b, init))
    for a, e in zip(g2, g1):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_naming_the_argument(monkeypatch):
    def no_kernel(*args):
        raise AssertionError("a kernel ran")

    for name in ("forward_states", "backward_states", "update_states", "varlen_states"):
        monkeypatch.setattr(genkern._native._C.causal_conv1d, name, no_kernel, raising=False)
    gen = torch.Generator().manual_seed(0)
    x, w = _rand(2, 3, 8, gen=gen), _rand(3, 4, gen=gen)
    state = torch.zeros(2, 3, 3, dtype=torch.float64)
    cases = [
        (
            ValueError,
            "seq_idx decreases",
            lambda: genkern.causal_conv1d(
                x, w, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]] * 2, dtype=torch.int32)
            ),
        ),
        (TypeError, "seq_idx", lambda: genkern.causal_conv1d(x, w, seq_idx=torch.zeros(2, 8))),
        (ValueError, "seq_idx", lambda: genkern.causal_conv1d(x, w, seq_idx=torch.zeros(2, 7, dtype=torch.int32))),
        (
            ValueError,
            "initial_states",
            lambda: genkern.causal_conv1d(x, w, dilation=2, initial_states=torch.zeros(2, 3, 3, dtype=torch.float64)),
        ),
        (TypeError, "initial_states", lambda: genkern.causal_conv1d(x, w, initial_states=torch.zeros(2, 3, 3))),
        (ValueError, "depthwise", lambda: genkern.causal_conv1d(x, _rand(3, 3, 2, gen=gen), return_final_states=True)),
        (ValueError, "conv_state", lambda: genkern.causal_conv1d_update(x[..., :1], state, w, dilation=2)),
        (
            ValueError,
            "conv_state_indices",
            lambda: genkern.causal_conv1d_update(
                x[..., :2], state, w, conv_state_indices=torch.tensor([0, 2], dtype=torch.int32)
            ),
        ),
        (
            ValueError,
            "conv_state_indices",
            lambda: genkern.causal_conv1d_update(
                x[..., :2], state, w, conv_state_indices=torch.tensor([1, 1], dtype=torch.int32)
            ),
        ),
        (
            TypeError,
            "conv_state_indices",
            lambda: genkern.causal_conv1d_update(x[..., :2], state, w, conv_state_indices=torch.tensor([0.0, 1.0])),
        ),
        (
            ValueError,
            "cache_seqlens",
            lambda: genkern.causal_conv1d_update(
                x[..., :2], state, w, cache_seqlens=torch.tensor([0, -1], dtype=torch.int32)
            ),
        ),
        (
            ValueError,
            "cache_seqlens",
            lambda: genkern.causal_conv1d_update(
                x[..., :2], state, w, cache_seqlens=torch.tensor([0], dtype=torch.int32)
            ),
        ),
        (
            ValueError,
            "cu_seqlens",
            lambda: genkern.causal_conv1d_varlen_states(
                x[0].T.contiguous(), torch.tensor([0, 5, 3], dtype=torch.int32), 3
            ),
        ),
        (
            ValueError,
            "cu_seqlens",
            lambda: genkern.causal_conv1d_varlen_states(
                x[0].T.contiguous(), torch.tensor([0, 9], dtype=torch.int32), 3
            ),
        ),
        (ValueError, "cu_seqlens", lambda: genkern.causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 8]))),
        (ValueError, "activation", lambda: genkern.causal_conv1d(x, w, activation="gelu", return_final_states=True)),
    ]
    for backend in ALL_BACKENDS:
        with gk_backend.scoped(backend):
            for error, words, call in cases:
                with pytest.raises(error, match=words):
                    call()


def test_native_checks_guard_the_kernels():
    """The compiled entry points check layouts and shapes themselves (reachable without the ops)."""
    native = genkern._native.Kernels(genkern._native._C.causal_conv1d)
    x, w = torch.randn(2, 3, 5), torch.randn(3, 2)
    y = torch.empty(2, 3, 5)
    with pytest.raises(ValueError, match="initial_states"):
        native.forward_states(x, w, None, torch.zeros(2, 3, 2), None, y, None, 1, 0, False)
    with pytest.raises(ValueError, match="channel-last"):
        native.forward_states(x, w, None, None, None, y, None, 1, 0, True)
    with pytest.raises(ValueError, match="conv_state"):
        native.update_states(x, torch.zeros(2, 3, 0), w, None, None, None, y, 1, 0, False)
    with pytest.raises(TypeError, match="seq_idx"):
        native.forward_states(x, w, None, None, torch.zeros(2, 5, dtype=torch.float64), y, None, 1, 0, False)


@pytest.mark.parametrize("sliced", [False, True])
def test_channel_last_x_is_read_in_place(monkeypatch, sliced):
    """A (B, L, C) tensor transposed reaches the cpu kernels without a copy, forward and backward; a channel
    slice of a wider one (Mamba's xBC) is made dense once, and its result is still channel-last."""
    native = genkern._native._C.causal_conv1d
    seen = []
    for name in ("forward_states", "backward_states"):
        original = getattr(native, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append(args[0 if _name == "forward_states" else 2].data)
            return _original(*args, **kwargs)

        monkeypatch.setattr(native, name, spy)
    wide = torch.randn(2, 11, 9 if sliced else 6, dtype=torch.float64)
    x = wide[..., :6].transpose(1, 2).requires_grad_()
    w = torch.randn(6, 4, dtype=torch.float64)
    y = genkern.causal_conv1d(x, w, activation="silu", initial_states=torch.zeros(2, 6, 3, dtype=torch.float64),
                              backend="cpu")  # fmt: skip
    y.sum().backward()
    assert ref.channel_last(y) and y.transpose(1, 2).is_contiguous()
    assert sliced or ref.channel_last(x.grad)  # autograd may store a sliced leaf's gradient densely
    assert len(seen) == 2
    assert (seen[0] == x.data_ptr()) != sliced and (seen[1] == x.data_ptr()) != sliced
