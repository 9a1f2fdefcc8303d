"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs with the AuxK loss for dead latents.

Both decode sparsely: the reconstruction gathers the few active decoder rows (embedding_bag with per-sample weights)
instead of multiplying a zero-filled [B, d_sae] matrix by W_dec, so decode and its backward cost O(B·k·d_in).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pipeline.config.sae import SAEConfig

from .base import SAEOutput, SparseAutoencoder


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Σ_j values[j]·W_dec[indices[j]] per row; indices/values [B, k], or flat with per-row `offsets`. No bias."""
    return F.embedding_bag(indices, W_dec, offsets, mode="sum", per_sample_weights=values.to(W_dec.dtype))


def decode_coo(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, W_dec: Tensor) -> Tensor:
    """Sparse decode of entries given as (row, col, value), rows ascending (as torch.nonzero returns them)."""
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = torch.cumsum(counts, dim=0) - counts
    return sparse_decode(cols, values, W_dec, offsets)


class TopKSAE(SparseAutoencoder):
    """Keep the k largest pre-activations of each row (then ReLU); tied init and unit-norm decoder rows."""

    arch = "topk"
    saelens_architecture = "topk"

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return values.relu(), indices

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        pre = self._pre_activation(xs)
        values, indices = self._select(pre)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def _decode_scaled(self, z: Tensor) -> Tensor:
        rows, cols = z.nonzero(as_tuple=True)
        return decode_coo(rows, cols, z[rows, cols], z.shape[0], self.W_dec) + self.b_dec

    def _forward_scaled(self, xs: Tensor, progress: float, dead_mask: Tensor | None) -> SAEOutput:
        pre = self._pre_activation(xs)
        values, indices = self._select(pre)
        x_hat_s = sparse_decode(indices, values, self.W_dec) + self.b_dec
        mse, fvu = self._reconstruction_terms(xs, x_hat_s)
        aux = self._aux_loss(pre, xs, x_hat_s, dead_mask)
        active = values > 0
        # Counting with index_add keeps the firing mask on the device (no host sync on the hot path).
        hits = torch.zeros(self.cfg.d_sae, device=xs.device).index_add_(0, indices.flatten(), active.flatten().float())
        terms = {"mse": mse.detach(), "fvu": fvu, "aux": aux.detach(), "l0": active.sum(dim=-1).float().mean()}
        return SAEOutput(x_hat=x_hat_s, loss=mse + self.cfg.aux_coefficient * aux, terms=terms, fired=hits > 0)

    def _aux_loss(self, pre: Tensor, xs: Tensor, x_hat_s: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK: the top-k_aux dead latents of each row reconstruct the main model's (detached) residual.

        k_aux comes from d_in (default d_in // 2), not d_sae. The residual x - x_hat already has b_dec on the x_hat
        side, so the dead latents' reconstruction adds no b_dec. The loss is a per-row mean of squared error in the
        main MSE's units: decomposable over rows (DDP-safe), and the dead latents get gradient from this term only,
        where Adam makes its overall scale immaterial."""
        zero = pre.new_zeros(())
        if dead_mask is None:
            return zero
        dead = dead_mask.to(pre.device).nonzero().squeeze(1)
        if dead.numel() == 0:
            return zero
        k_aux = min(self.cfg.resolved_aux_k, dead.numel())
        candidates = pre.index_select(1, dead)
        values, positions = candidates.topk(k_aux, dim=-1, sorted=False)
        residual = (xs - x_hat_s).detach()
        aux_hat = sparse_decode(dead[positions], values.relu(), self.W_dec)
        return (aux_hat - residual).pow(2).sum(dim=-1).mean()

    def saelens_config_extras(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}


class BatchTopKSAE(TopKSAE):
    """Keep the k·B largest activations of the whole batch, so rows may use more or fewer than k latents.

    Under torch.distributed the selection is over the global batch: every rank contributes its best candidates
    and all agree on one threshold. At inference a learned threshold θ (EMA of the smallest selected activation)
    replaces the batch dependence: z = relu(pre)·[pre > θ], which SAELens loads as a JumpReLU."""

    arch = "batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        pre = self._pre_activation(xs).relu()
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def _forward_scaled(self, xs: Tensor, progress: float, dead_mask: Tensor | None) -> SAEOutput:
        pre = self._pre_activation(xs).relu()
        if self.training:
            cut = batch_threshold(pre.detach(), self.cfg.k)
            self._track_threshold(cut)
            selected = (pre >= cut) & (pre > 0)
        else:
            selected = pre > self.threshold
        rows, cols = selected.nonzero(as_tuple=True)
        x_hat_s = decode_coo(rows, cols, pre[rows, cols], xs.shape[0], self.W_dec) + self.b_dec
        mse, fvu = self._reconstruction_terms(xs, x_hat_s)
        aux = self._aux_loss(pre, xs, x_hat_s, dead_mask)
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[cols] = True
        terms = {
            "mse": mse.detach(),
            "fvu": fvu,
            "aux": aux.detach(),
            "l0": torch.tensor(rows.numel() / xs.shape[0], device=xs.device),
            "threshold": self.threshold.detach().clone(),
        }
        return SAEOutput(x_hat=x_hat_s, loss=mse + self.cfg.aux_coefficient * aux, terms=terms, fired=fired)

    @torch.no_grad()
    def _track_threshold(self, cut: Tensor) -> None:
        # Every rank sees the same global cut, so the buffer stays identical across ranks.
        if cut <= 0:
            return
        if self.threshold_updates == 0:
            self.threshold.copy_(cut)
        else:
            m = self.cfg.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * cut)
        self.threshold_updates += 1

    def saelens_config_extras(self) -> dict:
        return {}

    def saelens_tensor_extras(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.expand(self.cfg.d_sae).clone()}


@torch.no_grad()
def batch_threshold(acts: Tensor, k: int) -> Tensor:
    """The (k·B_global)-th largest value of the non-negative [B, d_sae] `acts` over the global batch.

    Each rank sends its own top min(k·B_global, numel) values, padded with -1, which is enough: no rank can hold
    more than k·B_global of the global winners. Returns 0 when fewer values than that are positive."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    n_local = acts.shape[0]
    if world == 1:
        n_keep = min(k * n_local, acts.numel())
        return acts.flatten().topk(n_keep, sorted=False).values.min()
    n_global = torch.tensor([n_local], device=acts.device)
    dist.all_reduce(n_global)
    n_keep = k * int(n_global.item())
    candidates = torch.full((n_keep,), -1.0, device=acts.device, dtype=acts.dtype)
    local = acts.flatten().topk(min(n_keep, acts.numel()), sorted=False).values
    candidates[: local.numel()] = local
    gathered = [torch.empty_like(candidates) for _ in range(world)]
    dist.all_gather(gathered, candidates)
    return torch.cat(gathered).topk(n_keep, sorted=False).values.min().clamp_min(0)
