"""The one-call GPU acceptance run: everything sppo_fast claims about a GPU, measured in one command (<= 8.5 min on an
H200), so that a short GPU window is spent measuring, not preparing.

    python bench/gpu_check.py --out DIR                  # on a CUDA GPU: every part, within --time-limit seconds
    python bench/gpu_check.py --dry-run --out DIR        # CPU (CI): every part at tiny sizes, CUDA-only parts skipped
    python bench/gpu_check.py --out DIR --parts kernels,rollout

Parts, in the order they run (each a subprocess under its own time budget, so a hang or crash costs only that part;
a part that would start with too little of the total time left is skipped):
  pytest    the CUDA tests: kernel tests at realistic sizes, bf16 included, and the memory tests  [CUDA only]
  cli       `python -m sppo_fast.train` for 10 steps on a random-init small Qwen2: bf16 autocast, Liger,
            gradient checkpointing, --memory-budget (the user path, end to end, on the GPU)
  kernels   bench/bench_kernels.py at its four shapes: every method and peer, the three-GEMM floor, peak memory
  memory    bench/bench_memory.py: the 1.5B full-parameter update under each memory-plan rung, offload included
  train     bench/bench_train.py: SPPO, SPPO + separate critic, PPO (critic LLM), GRPO G=8 on a random-init
            Qwen2-1.5B, 16 prompts per step each (GRPO: 16 x 8), 128-token fixed-length rollouts: time split,
            prompts/s, tokens/s, peak memory
  rollout   bench/bench_rollout.py: every rollout backend at the Qwen2-1.5B shape, batch 64 x 1024 new tokens,
            bf16 weights under autocast, decode tokens/s (last: hf-static's torch.compile is the least predictable
            cost)
Budgets (s): pytest 40, cli 40, kernels 100, memory 60, train 100, rollout 170 = 510 (--time-limit): 30 s under
the 9 minutes for the interpreter and environment probe, and 90 s under the device's 10-minute command limit for
the wheel install before it. The parts' scripts append their rows as they go, so a part cut at its budget still
leaves what it finished.

Outputs in DIR, written as each part finishes (the device tool brings back at most 8 files):
  summary.md      environment, one line per part (status, seconds, headline figures), then each part's tables
  results.jsonl   an `env` row (GPU, driver, versions, git SHA), then per part its result rows and a `part` row
  logs.txt        every part's stdout + stderr, in order, under a header line

On the device machine there is no git: pass --git-sha (or write it to .whl/GIT_SHA before the call).
bench/README.md has the exact device command, with the wheels it carries.
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
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------------------------------
# The parts: name -> (budget seconds on an H200, commands(ctx) -> list of argv, or a "skipped: ..." string)
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
        flags += ["--bf16", "--liger", "--memory-budget", "12GiB"]
    else:  # the budget still picks the plan (and its report) on CPU
        flags += ["--device", "cpu", "--threads", "1", "--memory-budget", "2GiB"]
    return [[PY, "-c", build], [PY, "-m", "sppo_fast.train", *flags]]


def part_kernels(ctx):
    out = str(ctx["work"] / "kernels.jsonl")
    if ctx["dry"]:
        return [[PY, "bench/bench_kernels.py", "--quick", "--out", out]]
    return [[PY, "bench/bench_kernels.py", "--out", out, "--warmup", "1", "--rep", "5"]]


def part_rollout(ctx):
    out = str(ctx["work"] / "rollout.jsonl")
    if ctx["dry"]:
        return [[PY, "bench/bench_rollout.py", "--arch", "tiny", "--batch", "4", "--new-tokens", "8",
                 "--prompt-chars", "0", "--device", "cpu", "--threads", "1", "--no-isolate", "--out", out]]
    # hf first (the baseline of x_hf), then hf-static (the expected winner; its compile is the big unknown)
    return [[PY, "bench/bench_rollout.py", "--arch", "qwen2-1.5b", "--batch", "64", "--new-tokens", "1024",
             "--backends", "hf,hf-static,paged", "--timeout", "110", "--time-limit", str(ctx["budget"] - 5),
             "--out", out]]


def part_memory(ctx):
    out = str(ctx["work"] / "memory")
    if ctx["dry"]:
        return [[PY, "bench/bench_memory.py", "--quick", "--settings", "baseline", "--out", out]]
    return [[PY, "bench/bench_memory.py", "--steps", "2", "--out", out]]


def part_train(ctx):
    out = str(ctx["work"] / "train")
    if ctx["dry"]:
        return [[PY, "bench/bench_train.py", "--quick", "--algos", "sppo", "--batch-size", "8",
                 "--max-new-tokens", "4", "--out", out]]
    # same prompts per step for every algorithm (GRPO: 16 prompts x 8), fixed-length rollouts
    # the algorithms the targets compare come first (SPPO vs GRPO prompts/s, SPPO vs PPO peak)
    return [[PY, "bench/bench_train.py", "--arch", "qwen2-1.5b", "--algos", "sppo,grpo8,ppo,sppo_critic",
             "--batch-size", "16", "--grpo-prompts", "equal", "--max-new-tokens", "128", "--steps", "2",
             "--timeout", "45",
             "--train-arg=--min-new-tokens=128", "--train-arg=--gradient-checkpointing", "--out", out]]


PARTS = {  # name: (budget s on an H200, command builder); the budgets sum to the default --time-limit (510 s)
    "pytest": (40, part_pytest),
    "cli": (40, part_cli),
    "kernels": (100, part_kernels),  # rows are appended as they go: a cut leaves the first shapes
    "memory": (60, part_memory),
    "train": (100, part_train),
    "rollout": (170, part_rollout),  # last: the torch.compile of hf-static is the least predictable cost
}
DRY_BUDGET = 180  # per part, on a shared 2-core CPU


# ---------------------------------------------------------------------------------------------------------------------
# Reading each part's results back: (rows for results.jsonl, headline string, markdown for summary.md)
def jsonl(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def f(x, spec=".2f"):
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def table(rows, cols):
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fn(r) for _, fn in cols) + " |" for r in rows]
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


def read_kernels(ctx, log):
    rows = jsonl(ctx["work"] / "kernels.jsonl")
    timed = [r for r in rows if r.get("median_ms") is not None]
    by_shape = {}
    for r in timed:
        if r.get("mode") == "fwd+bwd" and r.get("method") != "floor_3gemm":
            best = by_shape.get(r.get("shape"))
            if best is None or r["median_ms"] < best["median_ms"]:
                by_shape[r.get("shape")] = r
    head = "; ".join(f"{s}: fastest fwd+bwd {r['method']} {r['median_ms']:.1f} ms ({f(r.get('x_floor'))}x floor)"
                     for s, r in by_shape.items())
    bad = [r for r in rows if r.get("error")]
    md = table(rows, [("shape", lambda r: f(r.get("shape"))), ("method", lambda r: f(r.get("method"))),
                      ("mode", lambda r: f(r.get("mode"))), ("median ms", lambda r: f(r.get("median_ms"), ".2f")),
                      ("x floor", lambda r: f(r.get("x_floor"))), ("peak extra GiB",
                                                                    lambda r: f(r.get("peak_extra_gib"), ".3f")),
                      ("max err logp", lambda r: f(r.get("max_abs_err_logp"), ".1e")),
                      ("note", lambda r: f(r.get("skipped") or r.get("error") or ""))]) if rows else ""
    return rows, (head or "no timed rows") + (f"; {len(bad)} errors" if bad else ""), md


def read_rollout(ctx, log):
    rows = jsonl(ctx["work"] / "rollout.jsonl")
    backends = [r for r in rows if r.get("kind") == "backend"]
    verdict = next((r for r in rows if r.get("kind") == "verdict"), {})
    ratios = next((r["x_hf"] for r in rows if r.get("kind") == "ratios"), {})
    for r in backends:
        r.setdefault("x_hf", ratios.get(r["backend"]))
    head = ", ".join(f"{r['backend']} {r['tok_per_s']:.0f} tok/s ({f(r.get('x_hf'))}x hf)" if "error" not in r
                     else f"{r['backend']} {r['error']}" for r in backends)
    if verdict:
        head += f"; fastest {verdict.get('fastest')}, auto now {verdict.get('auto_now')}"
    md = table(backends, [("backend", lambda r: r["backend"]), ("tok/s", lambda r: f(r.get("tok_per_s"), ".0f")),
                          ("x hf", lambda r: f(r.get("x_hf"))), ("median s", lambda r: f(r.get("median_s"), ".2f")),
                          ("first call s", lambda r: f(r.get("first_call_s"), ".1f")),
                          ("resp len", lambda r: f(r.get("response_len_mean"), ".0f")),
                          ("peak GiB", lambda r: f(r.get("peak_gib"))), ("error", lambda r: f(r.get("error", "")))])
    return rows, head or "no rows", md if backends else ""


def read_memory(ctx, log):
    rows = [r for p in sorted((ctx["work"] / "memory").glob("*.jsonl")) for r in jsonl(p)]
    head = ", ".join(f"{r['setting']} {f(r.get('peak_update_gib'))} GiB / {f(r.get('step_s'), '.2f')} s"
                     if "error" not in r else f"{r['setting']} {r['error'][:40]}" for r in rows)
    mds = sorted((ctx["work"] / "memory").glob("*.md"))
    return rows, head or "no rows", mds[0].read_text().strip() if mds else ""


def read_train(ctx, log):
    rows = jsonl(ctx["work"] / "train.jsonl")
    algos = [r for r in rows if r.get("kind") == "algo"]
    head = ", ".join(f"{r['algo']} {f(r.get('prompts_per_s'))} prompts/s peak {f(r.get('peak_gib'))} GiB"
                     if "error" not in r else f"{r['algo']} {r['error']}" for r in algos)
    md = ctx["work"] / "train.md"
    return rows, head or "no rows", md.read_text().strip() if md.is_file() else ""


READERS = {"pytest": read_pytest, "cli": read_cli, "kernels": read_kernels, "rollout": read_rollout,
           "memory": read_memory, "train": read_train}


# ---------------------------------------------------------------------------------------------------------------------
# Running
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


ENV_PROBE = r"""
import json, importlib, importlib.metadata as md, platform, torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
cuda = torch.cuda.is_available()
out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "python": platform.python_version(),
       "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
       "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None}
