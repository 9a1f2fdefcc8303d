"""The token window of each shown example, with one feature's activation at every token of it, from one shard's
metadata and its spilled codes (a context's rows are contiguous within a shard, so a window never leaves it).

A window holds the stored tokens within `w` positions of the activating one, in the same context: BOS and the
positions extraction left out (`exclude_first`) have no activations and are not part of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Windows:
    start: np.ndarray      # int64 [E]: first row (within the shard) of each window
    stop: np.ndarray       # int64 [E]: one past the last
    offsets: np.ndarray    # int64 [E + 1]: where each window's tokens lie in token_ids / acts
    token_ids: np.ndarray  # int32, all windows concatenated
    acts: np.ndarray       # float32, aligned with token_ids


def runs(context_id: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the [start, stop) rows of the unbroken run it lies in: same context, consecutive positions."""
    n = len(context_id)
    brk = np.ones(n, bool)
    brk[1:] = (context_id[1:] != context_id[:-1]) | (pos[1:] != pos[:-1] + 1)
    first = np.flatnonzero(brk)
    run = np.cumsum(brk) - 1
    return first[run], np.append(first[1:], n)[run]


def window_bounds(context_id: np.ndarray, pos: np.ndarray, rows: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) rows of the window around each of `rows`: at most `w` rows each side, within its run."""
    run_start, run_stop = runs(context_id, pos)
    return np.maximum(rows - w, run_start[rows]), np.minimum(rows + w + 1, run_stop[rows])


def build_windows(context_id: np.ndarray, pos: np.ndarray, token_id: np.ndarray, features: np.ndarray,
                  rows: np.ndarray, w: int, codes: np.ndarray) -> Windows:
    """Windows of examples (feature, row within the shard) of one shard whose metadata and codes are given."""
    rows = rows.astype(np.int64)
    start, stop = window_bounds(context_id, pos, rows, w)
    lengths = stop - start
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    at = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])  # the row of each window token
    acts = np.zeros(offsets[-1], np.float32)
    ex, code_row, value = _codes_in_windows(features, rows, start, stop, w, len(context_id), codes)
    acts[offsets[ex] + code_row - start[ex]] = value
    return Windows(start=start, stop=stop, offsets=offsets, token_ids=token_id[at].astype(np.int32), acts=acts)


def _codes_in_windows(features, rows, start, stop, w: int, n_rows: int, codes: np.ndarray):
    """(example, row, value) for every code of an example's feature inside its window. Each code is looked up among
    the examples of its feature centred within w rows of it: one pass over the codes, whatever the examples."""
    if len(rows) == 0 or len(codes) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    centre = features.astype(np.int64) * n_rows + rows
    order = np.argsort(centre, kind="stable")
    keys = centre[order]
    code_features = codes["feature"]
    q = code_features.astype(np.int64) * n_rows + codes["row"]
    lo = np.searchsorted(keys, q - w, side="left")
    hi = np.searchsorted(keys, q + w, side="right")
    count = hi - lo
    code = np.repeat(np.arange(len(q)), count)
    ex = order[lo[code] + np.arange(code.size) - np.repeat(np.cumsum(count) - count, count)]
    r = codes["row"][code].astype(np.int64)
    hit = (features[ex] == code_features[code]) & (r >= start[ex]) & (r < stop[ex])
    return ex[hit], r[hit], codes["value"][code][hit]
