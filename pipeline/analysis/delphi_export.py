"""`saepipe export delphi RUN OUT`: the SAE's activations on held-out contexts in EleutherAI delphi's latent cache
layout, so that delphi's own explainers and scorers can run on saepipe's data (delphi needs vLLM and a GPU; saepipe
does not depend on it).

OUT/<hookpoint>/<start>_<end>.safetensors, one per latent range [start, end] (end inclusive, delphi's split rule):
  locations   [N, 3] (context row, position in the context, latent - start); uint16 when the rows and offsets fit,
              else uint32 (delphi's choice)
  activations [N] float16
  tokens      [contexts, ctx_len] the contexts' token ids (BOS first; a document's last, shorter context is padded)
OUT/<hookpoint>/config.json: delphi's CacheConfig fields plus model_name, and what saepipe exported it from.
The hookpoint is named as delphi and sparsify name them: layers.<L> for the residual stream after block L,
layers.<L>.mlp for that block's MLP output. Positions that extraction did not store (BOS, `exclude_first`) have no
locations."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.io.atomic import atomic_replace_dir, json_bytes, remove_orphaned_tmps, tmp_path

from .analyze import _device, encode_batch_size, one_thread
from .source import open_sae_source

log = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)


def hookpoint_name(layer: int, hook: str) -> str:
    return f"layers.{layer}" if hook == "resid_post" else f"layers.{layer}.mlp"


def split_bounds(width: int, n_splits: int) -> list[tuple[int, int]]:
    """delphi's latent ranges: linspace(0, width, n_splits + 1) boundaries, each range's end inclusive."""
    edges = torch.linspace(0, width, steps=n_splits + 1).long().tolist()
    return [(a, b - 1) for a, b in zip(edges[:-1], edges[1:])]


@torch.no_grad()
def export_delphi(run: str | Path, out: str | Path, *, store: str | Path | None = None, tokens: int | None = None,
                  n_splits: int = 5, batch_size: int = 4096, device: str = "auto", show_progress: bool = True) -> Path:
    """Encode the held-out contexts (whole contexts, up to `tokens` stored rows) and write delphi's cache to `out`;
    returns the hookpoint directory."""
    if n_splits < 1:
        raise ConfigError(f"--splits: {n_splits} (need at least 1)")
    if tokens is not None and tokens < 1:
        raise ConfigError(f"--tokens: {tokens} (need at least 1)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any(out.glob("*/config.json")))):
        raise ConfigError(f"{out}: exists and is not a delphi cache; refusing to replace it")
    src = open_sae_source(run, store)
    dev = _device(device)
    sae = src.sae.to(dev).eval()
    dataset = src.dataset
    meta = dataset.meta
    d_sae = sae.cfg.d_sae
    if n_splits > d_sae:
        raise ConfigError(f"--splits: {n_splits} is more than the SAE's {d_sae} latents")
    batch = encode_batch_size(batch_size, d_sae, dev)
    tok = dataset.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    token_rows: list[np.ndarray] = []
    bounds = split_bounds(d_sae, n_splits)
    starts = np.array([a for a, _ in bounds])
    budget = tokens
    out.parent.mkdir(parents=True, exist_ok=True)
    work = tmp_path(out.parent / f"{out.name}-work")
    for left in remove_orphaned_tmps(out.parent / f"{out.name}-work"):
        log.info("removed %s, left by an export that was killed", left)
    spill = _SplitSpill(work, len(bounds))
    try:
        n_rows, n_codes, n_big = _encode(sae, src, dataset, meta, spill, starts, budget, batch, dev, pad, token_rows,
                                         show_progress)
        spill.close()
        _write(out, spill, bounds, token_rows, n_rows, n_codes, n_big, src, meta, batch, n_splits, d_sae)
    finally:
        spill.close()
        shutil.rmtree(work, ignore_errors=True)
    return out / hookpoint_name(meta.layer, meta.hook)


class _SplitSpill:
    """Each split's codes appended to its own pair of raw files during the encode (uint32 [row, pos, latent - start]
    and float32 values), so that memory holds one split's codes at the end, not all of them: 16 bytes a code, i.e.
    about 5 GB of disk for 10M tokens at k = 32, where one array would have needed as much RAM."""

    def __init__(self, directory: Path, n: int):
        directory.mkdir(parents=True)
        self.dir = directory
        self._files = [(open(directory / f"{i}.loc", "wb"), open(directory / f"{i}.act", "wb")) for i in range(n)]

    def append(self, split: int, loc: np.ndarray, act: np.ndarray) -> None:
        fl, fa = self._files[split]
        fl.write(np.ascontiguousarray(loc, np.uint32).tobytes())
        fa.write(np.ascontiguousarray(act, np.float32).tobytes())

    def read(self, split: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.fromfile(self.dir / f"{split}.loc", np.uint32).reshape(-1, 3),
                np.fromfile(self.dir / f"{split}.act", np.float32))

    def close(self) -> None:
        for fl, fa in self._files:
            fl.close()
            fa.close()


def _encode(sae, src, dataset, meta, spill: _SplitSpill, starts: np.ndarray, budget, batch: int, dev, pad: int,
            token_rows: list, show_progress: bool) -> tuple[int, int, int]:
    from tqdm import tqdm

    n_rows = n_codes = n_big = 0
    with tqdm(total=budget, unit="tok", unit_scale=True, desc="export delphi", disable=not show_progress) as bar:
        for shard in src.held_out_shards:
            if budget is not None and n_rows >= budget:
                break
            md = dataset.read_metadata(shard, ["context_id", "pos"])
            context_id, pos = md.column("context_id").to_numpy(), md.column("pos").to_numpy()
            ctx = dataset.read_contexts(shard)
            ctx_ids = ctx.column("context_id").to_numpy()
            order = np.argsort(ctx_ids, kind="stable")
            take = len(context_id)
            if budget is not None and n_rows + take > budget:
                # whole contexts only: up to the end of the context holding the budget's last row (a context's
                # rows are contiguous and in order within a shard)
                take = int(np.searchsorted(context_id, context_id[budget - n_rows - 1], side="right"))
            acts = dataset.read_acts(shard, torch.bfloat16)[:take]
            used = np.unique(context_id[:take])
            found = np.searchsorted(ctx_ids[order], used)
            if np.any(found >= len(ctx_ids)) or np.any(ctx_ids[order][np.minimum(found, len(ctx_ids) - 1)] != used):
                raise ConfigError(f"{dataset.shards[shard].ctx_path}: lacks contexts its rows name")
            first_row = len(token_rows)
            for j in order[found]:
                ids = np.full(meta.ctx_len, pad, np.int32)
                seq = np.asarray(ctx.column("token_ids")[int(j)].as_py(), np.int32)
                ids[: len(seq)] = seq
                token_rows.append(ids)
            row_of = first_row + np.searchsorted(used, context_id[:take])
            for start in range(0, take, batch):
                x = acts[start : start + batch].to(dev, torch.float32)
                rows, feats, vals = sae.encode_sparse(x)
                with one_thread(dev):
                    r = rows.cpu().numpy() + start
                    f = feats.cpu().numpy()
                    v = vals.float().cpu().numpy()
                    n_big += int((v > FLOAT16_MAX).sum())
                    loc = np.stack([row_of[r], pos[r].astype(np.int64), f], 1)
                    split = np.searchsorted(starts, f, side="right") - 1
                    for i in np.unique(split):
                        keep = split == i
                        part = loc[keep]
                        part[:, 2] -= starts[i]
                        spill.append(int(i), part, v[keep])
                    n_codes += len(v)
                bar.update(x.shape[0])
            n_rows += take
    if not token_rows:
        raise ConfigError(f"{src.store_root}: no held-out rows to export")
    return n_rows, n_codes, n_big


def _write(out: Path, spill: _SplitSpill, bounds, token_rows, n_rows: int, n_codes: int, n_big: int, src, meta,
           batch: int, n_splits: int, d_sae: int) -> None:
    if n_big:
        log.warning("%d activation(s) above float16's %g are stored as %g (delphi's cache is float16)", n_big,
                    FLOAT16_MAX, FLOAT16_MAX)
    token_matrix = np.stack(token_rows)
    hookpoint = hookpoint_name(meta.layer, meta.hook)
    config = {
        "dataset_repo": str(Path(src.store_root).resolve()), "dataset_split": f"held-out shards {src.held_out_shards}",
        "dataset_name": "", "dataset_column": "text", "batch_size": batch, "cache_ctx_len": meta.ctx_len,
        "n_tokens": int(n_rows), "n_splits": n_splits, "model_name": _model_name(meta.model, src.store_root),
        "saepipe": {"sae_dir": str(Path(src.sae_dir).resolve()), "store_root": str(Path(src.store_root).resolve()),
                    "layer": meta.layer, "hook": meta.hook, "d_sae": d_sae, "contexts": len(token_rows),
                    "stored_rows": int(n_rows), "exclude_first": meta.exclude_first},
    }

    def fill(tmp: Path) -> None:
        from safetensors.numpy import save_file

        module = tmp / hookpoint
        module.mkdir()
        for i, (a, b) in enumerate(bounds):
            loc, act = spill.read(i)  # in encode order: by row, then latent
            small = (not len(loc)) or (loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16)
            save_file({"locations": loc.astype(np.uint16 if small else np.uint32),
                       "activations": np.minimum(act, FLOAT16_MAX).astype(np.float16), "tokens": token_matrix},
                      str(module / f"{a}_{b}.safetensors"))
        (module / "config.json").write_bytes(json_bytes(config))

    atomic_replace_dir(out, fill)
    log.info("delphi cache of %d latents over %d contexts (%d stored tokens, %d activations) -> %s", d_sae,
             len(token_rows), n_rows, n_codes, out / hookpoint)


def _model_name(source: str, store_root: Path) -> str:
    """What delphi loads the tokenizer from: the hub name when the store records one, else the store's own copy of
    the tokenizer (the bundled GGUF model has no hub name)."""
    from pipeline.extract.preflight import SMOLLM2, model_source

    if source == model_source(SMOLLM2) or Path(source).exists():
        return str((Path(store_root) / "tokenizer").resolve())
    return source
