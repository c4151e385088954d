"""Fused log-prob and PPO-loss ops against their peers and against the three-GEMM floor, in one run on one GPU.

Workload: per-token log p(target) from hidden [N, H] and lm_head weight [V, H] (bf16), forward and backward with a
per-token upstream gradient (what a PPO/SPPO loss gives), at the issue's Qwen/Llama/Gemma shapes; and the whole
PPO loss (`ppo_clip_loss`, token ratio, per-sequence advantages) forward+backward and forward-only (the old-policy
scoring pass), for each of our impls. Every method runs in the same process on the same inputs, so the ratios
between rows are the result; absolute numbers belong to the GPU named in each row.

    python bench/bench_kernels.py                                    # the four issue shapes, bf16, CUDA
    python bench/bench_kernels.py --shapes qwen2.5-1.5b,llama3-8b    # a subset, by name
    python bench/bench_kernels.py --shapes 4096x2048x32000           # or N x H x V
    python bench/bench_kernels.py --methods ours,torch_naive         # method-name prefixes (floor always runs)
    python bench/bench_kernels.py --methods ours_ppo_loss_chunked:fwd+bwd,liger_flce   # ':MODE' picks one mode;
                                                                     # rows run in the order given
    python bench/bench_kernels.py --quick                            # CPU smoke test: N=64, H=32, V=257, fp32
    python bench/bench_kernels.py --cpu --isolate --shapes 2048x512x32000 --rep 5 --warmup 1 \
        --methods ours_ppo,torch --baseline-checkout /tmp/old      # CPU table: time + peak RSS per method
    python bench/bench_kernels.py --cpu --interleave --shapes 8192x512x32000 --methods ours_ppo_loss,torch_compile
                                                                   # round-robin timing on a shared machine

Method names: ours_ppo_loss_<impl> (grads in the forward on chunked/torch; composed on triton),
ours_ppo_recompute_<impl> (token_logprobs + ppo_clip_loss_from_logp: 4 GEMMs), ours_logprobs_<impl>, the peers
(torch_naive, torch_compile_naive = torch.compile of the naive PPO-shaped loss, torch_chunked_ckpt, torch_linear_ce =
torch's own `F.linear_cross_entropy` with its chunked path (torch >= 2.13), liger_*, cce_*), and floor_3gemm.
Modes: "fwd" (no_grad) and "fwd+bwd". `--methods` takes method-name prefixes, each optionally `:fwd` or `:fwd+bwd`;
the selected rows run in the order of the items that first match them (table order within one item), so a caller
with a time limit puts what matters most first.

Rows are appended to --out (JSONL, or CSV if the name ends in .csv); default
bench/results/kernels-<gpu>-<date>.jsonl, and a temp file in --quick mode (smoke-test timings are not figures).
Peers are optional: one that is not installed, runs out of memory or fails is recorded with a note and skipped.

Memory: on CUDA `peak_extra_gib` is the allocator's peak above what was allocated before the call (inputs, and the
previous call's grads, which the call frees first). On CPU, --isolate runs every (method, mode) in a fresh process
and records `peak_rss_mib` (the process's max RSS) and `peak_extra_rss_mib` (VmHWM after the runs minus VmRSS
right after the inputs were built and the peak was reset through /proc/self/clear_refs).
--baseline-checkout DIR also runs our methods from another checkout's code (e.g. `git worktree add DIR <sha>`
plus its sppo_fast/kernels symlink), labelled `<method>@<sha>`, in the same run.
"""
import argparse
import datetime
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/utils.py, when run as a script
from utils import _quantile, append_record, do_bench, environment, markdown_table  # noqa: E402

from sppo_fast.kernels import ppo_clip_loss, token_logprobs  # noqa: E402

