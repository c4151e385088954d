"""Per-sequence sums over packed tokens: out[b] = values[cu_seqlens[b] : cu_seqlens[b + 1]].sum().

The PPO loss needs these for sequence-level ratios (GSPO-style mean log-ratio per sequence) and for the
"seq-mean-*" loss aggregations. Sequences are packed without padding and described by `cu_seqlens` (the
flash-attn varlen convention: [B + 1] offsets starting at 0, non-decreasing, ending at N; a repeated offset is an
empty sequence).

Two paths, same numbers up to summation order:
- triton: one program per sequence, looping over its span in blocks, fp32 (or fp64) accumulator. Lengths are
  runtime values, so packing a new batch never recompiles.
- torch: token -> sequence ids by `searchsorted`, then `index_add`. No host sync and no cumsum: a running fp32
  cumsum over N tokens differenced at the bounds cancels catastrophically for long packs.
Both are registered so that `torch.compile(fullgraph=True)` traces through them (the triton path as a
`torch.library` custom op with a fake kernel and an autograd formula; the torch path is plain torch ops).
"""
import torch
import triton
import triton.language as tl

from ._utils import check_interpreter, check_same_device, resolve_impl

BLOCK_TOKENS = 1024  # tokens per loop step; the op is memory-bound, so this only has to be large enough to stream


# ---------------------------------------------------------------------------------------------------------------
# kernels
@triton.jit
def _segment_sum_kernel(VALUES, CU_SEQLENS, OUT, BLOCK: tl.constexpr):
    seq = tl.program_id(0).cast(tl.int64)
    start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    end = tl.load(CU_SEQLENS + seq + 1).to(tl.int64)
    # accumulate in the output dtype (fp32, or fp64 for fp64 inputs) whatever the input precision is
    acc = tl.zeros([BLOCK], dtype=OUT.dtype.element_ty)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(VALUES + idx, mask=idx < end, other=0.0).to(OUT.dtype.element_ty)
    tl.store(OUT + seq, tl.sum(acc, axis=0))


@triton.jit
def _segment_broadcast_kernel(SEQ_VALUES, CU_SEQLENS, OUT, BLOCK: tl.constexpr):
    # the adjoint of _segment_sum_kernel: every token of sequence b receives SEQ_VALUES[b]
    seq = tl.program_id(0).cast(tl.int64)
    start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    end = tl.load(CU_SEQLENS + seq + 1).to(tl.int64)
    val = tl.load(SEQ_VALUES + seq)
    block = (tl.zeros([BLOCK], dtype=SEQ_VALUES.dtype.element_ty) + val).to(OUT.dtype.element_ty)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        tl.store(OUT + idx, block, mask=idx < end)


