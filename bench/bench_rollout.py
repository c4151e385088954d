"""Decode throughput of each rollout backend (sppo_fast/rollout.py: hf, hf-static, paged) on the same model, prompts
and lengths, the way the trainer calls it: `rollout.generate`, sampling at T=0.6, under bf16 autocast on CUDA with
bf16 weights by default (--weights; the paged backend runs only with weights in the autocast dtype), fp32 on CPU,
fixed-length responses (min_new_tokens = max_new_tokens).

    python bench/bench_rollout.py                                   # CUDA: Qwen2-1.5B-shaped random init, 64 x 1024
    python bench/bench_rollout.py --arch tiny --batch 64 --new-tokens 40 --device cpu   # the embedded tiny model
    python bench/bench_rollout.py --backends hf,paged --reps 3
    python bench/bench_rollout.py --arch tiny --batch 64 --new-tokens 40 --prompt-chars 0 --device cpu --threads 1 \
        --interleave 7                                              # the committed CPU measurement (shared machine)

Each backend runs in a fresh subprocess with its own --timeout, so a hang or crash in one leaves the others'
results. Per backend: one warm-up call (for hf-static at the full shape, since its compiled decode step is
specialised to the cache shape; for the others --warmup-tokens new tokens), then --reps timed calls.
  first_call_s   the warm-up call (hf-static on CUDA: includes torch.compile and CUDA-graph capture)
  median_s       median wall seconds of one generate call over the timed calls (device synchronised)
  tok_per_s      batch x new tokens / median_s: decode tokens per second of the whole call, prefill included
  x_hf           tok_per_s / hf's in the same run
  x_hf_paired    --interleave only: the median over rounds of hf's time / this backend's time in the same round
  peak_gib       torch.cuda.max_memory_allocated during the timed calls (CUDA only)
Results: --out (JSONL, appended) and the same name with .md; default bench/results/rollout-<device>-<date>.*.
The CPU figures depend on the machine's load, which each row records.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/utils.py, when run as a script
from bench_train import QUICK_MODEL, QWEN2_15B  # noqa: E402
from utils import environment, markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("hf", "hf-static", "paged")
# random-init Qwen2 shapes (no weights needed), shared with bench_train.py; "tiny" is the embedded trained model
ARCHS = {"qwen2-1.5b": QWEN2_15B, "qwen2-small": QUICK_MODEL}


def load_model(arch: str, device):
    """(model in fp32, tokenizer). Random-init archs get the tiny model's character tokenizer and an EOS on an
    unused embedding row (fixed-length responses need no trained model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from sppo_fast.tiny import build_tokenizer, default_model_path

    if arch == "tiny":
        path = default_model_path()
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(device)
        return model, AutoTokenizer.from_pretrained(path)
    cfg = ARCHS[arch]
    tok = build_tokenizer(model_max_length=cfg["max_position_embeddings"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**cfg, bos_token_id=tok.bos_token_id, eos_token_id=cfg["vocab_size"] - 1,
                                             pad_token_id=tok.pad_token_id, attn_implementation="sdpa"))
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=cfg["vocab_size"] - 1,
                                               pad_token_id=tok.pad_token_id)
    return model, tok


def prompts_for(n: int, prompt_chars: int, seed: int = 0) -> list:
    """n synthetic addition-chain prompts; with prompt_chars > 0, several chained to about that many characters."""
    from sppo_fast import synthetic

    rows = synthetic.make_dataset(n * 64, seed)
    out, k = [], 0
    for _ in range(n):
        text = rows[k]["prompt"]
        k += 1
        while len(text) < prompt_chars:
            text = rows[k]["prompt"] + rows[k]["answer"] + ";" + text
            k += 1
        out.append(text[-prompt_chars:] if prompt_chars else text)
    return out


