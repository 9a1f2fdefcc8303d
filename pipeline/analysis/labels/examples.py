"""The excerpts the explainer and the scorers see: a feature's stored examples (examples.parquet), trimmed to a fixed
number of tokens around the activating one, and non-activating excerpts drawn from a pool of random held-out windows
that the SAE has encoded (a window is non-activating for a feature when the feature is zero at every token of it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.analysis.windows import runs

from ..browser_pages import display_text

OPEN, CLOSE = "<<", ">>"


@dataclass(frozen=True)
class Excerpt:
    """A run of tokens and one feature's activation at each (all zero for a non-activating excerpt)."""
    token_ids: tuple[int, ...]
    acts: tuple[float, ...]
    row: int         # store row of the centre token: the identity of the excerpt
    source: str      # "top", "interval" or "random"
    interval: int = -1  # the activation interval of an interval sample

    @property
    def active(self) -> np.ndarray:
        return np.asarray(self.acts) > 0


def trim(token_ids: Sequence[int], acts: Sequence[float], centre: int, length: int) -> tuple[list[int], list[float]]:
    """At most `length` tokens around index `centre`, as evenly on both sides as the run allows."""
    n = len(token_ids)
    start = max(0, min(centre - length // 2, n - length))
    stop = min(n, start + length)
    return list(token_ids[start:stop]), [float(a) for a in acts[start:stop]]


def load_examples(analysis_dir: Path, features: Sequence[int], context_tokens: int) -> dict[int, dict[str, list[Excerpt]]]:
    """{feature: {"top": [...], "interval": [...]}}: the stored examples of `features`, top ones by rank, interval
    samples from the strongest interval down (what examples.parquet holds, trimmed)."""
    wanted = sorted(set(int(f) for f in features))
    out: dict[int, dict[str, list[Excerpt]]] = {f: {"top": [], "interval": []} for f in wanted}
    if not wanted:
        return out
    table = pq.read_table(analysis_dir / "examples.parquet", filters=[("feature", "in", wanted)],
                          columns=["feature", "kind", "interval", "rank", "row", "pos", "window_start", "token_ids",
                                   "acts"])
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r["feature"], r["kind"] != "top", -r["interval"], r["rank"]))
    for r in rows:
        ids, acts = trim(r["token_ids"], r["acts"], r["pos"] - r["window_start"], context_tokens)
        out[r["feature"]][r["kind"]].append(Excerpt(tuple(ids), tuple(acts), int(r["row"]), r["kind"],
                                                      int(r["interval"])))
    return out


class NegativePool:
    """Random windows of the analysed rows, each with the set of features active anywhere in it."""

    def __init__(self, windows: list[tuple[int, ...]], rows: np.ndarray, active: np.ndarray, d_sae: int):
        self.windows = windows      # token ids of each window
        self.rows = rows            # int64 [W]: global store row of each window's centre
        self.active = active        # int64 [P]: sorted window * d_sae + feature pairs
        self.d_sae = d_sae

    @classmethod
    @torch.no_grad()
    def build(cls, sae, dataset, meta: dict, *, n_windows: int, context_tokens: int, seed: int,
              device: torch.device) -> "NegativePool":
        """`n_windows` centres drawn uniformly from the rows the analysis covered (its shards and row counts), read
        shard by shard and encoded by `sae` on `device`."""
        shards = [int(s) for s in meta["shards"]]
        taken = [int(r) for r in meta["rows_per_shard"]]
        total = sum(taken)
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(total, size=min(n_windows, total), replace=False))
        bounds = np.cumsum([0, *taken])
        windows: list[tuple[int, ...]] = []
        centre_rows: list[int] = []
        pairs: list[np.ndarray] = []
        d_sae = sae.cfg.d_sae
        for s, shard in enumerate(shards):
            local = picks[(picks >= bounds[s]) & (picks < bounds[s + 1])] - bounds[s]
            if not len(local):
                continue
            md = dataset.read_metadata(shard, ["context_id", "pos", "token_id"]).slice(0, taken[s])
            context_id, pos = md.column("context_id").to_numpy(), md.column("pos").to_numpy()
            token_id = md.column("token_id").to_numpy()
            start, stop = fitted_windows(context_id, pos, local.astype(np.int64), context_tokens)
            acts = dataset.read_acts(shard, torch.bfloat16)
            need = np.unique(np.concatenate([np.arange(a, b) for a, b in zip(start, stop)]))
            x = acts[torch.from_numpy(need)].to(device, torch.float32)
            rows, feats, _ = sae.encode_sparse(x)
            code_rows = need[rows.cpu().numpy()]
            code_feats = feats.cpu().numpy().astype(np.int64)
            first = len(windows)
            for w, (a, b) in enumerate(zip(start, stop)):
                lo, hi = np.searchsorted(code_rows, [a, b])
                pairs.append((first + w) * d_sae + np.unique(code_feats[lo:hi]))
                windows.append(tuple(int(t) for t in token_id[a:b]))
                centre_rows.append(int(dataset.shards[shard].row_offset + local[w]))
        active = np.unique(np.concatenate(pairs)) if pairs else np.empty(0, np.int64)
        return cls(windows, np.asarray(centre_rows, np.int64), active, d_sae)

    def __len__(self) -> int:
        return len(self.windows)

    def inactive_for(self, feature: int) -> np.ndarray:
        """Indices of the windows where `feature` is zero throughout."""
        keys = np.arange(len(self.windows), dtype=np.int64) * self.d_sae + feature
        found = np.searchsorted(self.active, keys)
        hit = found < len(self.active)
        hit[hit] = self.active[found[hit]] == keys[hit]
        return np.flatnonzero(~hit)

    def draw(self, feature: int, n: int, rng: np.random.Generator) -> list[Excerpt]:
        idx = self.inactive_for(feature)
        chosen = rng.choice(idx, size=min(n, len(idx)), replace=False) if len(idx) else idx
        return [Excerpt(self.windows[i], (0.0,) * len(self.windows[i]), int(self.rows[i]), "random")
                for i in sorted(chosen.tolist())]


def fitted_windows(context_id: np.ndarray, pos: np.ndarray, centre: np.ndarray, length: int):
    """[start, stop) rows of `length`-token windows around `centre` rows, within each one's run, by `trim`'s rule:
    the same lengths and placement as the stored examples get, so that length tells nothing about which is which."""
    run_start, run_stop = runs(context_id, pos)
    lo, hi = run_start[centre], run_stop[centre]
    a = np.maximum(lo, np.minimum(centre - length // 2, hi - length))
    b = np.minimum(hi, a + length)
    return a, b


def marked_text(tokenizer, token_ids: Sequence[int], marks: np.ndarray | None) -> str:
    """The excerpt as one line: runs of marked tokens wrapped in << >>; each run decoded whole, so a character split
    over byte-level tokens comes out right; control characters drawn visibly (a newline as ↵)."""
    ids = list(token_ids)
    if marks is None or not np.any(marks):
        return display_text(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    marks = np.asarray(marks, bool)
    pieces = []
    edges = np.flatnonzero(np.diff(marks.astype(np.int8))) + 1
    for a, b in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(ids)]])):
        text = display_text(tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        if marks[a]:
            stripped = text.lstrip()
            text = text[: len(text) - len(stripped)] + OPEN + stripped + CLOSE
        pieces.append(text)
    return "".join(pieces)
