"""The hand-written backward passes (pipeline.sae.autograd) against plain autograd on the same maths, in float64."""
from __future__ import annotations

import pytest
import torch

from pipeline.config.sae import SAEConfig
from pipeline.sae import make_sae
from pipeline.sae.autograd import ReluEncodeDecode

D_IN, D_SAE, K, ROWS = 12, 96, 6, 40


def _params(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(ROWS, D_IN), mk(D_IN, D_SAE), mk(D_SAE), mk(D_SAE, D_IN), mk(D_IN), (torch.rand(D_SAE, generator=g, dtype=dtype) + 0.5).requires_grad_()


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("b_dec_in_encoder", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_relu_encode_decode_matches_autograd(b_dec_in_encoder, weighted):
    xs, W_enc, b_enc, W_dec, b_dec, w = _params(0)
    weights = w if weighted else None
    g = torch.Generator().manual_seed(1)
    upstream, lam = torch.randn(ROWS, D_IN, generator=g, dtype=torch.float64), 0.7
    inputs = [xs, W_enc, b_enc, W_dec, b_dec] + ([w] if weighted else [])

    x_hat, penalty, l0, fired = ReluEncodeDecode.apply(xs, W_enc, b_enc, W_dec, b_dec, weights, b_dec_in_encoder)
    ours = _grads((x_hat * upstream).sum() + lam * penalty, inputs)

    enc_in = xs - b_dec if b_dec_in_encoder else xs
    z = torch.relu(enc_in @ W_enc + b_enc)
    ref_x_hat = z @ W_dec + b_dec
    ref_penalty = (z * (w if weighted else 1.0)).sum(dim=1).mean()
    ref = _grads((ref_x_hat * upstream).sum() + lam * ref_penalty, inputs)

    torch.testing.assert_close(x_hat, ref_x_hat)
    torch.testing.assert_close(penalty, ref_penalty)
    assert l0.item() == pytest.approx((z > 0).sum().item() / ROWS)
    assert torch.equal(fired, (z > 0).any(dim=0))
    for name, a, b in zip(["xs", "W_enc", "b_enc", "W_dec", "b_dec", "weights"], ours, ref):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_relu_l0_counts_active_entries_in_every_float_width(dtype):
    # l0 counts nonzero bit patterns through an integer view of z, whose width must follow z's dtype
    g = torch.Generator().manual_seed(2)
    xs, W_enc, W_dec = (torch.randn(*s, generator=g).to(dtype) for s in ((ROWS, D_IN), (D_IN, D_SAE), (D_SAE, D_IN)))
    b_enc, b_dec = torch.zeros(D_SAE, dtype=dtype), torch.zeros(D_IN, dtype=dtype)
    _, _, l0, fired = ReluEncodeDecode.apply(xs, W_enc, b_enc, W_dec, b_dec, None, False)
    active = torch.addmm(b_enc, xs, W_enc) > 0
    assert 0 < active.sum() < active.numel()
    assert l0.item() == pytest.approx(active.sum().item() / ROWS) and torch.equal(fired, active.any(dim=0))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_topk_step_matches_dense_autograd(arch):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, normalize_input=False)).double()
    x = torch.randn(ROWS, D_IN, dtype=torch.float64) * 3
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN, dtype=torch.float64) * 0.1)
        sae.b_enc.copy_(torch.randn(D_SAE, dtype=torch.float64) * 0.1)
    sae.train()
    dead = torch.arange(D_SAE) % 4 == 0  # AuxK on: its gradient goes through the same sparse paths
    out = sae(x, dead_mask=dead)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    ours = _grads(out.loss, params)

    # the same selection, taken from the dense pre-activation, then everything dense under autograd
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    with torch.no_grad():
        relu_pre = pre.relu()
        if arch == "topk":
            mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, relu_pre.topk(K, dim=1).indices, True)
        else:
            mask = relu_pre >= relu_pre.flatten().topk(K * ROWS).values.min()
    z = torch.where(mask, pre.relu(), torch.zeros_like(pre))
    x_hat = z @ sae.W_dec + sae.b_dec
    mse = (x_hat - x).pow(2).sum(dim=-1).mean()
    with torch.no_grad():
        aux_pre = torch.where(dead, relu_pre, torch.full_like(pre, -1.0))
        k_aux = min(D_IN // 2, int(dead.sum()))
        aux_mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, aux_pre.topk(k_aux, dim=1).indices, True)
    aux_z = torch.where(aux_mask, pre.relu(), torch.zeros_like(pre))
    aux = (aux_z @ sae.W_dec - (x - x_hat).detach()).pow(2).sum(dim=-1).mean()
    ref = _grads(mse + sae.cfg.aux_coefficient * aux, params)

    torch.testing.assert_close(out.loss, mse + sae.cfg.aux_coefficient * aux)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], ours, ref):
        torch.testing.assert_close(a, b, msg=name)
