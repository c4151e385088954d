"""Calibration of SPPO's shared value head on the CPU demo: which head options raise Pearson(V, R) without costing
accuracy. Each variant is the demo (`sppo-fast train`, the embedded tiny model and its preset: 100 steps, batch 64,
lr 3e-5, value lr 1e-2) with one set of value-head flags (`train.Args.value_*`), over several seeds.

    python bench/bench_value_head.py                          # every variant, seeds 0,1,2 (resumable)
    python bench/bench_value_head.py --variants base,layernorm --seeds 0 --out /tmp/head

Runs go seed-major (every variant's seed 0 first), so a partial run still covers every variant. Each finished run is
appended to the JSONL at once and a rerun with the same --out skips it. Outputs: <out>.jsonl ("env", "run" rows,
then one "variant" summary row each) and <out>.md (tables).

    python bench/bench_value_head.py --ceiling RUN_DIR --ceiling-k 16   # how high Pearson(V, R) can go at all

Ceiling: no V(prompt) can correlate with a binary R better than the true success probability p(prompt) does, and
Pearson(p, R) = sqrt(Var p / (m (1 - m))) with m = E[R]. `--ceiling` samples k responses per held-out prompt from a
run's final checkpoint, estimates Var p without bias (Var(p_hat) - mean(p_hat (1 - p_hat)) / (k - 1)), and reports
that ceiling beside the run's head: Pearson(V, R) on the same samples and the head's noise-corrected correlation
with p itself.

Metrics: eval Pearson = Pearson of V(prompt) with the reward of each of the k=4 samples per held-out prompt at the
final eval (256 prompts, `eval/value_pearson`); train Pearson = mean over the last 10 training steps of Pearson(V, R)
on the step's 64 rollouts; pass@1 = greedy held-out accuracy, avg@4 = mean sampled accuracy.
"""
import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/utils.py, when run as a script
from utils import git  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: (what it changes, trainer flags)
    "base": ("linear head on the last prompt token, final layer, value lr 1e-2 (the default)", []),
    "layernorm": ("LayerNorm (no affine) on the pooled state", ["--value-norm", "layernorm"]),
    "mean": ("mean over prompt tokens instead of the last one", ["--value-pooling", "mean"]),
    "mlp64": ("MLP head: Linear(128, 64) -> GELU -> Linear(64, 1)", ["--value-mlp-hidden", "64"]),
    "layer2": ("output of decoder layer 2 of 4 (pre-final-norm residual)", ["--value-layer", "1"]),
    "layer2_ln": ("layer 2 of 4, LayerNorm", ["--value-layer", "1", "--value-norm", "layernorm"]),
    "layer1_ln": ("layer 1 of 4, LayerNorm", ["--value-layer", "0", "--value-norm", "layernorm"]),
    "vlr3e-3": ("value lr 3e-3", ["--value-lr", "0.003"]),
    "vlr3e-2": ("value lr 3e-2", ["--value-lr", "0.03"]),
    "vlr1e-1": ("value lr 1e-1", ["--value-lr", "0.1"]),
}
DEFAULT_VARIANTS = "base,layernorm,mean,mlp64,layer2,layer2_ln,layer1_ln,vlr3e-3,vlr3e-2"


