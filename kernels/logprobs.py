"""Per-token log-probs (and entropy) of a linear LM head, computed without materialising the [N, V] logits.

    z = cap(hidden @ weight.T) / temperature,   logp[i] = z[i, t_i] - logsumexp(z[i]),
    entropy[i] = logsumexp(z[i]) - sum_j softmax(z[i])_j * z[i, j]

Three implementations behind one pair of `torch.library` custom ops (so `torch.compile` sees one opaque node):
- "chunked" (kernels/chunked.py): rows in chunks sized from a byte budget; per chunk the vendor GEMM (cuBLAS)
  writes fp32 logits [C, V] and one Triton row pass reduces them (lse, target logit, entropy); the backward
  recomputes the chunk (GEMM), writes dZ with the row pass and does dX = dZ W, dW += dZ^T X by the vendor GEMM.
  4 GEMMs in all (1 forward, 3 backward), extra memory = the chunk budget + a V x H fp32 dW accumulator.
- "torch": the same chunk loop with the row pass in torch ops; runs anywhere (the CPU default).
- "triton": tile-fused: one Triton kernel per (row block, V split) does GEMM tile + online log-sum-exp + target
  gather + entropy, a combine kernel merges V splits, and one backward kernel recomputes each logit tile and adds
  dX, dW with fp32 atomics. ~0 extra memory besides fp32 dX/dW accumulators; 4 GEMMs at Triton's matmul speed.
All save only the inputs plus two fp32 numbers per row (lse, E[z]) and recompute logits in backward.
"""
import contextlib
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import chunked
from ._utils import check_chunk_bytes, check_interpreter, check_same_device, resolve_impl, tanh as _tanh

# ------------------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A finite "-inf" for running maxima: with it, (m_old - m_new) * sum_old stays 0 * finite = 0 on the first tile
# instead of -inf * 0 = NaN, and exp(m_old - m_new) underflows to exactly 0.
_NEG_INIT = tl.constexpr(-1.0e30)


class _TileConfig(NamedTuple):
    block_n: int
    block_v: int
    block_h: int
    split_cols: int  # vocab columns per forward program along grid axis 1 (a multiple of block_v)
    num_warps: int
    num_stages: int


# GPU tiles, keyed on the element size. Picked offline by compiling for sm_90 and reading ptxas's report: these
# are the largest shapes with no (16-bit) or few (fp32, which runs without tensor cores) register spills. Not yet
# timed on hardware. A static table, never keyed on N, so nothing re-tunes per batch.
_FWD_GPU = {2: _TileConfig(64, 128, 64, 2048, 8, 3), 4: _TileConfig(64, 128, 32, 2048, 8, 3)}
_BWD_GPU = {2: _TileConfig(64, 128, 32, 0, 8, 3), 4: _TileConfig(64, 128, 16, 0, 8, 3)}
_COMBINE_BLOCK_N = 128  # rows per program of the combine kernel (any device; launched with Triton's default warps)
# The CPU interpreter runs every tile op in numpy: small tiles keep the tests fast and still exercise V splits,
# partial tiles and multi-chunk H loops.
_FWD_CPU = _TileConfig(16, 32, 16, 128, 1, 1)
_BWD_CPU = _TileConfig(16, 32, 16, 0, 1, 1)


# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(X, W, rows, cols, row_mask, col_mask, H, h_end, inv_temperature, softcap,
                 HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] for rows x cols, accumulated in fp32, and tanh(l / softcap) for the backward."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, h_end, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        x = tl.load(X + rows[:, None] * H + hs[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * H + hs[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    th = acc
    if HAS_SOFTCAP:
        th = _tanh(acc / softcap)
        acc = softcap * th
    return acc * inv_temperature, th


