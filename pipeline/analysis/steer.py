"""Turn SAE features as knobs while the model generates: boost a feature (add c·W_dec[i] to the hooked layer's
output), clamp it to a value, or ablate it.

Clamping and ablation edit only that feature's contribution and keep everything else the SAE would have got wrong:
x' = x + (z'_i - z_i)·W_dec[i], with z = encode(x). Splicing the whole reconstruction in instead would add the SAE's
error at every position, which on a small SAE swamps the one feature's effect.

Where the edits apply. Boosting is a plain addition and applies at every position, BOS included. Clamping and
ablation need the feature's activation, which means nothing at BOS and the `exclude_first` positions after it that
extraction left out (the SAE never saw those outliers), so they leave those positions alone.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor

from pipeline.errors import ConfigError, ModelError
from pipeline.extract.model import LoadedModel
from pipeline.sae.base import SparseAutoencoder

from .splice import num_layers, splice
from .unembed import decoder_directions

MODES = ("boost", "clamp", "ablate")


@dataclass(frozen=True)
class FeatureEdit:
    feature: int
    mode: Literal["boost", "clamp", "ablate"]
    value: float = 0.0  # boost: c; clamp: the activation z'_i; ablate: unused (z'_i = 0)

    def to_dict(self) -> dict:
        return asdict(self)


def check_edits(edits: Sequence[FeatureEdit], d_sae: int) -> None:
    if not edits:
        raise ConfigError("steer: no feature edits given")
    for e in edits:
        if e.mode not in MODES:
            raise ConfigError(f"steer: mode {e.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= e.feature < d_sae:
            raise ConfigError(f"steer: feature {e.feature} is out of range: the SAE has features 0..{d_sae - 1}")
        if not math.isfinite(e.value):
            raise ConfigError(f"steer: value {e.value} for feature {e.feature} is not a finite number")
        if e.mode == "clamp" and e.value < 0:
            raise ConfigError(f"steer: clamp value {e.value} for feature {e.feature} is negative; SAE activations "
                              "are >= 0 (use boost with a negative value to push against a feature)")


class FeatureSteer:
    """The splice edit for a set of FeatureEdits. `offset` is the position of the first token of the next call
    (generation with a KV cache feeds one new token at a time); 0 for a whole sequence."""

    def __init__(self, sae: SparseAutoencoder, edits: Sequence[FeatureEdit], *, first_position: int):
        check_edits(edits, sae.cfg.d_sae)
        self.sae = sae
        self.edits = list(edits)
        self.first_position = first_position
        self.directions = decoder_directions(sae)[[e.feature for e in edits]]  # [n_edits, d_in], residual units
        self.offset = 0

    @torch.no_grad()
    def __call__(self, act: Tensor) -> Tensor:
        out = act.to(torch.float32, copy=True)  # never edit the caller's tensor in place
        dirs = self.directions.to(act.device)
        boost = [j for j, e in enumerate(self.edits) if e.mode == "boost"]
        for j in boost:
            out = out + self.edits[j].value * dirs[j]
        others = [j for j, e in enumerate(self.edits) if e.mode != "boost"]
        if others:
            pos = self.offset + torch.arange(act.shape[1], device=act.device)
            inside = pos >= self.first_position
            if inside.any():
                # Latents of the unedited activation: each edit sets its own feature from what the SAE read there.
                z = self.sae.encode(act[:, inside].float())
                delta = torch.zeros_like(out[:, inside])
                for j in others:
                    e = self.edits[j]
                    target = e.value if e.mode == "clamp" else 0.0
                    delta = delta + (target - z[..., e.feature])[..., None] * dirs[j]
                out[:, inside] = out[:, inside] + delta
        return out.to(act.dtype)


@torch.no_grad()
def generate(model: LoadedModel, ids: Sequence[int], *, max_new_tokens: int, layer: int, hook: str,
             edit: FeatureSteer | None = None, greedy: bool = True, seed: int = 0,
             temperature: float = 1.0) -> list[int]:
    """New token ids after `ids` (one sequence), greedy or sampled from a generator seeded with `seed`, with `edit`
    spliced in at layer/hook for the prompt and every new token. Stops at EOS."""
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    eos = model.tokenizer.eos_token_id
    new: list[int] = []
    step = torch.tensor([list(ids)], dtype=torch.long, device=dev)
    cache, length = None, 0
    cache_arg = _cache_argument(model.model)

    def edited(act: Tensor) -> Tensor:
        edit.offset = length
        return edit(act)

    splicing = splice(model, layer, hook, edited) if edit is not None else contextlib.nullcontext()
    with splicing:
        for _ in range(max_new_tokens):
            out = model.model(input_ids=step, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            cache, length = getattr(out, cache_arg), length + step.shape[1]
            logits = out.logits[0, -1].float()
            if greedy:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            new.append(token)
            if eos is not None and token == eos:
                break
            step = torch.tensor([[token]], dtype=torch.long, device=dev)
    return new


def _cache_argument(causal_lm: torch.nn.Module) -> str:
    """The KV-cache keyword (and output field): `cache` from transformers 5.24, `past_key_values` before; the old
    name still works there but warns."""
    return "cache" if "cache" in inspect.signature(causal_lm.forward).parameters else "past_key_values"


def prompt_ids(model: LoadedModel, prompt: str, bos_id: int | None) -> list[int]:
    """BOS + the prompt's tokens without special tokens: how every stored context starts (pipeline.extract.packing)."""
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([bos_id] if bos_id is not None else []) + list(ids)


