"""How faithful an SAE is to the model: the next-token loss with its reconstruction spliced in at the hooked layer,
against the clean model and against zero-ablating that activation (SAELens's and SAEBench's core metrics).

    ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)      1 = as good as the model, 0 = no better than zeros
    kl_div_score  = (KL_zero - KL_sae) / KL_zero                   KL(clean || modified), summed over the vocabulary

The contexts are the stored ones of the run's held-out shards (token for token what extraction ran), so FVU and L0
come from the same tokens the CE is scored on, and none of them was trained on.

Which positions count. A stored context is BOS, then `exclude_first` positions extraction left out (attention sinks,
whose activations dwarf the rest), then the stored tokens. The SAE never saw the first 1 + exclude_first positions, so
they keep their clean activation under every intervention (SAE and zero ablation alike), as SAELens keeps special
tokens' activations; the positions of special tokens (BOS, EOS, PAD, ...) inside a context are treated the same.
A position t is scored, for CE, KL, FVU and L0 alike, when its own activation was replaced and the token it predicts
(t + 1) is not special: the first 1 + exclude_first positions' predictions could not change anyway, and the last
position of a context has no target.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError, ModelError
from pipeline.extract.hooks import HOOKS
from pipeline.extract.model import SMOLLM2, LoadedModel, load_model
from pipeline.extract.preflight import model_source
from pipeline.io.atomic import atomic_write_json
from pipeline.sae.base import SparseAutoencoder
from pipeline.store import ActivationDataset

from .splice import num_layers, splice


FORMAT = "saepipe-spliced-eval/1"
DEFAULT_BATCH = 8  # contexts per forward pass; three [batch, ctx_len, vocab] logit blocks are alive at once

# x [N, d_model] (the clean activations of the spliced positions) -> (x_hat [N, d_model], active latents per row [N])
Reconstruct = Callable[[Tensor], tuple[Tensor, Tensor]]


def sae_reconstruct(sae: SparseAutoencoder) -> Reconstruct:
    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        z = sae.encode(x)
        return sae.decode(z), (z > 0).sum(dim=-1)
    return run


def identity_reconstruct(x: Tensor) -> tuple[Tensor, Tensor]:
    return x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)


# ---- the measurement ------------------------------------------------------------------------------------------------

@dataclass
class _Sums:
    """Running float64 sums over scored tokens, so that any number of batches gives exact means."""

    ce: float = 0.0
    kl: float = 0.0
    sq_err: float = 0.0
    l0: float = 0.0


@dataclass
class _Totals:
    tokens: int = 0
    ce_clean: float = 0.0
    ce_zero: float = 0.0
    kl_zero: float = 0.0
    x_sum: Tensor | None = None  # [d_model], for the total variance of the scored activations
    x_sq: float = 0.0
    per: dict[str, _Sums] = field(default_factory=dict)


def splice_mask(ids: Tensor, lengths: Tensor, first: int, special_ids: Sequence[int]) -> Tensor:
    """bool [B, T]: positions whose activation the interventions replace (see the module docstring)."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    mask = (pos >= first)[None, :] & (pos[None, :] < lengths[:, None])
    if special_ids:
        mask &= ~torch.isin(ids, torch.tensor(list(special_ids), device=ids.device))
    return mask


def score_mask(ids: Tensor, lengths: Tensor, first: int, special_ids: Sequence[int]) -> Tensor:
    """bool [B, T]: positions whose next-token prediction is scored (replaced, and the target is not special)."""
    spliced = splice_mask(ids, lengths, first, special_ids)
    target_ok = torch.zeros_like(spliced)
    target_ok[:, :-1] = (torch.arange(1, ids.shape[1], device=ids.device)[None, :] < lengths[:, None])
    if special_ids:
        target_ok[:, :-1] &= ~torch.isin(ids[:, 1:], torch.tensor(list(special_ids), device=ids.device))
    return spliced & target_ok


