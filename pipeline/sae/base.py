"""The interface every SAE recipe implements, and what they share: parameters in SAELens layout, the input scale,
the unit-norm decoder constraint, and the hooks that persistence and export use (they live in persist.py and
export.py, which import this module and not the other way round).

Shapes follow SAELens: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] (row i is latent i's decoder vector,
the "decoder column" of the papers), b_dec [d_in]. Everything inside runs on inputs multiplied by `input_scale`;
encode/decode/forward take and return activations in their original scale.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from pipeline.config.sae import SAEConfig
from pipeline.errors import SAEFormatError

from .init import decoder_bias_init, input_scale_factor

log = logging.getLogger(__name__)


@dataclass
class SAEOutput:
    x_hat: Tensor  # reconstruction in the original input scale
    loss: Tensor  # scalar to backprop; a mean over rows, so that DDP's gradient average equals one big batch
    terms: dict[str, Tensor]  # detached scalars for logging: recon_loss, l0, fvu, and l1_loss / aux_loss / lambda / threshold by recipe
    fired: Tensor  # bool [d_sae]: latents active on at least one row of this batch


class SparseAutoencoder(nn.Module):
    arch: ClassVar[str]
    saelens_architecture: ClassVar[str]
    apply_b_dec_to_input: ClassVar[bool] = True  # encoder sees x - b_dec
    unit_norm_decoder: ClassVar[bool] = True  # decoder rows are kept at norm 1
    decoder_init_norm: ClassVar[float] = 1.0

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.arch != self.arch:
            raise ValueError(f"sae.arch: {cfg.arch!r} given to the {self.arch!r} class")
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("input_scale", torch.ones(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Runs at construction, on CPU. Tied initialisation (W_enc = W_decᵀ) from a seeded generator: every rank and
        # every rerun starts identical.
        gen = torch.Generator().manual_seed(self.cfg.seed)
        w = self.W_dec.data
        w.normal_(generator=gen)  # in place: no second d_sae x d_in buffer at production size
        w.mul_(self.decoder_init_norm / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ---- what a recipe provides; all work on scaled 2-D inputs --------------------------------------------------
    def _encode_scaled(self, xs: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode_scaled(self, z: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, z.to(self.W_dec.dtype), self.W_dec)

    def _forward_scaled(self, xs: Tensor, progress: float, dead_mask: Tensor | None) -> SAEOutput:
        raise NotImplementedError

    # ---- public interface -------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., d_sae] with inference semantics."""
        lead = x.shape[:-1]
        z = self._encode_scaled(self._scaled(x.reshape(-1, x.shape[-1])))
        return z.reshape(*lead, self.cfg.d_sae)

    def encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The active latents of [B, d_in] rows as (rows, features, values), values > 0, ascending by row: what
        encode gives, without a dense [B, d_sae] result where the recipe can avoid one."""
        z = self._encode_scaled(self._scaled(x))
        rows, cols = z.nonzero(as_tuple=True)
        return rows, cols, z[rows, cols]

    def decode(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        x_hat = self._decode_scaled(z.reshape(-1, z.shape[-1])) / self.input_scale
        return x_hat.reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor, *, progress: float = 1.0, dead_mask: Tensor | None = None) -> SAEOutput:
        """Training step on a [B, d_in] batch. `progress` in [0, 1] drives warmups; `dead_mask` [d_sae] feeds AuxK."""
        if x.ndim != 2:
            raise ValueError(f"sae.forward: expected a [batch, d_in] tensor, got shape {tuple(x.shape)}")
        out = self._forward_scaled(self._scaled(x), progress, dead_mask)
        out.x_hat = out.x_hat / self.input_scale
        return out

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Set the input scale and b_dec from a sample of raw activations [N, d_in]; deterministic in the sample."""
        x = x.reshape(-1, self.cfg.d_in).to(device=self.b_dec.device, dtype=torch.float32)
        scale = input_scale_factor(x) if self.cfg.normalize_input else 1.0
        self.input_scale.fill_(scale)
        self.b_dec.copy_(decoder_bias_init(x * scale, self.cfg.b_dec_init))
        log.info("SAE init from %d rows: input scale %.4g, b_dec %s (norm %.4g)",
                 x.shape[0], scale, self.cfg.b_dec_init, self.b_dec.norm().item())

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove from each decoder row's gradient the part parallel to the row: with the norm fixed at 1, that part
        only fights the renormalisation."""
        grad = self.W_dec.grad
        if not self.unit_norm_decoder or grad is None:
            return
        w = self.W_dec
        # vecdot / addcmul_ avoid [d_sae, d_in] temporaries (1.6 GB at production size).
        parallel = torch.linalg.vecdot(grad, w, dim=1) / w.norm(dim=1).square().clamp_min(1e-12)
        grad.addcmul_(parallel[:, None], w, value=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---- state and export hooks ------------------------------------------------------------------------------
    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor], source: str) -> None:
        """Copy a full state dict in, checking names and shapes so that a mismatch names the file and the tensor."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise SAEFormatError(f"{source}: tensors missing {missing}, unexpected {unexpected}")
        for name, target in own.items():
            if tuple(tensors[name].shape) != tuple(target.shape):
                got, want = tuple(tensors[name].shape), tuple(target.shape)
                raise SAEFormatError(f"{source}: {name} has shape {got}, expected {want}")
            target.copy_(tensors[name])

    # SAELens export hooks: extra cfg.json keys and tensors a recipe needs at inference.
    def saelens_config_extras(self) -> dict:
        return {}

    def saelens_tensor_extras(self) -> dict[str, Tensor]:
        return {}

    # ---- shared pieces ----------------------------------------------------------------------------------------
    def _scaled(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"sae: input has d={x.shape[-1]}, this SAE has d_in={self.cfg.d_in}")
        # input_scale stays 1 when normalize_input is off, so one code path serves both.
        return x.to(self.W_enc.dtype) * self.input_scale

    def _pre_activation(self, xs: Tensor) -> Tensor:
        inputs = xs - self.b_dec if self.apply_b_dec_to_input else xs
        return torch.addmm(self.b_enc, inputs, self.W_enc)

    @staticmethod
    def _reconstruction_terms(xs: Tensor, x_hat_s: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row squared error summed over d_in, averaged over rows (the loss term), and the batch FVU (a metric)."""
        sq_err = (x_hat_s - xs).pow(2).sum(dim=-1)
        mse = sq_err.mean()
        with torch.no_grad():
            total_var = (xs - xs.mean(dim=0)).pow(2).sum()
            fvu = sq_err.sum() / total_var.clamp_min(1e-12)
        return mse, fvu
