"""Hand-written backward passes for the training step: the same maths as autograd's, with fewer passes over the
[B, d_sae] activations and no matmul whose only use is b_dec's gradient.

Autograd's graph for (x - b_dec) @ W_enc spends a full [B, d_sae] x [d_sae, d_in] GEMM on the gradient of x - b_dec,
although x needs none and b_dec only needs its column sum: -W_enc @ Σ_rows dpre, a GEMV. Both Functions here use that.

Mixed precision: inside a Function autocast would cast some ops and not others (addmm and matmul, not embedding_bag or
the sparse products), and whether it is on in a backward depends on where backward() was called. So each Function
reads the autocast dtype on entry, turns autocast off and casts explicitly. The dense [B, d_sae] GEMMs run in that
dtype (bf16 under `precision: bf16`: that is where bf16 pays on a GPU); batch sums and the sparse O(B·k·d_in) parts
run in the parameters' dtype; every gradient comes back in its input's dtype, so fp32 parameters get fp32 gradients
and fp32 Adam state.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


# The integer dtype to view a float tensor's bit patterns as (bf16 under autocast, fp32 elsewhere).
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _gemm_dtype(t: Tensor) -> torch.dtype:
    """The dtype for the dense GEMMs: autocast's for fp32 inputs where it is on for t's device (as autocast itself,
    it leaves float64 alone), else t's own."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if t.dtype == torch.float32 and torch.is_autocast_enabled(kind) else t.dtype


