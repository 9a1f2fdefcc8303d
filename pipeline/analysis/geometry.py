"""Decoder geometry: each feature's nearest features by cosine similarity of their decoder rows.

Computed a block of rows at a time against the whole decoder, so memory is O(block · d_sae) and never the
d_sae × d_sae similarity matrix (16 GiB in float32 at 65,536 features)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

# Similarity block of about 256 MiB in float32, whatever d_sae is.
_BLOCK_ELEMENTS = 1 << 26


@torch.no_grad()
def decoder_neighbors(W_dec: Tensor, *, k: int = 10, device: str | torch.device | None = None,
                      block: int | None = None, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [d_sae, k], cosines float32 [d_sae, k]): for each decoder row, the k other rows with the highest
    cosine similarity, best first. A zero row (a latent whose decoder was never trained) has cosine 0 with all."""
    if W_dec.ndim != 2:
        raise ValueError(f"W_dec must be [d_sae, d_in], got shape {tuple(W_dec.shape)}")
    d_sae = W_dec.shape[0]
    k = min(k, d_sae - 1)
    if k <= 0:
        return np.zeros((d_sae, 0), np.int32), np.zeros((d_sae, 0), np.float32)
    device = torch.device(device) if device is not None else W_dec.device
    unit = W_dec.detach().to(device=device, dtype=torch.float32)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    block = block or max(1, min(d_sae, _BLOCK_ELEMENTS // d_sae))
    ids = np.empty((d_sae, k), np.int32)
    cos = np.empty((d_sae, k), np.float32)
    with tqdm(total=d_sae, desc="decoder neighbours", unit="feature", disable=not show_progress, delay=2.0) as bar:
        for start in range(0, d_sae, block):
            stop = min(d_sae, start + block)
            sims = unit[start:stop] @ unit.T
            # a row is its own nearest neighbour: push it below every real cosine (all >= -1)
            rows = torch.arange(stop - start, device=device)
            sims[rows, rows + start] = -2.0
            values, index = sims.topk(k, dim=1)
            ids[start:stop] = index.to(torch.int32).cpu().numpy()
            cos[start:stop] = values.cpu().numpy()
            bar.update(stop - start)
    return ids, cos
