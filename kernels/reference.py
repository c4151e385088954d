"""Readable fp32 (or fp64) references for every op in `sppo_fast.kernels`.

These materialise the full [N, V] logits, so they are for tests and for reading, never for training at scale.
Every fast path (Triton or chunked torch) must agree with these up to floating-point error.
"""
import torch


def logits_ref(hidden, weight, temperature=1.0, softcap=None):
    """z = cap(hidden @ weight.T) / temperature, computed in the inputs' dtype promoted to at least fp32."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)  # Gemma-style final-logit soft-capping, before temperature
    return logits / temperature


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, softcap=None, ignore_index=-100):
    """Returns (logp [N], entropy [N]) of the softmax over `logits_ref`; both 0 where targets == ignore_index."""
    z = logits_ref(hidden, weight, temperature, softcap)
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    logp = logprobs.gather(1, safe_targets[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def segment_sum_ref(values, cu_seqlens):
    """out[b] = values[cu_seqlens[b] : cu_seqlens[b + 1]].sum(); a Python loop, for reading."""
    bounds = cu_seqlens.tolist()
    return torch.stack([values[s:e].sum() for s, e in zip(bounds[:-1], bounds[1:])])


def ppo_clip_loss_from_logp_ref(logp, old_logp, advantages, mask, cu_seqlens, clip_low=0.2, clip_high=0.2,
                                dual_clip=3.0, ratio_level="token", loss_agg="token-mean"):
    """Token-level PPO clipped surrogate (with dual clip) on per-token log-probs, aggregated as `loss_agg`.

    logp, old_logp, advantages, mask: [N] (advantages already per token). cu_seqlens: [B+1] sequence bounds.
    ratio_level="sequence": every token of a sequence uses exp(mean over its valid tokens of logp - old_logp)
    (GSPO-style length-normalised sequence ratio), with the gradient flowing through each token's logp.
    """
    mask = mask.to(logp.dtype)
    bounds = cu_seqlens.tolist()
    log_ratio = (logp - old_logp) * mask
    if ratio_level == "sequence":
        per_seq = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            n = mask[s:e].sum().clamp(min=1)
            per_seq.append((log_ratio[s:e].sum() / n).expand(e - s))
        log_ratio = torch.cat(per_seq) if per_seq else log_ratio
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        # dual clip bounds the loss of negative-advantage tokens whose ratio has exploded
        clipped = torch.where(advantages < 0, torch.minimum(clipped, -advantages * dual_clip), clipped)
    per_token = clipped * mask
    if loss_agg == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    # sequences with no valid token (fully masked) do not count in the mean over sequences
    seq_losses = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = mask[s:e].sum()
        if n > 0:
            total = per_token[s:e].sum()
            seq_losses.append(total / n if loss_agg == "seq-mean-token-mean" else total)
    return torch.stack(seq_losses).mean() if seq_losses else per_token.sum() * 0.0
