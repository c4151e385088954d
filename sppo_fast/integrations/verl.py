"""verl's fused log-prob entry points, computed by `sppo_fast.kernels` (verl itself is not needed to import this).

verl (0.9) has two fused "hidden states x lm_head -> (log-probs, entropy)" paths, chosen by
`actor_rollout_ref.model.use_fused_kernels=True` and `...model.fused_kernel_options.impl_backend`:

  "triton"  `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels, temperature,
            reduction, dist_process_group)`, called by the patched HF forwards (`verl/models/transformers/*`,
            `forward_with_triton_backend`) and by the Megatron fused forwards (`verl/models/mcore/*`).
  "torch"   `verl.utils.experimental.torch_functional.FusedLinearForPPO(...).forward(hidden_states, vocab_weights,
            input_ids, temperature)`, called by `forward_with_torch_backend`.

This module provides both signatures (`linear_cross_entropy`, `fused_linear_for_ppo`) and `patch_verl()`, which
points verl at them. Shapes and semantics (same as verl's, except where noted):

    linear_cross_entropy(hidden [*, H], weight [V, H], labels [*], temperature=1.0, reduction="none",
                         dist_process_group=None) -> (logprobs, entropy)
        hidden's leading dims and labels are flattened to N tokens (as verl's kernel does).
        reduction="none": logprobs [N] fp32;  "sum" / "mean": logprobs 0-dim (sum / mean over the N tokens).
        entropy [N] fp32 in every case.
    fused_linear_for_ppo(hidden_states [B, T, H] or [T, H], vocab_weights [V, H], input_ids [B, T] or [T],
                         temperature=1.0) -> (log_probs fp32, entropy in hidden's dtype), both shaped like input_ids.

    log_probs[i] = log softmax(hidden[i] @ weight.T / temperature)[labels[i]],  entropy[i] = H(that softmax);
    both differentiable wrt hidden and weight (the kernel's backward; no [N, V] logits are stored).

Differences from verl's kernels: logits accumulate in fp32 from bf16 inputs (verl's torch path rounds the logits
to bf16 first); a label equal to -100 gives 0 log-prob and 0 entropy (verl has no ignore index: it rolls the
input ids, so every label is a real id); a vocab-parallel `dist_process_group` of size > 1 (Megatron tensor
parallelism) is not supported (NotImplementedError): the kernel needs the full [V, H] weight on each rank.

Wiring it into a verl run: every Ray worker must call `patch_verl()` before its model's first forward. verl imports
`actor_rollout_ref.model.external_lib` in each worker, and this module patches on import when the environment
variable SPPO_FAST_PATCH_VERL is set (to 1, or to the kernel impl: auto | chunked | triton | torch):

    SPPO_FAST_PATCH_VERL=1 python -m verl.trainer.main_ppo ... \\
        actor_rollout_ref.model.use_fused_kernels=True \\
        actor_rollout_ref.model.fused_kernel_options.impl_backend=triton \\
        actor_rollout_ref.model.external_lib=sppo_fast.integrations.verl

(or `VERL_USE_EXTERNAL_MODULES=sppo_fast.integrations.verl`, which verl imports in every process on `import verl`;
on a multi-node cluster pass the variables through `+ray_kwargs.ray_init.runtime_env.env_vars`).
"""
from __future__ import annotations

import os
import sys

import torch

__all__ = ["linear_cross_entropy", "fused_linear_for_ppo", "patch_verl", "REDUCTIONS"]

REDUCTIONS = ("none", "sum", "mean")

# verl modules that bind `linear_cross_entropy` by name at import time (`from ... import linear_cross_entropy`)
_IMPORTERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


def _check_group(dist_process_group) -> None:
    if dist_process_group is None:
        return
    import torch.distributed as dist

    if dist.get_world_size(dist_process_group) > 1:
        raise NotImplementedError("sppo_fast's kernels need the full [V, H] lm_head weight: a vocab-parallel "
                                  "dist_process_group (Megatron tensor parallelism > 1) is not supported")