def _token_terms(logits: Tensor, ids: Tensor, mask: Tensor, clean_logp: Tensor | None) -> tuple[Tensor, Tensor | None,
                                                                                                  Tensor]:
    """(CE per scored token, KL(clean || this) per scored token or None, log-probs of the scored tokens)."""
    logp = torch.log_softmax(logits[:, :-1][mask[:, :-1]].float(), dim=-1)
    targets = ids[:, 1:][mask[:, :-1]]
    ce = -logp.gather(1, targets[:, None]).squeeze(1)
    kl = None
    if clean_logp is not None:
        kl = (clean_logp.exp() * (clean_logp - logp)).sum(dim=-1)
    return ce, kl, logp


@torch.no_grad()
def spliced_metrics(model: LoadedModel, contexts: Sequence[np.ndarray], *, layer: int, hook: str,
                    reconstructions: Mapping[str, Reconstruct], first_scored: int, special_ids: Sequence[int],
                    batch_size: int = DEFAULT_BATCH, show_progress: bool = True) -> dict[str, dict]:
    """The metrics of each named reconstruction on `contexts` (token id arrays, BOS first), sharing one clean and
    one zero-ablated pass: {name: {ce_clean, ce_sae, ce_zero, ce_loss_score, kl_sae, kl_zero, kl_div_score, fvu,
    l0, tokens}}."""
    if num_layers(model.model) != model.model.config.num_hidden_layers:
        raise ModelError("the model is truncated (an open LayerCapture?): spliced evaluation needs every layer")
    dev = model.device
    tot = _Totals(per={name: _Sums() for name in reconstructions})
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))  # similar lengths share a batch: less padding
    bar = tqdm(total=len(contexts), unit="ctx", desc="spliced eval", disable=not show_progress, delay=2.0)
    for start in range(0, len(order), batch_size):
        chunk = [contexts[i] for i in order[start:start + batch_size]]
        lengths = torch.tensor([len(c) for c in chunk], device=dev)
        # Right padding needs no attention mask: attention is causal, so pads only follow the real tokens.
        ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long, device=dev)
        for row, c in enumerate(chunk):
            ids[row, :len(c)] = torch.as_tensor(c, dtype=torch.long, device=dev)
        spliced = splice_mask(ids, lengths, first_scored, special_ids)
        scored = score_mask(ids, lengths, first_scored, special_ids)
        kept = scored[spliced]  # which of the spliced rows are also scored
        n = int(scored.sum())
        if n == 0:
            bar.update(len(chunk))
            continue

        captured: dict[str, Tensor] = {}

        def grab(act: Tensor) -> Tensor:
            captured["x"] = act[spliced].float()
            return act

        with splice(model, layer, hook, grab):
            clean_logits = model.model(input_ids=ids, use_cache=False).logits
        ce_clean, _, clean_logp = _token_terms(clean_logits, ids, scored, None)
        del clean_logits
        x = captured.pop("x")
        xs = x[kept].double()
        tot.tokens += n
        tot.ce_clean += float(ce_clean.double().sum())
        tot.x_sum = xs.sum(0) if tot.x_sum is None else tot.x_sum + xs.sum(0)
        tot.x_sq += float(xs.pow(2).sum())

        with splice(model, layer, hook, lambda act: _replace(act, spliced, torch.zeros_like(x))):
            zero_logits = model.model(input_ids=ids, use_cache=False).logits
        ce, kl, _ = _token_terms(zero_logits, ids, scored, clean_logp)
        del zero_logits
        tot.ce_zero += float(ce.double().sum())
        tot.kl_zero += float(kl.double().sum())

        for name, reconstruct in reconstructions.items():
            x_hat, active = reconstruct(x)
            x_hat = x_hat.float()
            with splice(model, layer, hook, lambda act: _replace(act, spliced, x_hat)):
                logits = model.model(input_ids=ids, use_cache=False).logits
            ce, kl, _ = _token_terms(logits, ids, scored, clean_logp)
            del logits
            sums = tot.per[name]
            sums.ce += float(ce.double().sum())
            sums.kl += float(kl.double().sum())
            sums.sq_err += float((x_hat[kept].double() - xs).pow(2).sum())
            sums.l0 += float(active[kept].double().sum())
        bar.update(len(chunk))
    bar.close()
    if tot.tokens == 0:
        raise ConfigError("spliced eval: no scored tokens in the chosen contexts (all special or excluded)")
    return {name: _finish(tot, sums) for name, sums in tot.per.items()}


