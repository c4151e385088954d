"""Multi-GPU training with torchrun + FSDP2: process group, sharding, reductions, checkpoints gathered to rank 0.

    torchrun --nproc-per-node 8 -m sppo_fast.train --model /models/Qwen2.5-7B-Instruct --data gsm8k.jsonl ...

Without torchrun (WORLD_SIZE unset or 1) there is no process group and every function here is an identity or a
no-op, so a single process runs exactly the single-process code. Under torchrun:

- Data: every rank draws the same global batch from the global sampler and keeps its contiguous slice of the
  prompts (`local_slice`): a run sees the same prompts whatever the world size, and a GRPO group never straddles
  ranks, so rewards and advantages stay local.
- Sharding: `shard` applies FSDP2 `fully_shard` to every decoder layer, then to the whole model (embeddings, final
  norm, lm_head), and to the value head and the critic. Weights stay fp32 (bf16 comes from autocast, as on one
  GPU), AdamW states are DTensor shards, gradient clipping sees the global norm.
- The policy's root unit is unsharded by a pre-hook on the decoder: the trainer runs `get_decoder()` and reads
  `lm_head.weight` itself (the fused kernels need the full [V, H] matrix) instead of calling the model, so FSDP's
  own hooks on the root never fire. The kernels then get the unsharded parameter, its gradient accumulates there,
  and FSDP reduce-scatters it at the end of the backward like any other.
- Loss: a token-mean over ALL ranks' tokens. The counts are known on the host and all-reduced before the backward
  (`sum_counts`), and FSDP *sums* gradients (divide factor 1) instead of averaging them, so the gradient is the one
  a single process would get on the whole batch.
- Collectives in lock-step: each FSDP forward/backward all-gathers and reduce-scatters, so every rank runs as many
  micro-batches (`even_micro_batches`, with zero-weight `idle_pass`es on ranks that run out), in the update and in
  the scoring pass. Generation and evaluation run under `full_params` (every unit unsharded once, no collective
  per forward): HF `generate` calls the model once per token and ranks stop at different lengths.
- Metrics: per-rank shares (device tensors) are all-reduced once per log interval (`reduce_totals`); rewards,
  values and response lengths are gathered (`gather_step`, `all_gather_cat`). Rank 0 alone prints (other ranks'
  stdout goes to /dev/null), logs and draws the progress bar.
- Checkpoints: every tensor is gathered to full size and rank 0 writes the single-process layout (safetensors,
  atomic; `checkpoint.save`). A checkpoint therefore resumes on any world size, one process included; on resume,
  each rank loads the full weights and shards them, and full optimizer states are re-sharded (`load_optimizer`).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings

import torch
import torch.distributed as dist

__all__ = ["init", "teardown", "enabled", "rank", "world_size", "is_main", "barrier", "broadcast_object",
           "shard", "full_params", "local_slice", "sum_counts", "any_rank", "even_micro_batches", "idle_pass",
           "reduce_totals", "all_gather_cat", "gather_step", "gather_for_checkpoint", "load_module",
           "load_optimizer", "restore_rank_rng", "NullLogger"]

# how each per-rank total of `Stepper.update` combines over ranks (the rest are shares of a global mean: summed)
_REDUCE_OPS = {"stats/ratio_max": "max", "stats/ratio_min": "min", "nonfinite": "max"}


# ---------------------------------------------------------------------------------------------------------------------
# process group and rank helpers
def init(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): start the process group and return this rank's device; else `device`.

    CUDA: NCCL for device tensors and gloo for host-side counts and objects (`cpu:gloo,cuda:nccl`), device
    cuda:LOCAL_RANK. CPU: gloo. Ranks other than 0 send stdout to /dev/null so that only rank 0 prints (stderr, and so
    warnings and tracebacks, stays open on every rank). Idempotent: a group that already exists is kept.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        atexit.register(teardown)
    if dist.get_rank() != 0 and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def enabled() -> bool:
    """True in a multi-process run (a process group with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if enabled():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (e.g. the run directory, whose name holds a time stamp)."""
    if not enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class NullLogger:
    """What ranks other than 0 get instead of a MetricsLogger."""

    def log(self, step, scalars) -> None:
        pass

    def log_eval_samples(self, step, rows) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------------
# sharding
def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return FSDPModule, fully_shard


def _root(model):
    """The module that is sharded: the transformers model under a peft wrapper, or the module itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _blocks(root) -> list:
    """The units sharded one by one: the decoder layers (the model's `_no_split_modules` classes, as accelerate
    does), else the children of its largest ModuleList; none for a small module like the value head."""
    names = set(getattr(root, "_no_split_modules", None) or [])
    blocks = [m for m in root.modules() if type(m).__name__ in names and m is not root]
    if blocks:
        return blocks
    lists = [m for m in root.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def shard(*models):
    """FSDP2-shard each model (None passes through) in place and return them; an identity without a process group.

    Call after the weights are loaded (every rank loads the same full weights; each keeps its shard) and before the
    optimizer is built (it must hold the sharded parameters). Afterwards each rank's torch RNG is offset by its rank,
    so that ranks sample different noise.
    """
    if not enabled():
        return models
    from torch.distributed.device_mesh import init_device_mesh

    FSDPModule, fully_shard = _fsdp()
    # the value head's output v is a view (squeeze), which FSDP warns about; the trainer never writes into it
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPValueHead\) returned a view")
    device = next(p.device for m in models if m is not None for p in m.parameters())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for model in models:
        if model is None:
            continue
        root = _root(model)
        for block in _blocks(root):
            fully_shard(block, mesh=mesh)
        fully_shard(root, mesh=mesh)
        for unit in root.modules():
            if isinstance(unit, FSDPModule):
                # Sum, not average, over ranks: the loss is already normalised by the global token count.
                # Sum-only comms also keep gloo working (its reduce-scatter has no PREMUL_SUM).
                divide = getattr(unit, "set_gradient_divide_factor", None) or unit.set_reduce_scatter_divide_factor
                divide(1.0)  # (set_reduce_scatter_divide_factor: its name before torch 2.7)
                if hasattr(unit, "set_force_sum_reduction_for_comms"):
                    unit.set_force_sum_reduction_for_comms(True)
        decoder = root.get_decoder() if hasattr(root, "get_decoder") else None
        if decoder is not None and decoder is not root:
            _hook_decoder(root, decoder, device)
    torch.manual_seed(torch.initial_seed() + dist.get_rank())
    return models


def _hook_decoder(root, decoder, device) -> None:
    """The trainer runs `decoder` and reads `lm_head.weight` itself, never `root.forward`, so FSDP's hooks on the
    root (embeddings, final norm, lm_head) never fire. FSDP picks its root unit at the first forward, so run one
    through the real root (one token, no grad), reshard (the optimizer must see the shards), and from then on
    unshard the root's parameters before every decoder forward. Their gradients are reduce-scattered by FSDP's
    end-of-backward callback, which finishes every unit of the root that is still unsharded."""
    with torch.no_grad():
        root(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    root.reshard()
    decoder.register_forward_pre_hook(lambda module, args: root.unshard())


@contextlib.contextmanager
def full_params(*models):
    """Inside: every FSDP unit of `models` holds its full parameters across forwards, so forwards run no
    collective and ranks may run different numbers of them (generation, evaluation; no grad).
    One all-gather per unit on entry, resharded on exit. Memory: the full parameters, as for generation anyway."""
    if not enabled():
        yield
        return
    FSDPModule, _ = _fsdp()
    roots = [_root(m) for m in models if m is not None]
    units = [(u, u is root) for root in roots for u in root.modules() if isinstance(u, FSDPModule)]
    for unit, _ in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, is_root in units:
            unit.reshard()
            unit.set_reshard_after_forward(not is_root, recurse=False)  # FSDP's defaults: the root keeps its params


# ---------------------------------------------------------------------------------------------------------------------
# data split and lock-step micro-batches
def local_slice(items: list) -> list:
    """This rank's contiguous share of `items` (sizes differ by at most one); all of them without a group."""
    if not enabled():
        return items
    r, w, n = dist.get_rank(), dist.get_world_size(), len(items)
    if n < w:
        raise ValueError(f"{n} prompts cannot be split over {w} ranks: use a batch (and eval set) of at least "
                         f"{w} prompts")
    return items[r * n // w:(r + 1) * n // w]


def _all_reduce_host(values: list, op) -> list:
    t = torch.tensor(values, dtype=torch.float64)  # host tensor: gloo, no device sync
    dist.all_reduce(t, op=op)
    return t.tolist()


def sum_counts(*counts):
    """Host-side counts (tokens, sequences) summed over ranks; unchanged without a group."""
    if not enabled():
        return counts
    return tuple(type(c)(v) for c, v in zip(counts, _all_reduce_host(list(counts), dist.ReduceOp.SUM)))


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (e.g. a Ctrl-C seen by one rank: all must save at the same step)."""
    if not enabled():
        return bool(flag)
    return _all_reduce_host([float(bool(flag))], dist.ReduceOp.MAX)[0] > 0


def even_micro_batches(groups: list) -> list:
    """`groups` padded with [] to the largest number of micro-batches of any rank: each forward/backward holds
    FSDP collectives, so every rank must run as many. [] stands for an `idle_pass`."""
    if not enabled():
        return groups
    most = int(_all_reduce_host([len(groups)], dist.ReduceOp.MAX)[0])
    return groups + [[] for _ in range(most - len(groups))]


def idle_pass(forward, backward: bool = True) -> None:
    """The collectives that a rank with fewer micro-batches owes the others: `forward()` runs a forward on one of
    this rank's samples and returns the tensors that carry its graph (None entries are skipped); a zero through them
    is backpropagated. The zero gradient is exact (its upstream gradient is 0)."""
    outputs = [t for t in forward() if t is not None]
    if backward:
        sum(t.sum() * 0.0 for t in outputs).backward()


# ---------------------------------------------------------------------------------------------------------------------
# metrics
def reduce_totals(totals: dict) -> dict:
    """Per-rank totals of `Stepper.update` -> global values (one all-reduce per kind; call on every rank).

    Plain tensors are each rank's share of a global mean (the denominators are global): summed; ratio_max / min:
    max / min. DTensors (the grad norm from `clip_grad_norm_`) are already global: their local value is taken."""
    if not enabled():
        return totals
    out = {k: v.full_tensor() for k, v in totals.items() if _is_dtensor(v)}
    plain = [k for k in totals if k not in out]
    for op_name, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
        # sorted: the same keys on every rank (same code path, global nonfinite check), maybe inserted in another order
        keys = sorted(k for k in plain if _REDUCE_OPS.get(k, "sum") == op_name)
        if keys:
            stacked = torch.stack([totals[k].detach().double().cpu().reshape(()) for k in keys])  # log time: syncs
            dist.all_reduce(stacked, op=op)
            out.update(zip(keys, stacked.unbind()))
    return {k: out[k] for k in totals}


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def all_gather_cat(t: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's 1-D tensor (any length), concatenated in rank order, on the CPU; `t` itself without a group."""
    if not enabled() or t is None:
        return t
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts)


def all_gather_list(items: list) -> list:
    """Every rank's list of picklable items, concatenated in rank order; `items` itself without a group."""
    if not enabled():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def gather_step(samples: list, R: torch.Tensor, values: torch.Tensor | None):
    """The whole step's samples, rewards and values in rank order, for the step's metrics (after the update:
    `Sample.row` then no longer indexes the local rows)."""
    if not enabled():
        return samples, R, values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (samples, R.cpu(), None if values is None else values.detach().cpu()))
    samples = [s for p in parts for s in p[0]]
    R = torch.cat([p[1] for p in parts])
    values = None if values is None else torch.cat([p[2] for p in parts])
    return samples, R, values


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints: gather to rank 0 (the single-process layout), load full tensors into shards
def _full(t: torch.Tensor, keep: bool):
    """The full tensor of a DTensor (a collective: call on every rank in the same order), on the CPU where kept."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu() if keep else None


def _full_model_state(model) -> dict | None:
    """model.state_dict() with full tensors on rank 0 (None elsewhere); tied weights stay one tensor."""
    keep = is_main()
    out, seen = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():  # keep_vars: tied weights are the same object
        if id(t) not in seen:
            seen[id(t)] = _full(t, keep)
        out[name] = seen[id(t)]
    return out if keep else None


def _full_optimizer_state(optimizer) -> dict | None:
    state_dict = optimizer.state_dict()
    keep = is_main()
    state = {pid: {k: _full(v, keep) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for pid, s in state_dict["state"].items()}
    return {"state": state, "param_groups": state_dict["param_groups"]} if keep else None


def gather_for_checkpoint(*, policy, critic, value_head, optimizer) -> dict:
    """What `checkpoint.save` writes: state dicts of full tensors and the RNG states of ranks > 0.

    Without a group: {"policy": None (save_pretrained takes its own), "critic": None, "value_head": its
    state_dict, "optimizer": its state_dict, "rng": {}}. Under FSDP, a collective: every rank must call it; the
    dicts are filled on rank 0 (None elsewhere)."""
    if not enabled():
        return {"policy": None, "critic": None, "optimizer": optimizer.state_dict(), "rng": {},
                "value_head": None if value_head is None else value_head.state_dict()}
    out = {"policy": _full_model_state(policy), "critic": None if critic is None else _full_model_state(critic),
           "value_head": None if value_head is None else _full_model_state(value_head),
           "optimizer": _full_optimizer_state(optimizer)}
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    out["rng"] = {f"rng.{kind}.rank{r}": t for r, s in enumerate(states) if r > 0 for kind, t in s.items()}
    return out


def _like(full: torch.Tensor, ref):
    """`full` laid out like `ref`: the same DTensor shards (cut locally: every rank holds the full tensor)."""
    if not _is_dtensor(ref):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements,
                             src_data_rank=None)


def load_module(module, state_dict: dict) -> None:
    """module.load_state_dict of full tensors, into FSDP shards when the module is sharded."""
    if enabled():
        current = module.state_dict()
        state_dict = {k: _like(v, current[k]) if k in current else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict)


def load_optimizer(optimizer, state_dict: dict) -> None:
    """optimizer.load_state_dict of full states (the single-process layout), re-sharded like the parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if enabled() and len(params) == sum(len(g["params"]) for g in state_dict["param_groups"]):  # else torch says why
        state_dict = {"param_groups": state_dict["param_groups"], "state": {
            pid: {k: _like(v, params[int(pid)]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                  for k, v in s.items()} for pid, s in state_dict["state"].items()}}
    optimizer.load_state_dict(state_dict)


def restore_rank_rng(tensors: dict) -> None:
    """After rank 0's RNG state is restored on every rank: ranks > 0 take their own saved state, or (a checkpoint
    from fewer ranks) a seed drawn from rank 0's state plus the rank, so ranks never share sampling noise."""
    if not enabled() or dist.get_rank() == 0:
        return
    r = dist.get_rank()
    if f"rng.torch.rank{r}" in tensors:
        torch.set_rng_state(tensors[f"rng.torch.rank{r}"])
        if f"rng.cuda.rank{r}" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{r}"])
        return
    seed = int(torch.randint(0, 2 ** 62, (1,))) + r
    torch.manual_seed(seed)