SHAPES = {  # name: (N tokens, H, V)
    "qwen2.5-1.5b": (16384, 1536, 151936),
    "llama3-8b": (16384, 4096, 128256),
    "gemma2-2b-256k": (8192, 2304, 256000),
    "llama3-8b-64k": (65536, 4096, 128256),
}
QUICK_SHAPE = {"tiny": (64, 32, 257)}
FLOOR_CHUNK_ROWS = 16384  # the floor's GEMMs are timed on row chunks of this size (a 64k x 128k dZ is 16 GiB)
ERR_ROWS = 1024  # logp error is measured against an fp32 reference on the first rows only (full logits)
ENV_FIELDS = ["device", "torch", "cuda", "triton", "git_sha", "timestamp"]
CSV_FIELDS = ["bench", "shape", "N", "H", "V", "dtype", "method", "mode", "median_ms", "p20_ms", "p80_ms",
              "peak_extra_gib", "peak_rss_mib", "peak_extra_rss_mib", "x_floor", "max_abs_err_logp", "compile_s",
              "gemm_fwd_ms", "gemm_dx_ms", "gemm_dw_ms", "three_gemm_ms", "tflops_fwd", "reps", "skipped", "error",
              "code", "interleaved"] + ENV_FIELDS


# ---------------------------------------------------------------------------------------------------------------
# inputs
class Inputs:
    """One shape's tensors, shared by every method (each method gets fresh leaf copies of hidden/weight)."""

    def __init__(self, n, h, v, dtype, device, seq_len, seed=0):
        torch.manual_seed(seed)
        self.n, self.h, self.v, self.dtype, self.device = n, h, v, dtype, device
        self.hidden = (torch.randn(n, h, device=device) * 0.5).to(dtype)
        self.weight = (torch.randn(v, h, device=device) / math.sqrt(h)).to(dtype)
        self.targets = torch.randint(0, v, (n,), device=device)
        self.grad_logp = torch.randn(n, device=device)  # per-token upstream gradient, as a PPO loss gives
        # packed sequences of seq_len tokens (the last one shorter if seq_len does not divide n)
        self.seq_len = min(seq_len, n)
        bounds = list(range(0, n, self.seq_len)) + [n]
        self.cu_seqlens = torch.tensor(bounds, device=device, dtype=torch.int32)
        self.seq_advantages = torch.randn(len(bounds) - 1, device=device)
        rows = min(n, ERR_ROWS)
        self.ref_logp = torch.log_softmax(self.hidden[:rows].float() @ self.weight.float().T, -1) \
            .gather(1, self.targets[:rows, None])[:, 0]
        # old log-probs near the current ones, so that a few tokens are clipped (as mid-epoch)
        with torch.no_grad():
            logp = token_logprobs(self.hidden, self.weight, self.targets, impl="torch")
        self.old_logp = logp + 0.1 * torch.randn_like(logp)

    def leaves(self, grad=True):
        return self.hidden.clone().requires_grad_(grad), self.weight.clone().requires_grad_(grad)


class Skip(Exception):
    """A method that cannot run here (not installed, no CUDA); recorded as skipped with the reason."""


# ---------------------------------------------------------------------------------------------------------------
# methods: each builder returns fn() -> logp [N] (detached) or None, given leaf tensors h, w
def _naive_logp(h, w, t):
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])[:, 0]


def build_ours_logprobs(impl, backward):
    def build(x, h, w):
        if backward:
            def fn():
                logp = token_logprobs(h, w, x.targets, impl=impl)
                (logp * x.grad_logp).sum().backward()
                return logp.detach()
        else:
            def fn():
                with torch.no_grad():  # the old-policy scoring pass
                    return token_logprobs(h, w, x.targets, impl=impl)
        return fn
    return build


def build_ours_ppo(impl, backward):
    def build(x, h, w):
        if backward:
            def fn():
                loss, _ = ppo_clip_loss(h, w, x.targets, x.old_logp, x.seq_advantages, cu_seqlens=x.cu_seqlens,
                                        impl=impl)
                loss.backward()
        else:
            def fn():
                with torch.no_grad():  # forward-only: the loss and stats, one GEMM per chunk
                    ppo_clip_loss(h, w, x.targets, x.old_logp, x.seq_advantages, cu_seqlens=x.cu_seqlens,
                                  impl=impl)
        return fn
    return build


