"""PPO clipped surrogate (with dual clip) on packed sequences, from hidden states and the lm_head weight.

    logp, entropy = token_logprobs(hidden, weight, targets)          # the fused [N, V] work, never stores logits
    loss, stats   = ppo_clip_loss_from_logp(logp, old_logp, A, ...)  # cheap torch ops on [N] vectors

Everything after `token_logprobs` works on [N]-vectors, so it is plain torch: no host syncs, no value-dependent
Python branches, and it traces with `torch.compile(fullgraph=True)` (`token_logprobs` and the triton
`segment_sum` are torch.library custom ops). Hyperparameters are runtime values: Python floats become graph inputs
under torch.compile(dynamic=True) or the default automatic dynamic (torch 2.13: `specialize_float=False`), so a
clip schedule does not recompile (tested); under dynamic=False every new float recompiles, so pass 0-dim tensors
there, which are accepted as is. (temperature/softcap go to token_logprobs, whose custom op takes them as floats.)

Why the old log-probs must come from the same kernel: on the first minibatch the trainer passes
`old_logp = logp.detach()` from `token_logprobs` (or scores under no_grad with it), so the ratio is exactly 1
rather than 1 +- (kernel difference).

`ppo_clip_loss` itself takes one of two routes:
- gradients in the forward (impl "chunked" / "torch", token-level ratio, every loss_agg): the weight of each token
  in the aggregate is known before the chunk loop (from cu_seqlens and the mask), so dL/dlogp_i depends on token i
  alone; per chunk of rows: logits by the vendor GEMM, one row pass (lse, target logit, entropy, ratio, clip and
  dual clip, dL/dlogp, dZ in place), dX_c = dZ W and dW += dZ^T X_c. 3 GEMMs; the backward only scales the stored
  dX, dW by the upstream scalar. The loss value and the stats come from `ppo_clip_loss_from_logp` on the
  detached per-token log-probs, so they are the same numbers as the composed route's.
- composed (ratio_level="sequence", or impl "triton"): `token_logprobs` (forward = scoring pass) +
  `ppo_clip_loss_from_logp`; the backward recomputes each chunk / tile (the gradient pass): 4 GEMMs. The GSPO
  sequence ratio needs every token of a sequence before any token's gradient is known, hence the two passes.
"""
from typing import Optional

import torch

from . import chunked
from ._utils import check_chunk_bytes, check_same_device, resolve_impl
from .logprobs import check_mixed_dtypes, check_triton_available, token_logprobs
from .seq_sum import check_cu_seqlens, segment_ids, segment_sum_unchecked

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
RATIO_LEVELS = ("token", "sequence")


