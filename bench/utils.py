"""Shared benchmark helpers: a `do_bench`-style timer (CUDA events, warm-up, median/p20/p80), the peak memory a
call allocates above its inputs, the run's environment (GPU, versions, git SHA, time), and JSONL/CSV appends.

Numbers are only comparable within one run on one GPU: rerun the baseline beside the method, never against a
figure from another machine or day.
"""
import csv
import datetime
import json
import os
import statistics
import subprocess
import time

import torch


# ---------------------------------------------------------------------------------------------------------------
# timing and memory
def _quantile(sorted_values, q):
    """Linear-interpolated quantile of an already sorted list (statistics.quantiles needs >= 2 points)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def do_bench(fn, *, warmup=3, rep=10, setup=None, device="cuda"):
    """Time `fn()` and measure its peak extra memory.

    setup: called before every call of fn, untimed (e.g. `h.grad = None`, so a backward allocates its grads anew
        each time, as in training, instead of accumulating into last iteration's buffers).
    Returns dict(median_ms, p20_ms, p80_ms, peak_extra_gib, reps). On CUDA each call is bracketed by CUDA events
    (GPU time, no host overhead in between); on CPU by perf_counter, and peak memory is not measured (None).

    Peak extra memory: torch.cuda.max_memory_allocated during one call, minus what was allocated before it (the
    inputs and anything the caller holds), so it counts logits, activations saved for backward, workspaces and the
    output grads, not the inputs.
    """
    cuda = device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda")

    def call():
        if setup is not None:
            setup()
        return fn()

    for _ in range(warmup):
        call()
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the caching allocator's free blocks are not "allocated": peak counts live tensors
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30

    times = []
    for _ in range(rep):
        if setup is not None:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # one sync per rep: the events bracket exactly one call
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8),
            "peak_extra_gib": peak, "reps": rep}


# ---------------------------------------------------------------------------------------------------------------
# environment
def device_name(device="cuda"):
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def git(*cmd):
    """`git CMD` in the repository holding this file: its stripped stdout, or None (no git, not a repo, an error)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_sha():
    """HEAD's SHA with '+dirty' when the tree has changes; None outside a repository or before the first commit."""
    sha = git("rev-parse", "--short=12", "HEAD")
    return None if sha is None else sha + ("+dirty" if git("status", "--porcelain") else "")


def environment(device="cuda"):
    """What a result row needs to be interpreted later: which GPU, which software, which code, when."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------------------
# output
def append_record(path, record, fields=None):
    """Append one result row: a JSON line for *.jsonl, a CSV row for *.csv. For CSV the header is written when the
    file is new, from `fields` (pass the full column list: rows of different kinds carry different keys) or else
    the row's own keys; an existing file keeps its header, keys outside it are dropped and missing ones left empty."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".csv"):
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        if exists:
            with open(path, newline="") as f:
                fields = next(csv.reader(f))
        else:
            fields = list(fields or record)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(record)
    else:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (header, key, format or None). Missing values print as '-'."""
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, fmt) if fmt and isinstance(value, (int, float)) else str(value)

    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)
