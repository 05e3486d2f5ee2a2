"""genkern.compat.causal_conv1d: causal-conv1d's signatures, defaults and return conventions, and code
written for causal-conv1d (a Mamba block's prefill and decode) giving causal-conv1d's documented results."""

import inspect

import pytest
import torch
from conftest import assert_close
from test_causal_conv1d_states import conv1d_as_documented, update_as_documented

from genkern.compat import causal_conv1d as cc

# causal-conv1d's public signatures (causal_conv1d_interface.py, causal_conv1d_varlen.py).
SIGNATURES = {
    "causal_conv1d_fn": [
        ("x", inspect.Parameter.empty),
        ("weight", inspect.Parameter.empty),
        ("bias", None),
        ("seq_idx", None),
        ("initial_states", None),
        ("return_final_states", False),
        ("final_states_out", None),
        ("activation", None),
    ],
    "causal_conv1d_update": [
        ("x", inspect.Parameter.empty),
        ("conv_state", inspect.Parameter.empty),
        ("weight", inspect.Parameter.empty),
        ("bias", None),
        ("activation", None),
        ("cache_seqlens", None),
        ("conv_state_indices", None),
    ],
    "causal_conv1d_varlen_states": [
        ("x", inspect.Parameter.empty),
        ("cu_seqlens", inspect.Parameter.empty),
        ("state_len", inspect.Parameter.empty),
    ],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signatures_are_causal_conv1d_s(name):
    params = inspect.signature(getattr(cc, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_mamba_prefill_then_decode():
    """Mamba's pattern: xBC from a (B, L, C) projection, transposed (channel-last), silu, final states kept
    as the decode state, then one-token updates continuing the sequence."""
    torch.manual_seed(0)
    B, L, C, K = 2, 13, 8, 4
    x = torch.randn(B, L + 3, C, dtype=torch.float64).transpose(1, 2)
    w, b = torch.randn(C, K, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    y, state = cc.causal_conv1d_fn(x[..., :L], w, b, activation="swish", return_final_states=True)
    ey, e_state = conv1d_as_documented(x[..., :L], w, b, None, 1, "silu")
    assert y.stride(1) == 1  # channel-last in, channel-last out
    assert_close(y, ey, torch.float64)
    assert_close(state, e_state, torch.float64)
    full, _ = conv1d_as_documented(x, w, b, None, 1, "silu")
    state = state.contiguous()
    for t in range(L, L + 3):
        out = cc.causal_conv1d_update(x[..., t], state, w, b, activation="silu")
        assert out.shape == (B, C)
        assert_close(out, full[..., t], torch.float64)


def test_initial_states_and_final_states_out_with_gradients():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    init = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    out_buf = torch.empty(2, 5, 2, dtype=torch.float64)
    y, fs = cc.causal_conv1d_fn(x, w, initial_states=init, return_final_states=True, final_states_out=out_buf)
    assert fs is out_buf
    ey, efs = conv1d_as_documented(x, w, None, init, 1, None)
    assert_close(y, ey, torch.float64)
    assert_close(out_buf, efs, torch.float64)
    (y.sum() + 3 * fs.sum()).backward()
    x2, w2, i2 = (t.detach().requires_grad_() for t in (x, w, init))
    ey, efs = conv1d_as_documented(x2, w2, None, i2, 1, None)
    (ey.sum() + 3 * efs.sum()).backward()
    for a, e in ((x, x2), (w, w2), (init, i2)):
        assert_close(a.grad, e.grad, torch.float64)


def test_update_with_cache_seqlens_and_indices_and_returns():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    w = torch.randn(4, 4, dtype=torch.float64)
    state = torch.randn(5, 4, 6, dtype=torch.float64)
    lens = torch.tensor([2, 9], dtype=torch.int32)
    idx = torch.tensor([3, 1], dtype=torch.int32)
    mine = state.clone()
    y = cc.causal_conv1d_update(x, mine, w, None, "silu", lens, idx)
    ey, e_rows = update_as_documented(x, state[idx.long()], w, None, lens, "silu")
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ey, torch.float64)
    torch.testing.assert_close(mine[idx.long()], e_rows, rtol=0, atol=0)


def test_mixed_dtypes_and_varlen_states():
    torch.manual_seed(3)
    x = torch.randn(1, 6, 10)
    w, b = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    y = cc.causal_conv1d_fn(x, w, b)
    assert y.dtype == torch.float32
    assert_close(y, conv1d_as_documented(x, w.float(), b.float(), None, 1, None)[0], torch.float32)
    tokens = torch.randn(10, 6)
    states = cc.causal_conv1d_varlen_states(tokens, torch.tensor([0, 4, 10], dtype=torch.int32), 3)
    assert states.shape == (2, 6, 3) and states.stride(1) == 1
    torch.testing.assert_close(states[1], tokens[7:10].T, rtol=0, atol=0)
    torch.testing.assert_close(states[0], tokens[1:4].T, rtol=0, atol=0)


def test_unsupported_activation_is_causal_conv1d_s_error():
    x, w = torch.randn(1, 2, 3), torch.randn(2, 2)
    with pytest.raises(NotImplementedError, match="activation"):
        cc.causal_conv1d_fn(x, w, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        cc.causal_conv1d_update(x, torch.zeros(1, 2, 1), w, activation="tanh")