# ---------------------------------------------------------------------------------------------------------------
# input checks
def _check_vector(name: str, x, n: int | None = None, *, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 1 or (n is not None and x.shape[0] != n):
        want = f"[{n}]" if n is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_hparams(clip_low, clip_high, dual_clip, ratio_level, loss_agg) -> None:
    """Value checks on Python numbers only: a tensor hyperparameter is taken as is (checking it would sync)."""
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if not isinstance(clip_low, torch.Tensor) and not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1] (the ratio's lower bound is 1 - clip_low), got {clip_low}")
    if not isinstance(clip_high, torch.Tensor) and not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not isinstance(dual_clip, torch.Tensor) and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 or None (disabled), got {dual_clip}")


def _check_advantages(advantages, n, cu_seqlens):
    if cu_seqlens is None:
        if advantages.shape[0] != n:
            raise ValueError(f"advantages must have shape [N] = [{n}] when cu_seqlens is None (per-sequence "
                             f"advantages [B] need cu_seqlens), got {tuple(advantages.shape)}")
    else:
        num_seqs = cu_seqlens.shape[0] - 1
        if advantages.shape[0] not in (n, num_seqs):
            raise ValueError(f"advantages must have shape [N] = [{n}] (per token) or [B] = [{num_seqs}] (per "
                             f"sequence), got {tuple(advantages.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# the loss on per-token log-probs
def ppo_clip_loss_from_logp(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                            mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, *,
                            entropy: torch.Tensor | None = None, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
                            ratio_level: str = "token", loss_agg: str = "token-mean", entropy_coef=0.0,
                            impl: str = "auto", check_values: bool = False):
    """PPO clipped surrogate on precomputed per-token log-probs; see `ppo_clip_loss` for the formulas and stats.

    Args:
        logp: [N] float, log-probs of the taken tokens under the current policy (carries the gradient).
        old_logp: [N] float, behaviour-policy log-probs (no gradient is taken through it).
        advantages: [N] per token, or [B] per sequence (needs cu_seqlens). If B == N the vector is read as per
            token.
        mask: [N] bool (nonzero = valid token) or None (all valid). Invalid tokens add nothing to the loss, the
            gradient or the stats, whatever logp/old_logp/advantages hold there (NaN included).
        cu_seqlens: [B + 1] int32/int64 packed-sequence offsets, or None for one sequence of N tokens.
        entropy: [N] float or None; its aggregate enters the loss as -entropy_coef * agg(entropy) and the stats.
        impl: the segment_sum implementation ("auto" = triton on CUDA).

    Returns:
        (loss, stats): loss is a 0-dim tensor in logp's dtype promoted to >= fp32; stats as in `ppo_clip_loss`.
    """
    _check_vector("logp", logp)
    n = logp.shape[0]
    _check_vector("old_logp", old_logp, n)
    _check_vector("advantages", advantages)
    if mask is not None:
        _check_vector("mask", mask, n, floating=False)
    if entropy is not None:
        _check_vector("entropy", entropy, n)
    _check_hparams(clip_low, clip_high, dual_clip, ratio_level, loss_agg)
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, entropy=entropy,
                      cu_seqlens=cu_seqlens)
    entropy_in_loss = isinstance(entropy_coef, torch.Tensor) or entropy_coef != 0
    if entropy_in_loss and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")

    # Per-sequence reductions: with no cu_seqlens the whole batch is one sequence, and plain sums do (no [2]
    # offsets tensor is built, which would be a host-to-device copy and a dynamic-shape constant under compile).
    if cu_seqlens is None:
        _check_advantages(advantages, n, cu_seqlens)

        def seq_sum(x):
            return x.sum(0, keepdim=True)

        def to_tokens(s):
            return s.expand(n)
    else:
        check_cu_seqlens(cu_seqlens, n, check_values=check_values)
        _check_advantages(advantages, n, cu_seqlens)
        seg_impl = resolve_impl(impl, logp, cu_seqlens)
        ids = segment_ids(cu_seqlens, n)

        def seq_sum(x):
            return segment_sum_unchecked(x, cu_seqlens, seg_impl)

        def to_tokens(s):
            return s[ids]  # gather; its backward is the segment sum of the upstream gradient

    dtype = torch.promote_types(logp.dtype, torch.float32)
    valid = torch.ones(n, dtype=torch.bool, device=logp.device) if mask is None else mask.bool()
    valid_f = valid.to(dtype)
    num_valid = valid_f.sum()
    if advantages.shape[0] != n:
        advantages = to_tokens(advantages)
    # torch.where (not a multiply by the mask) so that garbage at invalid tokens cannot leak in as NaN * 0
    adv = torch.where(valid, advantages.to(dtype), 0.0)
    token_log_ratio = torch.where(valid, logp.to(dtype) - old_logp.detach().to(dtype), 0.0)

    # valid tokens per sequence, for the sequence ratio and the mean over sequences (None when neither is used)
    tokens_per_seq = seq_sum(valid_f) if ratio_level == "sequence" or loss_agg != "token-mean" else None
    if ratio_level == "sequence":
        # GSPO: one length-normalised ratio per sequence, exp(mean of its valid tokens' log-ratios); the gradient
        # reaches every token's logp through the mean
        seq_log_ratio = seq_sum(token_log_ratio) / tokens_per_seq.clamp(min=1)
        log_ratio = torch.where(valid, to_tokens(seq_log_ratio), 0.0)
    else:
        log_ratio = token_log_ratio
    ratio = torch.exp(log_ratio)

    # pg = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), written as a select on "the clipped term is strictly
    # larger" so that the same boolean is the clipfrac statistic (and ties take the unclipped branch's gradient)
    pg_unclipped = -adv * ratio
    # The bounds are built as 0-dim tensors: clamp's Python-scalar bounds would make torch.compile specialise
    # (and recompile) on every new clip value, while tensor arithmetic keeps them graph inputs.
    one = torch.ones((), dtype=dtype, device=logp.device)
    pg_clipped = -adv * torch.clamp(ratio, one - clip_low, one + clip_high)
    clip_active = valid & (pg_clipped > pg_unclipped)
    pg = torch.where(clip_active, pg_clipped, pg_unclipped)
    if dual_clip is not None:
        # dual clip (Ye et al. 2020): for A < 0 the clipped loss grows without bound with r; cap it at -A * c
        pg_dual = -adv * dual_clip
        dual_active = valid & (adv < 0) & (pg_dual < pg)
        pg = torch.where(dual_active, pg_dual, pg)
    else:
        dual_active = torch.zeros_like(valid)
    pg = torch.where(valid, pg, 0.0)

    seq_counts = num_counted = None  # bound in every mode: torch.compile rejects closures over empty cells
    if loss_agg != "token-mean":
        seq_counts = tokens_per_seq > 0  # sequences without a valid token are left out of the mean over sequences
        num_counted = seq_counts.to(dtype).sum().clamp(min=1)

    def aggregate(per_token):
        if loss_agg == "token-mean":
            return per_token.sum() / num_valid.clamp(min=1)
        per_seq = seq_sum(per_token)
        if loss_agg == "seq-mean-token-mean":
            per_seq = per_seq / tokens_per_seq.clamp(min=1)
        return torch.where(seq_counts, per_seq, 0.0).sum() / num_counted

    pg_loss = aggregate(pg)
    loss = pg_loss
    if entropy_in_loss:
        loss = loss - entropy_coef * aggregate(torch.where(valid, entropy.to(dtype), 0.0))

    # Statistics: detached fp32 0-dim tensors on the device; means are over valid tokens (0 when there are none)
    with torch.no_grad():
        denom = num_valid.clamp(min=1)

        def mean(x):
            return (torch.where(valid, x.to(dtype), 0.0).sum() / denom).float()

        # approx_kl: the k3 estimator (r - 1) - log r of KL(old || new) per token (Schulman, "Approximating KL
        # divergence"): unbiased, always >= 0, lower variance than -log r. It uses the per-token ratio even when
        # the loss uses the sequence ratio, since KL is a per-token quantity.
        k3 = torch.expm1(token_log_ratio) - token_log_ratio
        # ratio_max/min: over valid tokens, 1 when there are none (no update happened); the padded sentinel keeps
        # amax/amin defined for N = 0 without a branch
        ratio_f = ratio.float()
        neg_inf = ratio_f.new_full((1,), float("-inf"))
        ratio_max = torch.cat([torch.where(valid, ratio_f, float("-inf")), neg_inf]).amax()
        ratio_min = torch.cat([torch.where(valid, ratio_f, float("inf")), -neg_inf]).amin()
        any_valid = num_valid > 0
        stats = {
            "pg_loss": pg_loss.detach().float(),
            "clipfrac": mean(clip_active),
            "dual_clipfrac": mean(dual_active),
            "approx_kl": mean(k3),
            "ratio_mean": mean(ratio),
            "ratio_max": torch.where(any_valid, ratio_max, 1.0),
            "ratio_min": torch.where(any_valid, ratio_min, 1.0),
            "logp": mean(logp.detach()),
            "num_tokens": num_valid.float(),
        }
        if entropy is not None:
            stats["entropy"] = mean(entropy.detach())
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# gradients in the forward: the fused chunk loop, and an op that hands its stored grads to autograd
@torch.library.custom_op("sppo_fast::ppo_clip_fused", mutates_args=())
def _ppo_fused_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: Optional[torch.Tensor],
                  adv: torch.Tensor, w_tok: torch.Tensor, g_ent: Optional[torch.Tensor], hp: torch.Tensor,
                  temperature: float, softcap: Optional[float], ignore_index: int, on_policy: bool, has_dual: bool,
                  compute_dx: bool, compute_dw: bool, impl: str,
                  chunk_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N], dX [N, H] fp32 or [0], dW [V, H] fp32 or [0]) of L = sum_i w_i pg_i + sum_i g_ent_i H_i.
    Called on detached inputs: its outputs carry no autograd history (see _attach_grads_op)."""
    return chunked.ppo_fwd_with_grads(hidden, weight, targets, old_logp, adv, w_tok, g_ent, hp, temperature, softcap,
                                      ignore_index, on_policy, has_dual, compute_dx, compute_dw, chunk_bytes,
                                      triton_rows=impl == "chunked")


@_ppo_fused_op.register_fake
def _(hidden, weight, targets, old_logp, adv, w_tok, g_ent, hp, temperature, softcap, ignore_index, on_policy,
      has_dual, compute_dx, compute_dw, impl, chunk_bytes):
    n = hidden.shape[0]
    new = lambda *size: hidden.new_empty(size, dtype=torch.float32)  # noqa: E731
    return (new(n), new(n), new(*hidden.shape) if compute_dx else new(0),
            new(*weight.shape) if compute_dw else new(0))


@torch.library.custom_op("sppo_fast::attach_grads", mutates_args=())
def _attach_grads_op(loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor,
                     dw: torch.Tensor) -> torch.Tensor:
    """Returns a copy of `loss` whose gradient wrt hidden / weight is upstream * dx / dw (computed in forward)."""
    return loss.clone()


@_attach_grads_op.register_fake
def _(loss, hidden, weight, dx, dw):
    return torch.empty_like(loss)


def _attach_setup(ctx, inputs, output):
    _, hidden, weight, dx, dw = inputs
    ctx.save_for_backward(dx, dw)
    ctx.dtypes = (hidden.dtype, weight.dtype)


def _attach_backward(ctx, grad):
    dx, dw = ctx.saved_tensors
    x_dtype, w_dtype = ctx.dtypes

    def scaled(g32, dtype, needed):
        if not needed:
            return None
        if dtype == torch.float32:
            # in place: no second V x H buffer. A second backward through this graph (retain_graph=True) then
            # fails autograd's saved-tensor version check instead of scaling twice.
            return g32.mul_(grad)
        # one rounding to the input dtype, and no fp32 temporary of the product
        return torch.mul(g32, grad, out=torch.empty(g32.shape, dtype=dtype, device=g32.device))

    return None, scaled(dx, x_dtype, ctx.needs_input_grad[1]), scaled(dw, w_dtype, ctx.needs_input_grad[2]), None, None


_attach_grads_op.register_autograd(_attach_backward, setup_context=_attach_setup)


def _token_weights(valid, loss_agg, cu_seqlens, n, seg_impl):
    """w_i: token i's weight in agg(.), so that agg(x) = sum_i w_i x_i; 0 at invalid tokens. No host sync."""
    valid_f = valid.float()
    if loss_agg == "token-mean":
        return valid_f / valid_f.sum().clamp(min=1)
    if cu_seqlens is None:
        tokens_per_seq = valid_f.sum(0, keepdim=True)
        ids = torch.zeros(n, dtype=torch.long, device=valid.device)
    else:
        tokens_per_seq = segment_sum_unchecked(valid_f, cu_seqlens, seg_impl)
        ids = segment_ids(cu_seqlens, n)
    counted = (tokens_per_seq > 0).float().sum().clamp(min=1)  # sequences with no valid token are left out
    if loss_agg == "seq-mean-token-sum":
        per_seq = (1.0 / counted).expand(tokens_per_seq.shape)
    else:
        per_seq = 1.0 / (tokens_per_seq.clamp(min=1) * counted)
    return torch.where(valid, per_seq[ids], 0.0)


