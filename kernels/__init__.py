"""sppo_fast.kernels: fused log-prob and PPO-loss ops computed from hidden states and the lm_head weight.

Depends on torch and triton only; never imports the trainer. The log-prob and PPO ops take
`impl="auto"|"chunked"|"torch"|"triton"`: "chunked" is the row-chunked path (vendor GEMMs per chunk of rows, one
Triton row pass in between; CUDA, or the CPU interpreter under TRITON_INTERPRET=1), "torch" the same chunk loop with
a torch row pass (runs anywhere), "triton" the tile-fused kernel, and "auto" picks "chunked" on CUDA tensors and
"torch" otherwise (see kernels/_utils.py for why). segment_sum takes "auto"|"triton"|"torch" ("chunked" = triton).
"""
if __name__ == "sppo_fast.kernels":
    from .chunked import DEFAULT_CHUNK_BYTES
    from .logprobs import token_logprobs
    from .ppo_loss import LOSS_AGGS, RATIO_LEVELS, ppo_clip_loss, ppo_clip_loss_from_logp
    from .seq_sum import segment_sum

    # the ops, and the constants callers size or validate against (chunk budgets per device, loss aggregations)
    __all__ = ["token_logprobs", "ppo_clip_loss", "ppo_clip_loss_from_logp", "segment_sum", "DEFAULT_CHUNK_BYTES",
               "LOSS_AGGS", "RATIO_LEVELS"]
else:
    # Imported as a top-level `kernels` because a checkout's root is on sys.path (`python -m ...`, `python -m pytest`
    # or `torchrun -m ...` run from the repo root, or a PYTHONPATH that names it). That name belongs to PyPI's
    # hub-kernels package, which transformers (>= 5.25 requires it) imports as `from kernels import ...`. Renaming
    # this folder would break the layout every doc and script names, and no sys.path order fixes `python -m`, which
    # puts the checkout first. So this module steps aside: it finds the real `kernels` on the rest of sys.path,
    # executes it and leaves it in sys.modules, which is what the import system then returns to the importer (it
    # re-reads sys.modules after running a module). Without the PyPI package it stays empty (no __version__, so
    # transformers' probe answers "not installed"), and our torch.library ops stay registered only once, under the
    # name `sppo_fast.kernels`.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _load_pypi_kernels():
        root = _os.path.realpath(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
        rest = [p for p in _sys.path if _os.path.realpath(_os.path.abspath(p or _os.getcwd())) != root]
        spec = _machinery.PathFinder.find_spec("kernels", rest)
        if spec is None or spec.loader is None:
            return
        module = _util.module_from_spec(spec)
        _sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del _sys.modules["kernels"]
            raise

    _load_pypi_kernels()
    __all__ = []
