"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs with the AuxK loss for dead latents.

Both decode sparsely: the reconstruction gathers the few active decoder rows (embedding_bag with per-sample weights)
instead of multiplying a zero-filled [B, d_sae] matrix by W_dec, so decode and its backward cost O(B·k·d_in). The
encoder's backward is sparse too: the dense pre-activation is computed outside autograd and only the selected entries
(main and AuxK) are gathered with gradient, so dW_enc costs O(B·k·d_in) instead of two dense GEMMs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.config.sae import SAEConfig

from .autograd import GatherPreActivation, SparseDecode
from .base import SAEOutput, SparseAutoencoder


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Σ_j values[j]·W_dec[indices[j]] per row; indices/values [B, k], or flat with per-row `offsets`. No bias."""
    values = values.to(W_dec.dtype)
    if offsets is None:
        n_rows, per_row = indices.shape
        rows = torch.arange(n_rows, device=indices.device).repeat_interleave(per_row)
        offsets = torch.arange(0, n_rows * per_row, per_row, device=indices.device)
    else:
        counts = torch.diff(offsets, append=offsets.new_tensor([indices.numel()]))
        rows = torch.arange(offsets.numel(), device=indices.device).repeat_interleave(counts)
    return SparseDecode.apply(indices.flatten(), rows, offsets, values.flatten(), W_dec)


def decode_coo(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, W_dec: Tensor) -> Tensor:
    """Sparse decode of entries given as (row, col, value), rows ascending (as torch.nonzero returns them)."""
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = torch.cumsum(counts, dim=0) - counts
    return SparseDecode.apply(cols, rows, offsets, values.to(W_dec.dtype), W_dec)


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

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, indices = self._select(self._pre_activation(self._scaled(x)))
        rows = torch.arange(values.shape[0], device=values.device).repeat_interleave(values.shape[1])
        values, indices = values.flatten(), indices.flatten()
        active = values > 0
        return rows[active], indices[active], values[active]

    def _decode_scaled(self, z: Tensor) -> Tensor:
        rows, cols = z.nonzero(as_tuple=True)
        return decode_coo(rows, cols, z[rows, cols], z.shape[0], self.W_dec) + self.b_dec

    def _forward_scaled(self, xs: Tensor, progress: float, dead_mask: Tensor | None) -> SAEOutput:
        enc_in, pre = self._dense_pre_activation(xs)
        _, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        values = self._gather_pre(pre, enc_in, indices).relu()
        x_hat_s = sparse_decode(indices, values, self.W_dec) + self.b_dec
        mse, fvu = self._reconstruction_terms(xs, x_hat_s)
        aux = self._aux_loss(pre, enc_in, xs, x_hat_s, dead_mask)
        active = values > 0
        # Counting with index_add keeps the firing mask on the device (no host sync on the hot path).
        hits = torch.zeros(self.cfg.d_sae, device=xs.device).index_add_(0, indices.flatten(), active.flatten().float())
        terms = {"recon_loss": mse.detach(), "fvu": fvu, "aux_loss": aux.detach(), "l0": active.sum(dim=-1).float().mean()}
        return SAEOutput(x_hat=x_hat_s, loss=mse + self.cfg.aux_coefficient * aux, terms=terms, fired=hits > 0)

    @torch.no_grad()
    def _dense_pre_activation(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder input and the dense [B, d_sae] pre-activation, outside autograd: only the few selected entries
        carry gradient, through _gather_pre."""
        enc_in = xs - self.b_dec if self.apply_b_dec_to_input else xs
        return enc_in, torch.addmm(self.b_enc, enc_in, self.W_enc)

    def _gather_pre(self, pre: Tensor, enc_in: Tensor, cols: Tensor, rows: Tensor | None = None) -> Tensor:
        """pre[rows, cols] with gradient to the encoder; `cols` [B, n] per row when `rows` is None, else flat."""
        shape = cols.shape
        if rows is None:
            rows = torch.arange(shape[0], device=cols.device).repeat_interleave(shape[1])
        values = GatherPreActivation.apply(pre, enc_in, self.W_enc, self.b_enc, self.b_dec, rows, cols.flatten(),
                                           self.apply_b_dec_to_input)
        return values.view(shape)

    def _aux_loss(self, pre: Tensor, enc_in: Tensor, xs: Tensor, x_hat_s: Tensor,
                  dead_mask: Tensor | None) -> Tensor:
        """AuxK: the top-k_aux dead latents of each row reconstruct the main model's (detached) residual.

        k_aux comes from d_in (default d_in // 2), not d_sae. The residual x - x_hat already has b_dec on the x_hat
        side, so the dead latents' reconstruction adds no b_dec. The loss is a per-row mean of squared error in the
        main MSE's units: decomposable over rows (DDP-safe), and the dead latents get gradient from this term only,
        where Adam makes its overall scale immaterial."""
        zero = xs.new_zeros(())
        if dead_mask is None:
            return zero
        dead = dead_mask.to(pre.device).nonzero().squeeze(1)
        if dead.numel() == 0:
            return zero
        k_aux = min(self.cfg.resolved_aux_k, dead.numel())
        _, positions = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
        cols = dead[positions]
        values = self._gather_pre(pre, enc_in, cols).relu()
        residual = (xs - x_hat_s).detach()
        aux_hat = sparse_decode(cols, values, self.W_dec)
        return (aux_hat - residual).pow(2).sum(dim=-1).mean()

    def saelens_config_extras(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}


