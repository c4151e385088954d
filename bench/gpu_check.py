"""The one-call GPU acceptance run: the headline figures first, in one device command (<= 540 s), so that a short GPU
window is spent measuring, not preparing, and a failure costs only the part it hits.

    python bench/gpu_check.py --out DIR --wheels .whl      # on a CUDA GPU: the plan below, within --time-limit s
    python bench/gpu_check.py --dry-run --out DIR          # CPU (CI): every script at tiny sizes (3 parts that
                                                           # rerun an earlier script are skipped: CI time)
    python bench/gpu_check.py --plan                       # print the plan (parts, budgets, start times, targets)
    python bench/gpu_check.py --out DIR --parts kernels_qwen,rollout_hf

Before any part (about 5-10 s together):
  wheels   every wheel in --wheels (bench/gpu_wheels.sh fills .whl/) installed offline into a private site dir that
           the parts see first on PYTHONPATH; one pip call, and where it fails one call per wheel, so a bad wheel is
           one line in summary.md and the run goes on without it
  probe    one subprocess: versions, free GPU memory, one cuBLAS `torch.mm(bf16, bf16, out_dtype=torch.float32)`
           GEMM (what kernels/chunked.py's 16-bit branch uses), the C compiler and Python.h that Triton needs to
           build its launcher at the first launch, then one launch of a trivial @triton.jit kernel. Its result is
           the first table of summary.md. On CUDA, a part that needs what the probe found missing is skipped with
           that reason (Triton, torchao, pytest) instead of failing slowly; the kernel parts fall back to the
           torch-only methods when Triton cannot launch.
Then the parts, by value (each a subprocess in its own process group under its own budget; rows are appended as
they go, so a part cut at its budget keeps what it finished; a part starts only with min(budget, 30 s) left):
  (a) kernels_qwen, kernels_llama: bench_kernels.py, one shape each (its own budget: the Llama shape is never
      starved by the Qwen shape's compile-heavy peers): the three-GEMM floor, our PPO loss fwd+bwd and log-probs
      fwd, then Liger FLCE, torch's F.linear_cross_entropy (chunked; torch >= 2.13), torch naive, CCE exact and
      filtered, and last torch.compile; time and peak extra memory
  (b) memory: bench_memory.py, the 1.5B full-parameter update at the rungs whose estimate is <= 20 GiB (offload,
      8bit); train: bench_train.py, SPPO (shared head) and PPO (critic LLM) under the same 8bit plan: peak ratio
  (c) rollout_hf: bench_rollout.py, hf backend tokens/s at the 1.5B shape
  rest: pytest (the CUDA test files: correctness first), qlora (issue 25's rung: NF4 base + LoRA, rollout and
      update peaks vs the planner at the 1.5B shape, then at 7B while its budget lasts), rollout_more (hf-static,
      paged), train_more (GRPO G=8, SPPO + separate critic), cli (the trainer's command line end to end),
      kernels_more (the other methods and shapes), memory_more (bf16 and ckpt rungs)
`PARTS` below holds each part's estimate (seconds on one H100/H200), its basis, its budget and the targets it
covers; `--plan` prints them, and tests/test_bench.py checks that the preamble and (a)-(c) fit in the first 300 s
by these estimates.

Outputs in DIR, rewritten as each part finishes (the device tool brings back at most 8 files):
  summary.md      the probe, the environment, the plan with each part's status, seconds and headline, the targets
                  with the parts that cover them and what was measured, then each part's tables
  results.jsonl   `wheels` and `env` (probe) rows, then per part its result rows and a `part` row
  logs.txt        every part's stdout + stderr, in order, under a header line

On the device machine there is no git: the SHA comes from --git-sha, else .whl/GIT_SHA (bench/gpu_wheels.sh).
bench/README.md has the exact device command.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PY = sys.executable

# The small model of the `cli` part: Qwen2 layout, a real vocab size (so the fused lm_head kernels do real work),
# built at random with the tiny model's character tokenizer by bench_train.build_random_model.
CLI_MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)
DRY_CLI_MODEL = dict(CLI_MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=512, max_position_embeddings=256)

# bench_kernels.py method selections (`--methods`: run in this order). The headline: ours and the floor (the floor
# always runs first), then the peers that cost little to start, then CCE (several Triton kernels to JIT), and last
# torch.compile (the anchors measured its compile at 18 s / 9 s on these shapes).
KERNEL_HEADLINE = ("ours_ppo_loss_chunked:fwd+bwd,ours_ppo_loss_triton:fwd+bwd,ours_logprobs_chunked:fwd,"
                   "ours_logprobs_triton:fwd,liger_flce,torch_linear_ce,torch_naive:fwd+bwd,cce_exact,cce_filtered,"
                   "torch_compile_naive")
# without a Triton launch: what runs on cuBLAS and torch alone (torch.compile emits Triton kernels)
KERNEL_TORCH_ONLY = "ours_ppo_loss_torch:fwd+bwd,ours_logprobs_torch:fwd,torch_linear_ce,torch_naive:fwd+bwd"
KERNEL_REST = ("ours_logprobs_chunked:fwd+bwd,ours_logprobs_triton:fwd+bwd,ours_ppo_loss_chunked:fwd,"
               "ours_ppo_loss_triton:fwd,ours_ppo_recompute,ours_ppo_loss_torch,ours_logprobs_torch,torch_naive:fwd,"
               "torch_chunked_ckpt,liger_grpo_loss")
# The memory rungs (sppo_fast/memory.py) whose estimate for bench_memory.py's default update (Qwen2-1.5B shape,
# 8 x (512 + 1536) tokens, CUDA) is <= 20 GiB: offload 12.3 GiB, 8bit 15.2 GiB; bf16 is 23.8 and ckpt 31.1
# (tests/test_bench.py recomputes these from memory.estimate). offload first: no compile, so its row is sure; 8bit
# then fills the inductor cache that the train part's 8bit plan reuses.
MEMORY_HEADLINE = ("offload", "8bit")
MEMORY_REST = ("bf16", "ckpt")
# The qlora part: (bench_memory.py --arch, --rollout-tokens) in order. The 1.5B shape first, so its rows are sure;
# the 7B (Qwen2.5-7B's shape) then runs in what is left of the part's budget, with fewer new tokens per rollout: its
# eager decode dequantizes 196 NF4 weights, 5x the 1.5B's values (6.5 B against 1.3 B), per token.
QLORA_RUNS = (("qwen2-1.5b", 128), ("qwen2.5-7b", 64))
QLORA_TOLERANCE = 0.10  # issue 25: measured peak within 10% of the planner's estimate
TRAIN_PLAN = "8bit"  # the train parts' memory plan, for every algorithm: the SPPO/PPO peak ratio at <= 20 GiB settings
TARGET_GIB = 20.0


# ---------------------------------------------------------------------------------------------------------------------
# The parts
@dataclass(frozen=True)
class Part:
    name: str
    tier: str  # "a" kernels, "b" memory, "c" rollout (the headline, in this order), "rest"
    estimate_s: int  # expected seconds on one H100/H200
    budget_s: int  # killed past this: about 1.5x the estimate, the estimates being unmeasured on a GPU
    basis: str  # where the estimate comes from
    covers: str  # the targets it measures (summary.md)
    build: Callable  # ctx -> list of argv lists, or a "skipped: ..." string
    read: Callable  # (ctx, log text) -> (rows, headline, markdown)
    needs: tuple = ()  # what the probe must have found on CUDA: "triton", "torchao", "pytest"
    dry: bool = True  # False: the dry run skips it (the same script as an earlier part, other settings: CI time)


# Costs shared by the estimates: a part's process start (python, torch, transformers, CUDA context) ~8 s; Triton JIT
# ~2 s per kernel variant of host CPU; the anchors (shared/anchors/README.md, H200, same software) for GEMM, peer
# and torch.compile times. Nothing of ours has run on a GPU yet: the first run's seconds column replaces these.
PREAMBLE = (  # (name, estimate s, budget s, basis): they run before every part and count against --time-limit
    ("wheels", 3, 60, "one offline pip call for 7 wheels (6 MiB): measured 1.1 s on the 2-core CPU here"),
    ("probe", 8, 40, "torch import ~3 s, CUDA context ~1 s, one small GEMM, one Triton JIT + gcc launcher build "
                     "~3 s"),
)


KERNEL_REPS = ["--warmup", "1", "--rep", "5"]  # 7 calls per row: 1 warm-up, 1 for peak memory, 5 timed


def part_kernels(shape, methods_cuda, dry_methods):
    def build(ctx):
        out = str(ctx["work"] / f"{ctx['part']}.jsonl")
        if ctx["dry"]:
            return [[PY, "bench/bench_kernels.py", "--quick", "--methods", dry_methods, "--out", out]]
        methods = methods_cuda if ctx["probe"].get("triton_launch") == "ok" else KERNEL_TORCH_ONLY
        return [[PY, "bench/bench_kernels.py", "--shapes", shape, "--methods", methods, "--out", out, *KERNEL_REPS]]
    return build


def part_kernels_more(ctx):
    out = str(ctx["work"] / f"{ctx['part']}.jsonl")
    if ctx["dry"]:
        return [[PY, "bench/bench_kernels.py", "--quick", "--methods", KERNEL_REST, "--out", out]]
    return [[PY, "bench/bench_kernels.py", "--shapes", "qwen2.5-1.5b,llama3-8b", "--methods", KERNEL_REST, "--out",
             out, *KERNEL_REPS],
            [PY, "bench/bench_kernels.py", "--shapes", "gemma2-2b-256k,llama3-8b-64k", "--methods", KERNEL_HEADLINE,
             "--out", out, *KERNEL_REPS]]


def part_memory(settings, dry_settings):
    def build(ctx):
        out = str(ctx["work"] / ctx["part"])
        if ctx["dry"]:
            return [[PY, "bench/bench_memory.py", "--quick", "--settings", dry_settings, "--out", out]]
        return [[PY, "bench/bench_memory.py", "--steps", "2", "--settings", ",".join(settings), "--out", out]]
    return build


def part_train(algos, dry_algos):
    def build(ctx):
        out = str(ctx["work"] / ctx["part"])
        if ctx["dry"]:
            return [[PY, "bench/bench_train.py", "--quick", "--algos", dry_algos, "--memory-plan", TRAIN_PLAN,
                     "--batch-size", "8", "--max-new-tokens", "4", "--out", out]]
        # same prompts per step for every algorithm (GRPO: 16 prompts x 8), fixed-length 128-token rollouts
        return [[PY, "bench/bench_train.py", "--arch", "qwen2-1.5b", "--algos", algos, "--memory-plan", TRAIN_PLAN,
                 "--batch-size", "16", "--grpo-prompts", "equal", "--max-new-tokens", "128", "--steps", "2",
                 "--timeout", str(int(ctx["budget"] * 0.7)), "--train-arg=--min-new-tokens=128", "--out", out]]
    return build


def part_rollout(backends):
    def build(ctx):
        out = str(ctx["work"] / f"{ctx['part']}.jsonl")
        if ctx["dry"]:
            return [[PY, "bench/bench_rollout.py", "--arch", "tiny", "--batch", "4", "--new-tokens", "8",
                     "--prompt-chars", "0", "--device", "cpu", "--threads", "1", "--no-isolate", "--backends",
                     backends, "--out", out]]
        return [[PY, "bench/bench_rollout.py", "--arch", "qwen2-1.5b", "--batch", "64", "--new-tokens", "1024",
                 "--backends", backends, "--timeout", str(int(ctx["budget"]) - 5), "--time-limit",
                 str(int(ctx["budget"]) - 5), "--out", out]]
    return build


def part_qlora(ctx):
    out = str(ctx["work"] / ctx["part"])
    if ctx["dry"]:  # the tiny shape, both phases; the 7B has no CPU size (tests/test_bench.py checks its estimate)
        return [[PY, "bench/bench_memory.py", "--quick", "--settings", "qlora", "--rollout-tokens", "8", "--out", out]]
    # bench_memory stops itself 10 s before the part's budget ends (its rows keep what was measured, and its exit is
    # clean), so a 7B run that cannot finish costs only its own rows, never the 1.5B's or the part's status
    stop_at = f"{time.time() + ctx['budget'] - 10:.0f}"
    return [[PY, "bench/bench_memory.py", "--settings", "qlora", "--arch", arch, "--steps", "2", "--rollout-tokens",
             str(new_tokens), "--stop-at", stop_at, "--out", out] for arch, new_tokens in QLORA_RUNS]


def part_pytest(ctx):
    if not ctx["cuda"]:
        return "skipped: no CUDA"
    files = [f"tests/{name}" for name in ("test_logprobs.py", "test_ppo_loss.py", "test_seq_sum.py", "test_memory.py")
             if (REPO / "tests" / name).is_file()]
    # -v: one line per test as it finishes, so that a part killed at its budget still says what passed
    return [[PY, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", *files]]


def part_cli(ctx):
    w, dry = ctx["work"], ctx["dry"]
    cfg = DRY_CLI_MODEL if dry else CLI_MODEL
    build = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'bench'); "
             "from bench_train import build_random_model; "
             f"build_random_model(Path({str(w / 'cli_model')!r}), json.loads({json.dumps(json.dumps(cfg))}))")
    flags = ["--model", str(w / "cli_model"), "--steps", "2" if dry else "10", "--batch-size", "4" if dry else "32",
             "--max-new-tokens", "8" if dry else "128", "--max-prompt-tokens", "64", "--eval-size", "4",
             "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--no-progress", "--no-tensorboard",
             "--out-dir", str(w / "cli_runs"), "--run-name", "cli", "--lr", "1e-6", "--gradient-checkpointing"]
    if ctx["cuda"]:  # bf16 autocast and Liger act on CUDA only; the budget also caps the process's CUDA memory
        flags += ["--bf16", "--memory-budget", "12GiB"] + (["--liger"] if ctx["probe"].get("liger_kernel") else [])
    else:  # the budget still picks the plan (and its report) on CPU
        flags += ["--device", "cpu", "--threads", "1", "--memory-budget", "2GiB"]
    return [[PY, "-c", build], [PY, "-m", "sppo_fast.train", *flags]]


# ---------------------------------------------------------------------------------------------------------------------
# Reading each part's results back: (rows for results.jsonl, headline string, markdown for summary.md)
def jsonl(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def f(x, spec=".2f"):
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def table(rows, cols):
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(fn(r)).replace("|", "/").replace("\n", " ") for _, fn in cols) + " |"
              for r in rows]
    return "\n".join(lines)


def read_pytest(ctx, log):
    summary = re.findall(r"^=+ (.*(?:passed|failed|error|skipped).*) in [\d.]+s", log, re.M)
    if summary:  # pytest's own last line
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)",
                                                     summary[-1])}
    else:  # killed before it: count the -v lines
        counts = {}
        for k in re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", log):
            counts[k.lower()] = counts.get(k.lower(), 0) + 1
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.M)))
    row = {"counts": counts, "failed": failed}
    return [row], ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line", (
        "Failed: " + ", ".join(failed) if failed else "")


def read_cli(ctx, log):
    metrics = jsonl(ctx["work"] / "cli_runs" / "cli" / "metrics.jsonl")
    steps = [m for m in metrics if "losses/policy" in m]
    if not steps:
        return [], "no training step logged", ""
    import math
    finite = all(math.isfinite(m["losses/policy"]) for m in steps)
    tok = sorted(m["perf/tokens_per_s"] for m in steps[1:] or steps)
    peak = max((m.get("memory/update_peak_gib") or 0) for m in steps) or None
    row = {"steps": len(steps), "finite_losses": finite, "median_tokens_per_s": tok[len(tok) // 2],
           "update_peak_gib": peak, "rollout_peak_gib": max((m.get("memory/rollout_peak_gib") or 0) for m in steps)
           or None, "last": {k: v for k, v in steps[-1].items() if isinstance(v, (int, float))}}
    report = ctx["work"] / "cli_runs" / "cli" / "memory_report.txt"
    md = f"```\n{report.read_text().strip()}\n```" if report.is_file() else ""
    return [row], (f"{len(steps)} steps, losses {'finite' if finite else 'NOT FINITE'}, "
                   f"{row['median_tokens_per_s']:.0f} tok/s, update peak {f(peak)} GiB"), md


def kernel_headline(rows):
    """Per shape: our PPO loss fwd+bwd (chunked, else the fastest of ours) against the fastest peer fwd+bwd."""
    parts = []
    for shape in dict.fromkeys(r.get("shape") for r in rows):
        timed = [r for r in rows if r.get("shape") == shape and r.get("mode") == "fwd+bwd" and r.get("median_ms")
                 and r.get("method") != "floor_3gemm"]
        ours = sorted((r for r in timed if r["method"].startswith("ours_ppo_loss")),
                      key=lambda r: (r["method"] != "ours_ppo_loss_chunked", r["median_ms"]))
        peers = sorted((r for r in timed if not r["method"].startswith("ours_")), key=lambda r: r["median_ms"])
        say = lambda r: (f"{r['method']} {r['median_ms']:.1f} ms ({f(r.get('x_floor'))}x floor, "
                         f"{f(r.get('peak_extra_gib'), '.2f')} GiB)")
        if ours or peers:
            parts.append(f"{shape}: " + "; ".join(([say(ours[0])] if ours else []) +
                                                 ([f"fastest peer {say(peers[0])}"] if peers else [])))
    return parts


def read_kernels(ctx, log):
    rows = jsonl(ctx["work"] / f"{ctx['part']}.jsonl")
    bad = [r for r in rows if r.get("error")]
    md = table(rows, [("shape", lambda r: f(r.get("shape"))), ("method", lambda r: f(r.get("method"))),
                      ("mode", lambda r: f(r.get("mode"))), ("median ms", lambda r: f(r.get("median_ms"), ".2f")),
                      ("x floor", lambda r: f(r.get("x_floor"))),
                      ("peak extra GiB", lambda r: f(r.get("peak_extra_gib"), ".3f")),
                      ("compile s", lambda r: f(r.get("compile_s"), ".1f")),
                      ("max err logp", lambda r: f(r.get("max_abs_err_logp"), ".1e")),
                      ("note", lambda r: f(r.get("skipped") or r.get("error") or ""))]) if rows else ""
    head = " | ".join(kernel_headline(rows))
    return rows, (head or "no timed rows") + (f"; {len(bad)} errors" if bad else ""), md


def read_rollout(ctx, log):
    rows = jsonl(ctx["work"] / f"{ctx['part']}.jsonl")
    backends = [r for r in rows if r.get("kind") == "backend"]
    # x hf: against hf in this part, else in rollout_hf (same GPU, same run)
    hf = next((r for r in backends + ctx["rows"].get("rollout_hf", []) if r.get("kind") == "backend"
               and r.get("backend") == "hf" and r.get("tok_per_s")), None)
    for r in backends:
        if hf and r.get("tok_per_s"):
            r["x_hf"] = r["tok_per_s"] / hf["tok_per_s"]
    head = ", ".join(f"{r['backend']} {r['tok_per_s']:.0f} tok/s ({f(r.get('x_hf'))}x hf)" if "error" not in r
                     else f"{r['backend']} {r['error']}" for r in backends)
    md = table(backends, [("backend", lambda r: r["backend"]), ("tok/s", lambda r: f(r.get("tok_per_s"), ".0f")),
                          ("x hf", lambda r: f(r.get("x_hf"))), ("median s", lambda r: f(r.get("median_s"), ".2f")),
                          ("first call s", lambda r: f(r.get("first_call_s"), ".1f")),
                          ("resp len", lambda r: f(r.get("response_len_mean"), ".0f")),
                          ("peak GiB", lambda r: f(r.get("peak_gib"))), ("error", lambda r: f(r.get("error", "")))])
    return rows, head or "no rows", md if backends else ""


def read_memory(ctx, log):
    rows = [r for p in sorted((ctx["work"] / ctx["part"]).glob("*.jsonl")) for r in jsonl(p)]
    head = ", ".join(f"{r['setting']} {f(r.get('peak_update_gib'))} GiB (est. {f(r.get('estimate_update_gib'))}) / "
                     f"{f(r.get('step_s'), '.2f')} s" if "error" not in r else f"{r['setting']} {r['error'][:60]}"
                     for r in rows)
    mds = sorted((ctx["work"] / ctx["part"]).glob("*.md"))
    return rows, head or "no rows", mds[0].read_text().strip() if mds else ""


def read_qlora(ctx, log):
    rows = [r for p in sorted((ctx["work"] / ctx["part"]).glob("*.jsonl")) for r in jsonl(p)]
    arch_order = [arch for arch, _ in QLORA_RUNS]
    rows.sort(key=lambda r: arch_order.index(r["arch"]) if r.get("arch") in arch_order else -1)
    say = lambda r: (f"{r.get('arch')}: rollout {f(r.get('peak_rollout_gib'))}/{f(r.get('estimate_rollout_gib'))} GiB"
                     f" (x{f(r.get('ratio_rollout'), '.3f')}), update {f(r.get('peak_update_gib'))}/"
                     f"{f(r.get('estimate_update_gib'))} GiB (x{f(r.get('ratio_update'), '.3f')}), "
                     f"{f(r.get('step_s'), '.2f')} s/update" + "".join(
                         f"; {r[k][:80]}" for k in ("rollout_error", "stopped", "error") if r.get(k)))
    mds = sorted((ctx["work"] / ctx["part"]).glob("*.md"), key=lambda p: "7b" in p.name)
    return rows, "; ".join(say(r) for r in rows) or "no rows", "\n\n".join(p.read_text().strip() for p in mds)


def read_train(ctx, log):
    rows = jsonl(ctx["work"] / f"{ctx['part']}.jsonl")
    algos = [r for r in rows if r.get("kind") == "algo"]
    head = ", ".join(f"{r['algo']} {f(r.get('prompts_per_s'))} prompts/s peak {f(r.get('peak_gib'))} GiB"
                     if "error" not in r else f"{r['algo']} {r['error']}" for r in algos)
    md = ctx["work"] / f"{ctx['part']}.md"
    return rows, head or "no rows", md.read_text().strip() if md.is_file() else ""


_K = "time and peak extra memory of our PPO loss fwd+bwd and log-probs fwd vs the three-GEMM floor and the peers " \
     "(Liger FLCE, CCE exact/filtered, torch.compile, torch naive, F.linear_cross_entropy chunked) at "
PARTS = [
    Part("kernels_qwen", "a", 65, 100,
         "start 8 s; inputs + floor 3 s; ~12 Triton kernel variants JIT (ours chunked/triton, Liger, CCE) 24 s; "
         "torch.compile 18 s (anchors); 7 calls per row at the anchors' ms ~8 s",
         _K + "the Qwen shape (16384, 1536, 151936)", part_kernels("qwen2.5-1.5b", KERNEL_HEADLINE, KERNEL_HEADLINE),
         read_kernels),
    Part("kernels_llama", "a", 40, 60,
         "start 8 s; inputs + floor 4 s; Triton kernels mostly from the disk cache kernels_qwen filled (same "
         "constexprs) ~4 s; torch.compile 9 s (anchors); 7 calls per row at the anchors' ms ~10 s",
         _K + "the Llama-3 shape (16384, 4096, 128256)", part_kernels("llama3-8b", KERNEL_HEADLINE, KERNEL_HEADLINE),
         read_kernels, dry=False),
    Part("memory", "b", 60, 85,
         "start 8 s; random init of 1.54 B params on the GPU ~3 s per rung; Liger's RMSNorm/SwiGLU/RoPE and our "
         "row-pass variants for the trainer's flags: Triton JIT ~6 s; offload: 2 steps x (0.6 s fwd+bwd, "
         "anchors' 0.56 s at this shape, + ~3 s host AdamW over 1.54 B fp32 states); 8bit: torchao compiles its step "
         "per parameter signature, 9 here (tests/test_bench.py counts them on the meta model) x ~3 s + inductor "
         "import 5 s",
         f"the 1.5B full-parameter update <= {TARGET_GIB:.0f} GiB: peak vs estimate at the rungs that can meet it "
         f"({', '.join(MEMORY_HEADLINE)})", part_memory(MEMORY_HEADLINE, "8bit"), read_memory, ("triton", "torchao")),
    Part("train", "b", 75, 110,
         "build + save the random 1.54 B model (3 GiB bf16) 8 s; per algorithm: start + load 12 s, the 8bit step's "
         "9 compiles from the inductor cache the memory part filled ~10 s, 2 steps x (16 x 128-token eager decode "
         "~3 s + update 1 s): SPPO ~30 s, PPO (a second decoder, same signatures) ~35 s",
         f"SPPO (shared head) vs PPO (critic LLM) peak memory under the same {TRAIN_PLAN} plan (SPPO <= 0.55x PPO; "
         f"SPPO <= {TARGET_GIB:.0f} GiB), value-function memory <= 1% of PPO's critic",
         part_train("sppo,ppo", "sppo"), read_train, ("triton", "torchao")),
    Part("rollout_hf", "c", 40, 60,
         "start 8 s; random init 3 s; a 16-token warm-up; one call of 64 x 1024 new tokens: 1024 eager decode steps "
         "of a 28-layer model at ~25 ms (launch-bound) ~26 s",
         "rollout tokens/s of the hf backend (the trainer's CUDA default) at the 1.5B shape, 64 x 1024",
         part_rollout("hf"), read_rollout),
    Part("pytest", "rest", 60, 90,
         "the four CUDA test files at realistic sizes: unmeasured on a GPU; on the CPU they take minutes under the "
         "Triton interpreter, which the GPU replaces",
         "our kernels' correctness on the GPU, bf16 included; the memory plans' optimizers on CUDA", part_pytest,
         read_pytest, ("pytest", "triton")),
    Part("qlora", "rest", 85, 130,
         "1.5B: start 8 s; random init in bf16 on the GPU 2 s, NF4 quantization of its 196 weights (torchao, 1 M "
         "elements per chunk) ~3 s, peft wrap 1 s; Triton JIT of the trainer's kernels at this shape ~6 s; 2 steps x "
         "(rollout 8 x 128 new tokens, eager decode dequantizing every NF4 weight per token ~35 ms/token ~5 s + "
         "update 8 x 2048 tokens, 3 forward-sized passes of 1.5 B ~2 s): ~35 s. 7B: start 8 s; init 7.6 B bf16 on "
         "the GPU (15 GB for a moment) 3 s + quantization ~5 s; JIT ~4 s; 2 x (8 x 64 new tokens at ~90 ms/token, "
         "the dequantization's int64 code tensors moving ~100 GB per token, ~6 s + update ~5 s): ~50 s, cut "
         "cleanly 10 s before the budget ends",
         f"issue 25's qlora rung (NF4 base + LoRA + value head): rollout and update peaks vs the planner's estimate "
         f"(within {QLORA_TOLERANCE:.0%}) and step time, at the 1.5B shape, then at 7B (Qwen2.5-7B) if the budget "
         f"allows", part_qlora, read_qlora, ("triton", "torchao", "peft")),
    Part("rollout_more", "rest", 100, 130,
         "hf-static: torch.compile (reduce-overhead, CUDA graphs) of the decode step ~60 s + one call ~10 s; paged: "
         "~30 s; starts 2 x 8 s",
         "hf-static and paged tokens/s vs hf: which backend `auto` should pick on CUDA",
         part_rollout("hf-static,paged"),
         read_rollout, ("triton",)),
    Part("train_more", "rest", 80, 110,
         "as train: GRPO G=8 (16 prompts x 8: a 128-sequence rollout) ~40 s, SPPO + separate critic ~35 s",
         "SPPO prompts/s >= 4x GRPO G=8's (with train's SPPO row); the separate critic's cost",
         part_train("grpo8,sppo_critic", "grpo8"), read_train, ("triton", "torchao"), dry=False),
    Part("cli", "rest", 40, 60,
         "start + model build 12 s; 10 steps of 32 x 128 tokens on a 4-layer model ~25 s",
         "the user path end to end on CUDA: `python -m sppo_fast.train` with --bf16 --liger --memory-budget",
         part_cli, read_cli, ("triton",)),
    Part("kernels_more", "rest", 90, 120,
         "two commands, 4 shapes: the methods not in the headline, then the headline methods at the Gemma 256k and "
         "64k-token shapes; runs until cut",
         "the other methods (torch impl, recompute route, chunked checkpointing, Liger GRPO loss) and shapes",
         part_kernels_more, read_kernels),
    Part("memory_more", "rest", 60, 90,
         "as memory: bf16 (9 compiles, ~35 s) and ckpt (fp32 torch AdamW, no compile, ~10 s)",
         "the rungs above 20 GiB (bf16, ckpt): measured peak vs estimate", part_memory(MEMORY_REST, "baseline"),
         read_memory, ("triton", "torchao"), dry=False),
]
PART_BY_NAME = {p.name: p for p in PARTS}
TIME_LIMIT = 540  # s: 60 s under the device's 10-minute command limit, for the interpreter start and the summary
HEADLINE_WINDOW = 300  # s: the preamble and tiers a-c must fit in it by their estimates
DRY_BUDGET = 180  # per part, on a shared 2-core CPU


def plan(parts=None):
    """Rows (name, tier, estimate, budget, start by the estimates, start if every earlier step used its budget,
    covers, basis), in running order, the preamble first."""
    rows, t_est, t_bud = [], 0, 0
    for name, est, bud, basis in PREAMBLE:
        rows.append(dict(name=name, tier="-", estimate_s=est, budget_s=bud, start_s=t_est, worst_start_s=t_bud,
                         covers="", basis=basis))
        t_est, t_bud = t_est + est, t_bud + bud
    for p in parts or PARTS:
        rows.append(dict(name=p.name, tier=p.tier, estimate_s=p.estimate_s, budget_s=p.budget_s, start_s=t_est,
                         worst_start_s=t_bud, covers=p.covers, basis=p.basis))
        t_est, t_bud = t_est + p.estimate_s, t_bud + p.budget_s
    return rows


def plan_text(parts=None, time_limit=TIME_LIMIT):
    rows = plan(parts)
    head = [r for r in rows if r["tier"] in ("-", "a", "b", "c")]
    end = max(r["start_s"] + r["estimate_s"] for r in head)
    lines = [f"Plan (seconds on one H100/H200; --time-limit {time_limit:.0f}; the preamble and tiers a-c end at "
             f"{end} s by the estimates, within the first {HEADLINE_WINDOW} s):",
             table(rows, [("part", lambda r: r["name"]), ("tier", lambda r: r["tier"]),
                          ("est s", lambda r: r["estimate_s"]), ("budget s", lambda r: r["budget_s"]),
                          ("starts at s", lambda r: r["start_s"]),
                          ("at worst", lambda r: r["worst_start_s"]),
                          ("covers", lambda r: r["covers"] or "(before every part)")]),
             "'starts at': by the estimates; 'at worst': if every earlier step ran to its budget. A part starts only "
             "with min(budget, 30 s) of the time limit left.", "", "Bases of the estimates:"]
    lines += [f"- {r['name']}: {r['basis']}" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Wheels and the probe
def install_wheels(wheel_dir, site, env, timeout=120):
    """Every *.whl in wheel_dir into `site`, offline and without dependencies. One pip call; if it fails, one call
    per wheel, so that one bad wheel costs only itself. Two wheels of one project would make pip refuse the whole
    call: the later name (sorted) is kept and the clash reported. Returns result rows (wheel, status)."""
    wheels = sorted(Path(wheel_dir).glob("*.whl")) if wheel_dir else []
    if not wheels:
        return []
    rows, keep = [], {}
    for w in wheels:
        project = re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower()
        if project in keep:
            rows.append({"wheel": keep[project].name, "status": f"skipped: another wheel of {project} ({w.name})"})
        keep[project] = w
    wheels = list(keep.values())
    Path(site).mkdir(parents=True, exist_ok=True)
    pip = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
           "--target", str(site)]
    env = {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def call(args):
        try:
            proc = subprocess.run(pip + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                                  env=env)
            return proc.returncode, (proc.stderr or proc.stdout).strip()
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"{type(err).__name__}: {err}"

    rc, err = call(wheels)
    if rc == 0:
        return rows + [{"wheel": w.name, "status": "installed"} for w in wheels]
    for w in wheels:
        rc, err = call([w])
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING: Location")]
        rows.append({"wheel": w.name, "status": "installed" if rc == 0 else
                     f"failed (pip rc {rc}): {' '.join(lines)[-300:]}"})
    return rows


PROBE = r'''
import importlib.metadata as md, json, os, platform, shutil, sys, sysconfig, time

T0 = time.perf_counter()


def emit(**kw):  # one line per stage: a probe killed at its timeout still says how far it got
    print("PROBE " + json.dumps({**kw, "probe_s": round(time.perf_counter() - T0, 2)}), flush=True)


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# What Triton (3.x, triton/runtime/build.py) needs to build its launcher at the first launch: a C compiler ($CC,
# else gcc, else clang) and the Python headers of the interpreter's scheme.
scheme = sysconfig.get_default_scheme()
scheme = "posix_prefix" if scheme == "posix_local" else scheme
python_h = os.path.join(sysconfig.get_paths(scheme=scheme)["include"], "Python.h")
emit(python=platform.python_version(), cc=os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"),
     python_h=python_h if os.path.isfile(python_h) else f"missing: {python_h}")

import torch

cuda = torch.cuda.is_available()
info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None}
for name in ("triton", "transformers", "peft", "numpy", "liger-kernel", "cut-cross-entropy", "torchao",
             "math-verify", "flash-attn", "trl", "pytest"):
    info[name.replace("-", "_")] = version(name)
if cuda:
    free, total = torch.cuda.mem_get_info()
    info.update(free_gib=round(free / 2**30, 1), total_gib=round(total / 2**30, 1))
emit(**info)

if cuda:
    # the 16-bit chunk GEMMs of kernels/chunked.py: fp32 output straight from bf16 operands, and fp32 accumulation
    # in place (without them its _cuda_supports probe falls back to converting weight blocks: correct, slower)
    t = time.perf_counter()
    try:
        a = torch.randn(256, 512, device="cuda").bfloat16()
        b = torch.randn(512, 384, device="cuda").bfloat16()
        want = a.float() @ b.float()
        got = torch.mm(a, b, out_dtype=torch.float32)
        acc = torch.ones(256, 384, device="cuda")
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        ok = (got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-2, rtol=1e-2)
              and torch.allclose(acc, want + 1, atol=1e-2, rtol=1e-2))
        gemm = "ok" if ok else "wrong result"
    except Exception as err:
        gemm = f"{type(err).__name__}: {str(err)[:300]}"
    emit(cublas_out_dtype=gemm, cublas_s=round(time.perf_counter() - t, 2))
    t = time.perf_counter()
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _add_one(X, Y, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < n) + 1.0, mask=offs < n)

        x = torch.arange(1000, device="cuda", dtype=torch.float32)
        y = torch.zeros_like(x)
        _add_one[(4,)](x, y, 1000, BLOCK=256)
        torch.cuda.synchronize()
        launch = "ok" if torch.equal(y, x + 1) else "wrong result"
    except Exception as err:
        launch = f"{type(err).__name__}: {str(err)[:400]}"
    emit(triton_launch=launch, triton_s=round(time.perf_counter() - t, 2))
else:
    emit(cublas_out_dtype="skipped: no CUDA", triton_launch="skipped: no CUDA")
try:
    import sppo_fast.kernels  # the package mapping kernels/ -> sppo_fast.kernels must resolve
    emit(sppo_fast_kernels="ok")
except Exception as err:
    emit(sppo_fast_kernels=f"{type(err).__name__}: {err}")
'''


def run_probe(work, env, timeout):
    """The probe in a subprocess: (merged result dict, log text). A crash or a timeout keeps the stages before it."""
    script = work / "probe.py"  # a file, not `-c`: triton.jit reads its kernel's source with inspect
    script.write_text(PROBE)
    try:
        proc = subprocess.run([PY, str(script)], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                       for x in (err.stdout, err.stderr))
        rc = f"timeout after {timeout:.0f} s"
    result = {}
    for line in text.splitlines():
        if line.startswith("PROBE "):
            result.update(json.loads(line[len("PROBE "):]))
    result["probe_rc"] = rc
    if rc != 0:  # a stage that never reported: say why
        for key in ("cublas_out_dtype", "triton_launch", "sppo_fast_kernels"):
            result.setdefault(key, f"not reached (probe rc {rc})")
    return result, text


def gate(part, ctx):
    """None, or why `part` cannot run here: on CUDA, what the probe found missing that the part needs."""
    if not ctx["cuda"]:
        return None  # CPU dry run: every part takes its CPU path
    p = ctx["probe"]
    if "triton" in part.needs and p.get("triton_launch") != "ok":
        return f"skipped: Triton cannot launch ({p.get('triton_launch')})"
    if "torchao" in part.needs and not p.get("torchao"):
        return ("skipped: torchao not installed (the rungs that meet 20 GiB and the 8bit plan use its optimizers, "
                "the qlora rung its NF4 weights; bench/gpu_wheels.sh puts its wheel in .whl/)")
    if "peft" in part.needs and not p.get("peft"):
        return "skipped: peft not installed (the qlora rung's LoRA adapters come from it)"
    if "pytest" in part.needs and not p.get("pytest"):
        return "skipped: pytest not installed (bench/gpu_wheels.sh puts its wheel in .whl/)"
    return None


def resolve_git_sha(given):
    if given:
        return given
    try:
        sha = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            return sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = REPO / ".whl" / "GIT_SHA"  # written beside the carried wheels by bench/gpu_wheels.sh
    return stamp.read_text().strip() if stamp.is_file() else None


# ---------------------------------------------------------------------------------------------------------------------
# Running a part
def run_commands(commands, timeout, log_path, env):
    """Run argv lists one after another in REPO within `timeout` seconds in all; stdout+stderr appended to log_path.
    Returns (status, rc): ok | failed (exit != 0) | timeout. Each command is its own process group, killed whole
    on timeout (bench scripts start workers of their own)."""
    deadline = time.monotonic() + timeout
    with open(log_path, "a") as log:
        for argv in commands:
            log.write(f"$ {' '.join(argv)[:400]}\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                log.write(f"\n[gpu_check] killed after its {timeout:.0f} s budget\n")
                return "timeout", None
            if rc != 0:
                return "failed", rc
    return "ok", 0


def _kill_group(proc):
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


# ---------------------------------------------------------------------------------------------------------------------
# The summary
def targets(results, dry=False):
    """(target, covered by, measured) from the parts' rows so far: the figures the acceptance run exists for. A dry
    run's figures are CPU plumbing: no verdict is drawn from them."""
    rows = lambda *names: [r for n in names for r in results.get(n, [])]
    verdict = lambda ok: "(dry run: no verdict)" if dry else "met" if ok else "not met"
    out = []
    for name, shape in (("kernels_qwen", "Qwen (16384, 1536, 151936)"), ("kernels_llama", "Llama-3 (16384, 4096, "
                                                                                          "128256)")):
        out.append((f"PPO loss fwd+bwd and log-probs fwd vs the floor and the peers at {shape}: ms, peak GiB", name,
                    " | ".join(kernel_headline(rows(name))) or "not measured"))
    mem = [r for r in rows("memory") if r.get("peak_update_gib") is not None]
    out.append((f"1.5B full-parameter update <= {TARGET_GIB:.0f} GiB", "memory", "; ".join(
        f"{r['setting']} {r['peak_update_gib']:.2f} GiB -> {verdict(r['peak_update_gib'] <= TARGET_GIB)}"
        for r in mem) or "not measured"))
    algos = {r["algo"]: r for r in rows("train", "train_more") if r.get("kind") == "algo" and "error" not in r}
    s, p, g = algos.get("sppo"), algos.get("ppo"), algos.get("grpo8")
    if s and p and s.get("peak_gib") and p.get("peak_gib"):
        ratio = s["peak_gib"] / p["peak_gib"]
        got = (f"{s['peak_gib']:.2f} / {p['peak_gib']:.2f} GiB = {ratio:.3f} -> {verdict(ratio <= 0.55)}; "
               f"SPPO <= {TARGET_GIB:.0f} GiB: {verdict(s['peak_gib'] <= TARGET_GIB)}")
    else:
        got = "not measured"
    out.append((f"SPPO peak <= 0.55x PPO's at the same {TRAIN_PLAN} plan", "train", got))
    if s and g and g.get("prompts_per_s"):
        ratio = s["prompts_per_s"] / g["prompts_per_s"]
        got = f"{s['prompts_per_s']:.2f} / {g['prompts_per_s']:.2f} = {ratio:.2f}x -> {verdict(ratio >= 4)}"
    else:
        got = "not measured"
    out.append(("SPPO prompts/s >= 4x GRPO G=8's", "train + train_more", got))
    qlora = []
    for r in rows("qlora"):
        for phase in ("rollout", "update"):
            ratio = r.get(f"ratio_{phase}")
            if ratio is not None:
                qlora.append(f"{r.get('arch')} {phase} {r[f'peak_{phase}_gib']:.2f} / {r[f'estimate_{phase}_gib']:.2f}"
                             f" GiB = {ratio:.3f} -> {verdict(round(abs(ratio - 1), 3) <= QLORA_TOLERANCE)}")
    out.append((f"qlora rung: measured peak within {QLORA_TOLERANCE:.0%} of the planner's estimate, per phase (1.5B; "
                f"7B if the budget allows)", "qlora", "; ".join(qlora) or "not measured"))
    roll = [r for r in rows("rollout_hf", "rollout_more") if r.get("kind") == "backend" and r.get("tok_per_s")]
    out.append(("rollout tokens/s per backend (hf first); the fastest is `auto`'s CUDA pick",
                "rollout_hf, rollout_more",
                ", ".join(f"{r['backend']} {r['tok_per_s']:.0f}" for r in roll) +
                (f"; fastest {max(roll, key=lambda r: r['tok_per_s'])['backend']}" if roll else "not measured")))
    return out


