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

Not built yet: the fused "grads in forward" variant (DESIGN.md, row-chunked: per chunk of rows, logits by cuBLAS,
one Triton pass computing logp, entropy, the clipped loss's dL/dlogp and dZ in place, then dX = dZ W and
dW += dZ^T X; 3 GEMMs instead of the 4 of a recompute-in-backward kernel). It is only exact chunk by chunk when
dL/dlogp_i is known from token i alone (token ratio + token-mean with a precomputed valid-token count); the
sequence ratio and the seq-mean aggregations need whole sequences inside a chunk. Whether it beats the tile-fused
kernel is a GPU measurement (bench/bench_kernels.py against the 3-GEMM floor), and this session had no GPU, so it
is a listed follow-up rather than code nobody has timed.
"""
import torch

from ._utils import check_same_device, resolve_impl
from .logprobs import token_logprobs
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
        if advantages.shape[0] != n:
            raise ValueError(f"advantages must have shape [N] = [{n}] when cu_seqlens is None (per-sequence "
                             f"advantages [B] need cu_seqlens), got {tuple(advantages.shape)}")

        def seq_sum(x):
            return x.sum(0, keepdim=True)

        def to_tokens(s):
            return s.expand(n)
    else:
        check_cu_seqlens(cu_seqlens, n, check_values=check_values)
        num_seqs = cu_seqlens.shape[0] - 1
        if advantages.shape[0] not in (n, num_seqs):
            raise ValueError(f"advantages must have shape [N] = [{n}] (per token) or [B] = [{num_seqs}] (per "
                             f"sequence), got {tuple(advantages.shape)}")
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
# public API
def ppo_clip_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logp: torch.Tensor,
                  advantages: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None, ignore_index: int = -100,
                  clip_low=0.2, clip_high=0.2, dual_clip=3.0, ratio_level: str = "token",
                  loss_agg: str = "token-mean", temperature: float = 1.0, softcap: float | None = None,
                  entropy_coef=0.0, impl: str = "auto", check_values: bool = False):
    """Token-level PPO clipped surrogate with dual clip, from hidden states and the lm_head weight.

    Shapes and dtypes:
        hidden [N, H] and weight [V, H]: bf16/fp16/fp32, same dtype and device; N tokens packed without padding.
        targets [N] int64 token ids; targets == ignore_index marks tokens outside the loss (prompts, padding).
        old_logp [N] float: behaviour log-probs, ideally from `token_logprobs` itself (ratio == 1 exactly then).
        advantages [N] per token or [B] per sequence (broadcast through cu_seqlens; [B] needs cu_seqlens; if
            B == N the vector is read as per token).
        cu_seqlens [B + 1] int32/int64 offsets (start 0, non-decreasing, end N), or None for one sequence.

    Formulas (per valid token i, mask_i = targets_i != ignore_index):
        logp_i, H_i = token_logprobs(hidden, weight, targets, temperature, softcap)   (fp32)
        r_i   = exp(logp_i - old_logp_i)                        ratio_level="token"
        r_i   = exp(mean_{j in seq(i), valid} (logp_j - old_logp_j))   ratio_level="sequence" (GSPO)
        pg_i  = max(-A_i r_i, -A_i clip(r_i, 1 - clip_low, 1 + clip_high))
        pg_i  = min(pg_i, -A_i dual_clip)   if A_i < 0 and dual_clip is not None
        loss  = agg(pg) - entropy_coef * agg(H)
    with agg one of
        "token-mean":          sum_i pg_i / #valid tokens
        "seq-mean-token-mean": mean over sequences with >= 1 valid token of (sum over the sequence / its #valid)
        "seq-mean-token-sum":  mean over sequences with >= 1 valid token of (sum over the sequence)
    The entropy is always computed (for stats); it carries a gradient only when entropy_coef != 0.
    Hyperparameters may be Python floats or 0-dim tensors (the latter are not value-checked).

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
    _check_vector("old_logp", old_logp, n)
    _check_vector("advantages", advantages)
    _check_hparams(clip_low, clip_high, dual_clip, ratio_level, loss_agg)
    check_same_device(hidden=hidden, weight=weight, targets=targets, old_logp=old_logp, advantages=advantages,
                      cu_seqlens=cu_seqlens)
    impl = resolve_impl(impl, hidden, weight)

    logp, entropy = token_logprobs(hidden, weight, targets, temperature=temperature, softcap=softcap,
                                   ignore_index=ignore_index, return_entropy=True, impl=impl,
                                   check_values=check_values)
    if not isinstance(entropy_coef, torch.Tensor) and entropy_coef == 0:
        entropy = entropy.detach()  # stats only: lets the backward skip the entropy gradient
    return ppo_clip_loss_from_logp(logp, old_logp, advantages, targets != ignore_index, cu_seqlens,
                                   entropy=entropy, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                                   ratio_level=ratio_level, loss_agg=loss_agg, entropy_coef=entropy_coef,
                                   impl=impl, check_values=check_values)
