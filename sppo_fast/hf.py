"""Per-token log-probs of any Hugging Face causal LM through `sppo_fast.kernels`, never building [B, L, V] logits.

    from sppo_fast.hf import causal_lm_logprobs

    # instead of
    #   logits = model(input_ids, attention_mask=attention_mask).logits
    #   logp = torch.log_softmax(logits[:, :-1].float() / T, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logp = causal_lm_logprobs(model, input_ids, attention_mask, temperature=T)        # [B, L - 1] fp32
    logp = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)        # HF's -100 convention

How: run the model's backbone (`get_decoder()`, through a peft wrapper), keep the final hidden states [B, L, H],
gather the rows of the positions that are scored (both the position and its next token are real tokens, the next
token is in `response_mask` when one is given, and its label is not -100 when `labels` are given), and hand those
[N, H] rows with the lm_head weight [V, H] to `sppo_fast.kernels.token_logprobs`. Padding rows never reach the
kernel, and the [N, V] logits are never stored.
The result is scattered back to [B, L - 1] (or [B, K] with `logits_to_keep=K`) with 0 at unscored positions.

Model-specific head arithmetic is read from the (text) config: Gemma's `final_logit_softcapping` goes to the
kernel's softcap; a logit multiplier (`logit_scale`, `output_multiplier`, `lm_head_multiplier`, Granite's
`logits_scaling` divisor) is folded into the hidden rows, since cap(s * h W^T) = cap((s h) W^T). Tied embeddings
need nothing: `get_output_embeddings().weight` is the embedding tensor itself, and gradients from both uses add up.
"""
from __future__ import annotations

import torch

from sppo_fast.model import unwrap

__all__ = ["backbone", "causal_lm_logprobs", "compute_dtype", "head_operands", "lm_head_logprobs", "lm_head_params",
           "scored_positions"]