for name in ("triton", "transformers", "peft", "liger-kernel", "cut-cross-entropy", "torchao", "math-verify",
             "flash-attn", "trl", "tokenizers", "safetensors"):
    out[name.replace("-", "_")] = v(name)
try:
    import sppo_fast.kernels  # the package mapping kernels/ -> sppo_fast.kernels must resolve
    out["sppo_fast_kernels"] = "ok"
except Exception as err:
    out["sppo_fast_kernels"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def environment(git_sha):
    proc = subprocess.run([PY, "-c", ENV_PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_check: the environment probe failed:\n{proc.stderr[-3000:]}")
    env = json.loads(proc.stdout.strip().splitlines()[-1])
    if env["sppo_fast_kernels"] != "ok":
        raise SystemExit(f"gpu_check: `import sppo_fast.kernels` fails ({env['sppo_fast_kernels']}). From the "
                         "repository root, either `ln -s ../kernels sppo_fast/kernels` or `pip install --no-deps "
                         "--no-build-isolation --no-index -e .` (bench/README.md, 'gpu_check.py').")
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = q.stdout.strip() or None
    env.update(kind="env", git_sha=git_sha, hostname_cpus=os.cpu_count(),
               timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    return env


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
    stamp = REPO / ".whl" / "GIT_SHA"  # written beside the carried wheels before a device call (bench/README.md)
    return stamp.read_text().strip() if stamp.is_file() else None


def write_summary(out, env, parts, sections, dry):
    lines = [f"# gpu_check: {env['device']}, {env['timestamp']}", "",
             f"git {env.get('git_sha')}; Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), triton "
             f"{env['triton']}, transformers {env['transformers']}, peft {env['peft']}, liger-kernel "
             f"{env['liger_kernel']}, cut-cross-entropy {env['cut_cross_entropy']}, torchao {env['torchao']}, "
             f"flash-attn {env['flash_attn']}; GPU memory {env['gpu_mem_gib']} GiB, capability {env['capability']}, "
             f"nvidia-smi {env.get('nvidia_smi')}.", ""]
    if dry:
        lines += ["**Dry run (CPU, tiny sizes): the script's plumbing, not figures.**", ""]
    lines += [table(parts, [("part", lambda p: p["part"]), ("status", lambda p: p["status"]),
                            ("seconds", lambda p: f(p.get("seconds"), ".0f")), ("budget s", lambda p: f(p["budget_s"],
                                                                                                        ".0f")),
                            ("headline", lambda p: p.get("headline", "").replace("|", "/"))]), ""]
    for name, md in sections:
        if md:
            lines += [f"## {name}", "", md, ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="output directory (default: a new temp dir)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: every part at tiny sizes (CUDA-only parts skipped)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--time-limit", type=float, default=sum(b for b, _ in PARTS.values()),
                    help="seconds for all parts together; a part starts only with its budget left (default: the "
                         "sum of the budgets, 510)")
    ap.add_argument("--git-sha", default=os.environ.get("GIT_SHA", ""), help="the code's commit (no git on the device)")
    o = ap.parse_args(argv)
    parts = [p.strip() for p in o.parts.split(",") if p.strip()]
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown part(s) {bad}; choose from {list(PARTS)}")
    t_start = time.monotonic()
    out = Path(o.out or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "results.jsonl", "logs.txt"):
        (out / name).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work-"))
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                 "PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)}
    if o.dry_run:  # plumbing on CPU: Triton paths skip instead of crawling through the interpreter
        child_env.pop("TRITON_INTERPRET", None)
    env = environment(resolve_git_sha(o.git_sha))
    cuda = env["device"] != "cpu"
    if not cuda and not o.dry_run:
        raise SystemExit("gpu_check: no CUDA device; use --dry-run for the CPU smoke test")
    ctx = {"work": work, "dry": o.dry_run, "cuda": cuda and not o.dry_run}
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps({**env, "dry_run": o.dry_run}) + "\n")
    print(f"gpu_check on {env['device']} (git {env['git_sha']}) -> {out}", flush=True)
    done, sections = [], []
    for name in parts:
        budget, build = PARTS[name]
        budget = DRY_BUDGET if o.dry_run else budget
        record = {"kind": "part", "part": name, "budget_s": budget}
        left = o.time_limit - (time.monotonic() - t_start)
        ctx["budget"] = min(budget, left) if not o.dry_run else budget
        commands = build(ctx)
        log = work / f"{name}.log"
        log.write_text("")
        t0 = time.monotonic()
        if isinstance(commands, str):
            record.update(status=commands, headline="")
        elif left < min(budget, 30) and not o.dry_run:
            record.update(status=f"skipped: {left:.0f} s of the time limit left", headline="")
        else:
            status, rc = run_commands(commands, ctx["budget"], log, child_env)
            text = log.read_text(errors="replace")
            try:
                rows, headline, md = READERS[name](ctx, text)
            except Exception as err:  # a results reader must not take the summary down
                rows, headline, md = [], f"results unreadable: {type(err).__name__}: {err}", ""
            if status != "ok":
                headline = f"{status} (rc {rc}): {headline}; log tail: {text.strip()[-300:]!r}"
            record.update(status=status, rc=rc, headline=headline, rows=len(rows))
            with open(out / "results.jsonl", "a") as fh:
                for r in rows:
                    fh.write(json.dumps({**r, "row_kind": r.get("kind"), "kind": "row", "part": name},
                                        default=str) + "\n")
            sections.append((name, md))
        record["seconds"] = round(time.monotonic() - t0, 1)
        with open(out / "logs.txt", "a") as fh:
            fh.write(f"\n===== {name}: {record['status']} ({record['seconds']} s) =====\n")
            fh.write(log.read_text(errors="replace"))
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps({**record, "git_sha": env["git_sha"], "device": env["device"]}) + "\n")
        done.append(record)
        write_summary(out, env, done, sections, o.dry_run)  # rewritten after every part: a later crash keeps it
        print(f"[{time.monotonic() - t_start:5.0f} s] {name}: {record['status']} ({record['seconds']} s) "
              f"{record.get('headline', '')[:300]}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print((out / "summary.md").read_text())
    return 0 if all(p["status"] in ("ok", "skipped: no CUDA") for p in done) else 1


if __name__ == "__main__":
    sys.exit(main())
