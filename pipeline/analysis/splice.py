"""Run the whole model with the hooked layer's output replaced by f(output), at the hook point a store was extracted
from (resid_post: the decoder layer's output; mlp_out: its MLP's output). Unlike extraction's LayerCapture, the
model is not truncated: the edit flows through the later layers to the logits.

    with splice(loaded, layer, hook, lambda x: sae.decode(sae.encode(x))):
        logits = loaded.model(input_ids).logits

Also works under `generate` with a KV cache: each call then sees only the new positions, which is what a
per-position edit wants.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from pipeline.errors import ModelError
from pipeline.extract.hooks import hook_module as extraction_hook_module
from pipeline.extract.model import LoadedModel

Edit = Callable[[Tensor], Tensor]


def hook_module(causal_lm: torch.nn.Module, layer: int, hook: str) -> torch.nn.Module:
    """The module extraction captured (pipeline.extract.hooks), with a bad layer or hook as a one-line error."""
    try:
        return extraction_hook_module(causal_lm, layer, hook)
    except ValueError as err:
        raise ModelError(str(err)) from None


def num_layers(causal_lm: torch.nn.Module) -> int:
    return len(causal_lm.model.layers)


@contextlib.contextmanager
def splice(model: LoadedModel, layer: int, hook: str, fn: Edit) -> Iterator[None]:
    """Within the block, the activation at layer/hook ([batch, seq, d_model]) is replaced by fn(activation).

    fn may return another dtype (an fp32 SAE on a bf16 model): the result is cast back to the model's."""
    target = hook_module(model.model, layer, hook)

    def replace(module, inputs, output):
        act = output[0] if isinstance(output, tuple) else output
        new = fn(act)
        if new.shape != act.shape:
            raise RuntimeError(f"splice: the edit returned shape {tuple(new.shape)} for {tuple(act.shape)}")
        new = new.to(act.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = target.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
