"""Adapters that put `sppo_fast.kernels` inside other RL frameworks.

    sppo_fast.integrations.trl    FusedGRPOTrainer (TRL's GRPOTrainer, log-probs/entropies from our kernels) and
                                  SPPOTrainer / SPPOConfig (SPPO on TRL: one sample per prompt, value-head baseline).
    sppo_fast.integrations.verl   linear_cross_entropy / fused_linear_for_ppo with verl's fused-kernel signatures,
                                  and patch_verl() to route verl's `use_fused_kernels` backends to them.

Each submodule imports its framework only when used, so `import sppo_fast.integrations` needs neither.
For plain PyTorch / transformers code, see `sppo_fast.hf.causal_lm_logprobs`.
"""
