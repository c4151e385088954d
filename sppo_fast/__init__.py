"""sppo_fast: Sequence-Level PPO (SPPO) for LLM reasoning RL on one GPU.

`sppo_fast.kernels` holds the fused log-prob / PPO-loss ops; `sppo_fast.train` the single-file training loop.
"""
__version__ = "0.1.0"
