"""Truncate a Llama-style model after the hooked layer and capture that layer's activations."""
from __future__ import annotations

import torch

HOOKS = ("resid_post", "mlp_out")


def hook_module(causal_lm: torch.nn.Module, layer: int, hook: str) -> torch.nn.Module:
    """The module whose output is the activation at `layer`/`hook`: the decoder layer (the residual stream after
    it) or its MLP block. Extraction captures it; analysis splices edits into it."""
    if hook not in HOOKS:
        raise ValueError(f"hook {hook!r}: expected one of {HOOKS}")
    layers = causal_lm.model.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer}: the model has layers 0..{len(layers) - 1}")
    return layers[layer] if hook == "resid_post" else layers[layer].mlp


class LayerCapture:
    """Calling it with input ids runs layers 0..L only and returns the hooked activation [batch, seq, d_model].

    The residual stream after layer L is the decoder layer's output; `mlp_out` is the output of its MLP block.
    Layers past L, the final norm and the LM head never run.
    """

    def __init__(self, causal_lm: torch.nn.Module, layer: int, hook: str):
        target = hook_module(causal_lm, layer, hook)
        decoder = causal_lm.model
        # Kept so that `close()` gives the caller its whole model back (tests reuse one loaded model).
        self._original = (decoder.layers, decoder.norm)
        decoder.layers = decoder.layers[: layer + 1]
        decoder.norm = torch.nn.Identity()
        self.decoder = decoder
        self.d_model = causal_lm.config.hidden_size
        self._captured: torch.Tensor | None = None
        self._handle = target.register_forward_hook(self._grab)

    def _grab(self, module, inputs, output):
        self._captured = output[0] if isinstance(output, tuple) else output

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Right padding needs no attention mask: attention is causal, so pads only follow the real tokens.
        self._captured = None
        self.decoder(input_ids=input_ids, use_cache=False)
        if self._captured is None:
            raise RuntimeError("hooked layer did not run")
        out, self._captured = self._captured, None
        return out

    def close(self) -> None:
        self._handle.remove()
        self.decoder.layers, self.decoder.norm = self._original

    def __enter__(self) -> "LayerCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