def check_generation(prompts: Sequence[str], max_new_tokens: int, temperature: float) -> None:
    if not prompts:
        raise ConfigError("steer: no prompts given")
    if any(not p for p in prompts):
        raise ConfigError("steer: a prompt is empty")
    if max_new_tokens < 1:
        raise ConfigError(f"steer: max_new_tokens {max_new_tokens} (need at least 1)")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"steer: temperature {temperature} (need a positive number)")


def steer(sae_source, model: LoadedModel, prompts: Sequence[str], *, edits: Sequence[FeatureEdit],
          max_new_tokens: int = 32, greedy: bool = True, seed: int = 0, temperature: float = 1.0) -> list[dict]:
    """Baseline and steered completions of each prompt: [{prompt, baseline, steered, baseline_ids, steered_ids}].

    `sae_source` is what pipeline.analysis.source.open_sae_source returns (its .sae, and its .dataset for the hook
    point and the excluded positions), or a RUN path to open with it. Sampling uses the same seed for both, so they differ by the edit alone."""
    if isinstance(sae_source, (str, Path)):
        from .source import open_sae_source

        sae_source = open_sae_source(sae_source)
    meta = sae_source.dataset.meta
    sae = sae_source.sae.to(model.device).eval()
    check_generation(prompts, max_new_tokens, temperature)
    check_edits(edits, sae.cfg.d_sae)
    if num_layers(model.model) != model.model.config.num_hidden_layers:
        raise ModelError("the model is truncated (an open LayerCapture?): steering needs every layer")
    edit = FeatureSteer(sae, edits, first_position=1 + meta.exclude_first)
    tok = model.tokenizer
    results = []
    for prompt in prompts:
        ids = prompt_ids(model, prompt, meta.bos_token_id)
        kw = dict(max_new_tokens=max_new_tokens, layer=meta.layer, hook=meta.hook, greedy=greedy, seed=seed,
                  temperature=temperature)
        base = generate(model, ids, **kw)
        steered = generate(model, ids, edit=edit, **kw)
        results.append({"prompt": prompt, "baseline": tok.decode(base, skip_special_tokens=True),
                        "steered": tok.decode(steered, skip_special_tokens=True), "baseline_ids": base,
                        "steered_ids": steered})
    return results
