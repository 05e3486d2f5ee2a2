"""The cached sampler's colour plan: at which colour sub-step each output channel of each pixel node is
computed, and how many of its weight rows it needs (docs/math.md, section 4).

With colour groups, a layer's output group g sees the current pixel's input groups <= g (mask B) or < g
(mask A) only, so at sub-step c (before colour c is drawn) only the channels that need colour c - 1 and
nothing later are new: recomputing every channel at every sub-step is colours x the work. A channel's step
is the latest step at which one of the current-pixel values it reads becomes final: colour k of the input
(cache 0) at step k + 1, a node's output channel at its own step; earlier positions, row caches and the
other taps are final at step 0. Every writer of a cache channel (a first write and the accumulations after
it) runs at the latest of their steps, so they keep their program order. Step `colours` is after the last
draw: the channels that see the pixel's last colour, for the positions after it. With a logistic-mixture
head one draw gives all of a pixel's colours: they are final at step 1 (the last), and the mixture's params
must all be computed at step 0.

A channel's value is the same whichever step computes it once its inputs are final, so the samples do not
change; a channel is computed exactly once per pixel. A convolution also stops at its last non-zero
weight row (rows are taps x C_in, the current-pixel tap last in a masked kernel's order): the input groups
a mask hides are never multiplied.

The plan is computed on the host from the packed weights' zero pattern (`structure`, once per node when the
program is built) and passed with the program to every backend: a list per node of segments
(step, first channel, end channel, rows), sorted by step, covering each output channel once; row nodes,
which run once per row, have none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .reference import GATE


class Structure(NamedTuple):
    """What planning needs of a convolution's packed weight (taps, C_in, C_out): which input channels each
    output channel reads at the current pixel (tap (0, 0)) as (C_in, C_out) bool, or None without that tap,
    and rows (C_out,): one past each output channel's last non-zero row of the (taps x C_in) rows."""

    centre: torch.Tensor | None
    rows: torch.Tensor


def structure(dy, dx, weight: torch.Tensor) -> Structure:
    """A convolution node's Structure from its taps and packed weight (NaN counts as non-zero)."""
    nonzero = weight.detach().ne(0).cpu()
    flat = nonzero.flatten(0, 1)
    last = flat.shape[0] - flat.flip(0).to(torch.int8).argmax(0)  # one past the last non-zero row
    rows = torch.where(flat.any(0), last, 0).to(torch.int64)
    centre = next((nonzero[t] for t, (y, x) in enumerate(zip(dy, dx)) if y == 0 and x == 0), None)
    return Structure(centre, rows)


def _refuse(message: str) -> None:
    raise ValueError(f"cached sampling program: {message}")


def plan(
    nodes, structures, channels, colors: int, logits: int, levels: int, mixture: bool = False
) -> list[list[tuple[int, int, int, int]]]:
    """Each node's segments (step, lo, hi, rows): output channels [lo, hi) are computed at colour sub-step
    `step` from the first `rows` weight rows. `structures[k]` is node k's Structure (None for a gate).
    mixture: the logits cache holds a logistic mixture's params, all needed by the one draw of a pixel's
    colours after step 0 (so the input's colours are all final at step 1, and steps are 0 and 1)."""
    pixel_writers: dict[int, list[int]] = {}
    for k, node in enumerate(nodes):
        if not node[1]:
            pixel_writers.setdefault(node[3], []).append(k)
    # ready[c][o]: the step from which cache c's channel o at the current pixel is final.
    drawn = torch.ones(colors, dtype=torch.int64) if mixture else torch.arange(1, colors + 1, dtype=torch.int64)
    ready: dict[int, torch.Tensor] = {0: drawn}

    def at_pixel(cache: int, k: int) -> torch.Tensor:
        if cache in pixel_writers and pixel_writers[cache][-1] > k:
            _refuse(f"node {k} reads cache {cache} at its pixel before node {pixel_writers[cache][-1]} writes it")
        return ready.get(cache, torch.zeros(channels[cache], dtype=torch.int64))

    for k, node in enumerate(nodes):
        kind, row_level, src, dst, residual = node[:5]
        if row_level:
            ready[dst] = torch.zeros(channels[dst], dtype=torch.int64)
            continue
        if kind == GATE:
            half = channels[dst]
            inputs = at_pixel(src, k)
            step = torch.maximum(inputs[:half], inputs[half : 2 * half])
        else:
            centre = structures[k].centre
            step = torch.zeros(channels[dst], dtype=torch.int64)
            if centre is not None and centre.numel():
                step = (centre.to(torch.int64) * at_pixel(src, k)[:, None]).amax(0)
            if residual >= 0:
                step = torch.maximum(step, at_pixel(residual, k))
        ready[dst] = torch.maximum(ready[dst], step) if dst in ready and k != pixel_writers[dst][0] else step

    if mixture:
        want = torch.zeros(channels[logits], dtype=torch.int64)
    else:
        want = torch.arange(colors, dtype=torch.int64).repeat_interleave(levels)
    have = ready.get(logits, want)  # an unwritten or mis-sized logits cache is the runner's to refuse
    late = have > want if have.shape == want.shape else torch.zeros(1, dtype=torch.bool)
    if bool(late.any()) and mixture:
        _refuse("the mixture's params depend on their own pixel (not causal: a single draw gives all its colours)")
    if bool(late.any()):
        c = int(late.nonzero()[0, 0]) // levels
        _refuse(f"the logits of colour {c} depend on colour {c} or later at their own pixel (not causal)")

    segments: list[list[tuple[int, int, int, int]]] = []
    for k, node in enumerate(nodes):
        if node[1]:
            segments.append([])
            continue
        steps = ready[node[3]].tolist()
        rows = [0] * len(steps) if node[0] == GATE else structures[k].rows.tolist()
        runs: list[tuple[int, int, int, int]] = []
        for o, s in enumerate(steps):
            if runs and runs[-1][0] == s and runs[-1][2] == o:
                step, lo, _, r = runs[-1]
                runs[-1] = (step, lo, o + 1, max(r, rows[o]))
            else:
                runs.append((s, o, o + 1, rows[o]))
        segments.append(sorted(runs, key=lambda seg: seg[0]))
    return segments


def multiply_adds(nodes, segments, colors: int) -> tuple[int, int]:
    """Per sample and pixel: (the plan's multiply-adds, a full recompute's at every colour sub-step) over the
    pixel convolutions."""
    planned = full = 0
    for node, segs in zip(nodes, segments):
        if node[1] or node[0] == GATE:
            continue
        weight = node[9]
        full += colors * weight.shape[0] * weight.shape[1] * weight.shape[2]
        planned += sum((hi - lo) * rows for _, lo, hi, rows in segs)
    return planned, full