# ---------------------------------------------------------------------------------------------------------------
# public API
def ppo_clip_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor | None,
                  advantages: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, ignore_index: int = -100,
                  clip_low=0.2, clip_high=0.2, dual_clip=3.0, ratio_level: str = "token",
                  loss_agg: str = "token-mean", temperature: float = 1.0, softcap: float | None = None,
                  entropy_coef=0.0, on_policy: bool = False, impl: str = "auto", chunk_bytes: int | None = None,
                  check_values: bool = False):
    """Token-level PPO clipped surrogate with dual clip, from hidden states and the lm_head weight.

    Shapes and dtypes:
        hidden [N, H] and weight [V, H]: bf16/fp16/fp32, same dtype and device (or an fp32 master weight with
            16-bit hidden states, see `token_logprobs`); N tokens packed without padding.
        targets [N] int64 token ids; targets == ignore_index marks tokens outside the loss (prompts, padding).
        old_logp [N] float: behaviour log-probs, ideally from `token_logprobs` itself (ratio == 1 exactly then);
            None with on_policy=True.
        advantages [N] per token or [B] per sequence (broadcast through cu_seqlens; [B] needs cu_seqlens; if
            B == N the vector is read as per token).
        cu_seqlens [B + 1] int32/int64 offsets (start 0, non-decreasing, end N), or None for one sequence.

    Formulas (per valid token i, mask_i = targets_i != ignore_index):
        logp_i, H_i = token_logprobs(hidden, weight, targets, temperature, softcap)   (fp32)
        r_i   = exp(logp_i - old_logp_i)                        ratio_level="token"
        r_i   = exp(mean_{j in seq(i), valid} (logp_j - old_logp_j))   ratio_level="sequence" (GSPO)
        r_i   = 1 exactly                                       on_policy=True (old policy = this one)
        pg_i  = max(-A_i r_i, -A_i clip(r_i, 1 - clip_low, 1 + clip_high))
        pg_i  = min(pg_i, -A_i dual_clip)   if A_i < 0 and dual_clip is not None
        loss  = agg(pg) - entropy_coef * agg(H)
    with agg one of
        "token-mean":          sum_i pg_i / #valid tokens
        "seq-mean-token-mean": mean over sequences with >= 1 valid token of (sum over the sequence / its #valid)
        "seq-mean-token-sum":  mean over sequences with >= 1 valid token of (sum over the sequence)
    The entropy is always computed (for stats); it carries a gradient only when entropy_coef != 0.
    Hyperparameters may be Python floats or 0-dim tensors (the latter are not value-checked).

    Implementations (impl, see `token_logprobs`; "auto" = "chunked" on CUDA, "torch" elsewhere):
        "chunked" / "torch", ratio_level="token": gradients in the forward. Per chunk of rows 3 GEMMs (logits,
            dX, dW) and one row pass; the backward only multiplies the stored fp32 dX [N, H] and dW [V, H] by the
            upstream scalar. Held from forward to backward: dX and dW in fp32 (nothing else); during the forward
            the chunk budget (`chunk_bytes`). Under no_grad, or with inputs that need no grad, only the logits
            GEMM runs (forward-only loss and stats).
        ratio_level="sequence", or "triton": `token_logprobs` + `ppo_clip_loss_from_logp`, with the backward
            recomputing logits: 4 GEMMs, memory as `token_logprobs`.
    on_policy=True is the first minibatch of an update: old_logp is the current policy's own log-prob, so the
    ratio is exactly 1 without a scoring pass (pass old_logp=None).

    Returns:
        loss: 0-dim fp32 tensor, differentiable wrt hidden and weight.
        stats: dict of detached 0-dim fp32 tensors on the input device (no host sync; call .item() at log time):
            pg_loss (the clipped term alone), clipfrac (fraction of valid tokens where the clipped term was chosen
            strictly), dual_clipfrac (where the dual clip was), approx_kl (mean of k3 = (r - 1) - log r on the
            per-token ratio), ratio_mean / ratio_max / ratio_min (of the ratio the loss used; 1 with no valid
            token), entropy and logp (means), num_tokens (valid tokens). Means are 0 with no valid token.

    Validation: shapes, dtypes, devices and hyperparameter ranges raise ValueError at once; cu_seqlens values are
    checked on the device (`torch._assert_async`) unless check_values=True (eager ValueError, host sync).

    Example::

        >>> loss, stats = ppo_clip_loss(hidden, lm_head.weight, targets, old_logp, seq_advantages,
        ...                             cu_seqlens=cu_seqlens, loss_agg="token-mean")
        >>> loss.backward()
        >>> log({"losses/pg": stats["pg_loss"], "stats/clipfrac": stats["clipfrac"]})  # .item() at log time
    """
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    n = hidden.shape[0]
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[1] = {hidden.shape[1]}, got "
                         f"{tuple(weight.shape)}")
    _check_vector("targets", targets, n, floating=False)
    if on_policy:
        if old_logp is not None:
            raise ValueError("on_policy=True takes the current policy's own log-probs as old_logp: pass "
                             "old_logp=None (or on_policy=False with your old_logp)")
    elif old_logp is None:
        raise ValueError("old_logp is None: pass the behaviour log-probs, or on_policy=True for a ratio of 1")
    else:
        _check_vector("old_logp", old_logp, n)
    _check_vector("advantages", advantages)
    _check_hparams(clip_low, clip_high, dual_clip, ratio_level, loss_agg)
    check_same_device(hidden=hidden, weight=weight, targets=targets, old_logp=old_logp, advantages=advantages,
                      cu_seqlens=cu_seqlens)
    impl = resolve_impl(impl, hidden, weight)
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, ratio_level=ratio_level,
              loss_agg=loss_agg, entropy_coef=entropy_coef, impl=impl)
    entropy_in_loss = isinstance(entropy_coef, torch.Tensor) or entropy_coef != 0

    if impl == "triton" or ratio_level == "sequence":
        logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, softcap=softcap,
                                       ignore_index=ignore_index, return_entropy=True, impl=impl,
                                       chunk_bytes=chunk_bytes, check_values=check_values)
        if not entropy_in_loss:
            entropy = entropy.detach()  # stats only: lets the backward skip the entropy gradient
        old = logp.detach() if on_policy else old_logp
        return ppo_clip_loss_from_logp(logp, old, advantages, targets != ignore_index, cu_seqlens, entropy=entropy,
                                       check_values=check_values, **kw)

    # gradients in the forward (token ratio)
    from .logprobs import _check_inputs, _check_target_values

    _check_inputs(hidden, weight, targets, temperature, softcap)
    check_triton_available(impl, hidden)
    check_mixed_dtypes(impl, hidden, weight)
    chunk_bytes = check_chunk_bytes(chunk_bytes, hidden.device)
    if check_values:
        _check_target_values(targets, weight.shape[0], ignore_index)
    else:
        in_range = ((targets >= 0) & (targets < weight.shape[0])) | (targets == ignore_index)
        torch._assert_async(in_range.all(), "ppo_clip_loss: targets must be in [0, V) or ignore_index")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, n, check_values=check_values)
    _check_advantages(advantages, n, cu_seqlens)
    valid = targets != ignore_index
    seg_impl = resolve_impl(impl, hidden) if cu_seqlens is None else resolve_impl(impl, hidden, cu_seqlens)
    w_tok = _token_weights(valid, loss_agg, cu_seqlens, n, seg_impl)
    adv_tok = advantages if advantages.shape[0] == n else advantages[segment_ids(cu_seqlens, n)]
    adv_tok = torch.where(valid, adv_tok.float(), 0.0)
    g_ent = -entropy_coef * w_tok if entropy_in_loss else None
    one = torch.ones((), dtype=torch.float32, device=hidden.device)
    hp = torch.stack([one - clip_low, one + clip_high, one * (dual_clip if dual_clip is not None else 0.0)]).float()
    compute_dx = torch.is_grad_enabled() and hidden.requires_grad
    compute_dw = torch.is_grad_enabled() and weight.requires_grad
    logp, entropy, dx, dw = torch.ops.sppo_fast.ppo_clip_fused(
        hidden.detach().contiguous(), weight.detach().contiguous(), targets.contiguous(),
        None if on_policy else old_logp.detach().float().contiguous(), adv_tok.contiguous(), w_tok.contiguous(),
        None if g_ent is None else g_ent.detach().float().contiguous(), hp, float(temperature),
        None if softcap is None else float(softcap), int(ignore_index), bool(on_policy), dual_clip is not None,
        compute_dx, compute_dw, impl, chunk_bytes,
    )
    with torch.no_grad():  # the loss value and the stats, from the same per-token numbers the gradient used
        loss, stats = ppo_clip_loss_from_logp(logp, logp if on_policy else old_logp, advantages, valid, cu_seqlens,
                                              entropy=entropy, **kw)
    if compute_dx or compute_dw:
        loss = torch.ops.sppo_fast.attach_grads(loss, hidden, weight, dx, dw)
    return loss, stats