def _logprobs_and_entropy(hidden2d: torch.Tensor, weight: torch.Tensor, labels1d: torch.Tensor, temperature,
                          impl: str):
    """The kernel call on [N, H] x [V, H] with [N] labels -> (logp [N] fp32, entropy [N] fp32)."""
    from sppo_fast.hf import compute_dtype, head_operands
    from sppo_fast.kernels import token_logprobs

    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise NotImplementedError("per-sample temperatures are not supported (verl's fused kernels take one)")
        temperature = temperature.item()
    hidden2d, weight = head_operands(hidden2d, weight, compute_dtype(hidden2d, weight))
    with torch.autocast(hidden2d.device.type, enabled=False):
        return token_logprobs(hidden2d, weight, labels1d.long(), temperature=float(temperature), return_entropy=True,
                              impl=impl)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none", dist_process_group=None, *,
                         impl: str = "auto"):
    """Drop-in for `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` (see the module docstring).

    Args:
        hidden: [N, H] or [..., H] (flattened to N rows), bf16/fp16/fp32.
        weight: [V, H], the lm_head weight (cast to hidden's dtype, differentiably, if it differs).
        labels: N ids in any shape (flattened); -100 gives 0.
        temperature: a float (or a one-element tensor).
        reduction: "none" -> logprobs [N]; "sum" / "mean" -> a 0-dim sum / mean of the N log-probs.
        dist_process_group: None or a group of size 1.
        impl: the kernel implementation, "auto" | "chunked" | "triton" | "torch".

    Returns:
        (logprobs, entropy [N]), fp32.
    """
    reduction = reduction.lower()
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_group(dist_process_group)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    if labels1d.shape[0] != hidden2d.shape[0]:
        raise ValueError(f"labels must have one id per hidden row: {labels1d.shape[0]} labels for "
                         f"{hidden2d.shape[0]} rows")
    logprobs, entropy = _logprobs_and_entropy(hidden2d, weight, labels1d, temperature, impl)
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


def fused_linear_for_ppo(hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                         temperature: float = 1.0, *, impl: str = "auto"):
    """Drop-in for `verl.utils.experimental.torch_functional.FusedLinearForPPO.forward`.

    Args:
        hidden_states: [B, T, H] or [T, H].
        vocab_weights: [V, H].
        input_ids: [B, T] or [T], the (already rolled) next-token ids.
    Returns:
        (log_probs fp32, entropy in hidden_states' dtype), each shaped like input_ids.
    """
    if hidden_states.dim() not in (2, 3) or input_ids.shape != hidden_states.shape[:-1]:
        raise ValueError(f"hidden_states must be [B, T, H] or [T, H] and input_ids its leading shape, got "
                         f"{tuple(hidden_states.shape)} and {tuple(input_ids.shape)}")
    hidden2d = hidden_states.reshape(-1, hidden_states.shape[-1])
    logp, entropy = _logprobs_and_entropy(hidden2d, vocab_weights, input_ids.reshape(-1), temperature, impl)
    return logp.view(input_ids.shape), entropy.to(hidden_states.dtype).view(input_ids.shape)


def patch_verl(impl: str = "auto") -> list[str]:
    """Route verl's fused-kernel backends ("triton" and "torch") to sppo_fast's kernels in this process.

    Replaces `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` (read at call time by the HF forwards,
    and at import time by the Megatron forwards, which are patched too when already imported) and
    `FusedLinearForPPO.forward`. Idempotent. Needs verl installed. Returns the patched names.
    """
    import importlib

    lce_module = importlib.import_module("verl.utils.kernel.linear_cross_entropy")

    def verl_linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none",
                                  dist_process_group=None):
        return linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group, impl=impl)

    verl_linear_cross_entropy.__doc__ = linear_cross_entropy.__doc__
    verl_linear_cross_entropy._sppo_fast = True
    patched = []
    lce_module.linear_cross_entropy = verl_linear_cross_entropy
    patched.append("verl.utils.kernel.linear_cross_entropy.linear_cross_entropy")
    for name in _IMPORTERS:
        module = sys.modules.get(name)  # imported later, they pick up the patched attribute themselves
        if module is not None and hasattr(module, "linear_cross_entropy"):
            module.linear_cross_entropy = verl_linear_cross_entropy
            patched.append(f"{name}.linear_cross_entropy")

    torch_functional = importlib.import_module("verl.utils.experimental.torch_functional")

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, impl=impl)

    torch_functional.FusedLinearForPPO.forward = forward
    patched.append("verl.utils.experimental.torch_functional.FusedLinearForPPO.forward")
    return patched


def _patch_from_env() -> None:
    """SPPO_FAST_PATCH_VERL=1|auto|chunked|triton|torch: patch verl on import (how Ray workers get the patch)."""
    value = os.environ.get("SPPO_FAST_PATCH_VERL", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return
    patch_verl(impl="auto" if value in ("1", "true", "yes") else value)


_patch_from_env()
