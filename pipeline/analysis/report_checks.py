"""Seed 000's checks of a trained SAE on held-out rows, as streaming passes with memory bounded by the batch:

- dead latents: never active on the rows read (and, seed 002's rule, never above 0.07);
- reconstruction keeping only the top-k active latents of each token (seed 000: k = 64), against all of them, and
  keeping only the k latents that fire most often, for every token (the other reading of "the top-64 neurons");
- ablation: zeroing latent i changes a token's squared error by Δ = 2·z_i·(e·d_i) + z_i²·‖d_i‖², with e = x − x̂ and
  d_i its decoder row (exact, no second decode). The latents whose removal costs the most in total, and for each the
  tokens that suffer most.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

Batches = Callable[[], Iterator[tuple[Tensor, Tensor]]]  # fresh iterator of (global rows [B] int64, x [B, d_in])
SEED002_DEAD_THRESHOLD = 0.07


@dataclass
class FirstPass:
    tokens: int
    fired: Tensor  # [d_sae] int64: tokens where each latent is active
    max_act: Tensor  # [d_sae]
    l0: Tensor  # [tokens] int32, active latents per token
    fvu_all: float
    fvu_top: float  # top-k per token
    ablation_total: Tensor  # [d_sae] float64: Σ over tokens of Δ
    sq_err: float  # Σ ‖x − x̂‖²

    @property
    def density(self) -> Tensor:
        return self.fired.double() / max(self.tokens, 1)

    @property
    def dead_pct(self) -> float:
        return 100.0 * (self.fired == 0).double().mean().item()

    @property
    def dead_pct_seed002(self) -> float:
        return 100.0 * (self.max_act <= SEED002_DEAD_THRESHOLD).double().mean().item()


@dataclass
class AblatedToken:
    row: int
    delta: float  # increase of the token's squared error when the latent is zeroed
    activation: float
    sq_err: float  # the token's squared error with every latent


@dataclass
class AblatedLatent:
    latent: int
    total_delta: float
    share: float  # total_delta / Σ ‖x − x̂‖² over the rows
    fired: int
    tokens: list[AblatedToken]


def _ablation_delta(z: Tensor, e: Tensor, w_dec: Tensor, dec_sq: Tensor) -> Tensor:
    """Δ[t, i] for the latents whose decoder rows are `w_dec` [m, d] (and squared norms dec_sq [m]); z [B, m]."""
    return 2 * z * (e @ w_dec.T) + z.square() * dec_sq


def _keep_top(z: Tensor, k: int) -> Tensor:
    if k >= z.shape[1]:
        return z
    values, index = z.topk(k, dim=1)
    return torch.zeros_like(z).scatter_(1, index, values)


@torch.no_grad()
def first_pass(sae, batches: Batches, *, top: int, device: torch.device, progress=None) -> FirstPass:
    d_sae = sae.cfg.d_sae
    w_dec = sae.W_dec.float()
    dec_sq = w_dec.square().sum(1)
    fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
    max_act = torch.zeros(d_sae, device=device)
    ablation = torch.zeros(d_sae, dtype=torch.float64, device=device)
    l0s, n = [], 0
    sum_x = sq_x = sq_err = sq_err_top = 0.0
    for _, x in batches():
        x = x.to(device, torch.float32)
        z = sae.encode(x).float()
        e = x - sae.decode(z).float()
        active = z > 0
        fired += active.sum(0)
        max_act = torch.maximum(max_act, z.max(0).values)
        l0s.append(active.sum(1).int().cpu())
        ablation += _ablation_delta(z, e, w_dec, dec_sq).double().sum(0)
        xd = x.double()
        sum_x = sum_x + xd.sum(0)
        sq_x += xd.square().sum().item()
        sq_err += e.double().square().sum().item()
        e_top = x - sae.decode(_keep_top(z, top)).float()
        sq_err_top += e_top.double().square().sum().item()
        n += x.shape[0]
        if progress is not None:
            progress(x.shape[0])
    if n == 0:
        raise ValueError("report: no rows to read")
    total_var = sq_x - (sum_x.square().sum().item() / n)  # Σ‖x − mean‖², in float64
    return FirstPass(tokens=n, fired=fired.cpu(), max_act=max_act.cpu(), l0=torch.cat(l0s),
                     fvu_all=sq_err / total_var, fvu_top=sq_err_top / total_var, ablation_total=ablation.cpu(),
                     sq_err=sq_err)


@torch.no_grad()
def second_pass(sae, batches: Batches, first: FirstPass, *, top: int, latents: int, examples: int,
                device: torch.device, progress=None) -> tuple[float, list[AblatedLatent]]:
    """(FVU keeping only the `top` most often firing latents for every token, the ablation of the `latents` latents
    whose removal costs the most, each with its `examples` most affected tokens)."""
    frequent = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    frequent[first.fired.topk(min(top, sae.cfg.d_sae)).indices] = True
    frequent = frequent.to(device)
    chosen = first.ablation_total.topk(min(latents, sae.cfg.d_sae)).indices.to(device)
    w_sel = sae.W_dec.float()[chosen]
    dec_sq = w_sel.square().sum(1)
    m = chosen.numel()
    best_delta = torch.full((examples, m), -float("inf"), device=device)
    best_rows = torch.zeros((examples, m), dtype=torch.int64, device=device)
    best_act = torch.zeros((examples, m), device=device)
    best_err = torch.zeros((examples, m), device=device)
    sum_x, sq_x, sq_err_freq, n = 0.0, 0.0, 0.0, 0
    for rows, x in batches():
        x = x.to(device, torch.float32)
        rows = rows.to(device)
        z = sae.encode(x).float()
        e = x - sae.decode(z).float()
        sq_err_freq += (x - sae.decode(z * frequent).float()).double().square().sum().item()
        xd = x.double()
        sum_x = sum_x + xd.sum(0)
        sq_x += xd.square().sum().item()
        n += x.shape[0]
        z_sel = z[:, chosen]
        delta = _ablation_delta(z_sel, e, w_sel, dec_sq).masked_fill(z_sel <= 0, -float("inf"))  # inactive: no Δ
        err = e.square().sum(1, keepdim=True).expand_as(delta)
        # Streaming top-k per latent: merge this batch's candidates with the best so far.
        all_delta = torch.cat([best_delta, delta])
        order = all_delta.topk(min(examples, all_delta.shape[0]), dim=0).indices
        best_delta = all_delta.gather(0, order)
        best_rows = torch.cat([best_rows, rows[:, None].expand_as(delta)]).gather(0, order)
        best_act = torch.cat([best_act, z_sel]).gather(0, order)
        best_err = torch.cat([best_err, err]).gather(0, order)
        if progress is not None:
            progress(x.shape[0])
    total_var = sq_x - (sum_x.square().sum().item() / n)
    out = []
    for j, latent in enumerate(chosen.tolist()):
        tokens = [AblatedToken(int(best_rows[r, j]), float(best_delta[r, j]), float(best_act[r, j]), float(best_err[r, j]))
                  for r in range(best_delta.shape[0]) if torch.isfinite(best_delta[r, j])]
        total = float(first.ablation_total[latent])
        out.append(AblatedLatent(latent, total, total / first.sq_err if first.sq_err > 0 else float("nan"),
                                 int(first.fired[latent]), tokens))
    return sq_err_freq / total_var, out