def _no_autocast(t: Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    # Batch sums come out in at least fp32: in bf16 the penalty and the bias gradients would keep 8 significant bits.
    return torch.promote_types(dtype, torch.float32)


def _addmm(bias: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """bias + a @ b, the product in a's dtype, the result in bias's. With a bf16 product the fp32 bias is added after
    the product's rounding, not rounded with it (b_dec can be large next to the reconstruction's residual)."""
    if a.dtype == bias.dtype:
        return torch.addmm(bias, a, b)
    return torch.mm(a, b).to(bias.dtype).add_(bias)


def _relu_mask(dpre: Tensor, z: Tensor, in_place: bool | None = None) -> Tensor:
    """dpre · 1[z > 0] for z >= 0: ReLU's backward, as autograd computes it.

    On CPU and CUDA it overwrites dpre, through threshold_backward's out= overload with dpre as both input and output:
    there the op is a TensorIterator kernel, which runs an output that is exactly one of its inputs the way every
    in-place op runs. The functional op writes a new [B, d_sae] buffer instead, one more stream of memory traffic:
    2-4% of a whole ReLU training step at the demo size on CPU (measured), and one more [B, d_sae] buffer at the peak.
    Other backends promise nothing about an out= that aliases an input and get the functional op."""
    if in_place is None:
        in_place = dpre.device.type in ("cpu", "cuda")
    if not in_place:
        return torch.ops.aten.threshold_backward(dpre, z, 0)
    return torch.ops.aten.threshold_backward.grad_input(dpre, z, 0, grad_input=dpre)


class ReluEncodeDecode(torch.autograd.Function):
    """x̂ = relu(enc_in @ W_enc + b_enc) @ W_dec + b_dec and the L1 penalty mean_rows(Σ_j z_j·w_j), in one Function.

    enc_in is x - b_dec or x (`b_dec_in_encoder`); `weights` [d_sae] weights the L1 per latent (None: all ones).
    Returns (x̂, penalty, l0, fired); l0 (mean active latents per row) and fired (bool [d_sae]) carry no gradient.
    z and the GEMMs are in the autocast dtype, x̂ and the penalty in the parameters' dtype.
    The backward folds the L1 gradient and the ReLU mask into one in-place pass over dz."""

    @staticmethod
    def forward(ctx, xs: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                weights: Tensor | None, b_dec_in_encoder: bool):
        dtype = _gemm_dtype(xs)
        with _no_autocast(xs):
            enc_in = (xs - b_dec if b_dec_in_encoder else xs).to(dtype)
            W_enc_g, W_dec_g = W_enc.to(dtype), W_dec.to(dtype)  # the parameters themselves when nothing is cast
            # ReLU in place (addmm's output is needed by nothing else) as threshold_ rather than relu_: it writes +0.0
            # where relu_ would keep -0.0, so below, a zero is a zero bit pattern.
            z = F.threshold_(torch.addmm(b_enc.to(dtype), enc_in, W_enc_g), 0.0, 0.0)
            x_hat = _addmm(b_dec, z, W_dec_g)
            # One pass for the per-latent sums gives the penalty, the firing mask (z >= 0) and, for weighted L1, the
            # weights' gradient. Counting the nonzero int32 bit patterns takes 1/6 of count_nonzero on the floats
            # (12 vs 80 ms at [4096, 9216]), and a bool mask with its sum is slower still.
            latent_sums = z.sum(dim=0, dtype=_sum_dtype(b_enc.dtype))
            weighted = latent_sums.sum() if weights is None else latent_sums @ weights.to(latent_sums.dtype)
            penalty = weighted / z.shape[0]
            fired = latent_sums > 0
            l0 = torch.count_nonzero(z.view(_SAME_SIZE_INT[z.element_size()])).float() / z.shape[0]
        ctx.b_dec_in_encoder = b_dec_in_encoder
        ctx.dtypes = (xs.dtype, W_enc.dtype, b_enc.dtype, W_dec.dtype, b_dec.dtype)
        ctx.save_for_backward(enc_in, z, latent_sums, W_enc, W_enc_g, W_dec_g, weights)
        ctx.mark_non_differentiable(l0, fired)
        return x_hat, penalty, l0, fired

    @staticmethod
    @once_differentiable
    def backward(ctx, g_xhat: Tensor, g_penalty: Tensor, _l0: None, _fired: None):
        enc_in, z, latent_sums, W_enc, W_enc_g, W_dec_g, weights = ctx.saved_tensors
        need_xs, need_W_enc, need_b_enc, need_W_dec, need_b_dec, need_weights, _ = ctx.needs_input_grad
        xs_dtype, W_enc_dtype, b_enc_dtype, W_dec_dtype, b_dec_dtype = ctx.dtypes
        rows, dtype = z.shape[0], z.dtype
        with _no_autocast(z):
            if g_xhat is None:
                g_xhat = z.new_zeros(rows, W_dec_g.shape[1], dtype=b_dec_dtype)
            if g_penalty is None:
                g_penalty = latent_sums.new_zeros(())
            l1_grad = g_penalty / rows  # d penalty / d z[b, j] = l1_grad · w_j
            g = g_xhat.to(dtype)

            grad_W_dec = (z.T @ g).to(W_dec_dtype) if need_W_dec else None
            grad_b_dec = g_xhat.sum(dim=0, dtype=_sum_dtype(b_dec_dtype)) if need_b_dec else None
            grad_weights = (latent_sums * l1_grad).to(weights.dtype) if need_weights else None

            # dpre = (g_xhat @ W_decᵀ + l1_grad·w) · 1[z > 0], built in the GEMM's own output buffer.
            l1_row = l1_grad.expand(W_dec_g.shape[0]) if weights is None else weights * l1_grad
            dpre = _relu_mask(torch.addmm(l1_row.to(dtype), g, W_dec_g.T), z)

            # A ones column on enc_in makes the dW_enc GEMM also return Σ_rows dpre (b_enc's gradient) as an extra
            # output row, which costs less than a separate pass over dpre. In bf16 that row is the GEMM's fp32
            # accumulator rounded once, like every other entry of dW_enc.
            enc_in_1 = torch.cat([enc_in, enc_in.new_ones(rows, 1)], dim=1)
            grad_enc_1 = enc_in_1.T @ dpre
            grad_W_enc, grad_b_enc = grad_enc_1[:-1].to(W_enc_dtype), grad_enc_1[-1].to(b_enc_dtype)
            grad_xs = (dpre @ W_enc_g.T).to(xs_dtype) if need_xs else None
            if need_b_dec and ctx.b_dec_in_encoder:
                # Σ_rows d(enc_in) = W_enc @ Σ_rows dpre, with the fp32 W_enc: the two terms of b_dec's gradient
                # nearly cancel once the SAE reconstructs well.
                grad_b_dec = grad_b_dec - W_enc @ grad_b_enc.to(W_enc.dtype)
        return (grad_xs, grad_W_enc if need_W_enc else None, grad_b_enc if need_b_enc else None, grad_W_dec,
                None if grad_b_dec is None else grad_b_dec.to(b_dec_dtype), grad_weights, None)


class GatherPreActivation(torch.autograd.Function):
    """pre[rows, cols] of pre = enc_in @ W_enc + b_enc, with gradients reaching W_enc, b_enc and b_dec through those
    entries only: O(n·d_in) work for n gathered entries instead of dense [B, d_sae] GEMMs.

    `pre` is the dense pre-activation computed without grad (it may have been relu'd in place: the gathered values
    are then relu(pre), and the caller's ReLU on them gives the right gradient), in the autocast dtype; the gathered
    values and everything after them are in W_enc's dtype. enc_in is x - b_dec when `b_dec_in_encoder`, else x;
    x itself gets no gradient."""

    @staticmethod
    def forward(ctx, pre: Tensor, enc_in: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                rows: Tensor, cols: Tensor, b_dec_in_encoder: bool):
        ctx.b_dec_in_encoder = b_dec_in_encoder
        ctx.dtypes = (W_enc.dtype, b_enc.dtype, b_dec.dtype)
        ctx.save_for_backward(enc_in, W_enc, rows, cols)
        return pre[rows, cols].to(W_enc.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        enc_in, W_enc, rows, cols = ctx.saved_tensors
        _, _, need_W_enc, need_b_enc, need_b_dec, _, _, _ = ctx.needs_input_grad
        W_enc_dtype, b_enc_dtype, b_dec_dtype = ctx.dtypes
        d_sae = W_enc.shape[1]
        grad_W_enc = grad_b_enc = grad_b_dec = None
        with _no_autocast(grad):
            grad = grad.to(W_enc.dtype)
            if need_W_enc:
                # dW_encᵀ = S @ enc_in with S [d_sae, B] holding `grad` at (cols, rows).
                S = torch.sparse_coo_tensor(torch.stack([cols, rows]), grad, (d_sae, enc_in.shape[0]),
                                            check_invariants=False)
                grad_W_enc = torch.sparse.mm(S, enc_in.to(grad.dtype)).T.contiguous().to(W_enc_dtype)
            col_sums = grad.new_zeros(d_sae).index_add_(0, cols, grad) if (need_b_enc or need_b_dec) else None
            if need_b_enc:
                grad_b_enc = col_sums.to(b_enc_dtype)
            if need_b_dec and ctx.b_dec_in_encoder:
                grad_b_dec = (-(W_enc @ col_sums)).to(b_dec_dtype)
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


def _entry_dots(grad: Tensor, W_dec: Tensor, cols: Tensor, offsets: Tensor, sddmm: bool | None = None) -> Tensor:
    """<grad[row of j], W_dec[cols[j]]> for every entry j, entries grouped by row from `offsets`: embedding_bag's
    per-sample-weight gradient, which torch only offers as a private op.

    On CPU, (grad @ W_decᵀ) sampled at the entries: an SDDMM on the CSR pattern that (offsets, cols) already are, as
    fast as the private op at the demo size (131k entries of d_in = 576) and 1.1-1.2x its time at d_in = 3072, where
    the step is dominated by dense work. (A gather of the W_dec rows with a bmm took 3-14x, a second embedding_bag
    under autograd 1.5-2.2x.) Elsewhere that second embedding_bag: cuSPARSE's CSR format assumes sorted, unique
    columns within a row, while TopK's come unsorted and sparse_decode accepts repeats."""
    if sddmm is None:
        sddmm = grad.device.type == "cpu"
    if not sddmm:
        values = grad.new_ones(cols.numel()).requires_grad_()
        with torch.enable_grad():
            bag = F.embedding_bag(cols, W_dec.detach(), offsets, mode="sum", per_sample_weights=values)
        return torch.autograd.grad(bag, values, grad)[0]
    n = cols.numel()
    crow = torch.cat([offsets, offsets.new_tensor([n])])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # Zeros, not empty: despite its docs, the CPU kernel multiplies beta=0 into the pattern's values (NaN stays).
        pattern = torch.sparse_csr_tensor(crow, cols, grad.new_zeros(n), (grad.shape[0], W_dec.shape[0]),
                                          check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, grad, W_dec.T, beta=0).values()


class SparseDecode(torch.autograd.Function):
    """Σ_j values[j]·W_dec[cols[j]] per row (embedding_bag with per-sample weights), entries flat and grouped by row:
    `rows` [n] ascending, `offsets` [B] where each row's entries start. Runs in W_dec's dtype whatever autocast says:
    it is O(n·d_in), cheap next to the encoder's GEMM.

    The forward is embedding_bag's; the backward replaces its W_dec gradient, which sorts the n indices (at
    n = B·k = 131k that sort alone measured 250 ms on 2 cores), by a sparse-dense product S @ grad, S [d_sae, B]."""

    @staticmethod
    def forward(ctx, cols: Tensor, rows: Tensor, offsets: Tensor, values: Tensor, W_dec: Tensor):
        values_dtype, values = values.dtype, values.to(W_dec.dtype)
        ctx.values_dtype = values_dtype
        ctx.save_for_backward(cols, rows, offsets, values, W_dec)
        with _no_autocast(W_dec):
            return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        cols, rows, offsets, values, W_dec = ctx.saved_tensors
        grad_values = grad_W_dec = None
        with _no_autocast(grad):
            grad = grad.to(W_dec.dtype).contiguous()
            if ctx.needs_input_grad[3]:
                grad_values = _entry_dots(grad, W_dec, cols, offsets).to(ctx.values_dtype)
            if ctx.needs_input_grad[4]:
                S = torch.sparse_coo_tensor(torch.stack([cols, rows]), values, (W_dec.shape[0], grad.shape[0]),
                                            check_invariants=False)
                grad_W_dec = torch.sparse.mm(S, grad)
        return None, None, None, grad_values, grad_W_dec