def build_ours_ppo_recompute(impl):
    """The composed route: token_logprobs (forward) + the loss on [N] vectors; the backward recomputes logits."""
    def build(x, h, w):
        from sppo_fast.kernels import ppo_clip_loss_from_logp

        def fn():
            logp, entropy = token_logprobs(h, w, x.targets, impl=impl, return_entropy=True)
            loss, _ = ppo_clip_loss_from_logp(logp, x.old_logp, x.seq_advantages, None, x.cu_seqlens,
                                              entropy=entropy.detach())
            loss.backward()
        return fn
    return build


def build_naive(backward):
    def build(x, h, w):
        if backward:
            def fn():
                logp = _naive_logp(h, w, x.targets)
                (logp * x.grad_logp).sum().backward()
                return logp.detach()
        else:
            def fn():
                with torch.no_grad():
                    return _naive_logp(h, w, x.targets)
        return fn
    return build


def build_compiled_naive(x, h, w):
    def loss_fn(h, w, t, g):
        # fp32 log-softmax of the full logits times a per-token upstream gradient: the naive PPO-shaped loss
        return (_naive_logp(h, w, t) * g).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, dynamic=False)

    def fn():
        compiled(h, w, x.targets, x.grad_logp).backward()
    return fn


def build_chunked_ckpt(x, h, w, chunk=4096):
    """verl/unsloth style: row chunks whose logits are recomputed in backward (activation checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, tc):
        return _naive_logp(hc, w, tc)

    def fn():
        logp = torch.cat([checkpoint(part, h[i:i + chunk], x.targets[i:i + chunk], use_reentrant=False)
                          for i in range(0, x.n, chunk)])
        (logp * x.grad_logp).sum().backward()
        return logp.detach()
    return fn


def build_liger_flce(x, h, w):
    if x.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Skip("liger-kernel's Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError as e:
        raise Skip(f"liger-kernel not importable: {e}")

    def fn():
        # reduction="none" gives -logp per token. Liger's backward only scales by a scalar (its grads are computed
        # in forward), so this is timed with a uniform upstream gradient: a timing peer, not an RL-correct grad.
        out = LigerFusedLinearCrossEntropyFunction.apply(h, w, x.targets, None, None, -100, 0.0, 0.0, "none")
        nll = out[0] if isinstance(out, tuple) else out
        nll.sum().backward()
        return -nll.detach().float()
    return fn


def build_liger_grpo(x, h, w):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise Skip(f"liger-kernel not importable: {e}")
    if x.n % x.seq_len:
        raise Skip(f"N={x.n} is not a multiple of the sequence length {x.seq_len} (Liger wants [B, T] inputs)")
    b = x.n // x.seq_len
    # the same RL op as ours: token-level clipped PPO loss, per-sequence advantages, no KL term
    loss_module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                           compiled=x.device == "cuda", chunk_size=1)
    mask = torch.ones(b, x.seq_len, device=x.device, dtype=torch.long)

    def fn():
        out = loss_module(h.view(b, x.seq_len, -1), w, x.targets.view(b, x.seq_len), mask, x.seq_advantages[:b],
                          old_per_token_logps=x.old_logp.view(b, x.seq_len))
        (out[0] if isinstance(out, tuple) else out).backward()
    return fn


def build_torch_linear_ce(x, h, w):
    """torch's own fused linear + cross-entropy on its chunked path (`options=LinearCrossEntropyOptions()`, torch >=
    2.13): the per-token NLL (reduction="none"), so the per-token upstream gradient applies as for CCE."""
    lce = getattr(torch.nn.functional, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if lce is None or options is None:
        raise Skip(f"not in this torch ({torch.__version__}): F.linear_cross_entropy with chunking is torch >= 2.13")
    opts = options()

    def fn():
        nll = lce(h, w, x.targets, reduction="none", options=opts)
        ((-nll) * x.grad_logp).sum().backward()
        return -nll.detach().float()

    # torch falls back to its unchunked reference path, with a warning, for what the chunked path does not support;
    # a fallback would be timed as the chunked op without this first call
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    fallback = [str(c.message) for c in caught if "ignored" in str(c.message)]
    if fallback:
        raise Skip(f"torch took its reference path, not the chunked one: {fallback[0][:200]}")
    return fn


def build_cce(filtered):
    def build(x, h, w):
        if x.device != "cuda":
            raise Skip("cut-cross-entropy needs CUDA")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise Skip(f"cut-cross-entropy not importable: {e}")
        # "exact" passes filter_eps=None; the default filters small gradient entries (approximate)
        kwargs = {} if filtered else {"filter_eps": None}

        def fn():
            nll = linear_cross_entropy(h, w, x.targets, reduction="none", **kwargs)
            ((-nll) * x.grad_logp).sum().backward()
            return -nll.detach().float()
        return fn
    return build


def method_table(device, interpret):
    """(method, mode, builder, needs grad). Triton runs on CUDA, or on CPU only under TRITON_INTERPRET=1."""
    triton_ok = device == "cuda" or interpret
    rows = []
    for impl in (["chunked", "triton"] if triton_ok else []) + ["torch"]:
        rows += [(f"ours_ppo_loss_{impl}", "fwd", build_ours_ppo(impl, False), False),
                 (f"ours_ppo_loss_{impl}", "fwd+bwd", build_ours_ppo(impl, True), True),
                 (f"ours_logprobs_{impl}", "fwd", build_ours_logprobs(impl, False), False),
                 (f"ours_logprobs_{impl}", "fwd+bwd", build_ours_logprobs(impl, True), True)]
        if impl != "triton":  # on triton ppo_clip_loss is this composed route already
            rows.append((f"ours_ppo_recompute_{impl}", "fwd+bwd", build_ours_ppo_recompute(impl), True))
    rows += [("torch_naive", "fwd", build_naive(False), False),
             ("torch_naive", "fwd+bwd", build_naive(True), True),
             ("torch_compile_naive", "fwd+bwd", build_compiled_naive, True),
             ("torch_chunked_ckpt", "fwd+bwd", build_chunked_ckpt, True),
             ("torch_linear_ce", "fwd+bwd", build_torch_linear_ce, True),
             ("liger_flce", "fwd+bwd", build_liger_flce, True),
             ("liger_grpo_loss", "fwd+bwd", build_liger_grpo, True),
             ("cce_exact", "fwd+bwd", build_cce(False), True),
             ("cce_filtered", "fwd+bwd", build_cce(True), True)]
    return rows


def select_methods(table, spec):
    """The rows of `table` that `spec` names, in its order. spec: None (every row) or comma-separated items, each a
    method-name prefix with an optional ':fwd' / ':fwd+bwd'; a row runs once, where the first item matching it is."""
    if spec is None:
        return list(table)
    chosen = []
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        prefix, _, mode = item.partition(":")
        if mode and mode not in ("fwd", "fwd+bwd"):
            raise SystemExit(f"--methods {item!r}: the mode after ':' is 'fwd' or 'fwd+bwd'")
        chosen += [row for row in table if row[0].startswith(prefix) and mode in ("", row[1]) and row not in chosen]
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# the floor: the three GEMMs any exact fwd+bwd must do (X W^T, dZ W, dZ^T X), cuBLAS via torch.matmul
def bench_floor(x, warmup, rep):
    rows = min(x.n, FLOOR_CHUNK_ROWS)
    scale = x.n / rows  # at 64k tokens: timed on 16k-row chunks and scaled, as a chunked kernel would run
    xs = x.hidden[:rows]
    dz = torch.randn(rows, x.v, device=x.device, dtype=x.dtype)
    fwd = do_bench(lambda: xs @ x.weight.T, warmup=warmup, rep=rep, device=x.device)["median_ms"] * scale
    dx = do_bench(lambda: dz @ x.weight, warmup=warmup, rep=rep, device=x.device)["median_ms"] * scale
    dw = do_bench(lambda: dz.T @ xs, warmup=warmup, rep=rep, device=x.device)["median_ms"] * scale
    del dz
    flop = 2 * x.n * x.h * x.v
    return {"gemm_fwd_ms": fwd, "gemm_dx_ms": dx, "gemm_dw_ms": dw, "three_gemm_ms": fwd + dx + dw,
            "tflops_fwd": flop / (fwd * 1e-3) / 1e12}


# ---------------------------------------------------------------------------------------------------------------
def parse_shapes(spec):
    shapes = {}
    for item in spec.split(","):
        item = item.strip()
        if item in SHAPES:
            shapes[item] = SHAPES[item]
        elif re.fullmatch(r"\d+x\d+x\d+", item):
            shapes[item] = tuple(int(d) for d in item.split("x"))
        else:
            raise SystemExit(f"unknown shape {item!r}: use one of {list(SHAPES)} or NxHxV")
    return shapes


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _proc_status_kib(key):
    """VmRSS / VmHWM of this process in KiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_method(x, method, mode, build, needs_grad, device, warmup, rep, floor, quick, rss=False):
    """One row: timing (do_bench), peak memory, logp error. Failures are recorded, not raised."""
    row = {"method": method, "mode": mode}
    if quick and method == "torch_compile_naive":
        return {**row, "skipped": "quick mode (compile time dominates)"}
    try:
        h_leaf, w_leaf = x.leaves(grad=needs_grad)
        fn = build(x, h_leaf, w_leaf)
        last = {}

        def run():
            last["out"] = fn()

        def reset_grads():
            h_leaf.grad = w_leaf.grad = None

        base_rss = None
        if rss:
            gc.collect()
            if _reset_peak_rss():
                base_rss = _proc_status_kib("VmRSS")
        if method == "torch_compile_naive":  # the first call compiles: time it apart
            t0 = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - t0
        row.update(do_bench(run, warmup=warmup, rep=rep, setup=reset_grads, device=device))
        if rss:
            hwm = _proc_status_kib("VmHWM")
            row["peak_rss_mib"] = None if hwm is None else hwm / 1024
            if base_rss is not None and hwm is not None:
                row["peak_extra_rss_mib"] = (hwm - base_rss) / 1024
        if floor is not None:
            row["x_floor"] = row["median_ms"] / floor["three_gemm_ms"]
        logp = last.get("out")
        if logp is not None:
            rows_checked = x.ref_logp.shape[0]
            row["max_abs_err_logp"] = (logp[:rows_checked].float() - x.ref_logp).abs().max().item()
    except Skip as e:
        row["skipped"] = str(e)
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # noqa: BLE001 - a failing peer is a result to record, not a crash
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def run_child(args, x, device, warmup, rep, interpret):
    """--child METHOD|MODE: one method in this fresh process; prints its row as JSON on the last line."""
    method, mode = args.child.split("|")
    for name, m, build, needs_grad in method_table(device, interpret):
        if name == method and m == mode:
            row = run_method(x, name, m, build, needs_grad, device, warmup, rep, None, False, rss=True)
            break
    else:
        row = {"method": method, "mode": mode, "error": "unknown method in this checkout"}
    print("CHILD_ROW " + json.dumps(row), flush=True)


