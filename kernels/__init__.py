"""sppo_fast.kernels: fused log-prob and PPO-loss ops computed from hidden states and the lm_head weight.

Depends on torch and triton only; never imports the trainer. Every op takes `impl="auto"|"triton"|"torch"`:
"triton" is the fused kernel (CUDA, or the CPU interpreter under TRITON_INTERPRET=1), "torch" a chunked pure-torch
path that runs anywhere, "auto" picks triton on CUDA tensors and torch otherwise.
"""
if __name__ == "sppo_fast.kernels":
    from .logprobs import token_logprobs
    from .ppo_loss import ppo_clip_loss, ppo_clip_loss_from_logp
    from .seq_sum import segment_sum

    __all__ = ["token_logprobs", "ppo_clip_loss", "ppo_clip_loss_from_logp", "segment_sum"]
else:
    # Imported as a top-level `kernels` because a checkout's root is on sys.path (`python -m ...` run from the repo
    # root). transformers probes `import kernels` for the unrelated PyPI hub-kernels package; staying empty (no
    # __version__) makes that probe answer "not installed", and keeps our torch.library ops registered only once,
    # under the name `sppo_fast.kernels`.
    __all__ = []