# ---------------------------------------------------------------------------------------------------------------
# the head
def _logit_scale(text_config) -> float:
    """The factor some families multiply their logits by before any softcap (1.0 for most, e.g. Llama, Qwen)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):  # Cohere, Muse, Falcon-H1
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:  # Granite / MiniCPM3 divide by it, HyperCLOVA X multiplies
        return float(scaling) if getattr(text_config, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def lm_head_params(model):
    """(weight [V, H], softcap or None, logit_scale float) of a causal LM, through a peft wrapper.

    The weight is the live parameter (the embedding matrix itself when embeddings are tied), so gradients reach it.
    Raises NotImplementedError for an lm_head with a bias (the kernels compute h W^T only).
    """
    base = unwrap(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (is it a causal LM?)")
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError(f"{type(base).__name__}'s lm_head has a bias, which the fused log-prob kernels do "
                                  f"not support (they compute hidden @ weight.T); use the model's own logits "
                                  f"(model(...).logits, then log_softmax) for this model")
    weight = head.weight
    if type(weight).__name__ == "DTensor":  # FSDP2: the kernel needs the full [V, H] matrix on every rank
        from torch.distributed.tensor import Partial

        # each rank's kernel sees only its own rows' gradient: mark it Partial so the all-gather's backward
        # reduce-scatters the sum over ranks rather than keeping each rank's local piece
        weight = weight.full_tensor(grad_placements=[Partial()] * weight.device_mesh.ndim)
    text_config = base.config.get_text_config()
    return weight, getattr(text_config, "final_logit_softcapping", None), _logit_scale(text_config)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, force_fp32: bool = False) -> torch.dtype:
    """The dtype the naive `lm_head(hidden)` would compute in: autocast's when it is on (F.linear casts both
    operands), else the wider of the two (where a plain Linear would refuse mismatched dtypes)."""
    if force_fp32:
        return torch.float32
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def head_operands(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, keep_fp32_weight: bool = False):
    """(hidden, weight) cast to `dtype` for the kernels, by differentiable casts: the gradient reaches the fp32 master
    weight and the backbone in their own dtypes. keep_fp32_weight: leave an fp32 weight as it is (the chunked and
    torch impls take it beside 16-bit hidden rows and run their GEMMs on its 16-bit rounding, as autocast would; dW
    then lands in fp32 with no 16-bit copy of the head and no 16-bit grad to cast back)."""
    if not (keep_fp32_weight and weight.dtype == torch.float32):
        weight = weight.to(dtype)
    return hidden.to(dtype), weight


def lm_head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                     return_entropy: bool = False, impl: str = "auto", check_values: bool = False,
                     ignore_index: int = -100, force_fp32: bool = False):
    """log softmax(head(hidden) / T)[targets] for selected hidden rows, through `sppo_fast.kernels.token_logprobs`.

    Args:
        model: the causal LM whose lm_head (weight, softcap, logit scale) is used; peft-wrapped is fine.
        hidden: [N, H] final hidden states (any float dtype), one row per scored token.
        targets: [N] int64 next-token ids; `ignore_index` rows give 0.
        force_fp32: compute the head in fp32 whatever the autocast state (TRL's `cast_lm_head_to_fp32`).

    Returns:
        logp [N] fp32, or (logp [N], entropy [N]) fp32 with return_entropy; differentiable wrt hidden and weight.
    """
    from sppo_fast.kernels import token_logprobs

    weight, softcap, scale = lm_head_params(model)
    hidden = hidden.to(weight.device)
    targets = targets.to(weight.device)
    hidden, weight = head_operands(hidden, weight, compute_dtype(hidden, weight, force_fp32))
    if scale != 1.0:
        hidden = hidden * scale
    # Dtypes are settled above; autocast off so the kernel's internal matmuls (torch path) stay in that dtype.
    with torch.autocast(hidden.device.type, enabled=False):
        return token_logprobs(hidden, weight, targets, temperature=float(temperature), softcap=softcap,
                              ignore_index=ignore_index, return_entropy=return_entropy, impl=impl,
                              check_values=check_values)


# ---------------------------------------------------------------------------------------------------------------
# the full model
def scored_positions(attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L - 1] bool: position t is scored (its log-prob is that of token t + 1 given tokens <= t) when tokens
    t and t + 1 are both real (attention_mask) and token t + 1 is a response token (response_mask, if given).

    Requiring token t to be real too is what makes left padding right: the first real token of a left-padded row
    has only padding before it, so it has no prediction (the naive path would read it off a pad position).
    """
    real = attention_mask.bool()
    valid = real[:, 1:] & real[:, :-1]
    if response_mask is not None:
        valid = valid & response_mask.bool()[:, 1:]
    return valid


def backbone(model):
    """The decoder of a causal LM (`get_decoder()`), through a peft wrapper: its forward gives the final hidden
    states without the lm_head. Prompt-learning adapters are refused (their virtual tokens come from the wrapper)."""
    base = unwrap(model)
    active = getattr(model, "active_peft_config", None)
    if active is not None and getattr(active, "is_prompt_learning", False):
        # prompt learning (prefix / prompt tuning) injects virtual tokens in the peft wrapper's own forward
        raise NotImplementedError("prompt-learning peft adapters are not supported: their virtual tokens are added "
                                  "by the peft wrapper's forward, which this path does not run")
    return base.get_decoder()


def causal_lm_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       response_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                       logits_to_keep: int | None = None,
                       temperature: float = 1.0, return_entropy: bool = False, impl: str = "auto",
                       position_ids: torch.Tensor | None = None, check_values: bool = False, **decoder_kwargs):
    """Per-token log-probs of `input_ids[:, 1:]` given their prefix, from the fused kernel (no [B, L, V] logits).

    The exact replacement for
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logp = log_softmax(logits[:, :-1].float() / temperature, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    with unscored positions set to 0 (see `scored_positions`: padding on either side, prompt tokens when a
    response_mask is given, -100 labels when labels are given).

    Args:
        model: a Hugging Face causal LM (`*ForCausalLM`), optionally peft-wrapped (LoRA etc.; not prompt learning).
            Its backbone (`get_decoder()`) is called directly, so pass the unwrapped module rather than a DDP/FSDP
            wrapper (whose forward hooks would be skipped).
        input_ids: [B, L] int64, left- or right-padded.
        attention_mask: [B, L] 0/1, None = no padding.
        response_mask: [B, L] 0/1 aligned with input_ids: score only tokens t + 1 where it is 1 (e.g. the
            completion). Rows of other positions are not sent to the kernel at all.
        labels: [B, L] int64 in Hugging Face's convention, as for `model(input_ids, labels=labels)`: aligned with
            input_ids and shifted here as the model's loss shifts them (position t is scored against labels[:, t + 1]),
            -100 = not scored. The scored token is the label (normally input_ids[:, t + 1]). Padding is still
            unscored whatever its label; with response_mask too, both masks apply. `labels` equal to input_ids with
            -100 outside the response give exactly the response_mask result.
        logits_to_keep: K, return only the last K positions, [B, K] (TRL's convention: output[:, -K:] of the full
            result; K = completion length scores the right-padded completion that follows a left-padded prompt).
        temperature: the sampling temperature (logits are divided by it).
        return_entropy: also return the entropy of each scored position's distribution (0 elsewhere).
        impl: the kernel implementation, "auto" | "chunked" | "triton" | "torch".
        position_ids: [B, L], passed to the backbone (the naive path passes it to the model the same way).
        check_values: the kernel's eager target-range check (a host sync; for debugging).
        **decoder_kwargs: extra keyword arguments for the backbone's forward. Loss arguments (`shift_labels`,
            `num_items_in_batch`) are refused: this returns log-probs, not a loss.

    Returns:
        logp [B, L - 1] (or [B, K]) fp32, or (logp, entropy) with return_entropy. Differentiable wrt the model's
        parameters. Gathering the valid rows is one host sync (the number of scored tokens).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, m in (("attention_mask", attention_mask), ("response_mask", response_mask), ("labels", labels)):
        if m is not None and m.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(m.shape)}")
    for name in ("shift_labels", "num_items_in_batch"):
        # otherwise they would reach the backbone's **kwargs and be ignored without a word
        if name in decoder_kwargs:
            raise TypeError(f"causal_lm_logprobs does not take {name!r}: it returns per-token log-probs, not a loss; "
                            f"pass unshifted `labels` (-100 = unscored) or `response_mask` to choose the positions")
    num_pos = max(length - 1, 0)
    keep = num_pos if logits_to_keep is None else int(logits_to_keep)
    if not 0 <= keep <= num_pos:
        raise ValueError(f"logits_to_keep must be in [0, L - 1 = {num_pos}], got {logits_to_keep}")
    start = num_pos - keep  # output column j is position start + j, predicting token start + j + 1

    scored = scored_positions(attention_mask, response_mask)  # [B, L - 1]
    targets = input_ids
    if labels is not None:
        targets = labels.to(input_ids.device)
        scored = scored & (targets[:, 1:] != -100)  # HF's shift: position t predicts labels[:, t + 1]
    scored = scored[:, start:]  # [B, K]
    backbone_inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **decoder_kwargs)
    if position_ids is not None:
        backbone_inputs["position_ids"] = position_ids
    hidden = backbone(model)(**backbone_inputs).last_hidden_state  # [B, L, H]
    rows = hidden[:, start:num_pos][scored]  # [N, H]: only scored positions go to the kernel
    targets = targets[:, start + 1:][scored]  # [N]
    result = lm_head_logprobs(model, rows, targets, temperature=temperature, return_entropy=return_entropy,
                              impl=impl, check_values=check_values)
    # masked_scatter (rather than index_put into zeros) keeps the output attached to the graph even when N = 0
    scatter = lambda x: x.new_zeros(batch, keep).masked_scatter(scored.to(x.device), x)  # noqa: E731
    if return_entropy:
        return scatter(result[0]), scatter(result[1])
    return scatter(result)