def run_one(key, flags, seed, work):
    """One demo run in a subprocess (1 torch thread); returns its result row."""
    cmd = [sys.executable, "-m", "sppo_fast.train", "--seed", str(seed), "--threads", "1", "--device", "cpu",
           "--no-progress", "--no-tensorboard", "--save-every", "0", "--out-dir", str(work), "--run-name", key, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shutil.rmtree(work / key, ignore_errors=True)
    return cmd, env


def collect(key, variant, seed, work, wall):
    from sppo_fast.metrics import read_metrics

    rows = read_metrics(work / key)
    evals = [r for r in rows if "eval/pass@1" in r]
    train = [r for r in rows if "value/pearson" in r]
    steps = [r for r in rows if "stats/advantage_abs" in r]
    last = [r["value/pearson"] for r in train[-10:] if math.isfinite(r["value/pearson"])]
    shutil.rmtree(work / key / "checkpoints", ignore_errors=True)
    fin = evals[-1]
    return {"kind": "run", "key": key, "variant": variant, "flags": VARIANTS[variant][1], "seed": seed,
            "pass1_start": evals[0]["eval/pass@1"], "pass1": fin["eval/pass@1"], "avg4": fin["eval/avg@4"],
            "eval_pearson": fin.get("eval/value_pearson"), "eval_value_mean": fin.get("eval/value_mean"),
            "train_pearson_last10": sum(last) / len(last) if last else None,
            "evals": [{"step": r["step"], "pass1": r["eval/pass@1"], "avg4": r["eval/avg@4"],
                       "pearson": r.get("eval/value_pearson")} for r in evals],
            "adv_abs_mean": sum(r["stats/advantage_abs"] for r in steps) / len(steps),
            "train_reward_mean": sum(r["reward/mean"] for r in steps) / len(steps),
            "train_s": fin["time/train_s"], "wall_s": wall}


def _ms(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(done, variants):
    out = []
    for v in variants:
        rows = [r for r in done.values() if r["variant"] == v]
        if not rows:
            continue
        s = {"kind": "variant", "variant": v, "what": VARIANTS[v][0], "flags": VARIANTS[v][1],
             "seeds": sorted(r["seed"] for r in rows)}
        for k in ("pass1", "avg4", "eval_pearson", "train_pearson_last10", "adv_abs_mean", "train_reward_mean"):
            s[k], s[k + "_sd"] = _ms([r.get(k) for r in rows])
        out.append(s)
    return out


def write_md(path, env, done, summ, variants):
    base = {r["seed"]: r for r in done.values() if r["variant"] == "base"}
    f = lambda x, s=100, d=1: "-" if x is None else f"{s * x:.{d}f}"
    L = [f"# Shared value head calibration on the CPU demo — {env['timestamp'][:10]}\n",
         f"Machine: {env['cpu']}, {env['usable_cores']} cores shared with other jobs, torch {env['torch']}, git "
         f"{env['git_sha']}{' (dirty tree)' if env['git_dirty'] else ''}. Every run: the demo (`sppo-fast train`, "
         "embedded tiny model, preset: 100 steps, batch 64, lr 3e-5, value lr 1e-2, T=0.6, eval on 256 held-out "
         "prompts) + the variant's flags, `--threads 1`. Generated by `bench/bench_value_head.py`.\n",
         "Eval Pearson: V(prompt) against each of the 4 sampled rewards per held-out prompt at the final eval "
         "(one binomial-noise sd of pass@1 on 256 prompts is about 3 points). Train Pearson: mean of the last 10 "
         "training steps' Pearson(V, R) over 64 rollouts each. Δ columns: the variant minus the default head on the "
         "same seeds (paired).\n",
         "| variant | what | seeds | pass@1 % | avg@4 % | eval Pearson | train Pearson | Δ pass@1 (paired) | "
         "Δ eval Pearson (paired) | mean abs(A) (train) | train reward |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summ:
        rows = [r for r in done.values() if r["variant"] == s["variant"] and r["seed"] in base]
        dp = _ms([r["pass1"] - base[r["seed"]]["pass1"] for r in rows])[0] if rows else None
        de = _ms([(r["eval_pearson"] or float("nan")) - (base[r["seed"]]["eval_pearson"] or float("nan"))
                  for r in rows])[0] if rows else None
        L.append(f"| {s['variant']} | {s['what']} | {','.join(map(str, s['seeds']))} | "
                 f"{f(s['pass1'])} ± {f(s['pass1_sd'])} | {f(s['avg4'])} ± {f(s['avg4_sd'])} | "
                 f"{f(s['eval_pearson'], 1, 3)} ± {f(s['eval_pearson_sd'], 1, 3)} | "
                 f"{f(s['train_pearson_last10'], 1, 3)} ± {f(s['train_pearson_last10_sd'], 1, 3)} | "
                 f"{'-' if dp is None or s['variant'] == 'base' else f'{100 * dp:+.1f}'} | "
                 f"{'-' if de is None or s['variant'] == 'base' else f'{de:+.3f}'} | "
                 f"{f(s.get('adv_abs_mean'), 1, 3)} | {f(s.get('train_reward_mean'), 1, 3)} |")
    L += ["", "## Every run\n", "| run | pass@1 start→end % | avg@4 % | eval Pearson | train Pearson | train s |",
          "|---|---|---|---|---|---|"]
    for r in sorted(done.values(), key=lambda r: (variants.index(r["variant"]) if r["variant"] in variants else 99,
                                                  r["seed"])):
        L.append(f"| {r['key']} | {f(r['pass1_start'])} → {f(r['pass1'])} | {f(r['avg4'])} | "
                 f"{f(r['eval_pearson'], 1, 3)} | {f(r['train_pearson_last10'], 1, 3)} | {r['train_s']:.0f} |")
    Path(path).write_text("\n".join(L) + "\n")


def ceiling(run_dir: Path, k: int, seed: int = 0) -> dict:
    """Pearson(V, R) of a run's final head against its oracle ceiling (see the module docstring)."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from sppo_fast import checkpoint, data, rewards
    from sppo_fast.model import load_policy, load_tokenizer
    from sppo_fast.rollout import pack
    from sppo_fast.train import Args, Stepper, pearson, score_rewards, value_of
    from sppo_fast.value_head import ValueHead

    torch.set_num_threads(1)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    args = Args(**{f: cfg[f] for f in Args.__dataclass_fields__ if f in cfg})
    ckpt = checkpoint.list_checkpoints(run_dir)[-1]
    device = torch.device("cpu")
    policy = load_policy(ckpt / "policy", device=device, attn_implementation="sdpa").eval()
    tok = load_tokenizer(ckpt / "policy")
    head = ValueHead(policy.config.hidden_size, norm=args.value_norm, mlp_hidden=args.value_mlp_hidden)
    head.load_state_dict(load_file(str(ckpt / "value_head.safetensors")))
    _, eval_rows = data.load_dataset(args.data, eval_fraction=args.eval_size, synthetic_n_eval=args.eval_size,
                                     seed=args.seed)
    texts = data.format_prompts(eval_rows, tok, chat_template=False)
    stepper = Stepper(args, policy, head, None, None, tok, device)
    torch.manual_seed(seed)
    with torch.no_grad():
        samples = stepper.generate(texts, num_samples=k, temperature=args.temperature)
        R = score_rewards(rewards.get_reward_fn(args.reward), eval_rows, samples, args)
        firsts = list(range(0, len(samples), k))
        V = torch.cat([value_of(stepper.forward(pack(samples, firsts[i:i + 64], packed=False,
                                                     pad_token_id=tok.pad_token_id))[3], args.value_loss)
                       for i in range(0, len(firsts), 64)])
    p_hat = R.view(-1, k).double().mean(1)
    m = R.double().mean().item()
    var_p = max(0.0, p_hat.var(unbiased=False).item() - (p_hat * (1 - p_hat)).mean().item() / (k - 1))
    Vd = V.double()
    cov_vp = ((Vd - Vd.mean()) * (p_hat - p_hat.mean())).mean().item()  # unbiased for cov(V, p): noise is independent
    return {"kind": "ceiling", "run_dir": str(run_dir), "k": k, "n_prompts": len(eval_rows), "mean_R": m,
            "var_p": var_p, "ceiling_pearson": math.sqrt(var_p / (m * (1 - m))) if 0 < m < 1 else None,
            "pearson_V_R": pearson(V.repeat_interleave(k), R),
            "corr_V_p": cov_vp / math.sqrt(Vd.var(unbiased=False).item() * var_p) if var_p > 0 else None,
            "frac_prompts_p_hat_0": (p_hat == 0).float().mean().item(),
            "frac_prompts_p_hat_1": (p_hat == 1).float().mean().item()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="", help="explicit run order, e.g. layer2:1,base:2 (overrides --variants/--seeds "
                                               "for what runs; the table covers every finished run)")
    ap.add_argument("--report", action="store_true", help="only rewrite the tables from the finished runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="", help="output prefix (default bench/results/head-cpu-<date>)")
    ap.add_argument("--work-dir", default="", help="run directories (default: a temp dir)")
    ap.add_argument("--ceiling", default="", help="a finished run dir: its head's Pearson vs the oracle ceiling")
    ap.add_argument("--ceiling-k", type=int, default=16)
    o = ap.parse_args(argv)
    if o.ceiling:
        res = ceiling(Path(o.ceiling), o.ceiling_k)
        print(json.dumps(res))
        if o.out:
            with open(o.out, "a") as fh:
                fh.write(json.dumps(res) + "\n")
        return 0
    variants = [v.strip() for v in o.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in o.seeds.split(",")]
    prefix = Path(o.out) if o.out else REPO / "bench" / "results" / f"head-cpu-{datetime.date.today().isoformat()}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    jsonl, md = prefix.with_name(prefix.name + ".jsonl"), prefix.with_name(prefix.name + ".md")
    work = Path(o.work_dir or f"/tmp/sppo_bench_{prefix.name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    done, env = {}, None
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("kind") == "run":
                done[row["key"]] = row
            elif row.get("kind") == "env":
                env = row
        print(f"resuming: {len(done)} finished runs in {jsonl}")
    if env is None:
        import platform
        import torch

        status = git("status", "--porcelain")
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.machine())
        env = {"kind": "env", "cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "git_sha": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(status),
               "load_avg_1m": os.getloadavg()[0],
               "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    todo = [(v, s) for s in seeds for v in variants]
    if o.runs:
        todo = [(r.split(":")[0], int(r.split(":")[1])) for r in o.runs.split(",") if r.strip()]
        bad = [v for v, _ in todo if v not in VARIANTS]
        if bad:
            ap.error(f"unknown variant(s) {bad} in --runs")
    todo = [(v, s) for v, s in todo if f"{v}__s{s}" not in done]
    for v, s in list(todo):  # a run that finished while no runner was watching: collect it instead of rerunning
        key = f"{v}__s{s}"
        log = work / f"{key}.log"
        if log.is_file() and "eval at end:" in log.read_text() and (work / key / "metrics.jsonl").is_file():
            done[key] = collect(key, v, s, work, None)
            if not jsonl.is_file() or not jsonl.read_text().strip():
                jsonl.write_text(json.dumps(env) + "\n")
            with open(jsonl, "a") as fh:
                fh.write(json.dumps(done[key]) + "\n")
            todo.remove((v, s))
            print(f"collected {key} (finished earlier)", flush=True)
    if o.report:
        todo = []
        for key, row in list(done.items()):  # refresh derived columns from run dirs still on disk
            if "adv_abs_mean" not in row and (work / key / "metrics.jsonl").is_file():
                done[key] = collect(key, row["variant"], row["seed"], work, row.get("wall_s"))
    running = {}
    while todo or running:
        while todo and len(running) < o.workers:
            v, s = todo.pop(0)
            key = f"{v}__s{s}"
            cmd, penv = run_one(key, VARIANTS[v][1], s, work)
            log = open(work / f"{key}.log", "w")
            running[key] = (subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=log, stderr=subprocess.STDOUT),
                            v, s, time.perf_counter(), log)
            print(f"start {key}", flush=True)
        time.sleep(1)
        for key, (proc, v, s, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            log.close()
            if proc.returncode != 0:
                print(f"FAILED {key}:\n{(work / f'{key}.log').read_text()[-2000:]}", flush=True)
                continue
            row = collect(key, v, s, work, time.perf_counter() - t0)
            done[key] = row
            if not jsonl.is_file() or not jsonl.read_text().strip():
                jsonl.write_text(json.dumps(env) + "\n")
            with open(jsonl, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"done {key}: pass@1 {row['pass1']:.3f} eval pearson {row['eval_pearson']} "
                  f"train pearson {row['train_pearson_last10']} ({row['wall_s']:.0f}s)", flush=True)
    order = [v for v in VARIANTS if any(r["variant"] == v for r in done.values())]
    summ = summarize(done, order)
    with open(jsonl, "w") as fh:
        fh.write(json.dumps(env) + "\n")
        for r in sorted(done.values(), key=lambda r: r["key"]):
            fh.write(json.dumps(r) + "\n")
        for s in summ:
            fh.write(json.dumps(s) + "\n")
    write_md(md, env, done, summ, order)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
