"""Hand-written backward passes for the training step: the same maths as autograd's, with fewer passes over the
[B, d_sae] activations and no matmul whose only use is b_dec's gradient.

Autograd's graph for (x - b_dec) @ W_enc spends a full [B, d_sae] x [d_sae, d_in] GEMM on the gradient of x - b_dec,
although x needs none and b_dec only needs its column sum: -W_enc @ Σ_rows dpre, a GEMV. Both Functions here use that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


# The integer dtype to view a float tensor's bit patterns as (bf16 under autocast on GPU, fp32 elsewhere).
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReluEncodeDecode(torch.autograd.Function):
    """x̂ = relu(enc_in @ W_enc + b_enc) @ W_dec + b_dec and the L1 penalty mean_rows(Σ_j z_j·w_j), in one Function.

    enc_in is x - b_dec or x (`b_dec_in_encoder`); `weights` [d_sae] weights the L1 per latent (None: all ones).
    Returns (x̂, penalty, l0, fired); l0 (mean active latents per row) and fired (bool [d_sae]) carry no gradient.
    The backward folds the L1 gradient and the ReLU mask into one in-place pass over dz."""

    @staticmethod
    def forward(ctx, xs: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                weights: Tensor | None, b_dec_in_encoder: bool):
        enc_in = xs - b_dec if b_dec_in_encoder else xs
        # ReLU in place (addmm's output is needed by nothing else) as threshold_ rather than relu_: it writes +0.0
        # where relu_ would keep -0.0, so below, a zero is a zero bit pattern.
        z = F.threshold_(torch.addmm(b_enc, enc_in, W_enc), 0.0, 0.0)
        x_hat = torch.addmm(b_dec, z, W_dec)
        # One pass for the per-latent sums gives the penalty, the firing mask (z >= 0) and, for weighted L1, the
        # weights' gradient. Counting the nonzero int32 bit patterns takes 1/6 of count_nonzero on the floats
        # (12 vs 80 ms at [4096, 9216]), and a bool mask with its sum is slower still.
        latent_sums = z.sum(dim=0)
        penalty = (latent_sums.sum() if weights is None else latent_sums @ weights) / z.shape[0]
        fired = latent_sums > 0
        l0 = torch.count_nonzero(z.view(_SAME_SIZE_INT[z.element_size()])).float() / z.shape[0]
        ctx.b_dec_in_encoder = b_dec_in_encoder
        ctx.save_for_backward(enc_in, z, latent_sums, W_enc, W_dec, weights)
        ctx.mark_non_differentiable(l0, fired)
        return x_hat, penalty, l0, fired

    @staticmethod
    @once_differentiable
    def backward(ctx, g_xhat: Tensor, g_penalty: Tensor, _l0: None, _fired: None):
        enc_in, z, latent_sums, W_enc, W_dec, weights = ctx.saved_tensors
        need_xs, need_W_enc, need_b_enc, need_W_dec, need_b_dec, need_weights, _ = ctx.needs_input_grad
        rows = z.shape[0]
        if g_xhat is None:
            g_xhat = z.new_zeros(rows, W_dec.shape[1])
        if g_penalty is None:
            g_penalty = z.new_zeros(())
        l1_grad = g_penalty / rows  # d penalty / d z[b, j] = l1_grad · w_j

        grad_W_dec = z.T @ g_xhat if need_W_dec else None
        grad_b_dec = g_xhat.sum(dim=0) if need_b_dec else None
        grad_weights = latent_sums * l1_grad if need_weights else None

        # dpre = (g_xhat @ W_decᵀ + l1_grad·w) · 1[z > 0], built in the GEMM's own output buffer.
        l1_row = l1_grad.expand(W_dec.shape[0]) if weights is None else weights * l1_grad
        dpre = torch.addmm(l1_row, g_xhat, W_dec.T)
        torch.ops.aten.threshold_backward.grad_input(dpre, z, 0, grad_input=dpre)

        # A ones column on enc_in makes the dW_enc GEMM also return Σ_rows dpre (b_enc's gradient) as an extra
        # output row, which costs less than a separate pass over dpre.
        enc_in_1 = torch.cat([enc_in, enc_in.new_ones(rows, 1)], dim=1)
        grad_enc_1 = enc_in_1.T @ dpre
        grad_W_enc, grad_b_enc = grad_enc_1[:-1], grad_enc_1[-1]
        grad_xs = dpre @ W_enc.T if need_xs else None
        if need_b_dec and ctx.b_dec_in_encoder:
            grad_b_dec = grad_b_dec - W_enc @ grad_b_enc  # Σ_rows d(enc_in) = W_enc @ Σ_rows dpre
        return (grad_xs, grad_W_enc if need_W_enc else None, grad_b_enc if need_b_enc else None, grad_W_dec,
                grad_b_dec, grad_weights, None)


class GatherPreActivation(torch.autograd.Function):
    """pre[rows, cols] of pre = enc_in @ W_enc + b_enc, with gradients reaching W_enc, b_enc and b_dec through those
    entries only: O(n·d_in) work for n gathered entries instead of dense [B, d_sae] GEMMs.

    `pre` is the dense pre-activation computed without grad (it may have been relu'd in place: the gathered values
    are then relu(pre), and the caller's ReLU on them gives the right gradient). enc_in is x - b_dec when
    `b_dec_in_encoder`, else x; x itself gets no gradient."""

    @staticmethod
    def forward(ctx, pre: Tensor, enc_in: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                rows: Tensor, cols: Tensor, b_dec_in_encoder: bool):
        ctx.b_dec_in_encoder = b_dec_in_encoder
        ctx.save_for_backward(enc_in, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        enc_in, W_enc, rows, cols = ctx.saved_tensors
        _, _, need_W_enc, need_b_enc, need_b_dec, _, _, _ = ctx.needs_input_grad
        d_sae = W_enc.shape[1]
        grad_W_enc = grad_b_enc = grad_b_dec = None
        if need_W_enc:
            # dW_encᵀ = S @ enc_in with S [d_sae, B] holding `grad` at (cols, rows).
            S = torch.sparse_coo_tensor(torch.stack([cols, rows]), grad, (d_sae, enc_in.shape[0]),
                                        check_invariants=False)
            grad_W_enc = torch.sparse.mm(S, enc_in).T.contiguous()
        col_sums = grad.new_zeros(d_sae).index_add_(0, cols, grad) if (need_b_enc or need_b_dec) else None
        if need_b_enc:
            grad_b_enc = col_sums
        if need_b_dec and ctx.b_dec_in_encoder:
            grad_b_dec = -(W_enc @ col_sums)
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


class SparseDecode(torch.autograd.Function):
    """Σ_j values[j]·W_dec[cols[j]] per row (embedding_bag with per-sample weights), entries flat and grouped by row:
    `rows` [n] ascending, `offsets` [B] where each row's entries start.

    The forward is embedding_bag's; the backward replaces its W_dec gradient, which sorts the n indices (at
    n = B·k = 131k that sort alone measured 250 ms on 2 cores), by a sparse-dense product S @ grad, S [d_sae, B]."""

    @staticmethod
    def forward(ctx, cols: Tensor, rows: Tensor, offsets: Tensor, values: Tensor, W_dec: Tensor):
        ctx.save_for_backward(cols, rows, offsets, values, W_dec)
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        cols, rows, offsets, values, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[3]:
            # embedding_bag's own per-sample-weight gradient; its offset2bag argument is each entry's row.
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, W_dec, cols, offsets, rows, 0)
        if ctx.needs_input_grad[4]:
            S = torch.sparse_coo_tensor(torch.stack([cols, rows]), values, (W_dec.shape[0], grad.shape[0]),
                                        check_invariants=False)
            grad_W_dec = torch.sparse.mm(S, grad)
        return None, None, None, grad_values, grad_W_dec