def _replace(act: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
    out = act.clone()
    out[mask] = rows.to(act.dtype)
    return out


def _finish(tot: _Totals, sums: _Sums) -> dict:
    n = tot.tokens
    ce_clean, ce_zero, ce_sae = tot.ce_clean / n, tot.ce_zero / n, sums.ce / n
    kl_zero, kl_sae = tot.kl_zero / n, sums.kl / n
    total_var = tot.x_sq - float(tot.x_sum.pow(2).sum()) / n

    def ratio(a: float, b: float) -> float | None:
        # None (JSON null) where the baseline leaves nothing to recover, e.g. zero ablation changed nothing.
        return a / b if b != 0 else None

    return {
        "ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero,
        "ce_loss_score": ratio(ce_zero - ce_sae, ce_zero - ce_clean),
        "kl_sae": kl_sae, "kl_zero": kl_zero, "kl_div_score": ratio(kl_zero - kl_sae, kl_zero),
        "fvu": ratio(sums.sq_err, total_var), "l0": sums.l0 / n, "tokens": n,
    }


# ---- the run-level command ------------------------------------------------------------------------------------------

def held_out_contexts(dataset: ActivationDataset, shards: Sequence[int], n: int) -> tuple[list[np.ndarray], list[int]]:
    """The first `n` stored contexts of `shards`, in shard order, and the shards they came from."""
    contexts, used = [], []
    for shard in shards:
        if len(contexts) >= n:
            break
        column = dataset.read_contexts(shard).column("token_ids")
        take = column.slice(0, n - len(contexts)).to_pylist()
        contexts.extend(np.asarray(c, dtype=np.int64) for c in take)
        used.append(shard)
    return contexts, used


def store_model_config(dataset: ActivationDataset, device: str) -> ModelConfig:
    """The model the store was extracted from, as a ModelConfig (dataset.json records the source, not the config)."""
    meta = dataset.meta
    name = SMOLLM2 if meta.model == model_source(SMOLLM2) else meta.model
    return ModelConfig(name=name, revision=meta.revision, dtype=meta.compute_dtype, device=device)


def check_sae_matches_store(sae: SparseAutoencoder, dataset: ActivationDataset) -> None:
    """The SAE reads the store's hook point. open_sae_source checks the run's own SAE (width and the hook its
    cfg.json names); this covers a substitute SAE and the hook point itself. Whether the layer exists in the model
    is checked right after loading it: dataset.json records the layer the store was extracted from, so only a
    hand-edited store could name a missing one, and reading the model's config needs the same resolution (for the
    GGUF, dequantising) as loading it."""
    meta = dataset.meta
    if meta.hook not in HOOKS:
        raise ConfigError(f"{dataset.root}/dataset.json: hook {meta.hook!r} is not one of {', '.join(HOOKS)}")
    if sae.cfg.d_in != meta.d_model:
        raise ConfigError(f"SAE d_in {sae.cfg.d_in} does not match the store's d_model {meta.d_model} "
                          f"({dataset.root})")


def check_model_matches_store(model: LoadedModel, dataset: ActivationDataset) -> None:
    meta = dataset.meta
    if model.source != meta.model:
        raise ConfigError(f"the given model is {model.source!r}, the store {dataset.root} was extracted from "
                          f"{meta.model!r}")
    if model.model.config.hidden_size != meta.d_model:
        raise ConfigError(f"the model's hidden size {model.model.config.hidden_size} differs from the store's "
                          f"d_model {meta.d_model}")
    if not 0 <= meta.layer < model.model.config.num_hidden_layers:
        raise ConfigError(f"{dataset.root}/dataset.json: layer {meta.layer} does not exist in {model.source} "
                          f"({model.model.config.num_hidden_layers} layers)")


def special_token_ids(model: LoadedModel, dataset: ActivationDataset) -> list[int]:
    ids = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    if dataset.meta.bos_token_id is not None:
        ids.add(int(dataset.meta.bos_token_id))
    return sorted(ids)


def default_out(source) -> Path:
    if source.run_dir is None:
        raise ConfigError(f"{source.sae_dir} is a bare SAELens directory, not a training run: pass --out "
                          "for the results file")
    return Path(source.run_dir) / "eval" / "spliced.json"


def run_spliced_eval(run: str | Path, *, store: str | Path | None = None, contexts: int = 64, device: str = "auto",
                     model: LoadedModel | None = None, out: str | Path | None = None, sae: SparseAutoencoder | None = None,
                     batch_size: int = DEFAULT_BATCH, show_progress: bool = True) -> dict:
    """Spliced CE/KL of the run's SAE on `contexts` held-out contexts; writes the result JSON to `out` (default
    RUN/eval/spliced.json) and returns it. `model` reuses a loaded model (it must be the store's); `sae` replaces the
    run's SAE (e.g. a damaged copy, as a control), keeping the run's store and held-out shards."""
    from .source import open_sae_source

    started = time.perf_counter()
    if contexts < 1:
        raise ConfigError(f"contexts: {contexts} (need at least 1)")
    if batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size} (need at least 1)")
    source = open_sae_source(run, store)
    dataset = source.dataset
    the_sae = sae if sae is not None else source.sae
    check_sae_matches_store(the_sae, dataset)
    out_path = Path(out) if out is not None else default_out(source)
    token_lists, shards = held_out_contexts(dataset, source.held_out_shards, contexts)
    if not token_lists:
        raise ConfigError(f"{dataset.root}: the held-out shards {source.held_out_shards} hold no contexts")
    meta = dataset.meta
    if model is None:
        model = load_model(store_model_config(dataset, device), show_progress=show_progress)
    check_model_matches_store(model, dataset)
    the_sae = the_sae.to(model.device).eval()
    first = 1 + meta.exclude_first
    metrics = spliced_metrics(model, token_lists, layer=meta.layer, hook=meta.hook,
                              reconstructions={"sae": sae_reconstruct(the_sae)}, first_scored=first,
                              special_ids=special_token_ids(model, dataset), batch_size=batch_size,
                              show_progress=show_progress)["sae"]
    result = {
        "format": FORMAT,
        **metrics,
        "contexts": len(token_lists),
        "sae_dir": str(source.sae_dir),
        "store_root": str(dataset.root),
        "shards": shards,
        "model": {"source": meta.model, "revision": meta.revision, "dtype": str(model.dtype).removeprefix("torch.")},
        "layer": meta.layer,
        "hook": meta.hook,
        "excluded": {"first_positions": first, "special_token_ids": special_token_ids(model, dataset)},
        "device": str(model.device),
        "seconds": round(time.perf_counter() - started, 3),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, result)
    result["out"] = str(out_path)
    return result


TABLE_ROWS = [("CE clean", "ce_clean"), ("CE spliced (SAE)", "ce_sae"), ("CE zero-ablation", "ce_zero"),
              ("ce_loss_score", "ce_loss_score"), ("KL(clean || SAE)", "kl_sae"), ("KL(clean || zero)", "kl_zero"),
              ("kl_div_score", "kl_div_score"), ("FVU", "fvu"), ("L0", "l0"), ("tokens scored", "tokens"),
              ("contexts", "contexts")]


def format_table(result: Mapping) -> str:
    width = max(len(label) for label, _ in TABLE_ROWS)
    lines = [f"spliced eval of {result.get('sae_dir')} at layer {result.get('layer')} {result.get('hook')}"]
    for label, key in TABLE_ROWS:
        value = result[key]
        text = "n/a" if value is None else f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"  {label:<{width}}  {text:>12}")
    return "\n".join(lines)
