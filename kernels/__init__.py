"""sppo_fast.kernels: fused log-prob and PPO-loss ops computed from hidden states and the lm_head weight.

Depends on torch and triton only; never imports the trainer. The log-prob and PPO ops take
`impl="auto"|"chunked"|"torch"|"triton"`: "chunked" is the row-chunked path (vendor GEMMs per chunk of rows, one
Triton row pass in between; CUDA, or the CPU interpreter under TRITON_INTERPRET=1), "torch" the same chunk loop with
a torch row pass (runs anywhere), "triton" the tile-fused kernel, and "auto" picks "chunked" on CUDA tensors and
"torch" otherwise (see kernels/_utils.py for why). segment_sum takes "auto"|"triton"|"torch" ("chunked" = triton).
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
