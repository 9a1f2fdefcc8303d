"""The output tokens each feature promotes and suppresses through the direct path: its decoder row, in the model's
residual units, times the final norm's scale, through the unembedding (SAEDashboard's "logit effects")."""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.extract.model import LoadedModel
from pipeline.sae.base import SparseAutoencoder


def decoder_directions(sae: SparseAutoencoder) -> Tensor:
    """W_dec [d_sae, d_in] in the model's residual units.

    decode() divides by input_scale, so a latent of value z adds z·W_dec[i]/s to the residual; an SAE loaded from
    SAELens format has s = 1 (export folds it in), one taken straight from training may not."""
    return sae.W_dec.detach().float() / sae.input_scale.detach().float()


def final_norm_scale(model: LoadedModel) -> Tensor:
    """The per-dimension gain of the final RMSNorm. The norm's 1/rms factor depends on the whole residual, not on the
    feature, so it is left out (as SAEDashboard does): only the gain reshapes a direction."""
    norm = model.model.model.norm
    weight = getattr(norm, "weight", None)
    if weight is None:
        return torch.ones(model.model.config.hidden_size, device=model.device)
    weight = weight.detach().float()
    # Gemma-style norms scale by (1 + weight); Llama's by weight.
    return 1.0 + weight if type(norm).__name__.startswith("Gemma") else weight


@torch.no_grad()
def logit_effects(sae: SparseAutoencoder, model: LoadedModel, features: Tensor) -> Tensor:
    """[len(features), vocab] direct-path logit change per unit of each feature's activation."""
    w_u = model.model.get_output_embeddings().weight  # [vocab, d_model]; tied to the embeddings in SmolLM2
    scale = final_norm_scale(model)
    rows = decoder_directions(sae)[features.to(sae.W_dec.device)].to(model.device)
    return (rows * scale) @ w_u.detach().float().T


@torch.no_grad()
def output_token_effects(sae: SparseAutoencoder, model: LoadedModel, *, top: int = 10,
                         batch: int = 4096) -> dict[str, Tensor]:
    """Per feature, the `top` token ids with the largest and smallest direct-path logit change, and those changes:
    boost_ids / boost_values (descending) and suppress_ids / suppress_values (ascending, most negative first), each
    [d_sae, top] on the CPU. `batch` features at a time bound the [batch, vocab] logit block."""
    d_sae = sae.cfg.d_sae
    vocab = model.model.get_output_embeddings().weight.shape[0]
    if d_sae and sae.cfg.d_in != model.model.config.hidden_size:
        raise ValueError(f"SAE d_in {sae.cfg.d_in} does not match the model's hidden size "
                         f"{model.model.config.hidden_size}")
    top = min(top, vocab)
    out = {"boost_ids": torch.empty(d_sae, top, dtype=torch.int64), "boost_values": torch.empty(d_sae, top),
           "suppress_ids": torch.empty(d_sae, top, dtype=torch.int64), "suppress_values": torch.empty(d_sae, top)}
    for start in range(0, d_sae, batch):
        ids = torch.arange(start, min(start + batch, d_sae))
        logits = logit_effects(sae, model, ids)
        hi = logits.topk(top, dim=1)
        lo = logits.topk(top, dim=1, largest=False)
        out["boost_ids"][ids], out["boost_values"][ids] = hi.indices.cpu(), hi.values.cpu()
        out["suppress_ids"][ids], out["suppress_values"][ids] = lo.indices.cpu(), lo.values.cpu()
    return out


@torch.no_grad()
def direct_effect_zscores(sae: SparseAutoencoder, model: LoadedModel, *, batch: int = 1024) -> Tensor:
    """[d_sae]: how far each feature's top boosted token stands out, (max - mean) / std of its logit effects over
    the vocabulary. A mid-layer feature's raw top value is dominated by a few rare tokens with large unembedding
    norms, boosted by most features alike; a high z-score marks a direction aimed at one token, the features whose
    boosting actually raises that token after the remaining layers."""
    out = torch.empty(sae.cfg.d_sae)
    for start in range(0, sae.cfg.d_sae, batch):
        ids = torch.arange(start, min(start + batch, sae.cfg.d_sae))
        logits = logit_effects(sae, model, ids)
        out[ids] = ((logits.max(dim=1).values - logits.mean(dim=1)) / logits.std(dim=1).clamp_min(1e-12)).cpu()
    return out