def write_summary(out, probe, wheels, records, results, sections, dry, time_limit):
    lines = [f"# gpu_check: {probe.get('device', '?')}, {probe.get('timestamp')}", ""]
    if dry:
        lines += ["**Dry run (CPU, tiny sizes): the script's plumbing, not figures.**", ""]
    checks = [("Triton launch (one @triton.jit kernel)", probe.get("triton_launch"), probe.get("triton_s")),
              ("cuBLAS bf16 GEMM, out_dtype=fp32 (mm, addmm)", probe.get("cublas_out_dtype"), probe.get("cublas_s")),
              ("C compiler for Triton's launcher", probe.get("cc") or "missing", None),
              ("Python.h", probe.get("python_h"), None),
              ("free GPU memory", f"{probe.get('free_gib')} of {probe.get('total_gib')} GiB" if probe.get("free_gib")
               is not None else "no CUDA", None),
              ("import sppo_fast.kernels", probe.get("sppo_fast_kernels"), None),
              ("liger-kernel / cut-cross-entropy / torchao / pytest", " / ".join(
                  str(probe.get(k) or "not installed") for k in ("liger_kernel", "cut_cross_entropy", "torchao",
                                                                 "pytest")), None)]
    lines += [f"## Probe ({f(probe.get('probe_s'), '.1f')} s, rc {probe.get('probe_rc')})", "",
              table(checks, [("check", lambda c: c[0]), ("result", lambda c: f(c[1])), ("s", lambda c: f(c[2]))]),
              ""]
    if wheels:
        bad = [w for w in wheels if w["status"] != "installed"]
        lines += [f"Wheels: {len(wheels) - len(bad)} of {len(wheels)} installed "
                  f"({', '.join(w['wheel'] for w in wheels if w['status'] == 'installed') or 'none'})."]
        lines += [f"- {w['wheel']}: {w['status']}" for w in bad]
        lines.append("")
    lines += [f"git {probe.get('git_sha')}; Python {probe.get('python')}, torch {probe.get('torch')} (CUDA "
              f"{probe.get('cuda')}), triton {probe.get('triton')}, transformers {probe.get('transformers')}, peft "
              f"{probe.get('peft')}, numpy {probe.get('numpy')}, flash-attn {probe.get('flash_attn')}; GPU memory "
              f"{probe.get('gpu_mem_gib')} GiB, capability {probe.get('capability')}, nvidia-smi "
              f"{probe.get('nvidia_smi')}.", ""]
    lines += [f"## Parts (in running order; --time-limit {time_limit:.0f} s)", "",
              table(records, [("part", lambda p: p["part"]), ("tier", lambda p: p["tier"]),
                              ("covers", lambda p: p["covers"]), ("est s", lambda p: f(p["estimate_s"], ".0f")),
                              ("budget s", lambda p: f(p["budget_s"], ".0f")), ("status", lambda p: p["status"]),
                              ("s", lambda p: f(p.get("seconds"), ".0f")),
                              ("headline", lambda p: p.get("headline", ""))]), ""]
    lines += ["## Targets", "", table(targets(results, dry), [("target", lambda t: t[0]), ("part", lambda t: t[1]),
                                                          ("measured", lambda t: t[2])]), ""]
    for name, md in sections:
        if md:
            lines += [f"## {name}", "", md, ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="output directory (default: a new temp dir)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: every script at tiny sizes")
    ap.add_argument("--plan", action="store_true", help="print the plan and exit (nothing runs)")
    ap.add_argument("--parts", default=",".join(PART_BY_NAME), help=f"comma list of {', '.join(PART_BY_NAME)}")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT,
                    help=f"seconds for everything, wheels and probe included (default {TIME_LIMIT}); a part starts "
                         "only with min(its budget, 30 s) left and gets at most what is left")
    ap.add_argument("--wheels", default=None,
                    help="directory of wheels to install first (default: .whl/ in the checkout if it has any; "
                         "'none' to skip)")
    ap.add_argument("--site", default="", help="where the wheels go (default: a temp dir)")
    ap.add_argument("--git-sha", default=os.environ.get("GIT_SHA", ""), help="the code's commit (no git on the device)")
    o = ap.parse_args(argv)
    names = [p.strip() for p in o.parts.split(",") if p.strip()]
    if bad := [p for p in names if p not in PART_BY_NAME]:
        ap.error(f"unknown part(s) {bad}; choose from {list(PART_BY_NAME)}")
    parts = [PART_BY_NAME[n] for n in names]
    print(plan_text(parts, o.time_limit), flush=True)
    if o.plan:
        return 0
    t_start = time.monotonic()
    out = Path(o.out or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "results.jsonl", "logs.txt"):
        (out / name).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work-"))
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if o.dry_run:  # plumbing on CPU: Triton paths skip instead of crawling through the interpreter
        child_env.pop("TRITON_INTERPRET", None)

    # wheels, then the probe: both before any part, both in the summary's first lines
    wheel_dir = None if o.wheels == "none" else Path(o.wheels) if o.wheels else REPO / ".whl"
    site = Path(o.site) if o.site else work / "site"
    wheels = install_wheels(wheel_dir, site, child_env) if wheel_dir and wheel_dir.is_dir() else []
    path = [str(site)] if any(w["status"] == "installed" for w in wheels) else []
    # the checkout root first: the parts import sppo_fast (and sppo_fast.kernels) from this tree
    child_env["PYTHONPATH"] = os.pathsep.join(path + [str(REPO)] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    for w in wheels:
        print(f"wheel {w['wheel']}: {w['status']}", flush=True)
    probe, probe_log = run_probe(work, child_env, timeout=PREAMBLE[1][2])
    probe.update(kind="env", dry_run=o.dry_run, git_sha=resolve_git_sha(o.git_sha), hostname_cpus=os.cpu_count(),
                 timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        probe["nvidia_smi"] = q.stdout.strip() or None
    with open(out / "results.jsonl", "a") as fh:
        for w in wheels:
            fh.write(json.dumps({"kind": "wheel", **w}) + "\n")
        fh.write(json.dumps(probe) + "\n")
    with open(out / "logs.txt", "a") as fh:
        fh.write(f"===== probe (rc {probe['probe_rc']}) =====\n{probe_log}\n")
    cuda = probe.get("device") not in (None, "cpu")
    print(f"gpu_check on {probe.get('device')} (git {probe.get('git_sha')}) -> {out}; probe "
          f"{f(probe.get('probe_s'), '.1f')} s: triton launch {probe.get('triton_launch')}, cuBLAS out_dtype "
          f"{probe.get('cublas_out_dtype')}, cc {probe.get('cc')}, Python.h {probe.get('python_h')}", flush=True)
    records, sections, results = [], [], {}
    fatal = None
    if probe.get("sppo_fast_kernels") != "ok":
        fatal = (f"`import sppo_fast.kernels` fails ({probe.get('sppo_fast_kernels')}). From the repository root, "
                 "either `ln -s ../kernels sppo_fast/kernels` or `pip install --no-deps --no-build-isolation "
                 "--no-index -e .` (bench/README.md, 'gpu_check.py').")
    elif not cuda and not o.dry_run:
        fatal = "no CUDA device; use --dry-run for the CPU smoke test"
    ctx = {"work": work, "dry": o.dry_run, "cuda": cuda and not o.dry_run, "probe": probe, "rows": results}
    for part in parts:
        record = {"kind": "part", "part": part.name, "tier": part.tier, "covers": part.covers,
                  "estimate_s": part.estimate_s, "budget_s": DRY_BUDGET if o.dry_run else part.budget_s}
        left = o.time_limit - (time.monotonic() - t_start)
        ctx.update(part=part.name, budget=record["budget_s"] if o.dry_run else min(part.budget_s, left))
        t0 = time.monotonic()
        why = (f"skipped: {fatal}" if fatal else
               "skipped: dry run (the same script as an earlier part, other settings)" if o.dry_run and not part.dry
               else gate(part, ctx))
        if why is None and left < min(part.budget_s, 30) and not o.dry_run:
            why = f"skipped: {left:.0f} s of the time limit left"
        commands = why or part.build(ctx)
        if isinstance(commands, str):
            record.update(status=commands, headline="")
        else:
            log = work / f"{part.name}.log"
            log.write_text("")
            status, rc = run_commands(commands, ctx["budget"], log, child_env)
            text = log.read_text(errors="replace")
            try:
                rows, headline, md = part.read(ctx, text)
            except Exception as err:  # a results reader must not take the summary down
                rows, headline, md = [], f"results unreadable: {type(err).__name__}: {err}", ""
            if status != "ok":
                headline = f"{status} (rc {rc}): {headline}; log tail: {text.strip()[-300:]!r}"
            results[part.name] = rows
            record.update(status=status, rc=rc, headline=headline, rows=len(rows))
            with open(out / "results.jsonl", "a") as fh:
                for r in rows:
                    fh.write(json.dumps({**r, "row_kind": r.get("kind"), "kind": "row", "part": part.name},
                                        default=str) + "\n")
            sections.append((part.name, md))
            with open(out / "logs.txt", "a") as fh:
                fh.write(f"\n===== {part.name}: {status} =====\n{text}")
        record["seconds"] = round(time.monotonic() - t0, 1)
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps({**record, "git_sha": probe.get("git_sha"), "device": probe.get("device")}) + "\n")
        records.append(record)
        write_summary(out, probe, wheels, records, results, sections, o.dry_run, o.time_limit)  # after every part
        print(f"[{time.monotonic() - t_start:5.0f} s] {part.name}: {record['status']} ({record['seconds']} s) "
              f"{record.get('headline', '')[:300]}", flush=True)
    write_summary(out, probe, wheels, records, results, sections, o.dry_run, o.time_limit)
    shutil.rmtree(work, ignore_errors=True)
    print((out / "summary.md").read_text())
    if fatal:
        print(f"gpu_check: {fatal}", file=sys.stderr)
        return 1
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