# ---------------------------------------------------------------------------------------------------------------
# launchers
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16/fp32 -> fp32, fp64 -> fp64."""
    return torch.promote_types(dtype, torch.float32)


def _segment_sum_fwd(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    num_seqs = cu_seqlens.shape[0] - 1
    out = torch.empty(num_seqs, dtype=_acc_dtype(values.dtype), device=values.device)
    if num_seqs > 0:
        _segment_sum_kernel[(num_seqs,)](values.contiguous(), cu_seqlens.contiguous(), out, BLOCK=BLOCK_TOKENS)
    return out


def _segment_sum_bwd(seq_values: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # every token belongs to exactly one sequence (cu_seqlens covers [0, N)), so `empty` is fully written
    out = torch.empty(num_tokens, dtype=seq_values.dtype, device=seq_values.device)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_seqs > 0 and num_tokens > 0:
        _segment_broadcast_kernel[(num_seqs,)](seq_values.contiguous(), cu_seqlens.contiguous(), out,
                                               BLOCK=BLOCK_TOKENS)
    return out


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops (triton path): opaque to torch.compile, which only needs the fake kernels for shapes
@torch.library.custom_op("sppo_fast::segment_sum_triton", mutates_args=())
def _segment_sum_triton_op(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return _segment_sum_fwd(values, cu_seqlens)


@_segment_sum_triton_op.register_fake
def _(values, cu_seqlens):
    return values.new_empty(cu_seqlens.shape[0] - 1, dtype=_acc_dtype(values.dtype))


@torch.library.custom_op("sppo_fast::segment_broadcast_triton", mutates_args=())
def _segment_broadcast_triton_op(seq_values: torch.Tensor, cu_seqlens: torch.Tensor,
                                 num_tokens: int) -> torch.Tensor:
    return _segment_sum_bwd(seq_values, cu_seqlens, num_tokens)


@_segment_broadcast_triton_op.register_fake
def _(seq_values, cu_seqlens, num_tokens):
    return seq_values.new_empty(num_tokens)


def _sum_setup_context(ctx, inputs, output):
    values, cu_seqlens = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.num_tokens = values.shape[0]
    ctx.values_dtype = values.dtype


def _sum_backward(ctx, grad_out):
    (cu_seqlens,) = ctx.saved_tensors
    grad = _segment_broadcast_triton_op(grad_out, cu_seqlens, ctx.num_tokens)
    return grad.to(ctx.values_dtype), None


def _broadcast_setup_context(ctx, inputs, output):
    seq_values, cu_seqlens, _ = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.seq_dtype = seq_values.dtype


def _broadcast_backward(ctx, grad_out):
    # double backward of segment_sum: the adjoint of a broadcast is again a segment sum
    (cu_seqlens,) = ctx.saved_tensors
    return _segment_sum_triton_op(grad_out, cu_seqlens).to(ctx.seq_dtype), None, None


_segment_sum_triton_op.register_autograd(_sum_backward, setup_context=_sum_setup_context)
_segment_broadcast_triton_op.register_autograd(_broadcast_backward, setup_context=_broadcast_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# torch path
def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sequence index of every token, [N] int64, from [B + 1] offsets; no host sync.

    Token i belongs to the sequence b with cu_seqlens[b] <= i < cu_seqlens[b + 1]; counting the ends <= i
    (`right=True`) skips empty sequences, whose end equals the next one's start.
    """
    positions = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def _segment_sum_torch(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    acc_dtype = _acc_dtype(values.dtype)
    ids = segment_ids(cu_seqlens, values.shape[0])
    out = torch.zeros(cu_seqlens.shape[0] - 1, dtype=acc_dtype, device=values.device)
    # index_add is differentiable (its backward is the gather values[ids]), so no custom autograd is needed
    return out.index_add(0, ids, values.to(acc_dtype))


# ---------------------------------------------------------------------------------------------------------------
# input checks, shared with ppo_loss.py
def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, *, check_values: bool = False) -> None:
    """Shape/dtype checks raise ValueError now. Value checks (starts at 0, non-decreasing, ends at num_tokens) need
    the data: by default they are queued on the device with `torch._assert_async` (no host sync; on CUDA a failure
    surfaces as a device-side assert at the next sync, on CPU as a RuntimeError right away); with
    `check_values=True` they run eagerly and raise ValueError, at the cost of a host sync (debugging only; under
    torch.compile this is a graph break)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if check_values:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {bounds[0]}")
        if bounds[-1] != num_tokens:
            raise ValueError(f"cu_seqlens must end at the number of tokens {num_tokens}, got {bounds[-1]}")
        drops = [b for b in range(len(bounds) - 1) if bounds[b + 1] < bounds[b]]
        if drops:
            b = drops[0]
            raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{b}] = {bounds[b]} > "
                             f"cu_seqlens[{b + 1}] = {bounds[b + 1]}")
        return
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == num_tokens) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    torch._assert_async(ok, "cu_seqlens must start at 0, be non-decreasing and end at the number of tokens "
                            "(rerun with check_values=True for details)")


# ---------------------------------------------------------------------------------------------------------------
# public API
def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor, *, impl: str = "auto",
                check_values: bool = False) -> torch.Tensor:
    """Sum of `values` over each packed sequence.

    Args:
        values: [N] floating point (bf16, fp16, fp32, fp64), one value per token.
        cu_seqlens: [B + 1] int32 or int64 on the same device; cu_seqlens[0] = 0, non-decreasing,
            cu_seqlens[B] = N. Equal neighbours describe an empty sequence (its sum is 0).
        impl: "triton" (one program per sequence), "torch" (searchsorted + index_add) or "auto" (triton on CUDA).
        check_values: validate cu_seqlens eagerly with a ValueError (host sync); by default the same checks are
            queued on the device with `torch._assert_async`.

    Returns:
        [B] sums in values.dtype promoted to at least fp32 (accumulated in that dtype). Differentiable wrt
        `values`: the gradient of token i is the upstream gradient of its sequence.

    Example::

        >>> values = torch.tensor([1., 2., 3., 4., 5.])
        >>> segment_sum(values, torch.tensor([0, 2, 2, 5]), impl="torch")
        tensor([ 3.,  0., 12.])
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError(f"values must be a 1-D tensor [N], got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if isinstance(cu_seqlens, torch.Tensor):
        check_same_device(values=values, cu_seqlens=cu_seqlens)
    check_cu_seqlens(cu_seqlens, values.shape[0], check_values=check_values)
    impl = resolve_impl(impl, values, cu_seqlens)
    if impl in ("triton", "chunked"):
        check_interpreter(values)
    return segment_sum_unchecked(values, cu_seqlens, impl)


def segment_sum_unchecked(values: torch.Tensor, cu_seqlens: torch.Tensor, impl: str) -> torch.Tensor:
    """`segment_sum` without input checks, for callers that validated cu_seqlens once and sum several vectors
    over it (ppo_loss.py); `impl` is a resolved one: "triton" and "chunked" (the CUDA default of the other ops)
    take the Triton kernel, "torch" the torch path."""
    if impl in ("triton", "chunked"):
        return _segment_sum_triton_op(values, cu_seqlens)
    return _segment_sum_torch(values, cu_seqlens)
