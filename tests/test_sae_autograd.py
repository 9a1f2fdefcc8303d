"""The hand-written backward passes (pipeline.sae.autograd) against plain autograd on the same maths, in float64, and
under bf16 (autocast, or bf16 tensors) against the same float64 references."""
from __future__ import annotations

import pytest
import torch

from pipeline.config.sae import SAEConfig
from pipeline.sae import make_sae
from pipeline.sae.autograd import GatherPreActivation, ReluEncodeDecode, SparseDecode, _entry_dots, _relu_mask
from pipeline.sae.topk import _local_cut

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


# ---- bf16 -------------------------------------------------------------------------------------------------------
# Under autocast the dense GEMMs take bf16 inputs (8 significant bits, unit roundoff 2^-9 ≈ 0.2%) and round their
# outputs; a gradient passes through up to three such GEMMs. The references are float64 autograd with the ReLU/TopK
# masks taken from the bf16 pre-activations the Functions saw: a pre-activation within rounding of 0 lands on either
# side (a handful per test here, counted below), and one such entry alone moves the encoder gradients of these small
# problems by 1-3%, which is the precision's doing, not the backward's. With the masks matched, the measured normwise
# errors stay under 0.6%; BF16_TOL = 2% (about 10 unit roundoffs) leaves room for other seeds and BLAS builds while
# failing on any real dtype bug (a lost mask, a dropped term or a gradient in the wrong dtype is off by O(1)).
# What stays fp32 by design is checked at fp32 tolerance.
BF16_TOL = 0.02
AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("mode", ["autocast", "autocast_backward_inside", "bf16_inputs"])
@pytest.mark.parametrize("b_dec_in_encoder", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_relu_encode_decode_bf16_matches_float64(mode, b_dec_in_encoder, weighted):
    # fp32 parameters under autocast (backward outside or inside the autocast region), or bf16 tensors throughout
    dtype = torch.bfloat16 if mode == "bf16_inputs" else torch.float32
    leaves = [t.detach().to(dtype).requires_grad_() for t in _params(0)]
    xs, W_enc, b_enc, W_dec, b_dec, w = leaves
    inputs = [xs, W_enc, b_enc, W_dec, b_dec] + ([w] if weighted else [])
    upstream, lam = torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0.7

    with torch.autocast(**AUTOCAST, enabled=mode != "bf16_inputs"):
        x_hat, penalty, l0, fired = ReluEncodeDecode.apply(xs, W_enc, b_enc, W_dec, b_dec, w if weighted else None,
                                                           b_dec_in_encoder)
        loss = (x_hat * upstream.to(x_hat.dtype)).sum() + lam * penalty
        z16 = next(t for t in x_hat.grad_fn.saved_tensors if t.shape == (ROWS, D_SAE))  # z as the Function saved it
        ours = _grads(loss, inputs) if mode == "autocast_backward_inside" else None
    ours = ours or _grads(loss, inputs)
    assert z16.dtype == torch.bfloat16

    xs64, W_enc64, b_enc64, W_dec64, b_dec64, w64 = (t.detach().double().requires_grad_() for t in leaves)
    pre = (xs64 - b_dec64 if b_dec_in_encoder else xs64) @ W_enc64 + b_enc64
    assert ((z16 > 0) != (pre > 0)).sum() <= 0.005 * pre.numel()  # measured up to 0.1%
    z = pre * (z16 > 0)
    ref_x_hat = z @ W_dec64 + b_dec64
    ref_penalty = (z * (w64 if weighted else 1.0)).sum(dim=1).mean()
    ref = _grads((ref_x_hat * upstream).sum() + lam * ref_penalty,
                 [xs64, W_enc64, b_enc64, W_dec64, b_dec64] + ([w64] if weighted else []))

    if mode != "bf16_inputs":
        assert x_hat.dtype == penalty.dtype == torch.float32  # the loss terms leave the Function in fp32
    assert _rel_err(x_hat, ref_x_hat) < BF16_TOL and _rel_err(penalty, ref_penalty) < BF16_TOL
    assert l0.item() == pytest.approx((z16 > 0).sum().item() / ROWS) and torch.equal(fired, (z16 > 0).any(dim=0))
    for name, a, b, leaf in zip(["xs", "W_enc", "b_enc", "W_dec", "b_dec", "weights"], ours, ref, inputs):
        assert a.dtype == leaf.dtype, name
        assert _rel_err(a, b) < BF16_TOL, (name, _rel_err(a, b))


def test_gather_pre_activation_bf16_pre_gives_fp32_values_and_exact_grads():
    # Only the gathered values carry bf16 rounding: the gradients do not depend on them and stay fp32.
    g = torch.Generator().manual_seed(3)
    xs, W_enc, b_enc, b_dec = (torch.randn(*s, generator=g) for s in ((ROWS, D_IN), (D_IN, D_SAE), (D_SAE,), (D_IN,)))
    W_enc, b_enc, b_dec = (t.requires_grad_() for t in (W_enc, b_enc, b_dec))
    flat = torch.randperm(ROWS * D_SAE, generator=g)[: ROWS * K].sort().values
    rows, cols = flat // D_SAE, flat % D_SAE
    upstream = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        enc_in = xs - b_dec
        pre = torch.addmm(b_enc, enc_in, W_enc)
    assert pre.dtype == torch.bfloat16
    with torch.autocast(**AUTOCAST):
        values = GatherPreActivation.apply(pre, enc_in, W_enc, b_enc, b_dec, rows, cols, True)
    assert values.dtype == torch.float32 and torch.equal(values, pre[rows, cols].float())
    ours = _grads((values * upstream.float()).sum(), [W_enc, b_enc, b_dec])

    W_enc64, b_enc64, b_dec64 = (t.detach().double().requires_grad_() for t in (W_enc, b_enc, b_dec))
    ref_values = ((xs.double() - b_dec64) @ W_enc64 + b_enc64)[rows, cols]
    ref = _grads((ref_values * upstream).sum(), [W_enc64, b_enc64, b_dec64])
    for name, a, b in zip(["W_enc", "b_enc", "b_dec"], ours, ref):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


def _coo_batch(g: torch.Generator, n_rows: int = ROWS):
    """Entries grouped by row, with an empty row and a latent repeated within a row (decode_coo allows both)."""
    counts = torch.randint(0, 2 * K, (n_rows,), generator=g)
    counts[3] = 0
    rows = torch.arange(n_rows).repeat_interleave(counts)
    cols = torch.randint(0, D_SAE, (rows.numel(),), generator=g)
    cols[1] = cols[0]
    offsets = torch.cumsum(counts, 0) - counts
    return rows, cols, offsets


def test_sparse_decode_bf16_values_match_float64():
    g = torch.Generator().manual_seed(4)
    rows, cols, offsets = _coo_batch(g)
    assert rows[0] == rows[1]
    values = torch.rand(rows.numel(), generator=g).to(torch.bfloat16).requires_grad_()
    W_dec = torch.randn(D_SAE, D_IN, generator=g, requires_grad=True)
    upstream = torch.randn(ROWS, D_IN, generator=g, dtype=torch.float64)
    with torch.autocast(**AUTOCAST):
        out = SparseDecode.apply(cols, rows, offsets, values, W_dec)
    assert out.dtype == torch.float32
    grad_values, grad_W_dec = _grads((out * upstream.float()).sum(), [values, W_dec])
    assert grad_values.dtype == torch.bfloat16 and grad_W_dec.dtype == torch.float32

    values64, W_dec64 = (t.detach().double().requires_grad_() for t in (values, W_dec))
    dense = torch.zeros(ROWS, D_SAE, dtype=torch.float64).index_put((rows, cols), values64, accumulate=True)
    ref_out = dense @ W_dec64
    ref_values, ref_W_dec = _grads((ref_out * upstream).sum(), [values64, W_dec64])
    # bf16 values are exact in fp32, so the decode and W_dec's gradient are fp32 sums; the values' gradient is an
    # fp32 dot product rounded once to the values' bf16.
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_W_dec.double(), ref_W_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_values.double(), ref_values, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("sddmm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entry_dots_both_paths_match_embedding_bag_own_gradient(dtype, sddmm):
    # What replaced embedding_bag's private per-sample-weight backward, the SDDMM (CPU) and the second embedding_bag
    # (elsewhere), both run here: against that backward reached through public autograd and against a dense product,
    # with empty rows, repeated latents and no entries at all.
    g = torch.Generator().manual_seed(5)
    rows, cols, offsets = _coo_batch(g)
    grad = torch.randn(ROWS, D_IN, generator=g, dtype=dtype)
    W_dec = torch.randn(D_SAE, D_IN, generator=g, dtype=dtype)
    ours = _entry_dots(grad, W_dec, cols, offsets, sddmm=sddmm)
    values = torch.ones(rows.numel(), dtype=dtype, requires_grad=True)
    bag = torch.nn.functional.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values)
    (own,) = torch.autograd.grad(bag, values, grad)
    torch.testing.assert_close(ours, own)
    torch.testing.assert_close(ours, (grad @ W_dec.T)[rows, cols])
    none = _entry_dots(grad, W_dec, cols[:0], torch.zeros(ROWS, dtype=torch.long), sddmm=sddmm)
    assert none.shape == (0,)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_topk_step_bf16_autocast_matches_float64(arch):
    # The same maths as test_sparse_topk_step_matches_dense_autograd, fp32 parameters under autocast. The reference
    # takes its selections from the same bf16 pre-activation the SAE selects on (bf16 ties and roundings may pick
    # other latents than float64 would), then computes everything dense in float64.
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, normalize_input=False))
    x = torch.randn(ROWS, D_IN) * 3
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN) * 0.1)
        sae.b_enc.copy_(torch.randn(D_SAE) * 0.1)
    sae.train()
    dead = torch.arange(D_SAE) % 4 == 0
    with torch.autocast(**AUTOCAST):
        out = sae(x, dead_mask=dead)
        pre16 = sae._dense_pre_activation(x)[1]
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    ours = _grads(out.loss, params)

    if arch == "topk":
        mask = torch.zeros(ROWS, D_SAE, dtype=torch.bool).scatter_(1, pre16.topk(K, dim=1, sorted=False).indices, True)
    else:
        pre16.relu_()
        mask = pre16 >= _local_cut(pre16, K)
    dead_idx = dead.nonzero().squeeze(1)
    k_aux = min(D_IN // 2, dead_idx.numel())
    aux_cols = dead_idx[pre16.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False).indices]
    aux_mask = torch.zeros(ROWS, D_SAE, dtype=torch.bool).scatter_(1, aux_cols, True)
    p64 = [p.detach().double().requires_grad_() for p in params]
    W_enc, b_enc, W_dec, b_dec = p64
    x64 = x.double()
    pre = (x64 - b_dec) @ W_enc + b_enc
    live = pre16 > 0  # the ReLU on the gathered values sees their bf16 signs
    z = pre * (mask & live)
    x_hat = z @ W_dec + b_dec
    mse = (x_hat - x64).pow(2).sum(dim=-1).mean()
    aux_z = pre * (aux_mask & live)
    aux = (aux_z @ W_dec - (x64 - x_hat).detach()).pow(2).sum(dim=-1).mean()
    ref = _grads(mse + sae.cfg.aux_coefficient * aux, p64)

    assert out.loss.dtype == torch.float32 and out.terms["l0"].item() * ROWS == mask.sum()
    assert _rel_err(out.loss, mse + sae.cfg.aux_coefficient * aux) < BF16_TOL
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], ours, ref):
        assert a.dtype == torch.float32, name
        assert _rel_err(a, b) < BF16_TOL, (name, _rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_relu_mask_in_place_and_functional_paths_equal_autograd_relu_backward(dtype):
    # _relu_mask overwrites dpre (an out= that is its own input) on CPU and CUDA and falls back to the functional op
    # elsewhere; both paths, bit for bit, are autograd's own ReLU backward.
    g = torch.Generator().manual_seed(6)
    pre = torch.randn(ROWS, D_SAE, generator=g).to(dtype).requires_grad_()
    dpre = torch.randn(ROWS, D_SAE, generator=g).to(dtype)
    z = torch.nn.functional.threshold(pre.detach(), 0.0, 0.0)
    (ref,) = torch.autograd.grad(pre.relu(), pre, dpre)
    buffer = dpre.clone()
    in_place = _relu_mask(buffer, z)  # the CPU default
    assert in_place.data_ptr() == buffer.data_ptr()
    functional = _relu_mask(dpre, z, in_place=False)
    assert functional.data_ptr() != dpre.data_ptr()
    assert torch.equal(in_place, ref) and torch.equal(functional, ref)


def test_relu_encode_decode_backward_is_the_same_on_the_fallback_mask(monkeypatch):
    import pipeline.sae.autograd as autograd

    leaves = [t.detach().float().requires_grad_() for t in _params(7)]
    xs, W_enc, b_enc, W_dec, b_dec, w = leaves

    def grads():
        x_hat, penalty, _, _ = ReluEncodeDecode.apply(xs, W_enc, b_enc, W_dec, b_dec, w, True)
        return _grads(x_hat.square().sum() + penalty, leaves)

    default = grads()
    fallback = autograd._relu_mask
    monkeypatch.setattr(autograd, "_relu_mask", lambda dpre, z: fallback(dpre, z, in_place=False))
    for a, b in zip(default, grads()):
        assert torch.equal(a, b)