@triton.jit(do_not_specialize=["N", "ignore_index"])
def _logprobs_fwd_kernel(
    X, W, TARGETS, M_PART, S_PART, A_PART, Z_TARGET,
    N, V, H, split_cols, inv_temperature, softcap, ignore_index,
    HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (i, s): rows block i over vocab columns [s * split_cols, (s + 1) * split_cols).

    Writes per-split partials [S, N]: running max m, sum exp(z - m), and sum exp(z - m) * (z - m) (entropy). The
    sum is kept relative to m so that entropy = log(sum) - mean(z - m) needs no cancellation against a large m.
    The target logit is stored by the one split that holds the target column.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (tgt != ignore_index)
    v_start = pid_s * split_cols
    v_end = tl.minimum(v_start + split_cols, V)
    # A block of ignored rows (prompt tokens, padding) does no GEMM work: its loops run zero times.
    any_valid = tl.max(valid.to(tl.int32), axis=0) > 0
    v_stop = tl.where(any_valid, v_end, v_start)

    m = tl.full([BLOCK_N], _NEG_INIT, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    a = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_target = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        # ignored rows load as zeros: whatever they hold (NaN, inf, padding garbage) stays out of every product
        z, _ = _logits_tile(X, W, rows, cols, valid, col_mask, H, H, inv_temperature, softcap,
                            HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(col_mask[None, :], z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 on padded columns
        if HAS_ENTROPY:
            shifted = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            a = alpha * (a + (m - m_new) * s) + tl.sum(e * shifted, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        z_target += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

    part = pid_s * N + rows
    tl.store(M_PART + part, m, mask=row_mask)
    tl.store(S_PART + part, s, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(A_PART + part, a, mask=row_mask)
    owns_target = valid & (tgt >= v_start) & (tgt < v_end)
    tl.store(Z_TARGET + rows, z_target, mask=owns_target)


@triton.jit(do_not_specialize=["N", "ignore_index"])
def _logprobs_combine_kernel(
    M_PART, S_PART, A_PART, Z_TARGET, TARGETS, LOGP, LSE, ENTROPY, MEAN_Z,
    N, num_splits, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Merges the V-split partials of each row in a fixed order (no atomics): the forward is bitwise deterministic."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    m = tl.full([BLOCK_N], _NEG_INIT, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    a = tl.zeros([BLOCK_N], dtype=tl.float32)
    part = rows  # int64 offsets (rows is int64), advanced by N per split
    for _ in range(0, num_splits):
        m_k = tl.load(M_PART + part, mask=row_mask, other=_NEG_INIT)
        s_k = tl.load(S_PART + part, mask=row_mask, other=0.0)
        m_new = tl.maximum(m, m_k)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_k - m_new)
        if HAS_ENTROPY:
            a_k = tl.load(A_PART + part, mask=row_mask, other=0.0)
            a = alpha * (a + (m - m_new) * s) + beta * (a_k + (m_k - m_new) * s_k)
        s = alpha * s + beta * s_k
        m = m_new
        part += N
    # Ignored rows (and blocks that skipped all work) have s = 0: keep their math finite, their outputs are 0.
    s = tl.where(valid, s, 1.0)
    log_s = tl.log(s)
    lse = m + log_s
    z_target = tl.load(Z_TARGET + rows, mask=valid, other=0.0)
    tl.store(LOGP + rows, tl.where(valid, z_target - lse, 0.0), mask=row_mask)
    tl.store(LSE + rows, tl.where(valid, lse, 0.0), mask=row_mask)
    if HAS_ENTROPY:
        mean_shifted = a / s  # E[z] - m
        tl.store(ENTROPY + rows, tl.where(valid, log_s - mean_shifted, 0.0), mask=row_mask)
        tl.store(MEAN_Z + rows, tl.where(valid, m + mean_shifted, 0.0), mask=row_mask)


@triton.jit(do_not_specialize=["N", "ignore_index"])
def _logprobs_bwd_kernel(
    X, W, TARGETS, LSE, MEAN_Z, GRAD_LOGP, GRAD_ENTROPY, DX, DW,
    N, V, H, inv_temperature, softcap, ignore_index,
    HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (i, j): recompute the logit tile (rows i, cols j), form dl, then add dl @ W into DX and dl^T @ X
    into DW with fp32 atomics.

    Why atomics rather than separate dX and dW kernels that own their outputs: one recomputed tile then feeds both
    products (3 GEMMs in the backward, 4 with the forward, instead of 5), and the (N/BN) x (V/BV) grid fills the GPU
    at any N. The cost is fp32 accumulation buffers for DX/DW and run-to-run rounding differences in the grads
    (the forward, which the PPO ratio depends on, stays bitwise deterministic).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    tgt = tl.load(TARGETS + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (tgt != ignore_index)
    g_logp = tl.load(GRAD_LOGP + rows, mask=valid, other=0.0)
    active = valid & (g_logp != 0.0)
    if HAS_ENTROPY:
        g_ent = tl.load(GRAD_ENTROPY + rows, mask=valid, other=0.0)
        mean_z = tl.load(MEAN_Z + rows, mask=valid, other=0.0)
        active = active | (valid & (g_ent != 0.0))
    lse = tl.load(LSE + rows, mask=valid, other=0.0)
    # Rows that are ignored or have a zero upstream grad (e.g. PPO-clipped tokens) contribute exactly nothing:
    # if none is left in the block, all three GEMM loops below run zero times.
    h_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, H, 0)

    # ignored rows load as zeros (here and in the dW loop): a NaN or inf they hold would survive the zero dl (0 * NaN)
    z, th = _logits_tile(X, W, rows, cols, valid, col_mask, H, h_end, inv_temperature, softcap,
                         HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    # ignored rows stored lse = 0: keep exp from overflowing on them (their dl is zeroed below anyway)
    p = tl.exp(tl.where(valid[:, None], z - lse[:, None], -float("inf")))
    is_target = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dz = g_logp[:, None] * (is_target - p)
    if HAS_ENTROPY:
        dz -= g_ent[:, None] * p * (z - mean_z[:, None])
    dl = dz * inv_temperature
    if HAS_SOFTCAP:
        dl = dl * (1.0 - th * th)
    dl = tl.where(active[:, None] & col_mask[None, :], dl, 0.0)
    # 16-bit operands for the tensor cores, as the framework's own matmul backward would use; fp32 stays fp32.
    dl = dl.to(X.dtype.element_ty)

    # Two loops rather than one with both products: the same loads (W for dX, X for dW), half the live
    # accumulators, so fewer register spills.
    if COMPUTE_DX:
        for h0 in range(0, h_end, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            w = tl.load(W + cols[:, None] * H + hs[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            dx = tl.dot(dl, w, input_precision=DOT_PRECISION)
            tl.atomic_add(DX + rows[:, None] * H + hs[None, :], dx, mask=active[:, None] & h_mask[None, :],
                          sem="relaxed")
    if COMPUTE_DW:
        dl_t = tl.trans(dl)
        for h0 in range(0, h_end, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            x = tl.load(X + rows[:, None] * H + hs[None, :], mask=valid[:, None] & h_mask[None, :], other=0.0)
            dw = tl.dot(dl_t, x, input_precision=DOT_PRECISION)
            tl.atomic_add(DW + cols[:, None] * H + hs[None, :], dw, mask=col_mask[:, None] & h_mask[None, :],
                          sem="relaxed")


# ------------------------------------------------------------------------------------------------------------------
def _tile_config(table_gpu, table_cpu, tensor):
    return table_gpu[tensor.element_size()] if tensor.is_cuda else table_cpu


def _triton_available_for(tensor):
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_precision(dtype):
    # tl.dot on fp32 defaults to TF32 on GPUs (10-bit mantissa), which would miss the fp32 error bound.
    return "ieee" if dtype == torch.float32 else "tf32"


def _device_ctx(tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _token_logprobs_fwd_triton(hidden, weight, targets, temperature, softcap, ignore_index, return_entropy):
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    entropy = torch.empty(n if return_entropy else 0, **f32)
    mean_z = torch.empty(n if return_entropy else 0, **f32)
    if n == 0:
        return logp, entropy, lse, mean_z
    cfg = _tile_config(_FWD_GPU, _FWD_CPU, hidden)
    # The split count depends on V only, never on N, and the combine order is fixed: a row gets the same bits in
    # any batch where it sits at the same position within its BLOCK_N tile (e.g. a block-aligned sub-batch).
    num_splits = triton.cdiv(v, cfg.split_cols)
    m_part = torch.empty((num_splits, n), **f32)
    s_part = torch.empty((num_splits, n), **f32)
    a_part = torch.empty((num_splits, n), **f32) if return_entropy else s_part
    z_target = torch.zeros(n, **f32)
    with _device_ctx(hidden):
        _logprobs_fwd_kernel[(triton.cdiv(n, cfg.block_n), num_splits)](
            hidden, weight, targets, m_part, s_part, a_part, z_target,
            n, v, h, cfg.split_cols, 1.0 / temperature, 1.0 if softcap is None else softcap, ignore_index,
            HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=return_entropy, DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        combine_block = _COMBINE_BLOCK_N
        _logprobs_combine_kernel[(triton.cdiv(n, combine_block),)](
            m_part, s_part, a_part, z_target, targets, logp, lse,
            entropy if return_entropy else logp, mean_z if return_entropy else lse,
            n, num_splits, ignore_index, HAS_ENTROPY=return_entropy, BLOCK_N=combine_block,
        )
    return logp, entropy, lse, mean_z


def _token_logprobs_bwd_triton(grad_logp, grad_entropy, hidden, weight, targets, lse, mean_z, temperature,
                               softcap, ignore_index, compute_dx, compute_dw):
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    # fp32 accumulators; for fp32 inputs they are the outputs themselves (the final .to is a no-op).
    dx = torch.zeros((n, h), **f32) if compute_dx else None
    dw = torch.zeros((v, h), **f32) if compute_dw else None
    if n > 0 and (compute_dx or compute_dw):
        cfg = _tile_config(_BWD_GPU, _BWD_CPU, hidden)
        has_entropy = grad_entropy is not None
        with _device_ctx(hidden):
            _logprobs_bwd_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v))](
                hidden, weight, targets, lse, mean_z if has_entropy else lse, grad_logp,
                grad_entropy if has_entropy else grad_logp, dx if compute_dx else lse, dw if compute_dw else lse,
                n, v, h, 1.0 / temperature, 1.0 if softcap is None else softcap, ignore_index,
                HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=has_entropy, COMPUTE_DX=compute_dx,
                COMPUTE_DW=compute_dw, DOT_PRECISION=_dot_precision(hidden.dtype),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    dx = dx.to(hidden.dtype) if compute_dx else hidden.new_empty(0)
    dw = dw.to(weight.dtype) if compute_dw else weight.new_empty(0)
    return dx, dw


# ------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sppo_fast::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                           softcap: Optional[float], ignore_index: int, return_entropy: bool, impl: str,
                           chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logp [N], entropy [N] or [0], lse [N], mean_z [N] or [0]), all fp32; lse/mean_z are for backward."""
    if impl == "triton":
        return _token_logprobs_fwd_triton(hidden, weight, targets, temperature, softcap, ignore_index,
                                          return_entropy)
    return chunked.logprobs_fwd(hidden, weight, targets, temperature, softcap, ignore_index, return_entropy,
                                chunk_bytes, triton_rows=impl == "chunked")


@_token_logprobs_fwd_op.register_fake
def _(hidden, weight, targets, temperature, softcap, ignore_index, return_entropy, impl, chunk_bytes):
    n = hidden.shape[0]
    n_entropy = n if return_entropy else 0
    new = lambda size: hidden.new_empty(size, dtype=torch.float32)  # noqa: E731
    return new(n), new(n_entropy), new(n), new(n_entropy)


@torch.library.custom_op("sppo_fast::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd_op(grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor,
                           weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mean_z: torch.Tensor,
                           temperature: float, softcap: Optional[float], ignore_index: int, compute_dx: bool,
                           compute_dw: bool, impl: str, chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d hidden or [0], d weight or [0]) in the inputs' dtype."""
    # Upstream grads are often expanded views (the grad of a sum has stride 0): kernels need them dense.
    grad_logp = grad_logp.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    if impl == "triton":
        return _token_logprobs_bwd_triton(grad_logp, grad_entropy, hidden, weight, targets, lse, mean_z,
                                          temperature, softcap, ignore_index, compute_dx, compute_dw)
    return chunked.logprobs_bwd(grad_logp, grad_entropy, hidden, weight, targets, lse, mean_z, temperature,
                                softcap, ignore_index, compute_dx, compute_dw, chunk_bytes,
                                triton_rows=impl == "chunked")


@_token_logprobs_bwd_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, lse, mean_z, temperature, softcap, ignore_index,
      compute_dx, compute_dw, impl, chunk_bytes):
    dx = torch.empty_like(hidden) if compute_dx else hidden.new_empty(0)
    dw = torch.empty_like(weight) if compute_dw else weight.new_empty(0)
    return dx, dw


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, softcap, ignore_index, return_entropy, impl, chunk_bytes = inputs
    _, _, lse, mean_z = output
    ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
    ctx.mark_non_differentiable(lse, mean_z)
    ctx.options = (temperature, softcap, ignore_index, return_entropy, impl, chunk_bytes)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_mean_z):
    hidden, weight, targets, lse, mean_z = ctx.saved_tensors
    temperature, softcap, ignore_index, return_entropy, impl, chunk_bytes = ctx.options
    compute_dx, compute_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    dx, dw = torch.ops.sppo_fast.token_logprobs_bwd(
        grad_logp, grad_entropy if return_entropy else None, hidden, weight, targets, lse, mean_z,
        temperature, softcap, ignore_index, compute_dx, compute_dw, impl, chunk_bytes,
    )
    return (dx if compute_dx else None, dw if compute_dw else None) + (None,) * 7


_token_logprobs_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, targets, temperature, softcap):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be 2-D [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be 1-D [N] with N = hidden.shape[0] = {hidden.shape[0]}, "
                         f"got shape {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64, got {targets.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden dtype must be one of {_FLOAT_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype and not (weight.dtype == torch.float32 and hidden.dtype != torch.float32):
        raise ValueError(f"weight dtype must equal hidden dtype {hidden.dtype} (or be fp32, a master weight with "
                         f"16-bit hidden states), got {weight.dtype}")
    check_same_device(hidden=hidden, weight=weight, targets=targets)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


def _check_target_values(targets, vocab_size, ignore_index):
    """Eager, host-syncing check: names the first bad position (for the trainer's first steps)."""
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    bad_positions = bad.nonzero()
    if bad_positions.numel():
        i = bad_positions[0, 0].item()
        raise ValueError(f"targets must be in [0, V={vocab_size}) or ignore_index={ignore_index}; "
                         f"targets[{i}] = {targets[i].item()} ({bad_positions.shape[0]} bad in total)")


def token_logprobs(hidden, weight, targets, *, temperature=1.0, softcap=None, ignore_index=-100,
                   return_entropy=False, impl="auto", chunk_bytes=None, check_values=False):
    """Log-probabilities of `targets` under softmax(cap(hidden @ weight.T) / temperature), never storing [N, V].

    Args:
        hidden: [N, H] bf16/fp16/fp32, the final hidden states (one row per token).
        weight: [V, H] same dtype and device, the lm_head weight (frozen is fine: no dW work is done then). With
            16-bit hidden states it may also be fp32 (a master weight under autocast; "chunked"/"torch" only): the
            products use its 16-bit rounding, as autocast would, and dW comes back in fp32 straight from the
            fp32 accumulator, with no 16-bit gradient and no cast back in between.
        targets: [N] int32/int64, the next-token ids; rows equal to `ignore_index` give 0 and no gradient.
        temperature: > 0, divides the (capped) logits, as the sampler did.
        softcap: None, or c > 0 for Gemma-style capping c * tanh(logits / c), applied before the temperature.
        return_entropy: also return the entropy of each row's distribution.
        impl: "chunked" (vendor GEMMs + Triton row pass; CUDA, or the CPU interpreter under TRITON_INTERPRET=1),
            "torch" (the same chunks with a torch row pass; any device), "triton" (tile-fused kernel; CUDA or the
            interpreter), or "auto" ("chunked" on CUDA, "torch" elsewhere).
        chunk_bytes: scratch budget of the chunked/torch impls (rows per chunk = chunk_bytes // bytes per row of
            fp32 logits and dZ); None = 512 MiB on CUDA, 128 MiB on CPU. Ignored by "triton".
        check_values: check on the host that every target is in [0, V) or ignore_index, raising ValueError with
            the first bad position. It is a host sync (and a graph break under torch.compile): use it eagerly, for
            the first steps only. Without it the check is a device-side `torch._assert_async`, which costs no sync
            and fails at the next sync point (at once on CPU).

    Returns:
        logp [N] fp32, or (logp [N] fp32, entropy [N] fp32) with return_entropy. Both are differentiable with
        respect to hidden and weight. Non-contiguous inputs are made contiguous (a copy). The forward is
        deterministic (same inputs, same bits), so old-policy log-probs taken under no_grad give a PPO ratio of
        exactly 1 before the first update. The backward's fp32 atomics (impl="triton") may round differently
        from run to run. Math is fp32 whatever autocast is active. Rows equal to ignore_index contribute exactly
        zero whatever their hidden state holds.

    Memory (chunked/torch): besides the inputs, the forward keeps 2 x N fp32 (lse, E[z]) for the backward and
    uses the chunk budget; the backward holds the chunk budget, dX in the input dtype and a V x H fp32 dW
    accumulator (returned as the gradient for fp32 weights, cast to 16 bits otherwise). Under no_grad only
    the forward runs: one GEMM per chunk (the old-log-prob scoring pass).

    Example::

        >>> hidden = torch.randn(6, 16)
        >>> weight = torch.randn(50, 16, requires_grad=True)
        >>> targets = torch.tensor([3, 7, -100, 1, 0, 49])
        >>> logp, entropy = token_logprobs(hidden, weight, targets, temperature=0.6, return_entropy=True)
        >>> (logp.sum() + 0.01 * entropy.sum()).backward()  # weight.grad: [50, 16]
    """
    _check_inputs(hidden, weight, targets, temperature, softcap)
    impl = resolve_impl(impl, hidden, weight)
    check_triton_available(impl, hidden)
    check_mixed_dtypes(impl, hidden, weight)
    chunk_bytes = check_chunk_bytes(chunk_bytes, hidden.device)
    vocab_size = weight.shape[0]
    if check_values:
        _check_target_values(targets, vocab_size, ignore_index)
    else:
        in_range = ((targets >= 0) & (targets < vocab_size)) | (targets == ignore_index)
        torch._assert_async(in_range.all(), "token_logprobs: targets must be in [0, V) or ignore_index")
    logp, entropy, _, _ = torch.ops.sppo_fast.token_logprobs_fwd(
        hidden.contiguous(), weight.contiguous(), targets.contiguous(), float(temperature),
        None if softcap is None else float(softcap), int(ignore_index), bool(return_entropy), impl, chunk_bytes,
    )
    return (logp, entropy) if return_entropy else logp


def check_mixed_dtypes(impl, hidden, weight):
    if weight.dtype != hidden.dtype and impl == "triton":
        raise ValueError(f"impl='triton' needs weight and hidden of one dtype, got {weight.dtype} and {hidden.dtype}; "
                         "the chunked impls take an fp32 master weight with 16-bit hidden states")


def check_triton_available(impl, hidden):
    if impl in ("triton", "chunked") and not _triton_available_for(hidden):
        raise ValueError(f"impl={impl!r} needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                         "use impl='torch' or 'auto' on this device")
    if impl in ("triton", "chunked"):
        check_interpreter(hidden)