def setup(spec: dict):
    """(model, tokenizer, prompts) as a spec asks: threads, arch, weight dtype, batch and prompt length."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    model, tok = load_model(spec["arch"], torch.device(spec["device"]))
    if spec["weights"] == "bf16":
        model.to(torch.bfloat16)
    return model, tok, prompts_for(spec["batch"], spec["prompt_chars"])


def interleaved(spec: dict, backends: list, rounds: int) -> list:
    """All backends in this process, one model: a warm-up call each, then `rounds` rounds that call every backend
    once in turn. On a shared machine whose load drifts, each round's ratio to hf is a paired comparison; the rows
    carry the median over rounds of both the time and that ratio."""
    import torch

    from sppo_fast.rollout import generate

    model, tok, prompts = setup(spec)
    n = spec["new_tokens"]
    call = lambda b: generate(model, tok, prompts, backend=b, temperature=0.6, max_new_tokens=n, min_new_tokens=n)
    torch.manual_seed(0)
    first, times, lengths = {}, {b: [] for b in backends}, {}
    for b in backends:
        t0 = time.perf_counter()
        call(b)
        first[b] = time.perf_counter() - t0
    for _ in range(rounds):
        for b in backends:
            t0 = time.perf_counter()
            samples = call(b)
            times[b].append(time.perf_counter() - t0)
            lengths[b] = sum(len(x.response_ids) for x in samples) / len(samples)
    rows = []
    for b in backends:
        med = statistics.median(times[b])
        row = {"kind": "backend", "backend": b, "arch": spec["arch"], "batch": spec["batch"], "new_tokens": n,
               "reps": rounds, "interleaved": True, "first_call_s": first[b], "median_s": med, "times_s": times[b],
               "tok_per_s": spec["batch"] * n / med, "response_len_mean": lengths[b], "peak_gib": None,
               "weights": spec["weights"], "threads": torch.get_num_threads()}
        if "hf" in times:  # paired: the median of per-round speed-ups over hf
            row["x_hf_paired"] = statistics.median(h / t for h, t in zip(times["hf"], times[b]))
        rows.append(row)
    return rows


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from sppo_fast.rollout import generate

    cuda = torch.device(spec["device"]).type == "cuda"
    model, tok, prompts = setup(spec)
    n = spec["new_tokens"]
    # as Stepper.generate: bf16 autocast on CUDA, over fp32 master weights (the default memory plan) or bf16 ones
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def call(tokens):
        with autocast:
            return generate(model, tok, prompts, backend=spec["backend"], temperature=0.6, top_p=1.0,
                            max_new_tokens=tokens, min_new_tokens=tokens)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    call(n if spec["backend"] == "hf-static" else min(spec["warmup_tokens"], n))
    sync()
    first = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, lengths = [], []
    for _ in range(spec["reps"]):
        sync()
        t0 = time.perf_counter()
        samples = call(n)
        sync()
        times.append(time.perf_counter() - t0)
        lengths.append(sum(len(s.response_ids) for s in samples) / len(samples))
    med = statistics.median(times)
    row = {"kind": "backend", "backend": spec["backend"], "arch": spec["arch"], "batch": spec["batch"],
           "new_tokens": n, "prompt_tokens_mean": sum(len(tok(p)["input_ids"]) for p in prompts) / len(prompts),
           "reps": spec["reps"], "first_call_s": first, "median_s": med, "times_s": times,
           "tok_per_s": spec["batch"] * n / med, "response_len_mean": statistics.mean(lengths),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "weights": spec["weights"] + (" + bf16 autocast" if cuda else ""), "threads": torch.get_num_threads()}
    Path(spec["out_json"]).write_text(json.dumps(row))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2-1.5b", choices=("tiny", *ARCHS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--prompt-chars", type=int, default=128, help="prompt length in characters (0: natural, ~8)")
    ap.add_argument("--reps", type=int, default=1, help="timed calls per backend")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="warm-up call length (hf, paged)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default="", choices=("", "bf16", "fp32"),
                    help="model weights (default: bf16 on CUDA, fp32 on CPU). On CUDA generation runs under bf16 "
                         "autocast either way; the paged backend needs bf16 weights there (its KV cache takes the "
                         "model's dtype), so bf16 is the setting where all three compare")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per backend before it is killed")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds for all backends together (0: none); each gets at most what is left")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run the backends in this process (CPU smoke tests: saves the subprocess start-ups)")
    ap.add_argument("--out", default="", help="results JSONL (default bench/results/rollout-<device>-<date>.jsonl)")
    ap.add_argument("--interleave", type=int, default=0,
                    help="CPU measurements on a shared machine: N rounds calling every backend in turn, in this "
                         "process (paired ratios to hf); instead of one subprocess per backend")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    o = ap.parse_args(argv)
    if o._worker:
        return worker(o._worker)
    import torch

    from sppo_fast.rollout import AUTO_BACKEND

    device = ("cuda" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device
    o.weights = o.weights or ("bf16" if torch.device(device).type == "cuda" else "fp32")
    backends = [b for b in o.backends.split(",") if b]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        ap.error(f"unknown backend(s) {bad}; choose from {BACKENDS}")
    env = environment(device)
    import transformers
    env.update(transformers=transformers.__version__, python=platform.python_version(),
               load_avg=os.getloadavg(), cpus=os.cpu_count())
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-").replace("nvidia-", "")
    out = Path(o.out or REPO / "bench" / "results" / f"rollout-{slug}-{datetime.date.today().isoformat()}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sppo_bench_rollout-"))
    rows, t_start = [], time.perf_counter()
    if o.interleave:
        spec = {"arch": o.arch, "batch": o.batch, "new_tokens": o.new_tokens, "prompt_chars": o.prompt_chars,
                "device": device, "threads": o.threads, "weights": o.weights}
        rows = [{**r, **env, "wall_s": time.perf_counter() - t_start} for r in interleaved(spec, backends,
                                                                                              o.interleave)]
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        backends = []  # measured above
    for backend in backends:
        spec = {"backend": backend, "arch": o.arch, "batch": o.batch, "new_tokens": o.new_tokens, "weights": o.weights,
                "prompt_chars": o.prompt_chars, "reps": o.reps, "warmup_tokens": o.warmup_tokens, "device": device,
                "threads": o.threads, "out_json": str(work / f"{backend}.json")}
        spec_path = work / f"{backend}.spec.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        timeout = o.timeout if not o.time_limit else min(o.timeout, o.time_limit - (t0 - t_start))
        if o.no_isolate:
            try:
                rc, log = worker(str(spec_path)), ""
            except Exception:  # recorded like a failed subprocess
                import traceback
                rc, log = "exception", traceback.format_exc()
        elif timeout < 5:
            rc, log = "timeout", "not started: the time limit is used up"
        else:
            try:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)],
                                      capture_output=True, text=True, timeout=timeout,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                rc, log = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as err:
                rc, log = "timeout", _text(err.stdout) + _text(err.stderr)
        if rc == 0 and Path(spec["out_json"]).is_file():
            row = json.loads(Path(spec["out_json"]).read_text())
        else:
            tail = log[-1500:]
            err = "timeout" if rc == "timeout" else "out of memory" if "out of memory" in tail.lower() else f"exit {rc}"
            row = {"kind": "backend", "backend": backend, "arch": o.arch, "error": err, "log_tail": tail}
            print(f"{backend} FAILED ({err}):\n{tail}", file=sys.stderr)
        row["wall_s"] = time.perf_counter() - t0
        row.update(env)
        rows.append(row)
        with open(out, "a") as f:  # at once: a later backend's hang or the caller's timeout keeps this row
            f.write(json.dumps(row) + "\n")
        print(f"{backend}: {row['wall_s']:.0f}s " + (f"{row['tok_per_s']:.0f} tok/s" if "error" not in row
                                                     else row["error"]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    base = next((r for r in rows if r["backend"] == "hf" and "error" not in r), None)
    for r in rows:
        if base and "error" not in r:
            r["x_hf"] = r["tok_per_s"] / base["tok_per_s"]
    ok = [r for r in rows if "error" not in r]
    best = max(ok, key=lambda r: r["tok_per_s"])["backend"] if ok else None
    dtype = torch.device(device).type
    verdict = {"kind": "verdict", "device": env["device"], "fastest": best, "auto_now": AUTO_BACKEND.get(dtype),
               "git_sha": env["git_sha"], "timestamp": env["timestamp"]}
    with open(out, "a") as f:
        f.write(json.dumps({"kind": "ratios", "x_hf": {r["backend"]: r.get("x_hf") for r in rows}}) + "\n")
        f.write(json.dumps(verdict) + "\n")
    text = [f"# Rollout backends: {env['device']}, {env['timestamp'][:10]}", "",
            f"`rollout.generate` at T=0.6, {o.batch} prompts x {o.new_tokens} new tokens (fixed length), arch "
            f"{o.arch}, {o.weights} weights{' under bf16 autocast' if dtype == 'cuda' else ''}; torch {env['torch']}, "
            f"transformers {env['transformers']}, git {env['git_sha']}, load "
            f"average {env['load_avg'][0]:.1f} on {env['cpus']} CPUs.", "",
            markdown_table(rows, [("backend", "backend", None), ("tok/s", "tok_per_s", ".0f"),
                                  ("x hf", "x_hf", ".2f"), ("x hf paired", "x_hf_paired", ".2f"),
                                  ("median s", "median_s", ".3f"),
                                  ("first call s", "first_call_s", ".2f"), ("resp len", "response_len_mean", ".1f"),
                                  ("peak GiB", "peak_gib", ".2f"), ("error", "error", None)]), "",
            f"Fastest: **{best}**; `auto` on {dtype} currently picks **{AUTO_BACKEND.get(dtype)}** "
            f"(sppo_fast/rollout.py AUTO_BACKEND)."]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0 if len(ok) == len(rows) else 1


def _text(x) -> str:
    """TimeoutExpired carries the captured output as bytes even with text=True."""
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


if __name__ == "__main__":
    sys.exit(main())