def spawn_child(args, shape_spec, method, mode, pythonpath=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{method}|{mode}", "--shapes", shape_spec,
           "--warmup", str(args.warmup), "--rep", str(args.rep), "--seq-len", str(args.seq_len)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.cpu:
        cmd.append("--cpu")
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("CHILD_ROW "):
            return json.loads(line[len("CHILD_ROW "):])
    return {"method": method, "mode": mode, "error": f"child exited {proc.returncode}: {proc.stderr[-300:]}"}


def run_interleaved(x, table, device, warmup, rep, floor):
    """Round-robin timing of several methods in one process (A B C A B C ...): on a machine shared with other jobs
    the load drifts over minutes, and interleaving puts every method under the same drift. Time only: one
    process's peak memory cannot be split between methods."""
    fns, rows = [], []
    for method, mode, build, needs_grad in table:
        row = {"method": method, "mode": mode, "interleaved": True}
        try:
            h_leaf, w_leaf = x.leaves(grad=needs_grad)
            fns.append((row, build(x, h_leaf, w_leaf), h_leaf, w_leaf))
        except Skip as e:
            row["skipped"] = str(e)
        rows.append(row)
    times = {id(row): [] for row, *_ in fns}
    for i in range(warmup + rep):
        for row, fn, h_leaf, w_leaf in fns:
            h_leaf.grad = w_leaf.grad = None
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[id(row)].append((time.perf_counter() - t0) * 1e3)
    for row, *_ in fns:
        ts = sorted(times[id(row)])
        row.update(median_ms=_quantile(ts, 0.5), p20_ms=_quantile(ts, 0.2), p80_ms=_quantile(ts, 0.8), reps=len(ts))
        if floor is not None:
            row["x_floor"] = row["median_ms"] / floor["three_gemm_ms"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="names or NxHxV, comma-separated")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method-name prefixes, each optionally ':fwd' or ':fwd+bwd' (e.g. "
                             "ours_ppo_loss:fwd+bwd,liger), run in that order; default all; the 3-GEMM floor always "
                             "runs first")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="input dtype (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--seq-len", type=int, default=1024, help="packed sequence length for the PPO losses")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rep", type=int, default=10)
    parser.add_argument("--out", default=None, help="results file (.jsonl or .csv), appended to")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test at N=64, H=32, V=257 on the available device; skips torch.compile")
    parser.add_argument("--cpu", action="store_true",
                        help="run --shapes on the CPU even if a GPU is present (the CPU table; fp32 by default)")
    parser.add_argument("--isolate", action="store_true",
                        help="each (method, mode) in a fresh process, recording its peak RSS (for CPU memory)")
    parser.add_argument("--baseline-checkout", default=None, metavar="DIR",
                        help="also run our methods from the code in DIR (another checkout's root), each isolated")
    parser.add_argument("--interleave", action="store_true",
                        help="time the selected methods round-robin in one process (no memory figures)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.quick:
        shapes, warmup, rep, seq_len = QUICK_SHAPE, 1, 3, 16
        if device == "cpu":
            # at these sizes OpenMP's thread hand-off costs more than the work (tens of ms on a shared machine)
            torch.set_num_threads(1)
    else:
        if device != "cuda" and not args.cpu:
            raise SystemExit("the full benchmark needs a CUDA GPU; use --quick for a CPU smoke test, or --cpu")
        shapes, warmup, rep, seq_len = parse_shapes(args.shapes), args.warmup, args.rep, args.seq_len
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if device == "cpu" and interpret and dtype == torch.bfloat16:
        print("note: the Triton interpreter computes bf16 tl.dot wrongly; triton rows will be inaccurate",
              file=sys.stderr)

    if args.child:
        (n, h, v), = shapes.values()
        run_child(args, Inputs(n, h, v, dtype, device, seq_len), device, warmup, rep, interpret)
        return

    env = environment(device)
    date = datetime.date.today().isoformat()
    if args.out:
        out = args.out
    elif args.quick:
        out = os.path.join(tempfile.gettempdir(), f"sppo_bench_kernels_quick-{date}.jsonl")
    else:
        gpu = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels-{gpu}-{date}.jsonl")
    baseline_sha = None
    if args.baseline_checkout:
        # a git checkout's short SHA, else the directory's name (e.g. an extracted `git archive <sha>`)
        baseline_sha = subprocess.run(["git", "-C", args.baseline_checkout, "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip() \
            or os.path.basename(os.path.normpath(args.baseline_checkout))

    chosen = select_methods(method_table(device, interpret), args.methods)
    chosen_keys = {(name, mode) for name, mode, _, _ in chosen}
    # items that name no method here (ours_*_chunked/triton without CUDA or the interpreter) become skipped rows,
    # so that a results table says what was asked for and not run instead of leaving it out
    full_table = method_table("cuda", True)
    unmatched = [item.strip() for item in (args.methods or "").split(",") if item.strip() and not any(
        name.startswith(item.strip().partition(":")[0]) for name, _, _, _ in chosen)]
    unmatched = [(item, "needs CUDA or TRITON_INTERPRET=1" if select_methods(full_table, item) else "unknown method")
                 for item in unmatched]

    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | git {env['git_sha']} | "
          f"{dtype_name} | results -> {out}")
    for shape_name, (n, h, v) in shapes.items():
        base = {"bench": "kernels", "shape": shape_name, "N": n, "H": h, "V": v, "dtype": dtype_name, **env}
        rows = []

        def record(row):
            rec = {**base, **row}
            append_record(out, rec, fields=CSV_FIELDS)
            rows.append(rec)

        try:
            x = Inputs(n, h, v, dtype, device, seq_len)
        except torch.OutOfMemoryError:
            record({"method": "inputs", "error": "OOM"})
            continue

        floor = None  # always measured: every row is reported as a multiple of it
        try:
            floor = bench_floor(x, warmup, rep)
            record({"method": "floor_3gemm", "mode": "fwd+bwd", "median_ms": floor["three_gemm_ms"],
                    "x_floor": 1.0, **floor})
        except torch.OutOfMemoryError:
            record({"method": "floor_3gemm", "error": "OOM"})
        free_memory()

        for item, why in unmatched:
            record({"method": item.partition(":")[0], "mode": item.partition(":")[2] or None, "skipped": why})
        shape_spec = f"{n}x{h}x{v}"
        if args.interleave:
            for row in run_interleaved(x, chosen, device, warmup, rep, floor):
                record(row)
            table = []
        else:
            table = chosen
        for method, mode, build, needs_grad in table:
            if args.isolate and not args.quick:
                row = spawn_child(args, shape_spec, method, mode)
                if floor is not None and row.get("median_ms"):
                    row["x_floor"] = row["median_ms"] / floor["three_gemm_ms"]
            else:
                row = run_method(x, method, mode, build, needs_grad, device, warmup, rep, floor, args.quick)
            record(row)
            free_memory()
        if baseline_sha:
            for method, mode, _, _ in method_table(device, interpret):
                if method.startswith("ours_") and (method, mode) in chosen_keys:
                    row = spawn_child(args, shape_spec, method, mode, pythonpath=args.baseline_checkout)
                    if floor is not None and row.get("median_ms"):
                        row["x_floor"] = row["median_ms"] / floor["three_gemm_ms"]
                    record({**row, "method": f"{method}@{baseline_sha}", "code": baseline_sha})

        print(f"\n## {shape_name}: N={n}, H={h}, V={v}, {dtype_name}, {env['device']}\n")
        for r in rows:
            r["note"] = r.get("error") or r.get("skipped")
        print(markdown_table(rows, [("method", "method", None), ("mode", "mode", None),
                                    ("median ms", "median_ms", ".3g"), ("p20 ms", "p20_ms", ".3g"),
                                    ("p80 ms", "p80_ms", ".3g"), ("peak extra GiB", "peak_extra_gib", ".3f"),
                                    ("peak RSS MiB", "peak_rss_mib", ".0f"),
                                    ("RSS above inputs MiB", "peak_extra_rss_mib", ".0f"),
                                    ("x 3-GEMM floor", "x_floor", ".2f"), ("max err logp", "max_abs_err_logp", ".2e"),
                                    ("note", "note", None)]))
        del x
        free_memory()


if __name__ == "__main__":
    main()