class BatchTopKSAE(TopKSAE):
    """Keep the k·B largest activations of the whole batch, so rows may use more or fewer than k latents.

    Under torch.distributed the selection is over the global batch: every rank contributes its best candidates
    and all agree on one threshold. At inference a learned threshold θ replaces the batch dependence:
    z = relu(pre)·[pre > θ], which SAELens loads as a JumpReLU. During training θ is an EMA of the smallest selected
    activation; the EMA trails the falling cut of a young SAE (a 120-step run ended at L0 9 for k=32), so at the
    end the trainer calls calibrate_threshold, which sets θ from the final weights."""

    arch = "batchtopk"
    saelens_architecture = "jumprelu"

    # a threshold, not k per row, at inference: the generic sparse encode
    encode_sparse = SparseAutoencoder.encode_sparse

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def _encode_scaled(self, xs: Tensor) -> Tensor:
        pre = self._pre_activation(xs).relu()
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def _forward_scaled(self, xs: Tensor, progress: float, dead_mask: Tensor | None) -> SAEOutput:
        enc_in, pre = self._dense_pre_activation(xs)
        pre.relu_()
        if self.training:
            cut = batch_threshold(pre, self.cfg.k)
            self._track_threshold(cut)
            # pre >= 0 here, so (pre >= cut) & (pre > 0) is one comparison.
            selected = pre >= cut if cut > 0 else pre > 0
        else:
            selected = pre > self.threshold
        rows, cols = selected.nonzero(as_tuple=True)
        values = self._gather_pre(pre, enc_in, cols, rows)
        x_hat_s = decode_coo(rows, cols, values, xs.shape[0], self.W_dec) + self.b_dec
        mse, fvu = self._reconstruction_terms(xs, x_hat_s)
        aux = self._aux_loss(pre, enc_in, xs, x_hat_s, dead_mask)
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
        fired[cols] = True
        terms = {
            "recon_loss": mse.detach(),
            "fvu": fvu,
            "aux_loss": aux.detach(),
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

    @torch.no_grad()
    def calibrate_threshold(self, x: Tensor, batch_size: int) -> float:
        """Set θ to the mean batch cut over whole batches of `batch_size` raw rows `x`, at the current weights, so
        that inference keeps k latents per row on average, as training did. A pure function of the weights and `x`:
        every rank computes the same θ from the same rows, and a resumed run recomputes it identically."""
        n = (x.shape[0] // batch_size) * batch_size
        if n == 0:
            raise ValueError(f"threshold calibration needs at least one batch of {batch_size} rows, got {x.shape[0]}")
        cuts = []
        for start in range(0, n, batch_size):
            xs = self._scaled(x[start : start + batch_size].to(self.W_enc.device))
            pre = self._dense_pre_activation(xs)[1].relu_()
            cuts.append(_local_cut(pre, self.cfg.k))
        self.threshold.copy_(torch.stack(cuts).mean())
        return float(self.threshold)

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
        return _local_cut(acts, k)
    n_global = torch.tensor([n_local], device=acts.device)
    dist.all_reduce(n_global)
    n_keep = k * int(n_global.item())
    # Candidates travel in fp32 (or wider): gloo and NCCL builds differ in which collectives take bf16.
    candidates = torch.full((n_keep,), -1.0, device=acts.device, dtype=_cut_dtype(acts))
    local = acts.flatten().topk(min(n_keep, acts.numel()), sorted=False).values
    candidates[: local.numel()] = local
    gathered = [torch.empty_like(candidates) for _ in range(world)]
    dist.all_gather(gathered, candidates)
    return torch.cat(gathered).topk(n_keep, sorted=False).values.min().clamp_min(0)


def _cut_dtype(acts: Tensor) -> torch.dtype:
    # A cut is one of the bf16 values under autocast, exact in fp32; fp32 keeps the EMA and the calibration mean
    # from rounding to bf16.
    return torch.promote_types(acts.dtype, torch.float32)


def _local_cut(acts: Tensor, k: int) -> Tensor:
    n_keep = min(k * acts.shape[0], acts.numel())
    return acts.flatten().topk(n_keep, sorted=False).values.min().to(_cut_dtype(acts))
