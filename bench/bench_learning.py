"""Learning efficiency on CPU: SPPO against GRPO (G=4, G=8), PPO and SPPO with a separate critic, on the embedded
tiny model and the synthetic addition-chain task. Held-out accuracy against sampled tokens and training wall-clock.

    python bench/bench_learning.py                  # the full CPU run (~30-40 min on 2 cores), resumable
    python bench/bench_learning.py --quick          # CI smoke test (< 60 s): 1 seed, 2 steps, 2 algorithms, temp dir
    python bench/bench_learning.py --algos sppo,grpo8 --seeds 0,1,2 --lr-mults 0.3,1,3
    python bench/bench_learning.py --horizon 150    # the same protocol on ~150-token responses (issue 14)
    python bench/bench_learning.py --horizon 60 --estimate   # its CPU cost: a few timed steps per algorithm

Horizon (`--horizon 20|60|150`, `synthetic.HORIZONS`): the same addition-chain family with longer chains, so
responses average ~19, ~61 or ~153 tokens. 20 is the embedded model and `--data synthetic` (the default). 60 and 150
train a tiny model for that task first (`sppo_fast.tiny.build(horizon=H)`, HORIZON_STEPS warm-up steps, seed 0;
deterministic on one machine and thread count, cached under --model-cache) and write the task's train/eval sets as
JSONL (`synthetic.write_jsonl_split`); max_new_tokens is the task's longest solution + 2 unless given.

Protocol (identical for every algorithm):
  * equal samples per step: SPPO/PPO `batch` prompts x 1; GRPO-G `batch/G` prompts x G (the demo preset's batch 64);
  * the same number of steps (the preset's), except GRPO G=8, which gets `--grpo8-step-mult` (default 4) times the
    steps so that its final accuracy is visible and SPPO can be tested at <= 1/4 of its sampled tokens;
  * the same learning-rate sweep on seed 0 (policy lr = preset lr x each of --lr-mults; when the best lr sits at an
    edge of the grid, the grid is extended once in that direction, by the same rule for every algorithm), then
    the separate-critic algorithms (PPO, SPPO --critic) also try critic lr = policy lr x each of --critic-lr-mults
    at their best policy lr; the best configuration (final (pass@1 + avg@k) / 2) then runs the remaining seeds;
  * SPPO's shared value head keeps the preset's value_lr.
Every run is a fresh subprocess (`--threads 1`), `--workers` at a time. Each finished run is appended to the JSONL at
once, and a rerun with the same --out skips runs already there (same configuration), so a crash loses one run at most.

Outputs (default prefix bench/results/learning-cpu-<date>): .jsonl (one "run" row per run, one "summary" row per
algorithm, one "env" row), .md (tables + verdict), .png (accuracy vs sampled tokens and vs training seconds).
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/utils.py, when run as a script
from utils import git  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

ALGOS = {  # key: (label, trainer flags, group size (samples per prompt), uses a separate critic LLM)
    "sppo": ("SPPO (shared head)", ["--algo", "sppo"], 1, False),
    "grpo4": ("GRPO G=4", ["--algo", "grpo", "--group-size", "4"], 4, False),
    "grpo8": ("GRPO G=8", ["--algo", "grpo", "--group-size", "8"], 8, False),
    "ppo": ("PPO (critic LLM, GAE λ=0.95)", ["--algo", "ppo", "--gae-lambda", "0.95"], 1, True),
    "ppo_l1": ("PPO (critic LLM, GAE λ=1)", ["--algo", "ppo", "--gae-lambda", "1.0"], 1, True),
    "sppo_critic": ("SPPO (separate critic)", ["--algo", "sppo"], 1, True),
}
DEFAULT_ALGOS = "sppo,grpo4,grpo8,ppo,ppo_l1,sppo_critic"


# ---------------------------------------------------------------------------------------------------------------------
# environment
def environment() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    status = git("status", "--porcelain")
    return {"kind": "env", "cpu": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable,
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "git_sha": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------------------------------
# one run (in a worker subprocess)
def run_flags(spec: dict) -> list:
    """Trainer flags of one run: the tiny demo preset's values, made explicit, then the run's own settings."""
    algo = ALGOS[spec["algo"]]
    G = algo[2]
    flags = ["--steps", str(spec["steps"]), "--batch-size", str(spec["batch"] // G),
             "--max-new-tokens", str(spec["max_new_tokens"]), "--lr", repr(spec["lr"]),
             "--value-lr", repr(spec["value_lr"]), "--eval-every", str(spec["eval_every"]),
             "--eval-size", str(spec["eval_size"]), "--eval-k", str(spec["eval_k"]), "--save-every", "0",
             "--micro-batch-tokens", str(spec["micro_batch_tokens"]), "--seed", str(spec["seed"]),
             "--threads", "1", "--no-progress", "--no-tensorboard", "--device", "cpu", "--grad-clip", "joint",
             "--log-eval-samples", *algo[1]]
    if spec["model"]:
        flags += ["--model", spec["model"]]
    if spec["algo"] == "sppo_critic":
        flags += ["--critic", spec["model_path"]]
    return flags + list(spec.get("data_flags") or [])


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from sppo_fast.cli import build_args
    from sppo_fast.metrics import read_metrics, read_rows
    from sppo_fast.train import main

    t0 = time.perf_counter()
    args = build_args(run_flags(spec) + ["--out-dir", spec["runs_dir"], "--run-name", spec["key"]])
    result = main(args)
    wall = time.perf_counter() - t0
    run_dir = Path(result["run_dir"])
    rows = read_metrics(run_dir)
    k = spec["eval_k"]
    evals = [{"step": r["step"], "tokens": r["rollout/sampled_tokens"], "train_s": r["time/train_s"],
              "pass1": r["eval/pass@1"], "avgk": r[f"eval/avg@{k}"], "response_len": r.get("eval/response_len"),
              "value_pearson": _finite(r.get("eval/value_pearson")), "value_mean": r.get("eval/value_mean")}
             for r in rows if "eval/pass@1" in r]
    train = [r for r in rows if "losses/policy" in r]
    last = train[-10:]
    mean = lambda key, rs: _mean([r.get(key) for r in rs])
    row = {"kind": "run", **{k2: v for k2, v in spec.items() if k2 not in ("runs_dir", "out_json")},
           "evals": evals, "reward_curve": [round(r["reward/mean"], 4) for r in train],
           "train_value_pearson_last10": mean("value/pearson", last), "train_reward_last10": mean("reward/mean", last),
           # where the advantage's signal comes from (Pearson over response tokens, per step; see Stepper.micro_batch)
           "train_advantage_reward_pearson": [_finite(r.get("stats/advantage_reward_pearson")) for r in train],
           "train_token_value_pearson": [_finite(r.get("value/token_pearson")) for r in train],
           "step_s_median": _median([r["perf/rollout_s"] + r["perf/reward_s"] + r["perf/update_s"] for r in train]),
           "rollout_s_median": _median([r["perf/rollout_s"] for r in train]),
           "update_s_median": _median([r["perf/update_s"] for r in train]),
           "wall_s": wall, "final_tokens": evals[-1]["tokens"], "final_train_s": evals[-1]["train_s"],
           "final_pass1": evals[-1]["pass1"], "final_avgk": evals[-1]["avgk"],
           "final_value_pearson": evals[-1]["value_pearson"]}
    row["score"] = (row["final_pass1"] + row["final_avgk"]) / 2
    # per-prompt results of the final eval (for a paired bootstrap over prompts): greedy 0/1 per prompt as a string
    # of "0"/"1", and per prompt the number of its k samples that scored 1 as a string of digits (k <= 9)
    final = [r for r in read_rows(run_dir / "eval_samples.jsonl") if r["step"] == evals[-1]["step"]]
    binary = all(x in (0.0, 1.0) for r in final for x in [r["reward"], *r["sampled_rewards"]])
    if final and binary and k <= 9:
        row["final_pass1_per_prompt"] = "".join(str(int(r["reward"])) for r in final)
        row["final_avgk_counts"] = "".join(str(int(sum(r["sampled_rewards"]))) for r in final)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # keep metrics.jsonl, drop the weights
    Path(spec["out_json"]).write_text(json.dumps(row))
    return 0


def _sha256(path):
    import hashlib
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return 0.0 if xs else None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ---------------------------------------------------------------------------------------------------------------------
# uncertainty: Student t without scipy (not a dependency), intervals that include the fixed eval set's binomial noise,
# Welch's test, and the selection rule for near-ties
def _betacf(a, b, x):
    """Continued fraction of the regularized incomplete beta (modified Lentz, as in Numerical Recipes)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def t_sf2(t, df):
    """Two-sided p-value P(|T| >= |t|) of Student's t with df degrees of freedom (df = inf: the normal)."""
    t = abs(t)
    if math.isinf(df):
        return math.erfc(t / math.sqrt(2))
    if t == 0:
        return 1.0
    x = df / (df + t * t)
    a, b = df / 2, 0.5
    if x <= 0:
        return 0.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return min(1.0, math.exp(lbeta) * _betacf(a, b, x) / a)
    return min(1.0, 1.0 - math.exp(lbeta) * _betacf(b, a, 1 - x) / b)


def t_crit(df, level=0.95):
    """t with P(|T| >= t) = 1 - level (bisection on t_sf2)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf2(mid, df) > 1 - level else (lo, mid)
    return (lo + hi) / 2


def _welch_df(parts):
    """Welch-Satterthwaite degrees of freedom of a sum of variance terms [(variance, df)]; df = inf for a known
    variance (the binomial term). With every term known the result is inf (normal)."""
    tot = sum(v for v, _ in parts)
    den = sum(v * v / d for v, d in parts if not math.isinf(d) and d > 0)
    return tot * tot / den if den > 0 else math.inf


def cell_interval(values, n_eval, level=0.95):
    """Mean and 95% interval of one cell (one algorithm, one metric, n seeds) on a fixed eval set of n_eval prompts.

    Variance of the mean = s^2 / n (seeds) + p(1 - p) / n_eval (the eval set's binomial noise: the same prompts
    score every seed, so averaging seeds does not remove it; for avg@k, p(1-p) bounds the per-prompt variance from
    above, so the term is conservative). The interval is mean ± t · sqrt(variance) with Welch-Satterthwaite df
    (the binomial term counted as known); one seed: binomial term only (normal)."""
    xs = [x for x in values if x is not None]
    if not xs:
        return None
    n, m = len(xs), sum(xs) / len(xs)
    s2 = _std(xs) ** 2 if n > 1 else 0.0
    b = m * (1 - m) / n_eval
    se = math.sqrt(b + s2 / n)
    # df of the seed part alone (n - 1): the known binomial term would raise a Satterthwaite df and could make the
    # interval narrower than the seed-only t interval; this way it is never narrower than either part's
    df = n - 1 if n > 1 else math.inf
    h = t_crit(df, level) * se
    return {"mean": m, "n": n, "sd": math.sqrt(s2) if n > 1 else None, "se": se, "df": df, "lo": m - h, "hi": m + h}


def welch(a, b, n_eval=None):
    """(mean(a) - mean(b), Welch's two-sided p on the seeds, p with the eval set's binomial noise added).

    The first p is Welch's t on the per-seed values: it conditions on this eval set (the question "on these 256
    prompts, does A beat B across training seeds?"). The second adds p_A(1-p_A)/N + p_B(1-p_B)/N to the variance of
    the difference, as if the two algorithms' eval-set errors were independent (they share the prompts, so this is
    an upper bound of that term: conservative), with the same df. None where a side has fewer than 2 values."""
    a, b = [x for x in a if x is not None], [x for x in b if x is not None]
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    parts = [(_std(a) ** 2 / len(a), len(a) - 1), (_std(b) ** 2 / len(b), len(b) - 1)]
    df = _welch_df(parts)  # Welch-Satterthwaite on the seed terms; kept for the second p, so that p_eval >= p
    out = {"diff": ma - mb, "n_a": len(a), "n_b": len(b), "df": df}
    for name, extra in (("p", 0.0), ("p_eval", (ma * (1 - ma) + mb * (1 - mb)) / n_eval if n_eval else None)):
        if extra is None:
            out[name] = None
            continue
        se = math.sqrt(sum(v for v, _ in parts) + extra)
        out[name] = t_sf2(out["diff"] / se, df) if se > 0 else (1.0 if out["diff"] == 0 else 0.0)
    return out


def choose(items, score, prefer, margin):
    """The selection rule: (chosen, tied, broken). `tied` are the items whose score is within `margin` of the best
    (|Δ| < margin: inside the selection noise); among them the one with the smallest `prefer` key wins. `broken` is
    True when that is not the plain maximum (or the maximum itself was an exact tie). margin = 0: the plain maximum,
    first in order on exact ties (the rule before issue 24)."""
    best = max(items, key=score)
    if margin <= 0:
        return best, [best], False
    tied = [i for i in items if score(best) - score(i) < margin]
    chosen = min(tied, key=prefer)
    return chosen, tied, len(tied) > 1


def tie_margin(best_score, n_eval):
    """The selection noise: one binomial sd of a proportion at the best score on the n_eval-prompt eval set."""
    return math.sqrt(max(best_score * (1 - best_score), 0.0) / n_eval)


# ---------------------------------------------------------------------------------------------------------------------
# the plan: sweep -> (edge extension) -> (critic lr) -> seeds, per algorithm, decided from finished runs
class Planner:
    def __init__(self, opts, preset, model_path):
        self.o, self.preset, self.model_path = opts, preset, model_path
        self.decisions, self.chosen = {}, {}  # per algorithm: the selection steps of the last plan(), its choice

    def spec(self, algo, lr, critic_mult, seed):
        o, p = self.o, self.preset
        steps = o.steps * (o.grpo8_step_mult if algo == "grpo8" else 1)
        eval_every = o.eval_every * (o.grpo8_eval_mult if algo == "grpo8" else 1)
        critic = ALGOS[algo][3]
        value_lr = lr * critic_mult if critic else p["value_lr"]
        key = (f"{algo}__lr{lr:.3g}" + (f"_clr{value_lr:.3g}" if critic else "") +
               f"__s{seed}__st{steps}_b{o.batch}_m{o.max_new_tokens}_e{o.eval_size}x{o.eval_k}_ee{eval_every}" +
               (f"_h{o.horizon}" if o.horizon != 20 else ""))
        return {"key": key, "algo": algo, "label": ALGOS[algo][0], "group_size": ALGOS[algo][2],
                "lr_mult": lr / p["lr"], "critic_lr_mult": critic_mult if critic else None, "lr": lr, "value_lr": value_lr,
                "seed": seed, "steps": steps, "batch": o.batch, "max_new_tokens": o.max_new_tokens or p["max_new_tokens"],
                "eval_every": eval_every, "eval_size": o.eval_size, "eval_k": o.eval_k,
                "micro_batch_tokens": p["micro_batch_tokens"], "model": o.model, "model_path": self.model_path,
                "horizon": o.horizon, "data_flags": o.data_flags}

    def _choose(self, algo, configs, score):
        """The rule applied to (lr, critic mult) configs of seed 0: ties within one binomial sd of the best score
        (`--tie-rule sd`) go to the policy lr nearest the preset's (log scale), then critic lr = policy lr (x1),
        then the smaller lr; `--tie-rule max` is the plain maximum (the rule before issue 24). Records the decision."""
        o, lr0 = self.o, self.preset["lr"]
        best = max(configs, key=lambda mc: score(*mc))
        margin = tie_margin(score(*best), o.eval_size) if o.tie_rule == "sd" else 0.0
        chosen, tied, broken = choose(configs, lambda mc: score(*mc),
                                      lambda mc: (round(abs(math.log(mc[0] / lr0)), 9), abs(math.log(mc[1])), mc[0]),
                                      margin)
        self.decisions.setdefault(algo, []).append(
            {"configs": [[m, c, score(m, c)] for m, c in configs], "max": list(best), "chosen": list(chosen),
             "tied": [list(t) for t in tied], "margin": margin, "broken": broken and chosen != best,
             "exact_tie": sum(score(*mc) == score(*best) for mc in configs) > 1})
        return chosen

    def plan(self, algo, done):
        """(specs needed so far, finished?) given `done` (key -> run row)."""
        o = self.o
        self.decisions[algo] = []
        seed0 = o.seeds[0]
        mults = list(o.lrs)
        needed = [self.spec(algo, m, 1.0, seed0) for m in mults]
        if not all(s["key"] in done for s in needed):
            return needed, False
        score = lambda m, c=1.0: done[self.spec(algo, m, c, seed0)["key"]]["score"]
        for _ in range(o.extend_edges):
            best = self._choose(algo, [(m, 1.0) for m in mults], score)[0]
            lo, hi = min(mults), max(mults)
            if len(mults) < 2 or lo < best < hi:
                break
            new = lo / o.extend_factor if best == lo else hi * o.extend_factor
            mults.append(new)
            needed.append(self.spec(algo, new, 1.0, seed0))
            if needed[-1]["key"] not in done:
                return needed, False
        best_m = self._choose(algo, [(m, 1.0) for m in mults], score)[0]
        configs = [(best_m, 1.0)]
        if ALGOS[algo][3]:
            for c in o.critic_lr_mults:
                if c != 1.0:
                    needed.append(self.spec(algo, best_m, c, seed0))
                    configs.append((best_m, c))
            if not all(s["key"] in done for s in needed):
                return needed, False
        best_cfg = self._choose(algo, configs, score) if len(configs) > 1 else configs[0]
        self.chosen[algo] = best_cfg
        needed += [self.spec(algo, *best_cfg, s) for s in o.seeds[1:]]
        return needed, all(s["key"] in done for s in needed)

    def best(self, algo, done):
        """The specs of the chosen configuration, one per seed (after plan() says finished)."""
        needed, _ = self.plan(algo, done)
        last = needed[-len(self.o.seeds) + 1:] if len(self.o.seeds) > 1 else []
        seed0 = self.o.seeds[0]
        if last:
            first = self.spec(algo, last[0]["lr"], last[0]["critic_lr_mult"] or 1.0, seed0)
        else:  # one seed: the best seed-0 run
            first = max((s for s in needed if s["seed"] == seed0), key=lambda s: done[s["key"]]["score"])
        return [first] + last


def run_all(opts, planner, done, jsonl_path, work_dir):
    """Run every planned spec, `workers` at a time, appending each finished row to the JSONL."""
    running, failed = {}, {}
    t_start = time.perf_counter()
    while True:
        for key, (proc, spec, t0, log) in list(running.items()):
            if proc.poll() is None:
                if time.perf_counter() - t0 > opts.run_timeout:
                    proc.kill()
                continue
            del running[key]
            log.close()
            out_json = Path(spec["out_json"])
            if proc.returncode == 0 and out_json.is_file():
                row = json.loads(out_json.read_text())
                done[key] = row
                with open(jsonl_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"[{time.perf_counter() - t_start:6.0f}s] done {key}: pass@1 {row['final_pass1']:.3f} "
                      f"avg@{opts.eval_k} {row['final_avgk']:.3f} ({row['wall_s']:.0f}s)", flush=True)
            else:
                tail = Path(log.name).read_text()[-3000:]
                failed[key] = tail
                print(f"FAILED {key} (exit {proc.returncode}); log tail:\n{tail}", flush=True)
        todo = []
        for algo in opts.algos:
            needed, _ = planner.plan(algo, done)
            todo += [s for s in needed if s["key"] not in done and s["key"] not in running and s["key"] not in failed]
        if not running and not todo:
            return failed  # everything planned is done (or blocked behind a failed run)
        todo.sort(key=lambda s: -s["steps"])  # long runs first: better packing of the workers
        while todo and len(running) < opts.workers:
            spec = todo.pop(0)
            spec = {**spec, "runs_dir": str(work_dir / "runs"), "out_json": str(work_dir / f"{spec['key']}.json")}
            Path(spec["out_json"]).unlink(missing_ok=True)
            spec_path = work_dir / f"{spec['key']}.spec.json"
            spec_path.write_text(json.dumps(spec))
            shutil.rmtree(work_dir / "runs" / spec["key"], ignore_errors=True)  # a crashed attempt: start over
            log = open(work_dir / f"{spec['key']}.log", "w")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)],
                                    cwd=work_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[spec["key"]] = (proc, spec, time.perf_counter(), log)
            print(f"[{time.perf_counter() - t_start:6.0f}s] start {spec['key']}", flush=True)
        time.sleep(0.5)


def run_specs(specs, done, jsonl_path, work_dir, *, workers, run_timeout):
    """`run_all` over a fixed list of specs, no planning (the estimate's timed runs, bench_value_calibration's
    reruns); returns the failed ones."""
    class Fixed:  # run_all's planner interface
        def plan(self, algo, _done):
            return [s for s in specs if s["algo"] == algo], True

    opts = argparse.Namespace(workers=workers, run_timeout=run_timeout, eval_k=specs[0]["eval_k"],
                              algos=list(dict.fromkeys(s["algo"] for s in specs)))
    return run_all(opts, Fixed(), done, jsonl_path, work_dir)


# ---------------------------------------------------------------------------------------------------------------------
# analysis
def mean_curve(rows, x="tokens", y="pass1"):
    """Seed-mean curve over the shared eval points: [(mean x, mean y, min y, max y)]."""
    n = min(len(r["evals"]) for r in rows)
    out = []
    for i in range(n):
        xs = [r["evals"][i][x] for r in rows]
        ys = [r["evals"][i][y] for r in rows]
        out.append((sum(xs) / len(xs), sum(ys) / len(ys), min(ys), max(ys)))
    return out


def interp(curve, x0):
    """y of a (x, y, ...) curve at x0 (linear between points; None beyond its end)."""
    for (xa, ya, *_), (xb, yb, *_) in zip(curve, curve[1:]):
        if xa <= x0 <= xb:
            return ya if xb == xa else ya + (yb - ya) * (x0 - xa) / (xb - xa)
    if curve and abs(curve[-1][0] - x0) <= 1e-9 * max(1.0, abs(x0)):
        return curve[-1][1]
    return None


def first_reach(curve, threshold):
    """x at which the curve first reaches threshold (linear between eval points); None if never."""
    if curve and curve[0][1] >= threshold:
        return curve[0][0]
    for (xa, ya, *_), (xb, yb, *_) in zip(curve, curve[1:]):
        if ya < threshold <= yb:
            return xa + (xb - xa) * (threshold - ya) / (yb - ya)
    return None


def quarter_gap(sppo_rows, g8_tokens, threshold, y):
    """How far SPPO is from the threshold within the target's budget (1/4 of GRPO G=8's tokens): its seed-mean
    accuracy at that budget (or at its last eval, when its run is shorter) and that accuracy minus the threshold."""
    c = mean_curve(sppo_rows, "tokens", y)
    acc = interp(c, min(g8_tokens / 4, c[-1][0]))
    return acc, acc - threshold


def summarize(opts, planner, done):
    best = {a: [done[s["key"]] for s in planner.best(a, done)] for a in opts.algos}
    summ = {}
    for a, rows in best.items():
        fp = [r["final_pass1"] for r in rows]
        fk = [r["final_avgk"] for r in rows]
        summ[a] = {"kind": "summary", "algo": a, "label": ALGOS[a][0], "seeds": [r["seed"] for r in rows],
                   "lr": rows[0]["lr"], "lr_mult": rows[0]["lr_mult"], "value_lr": rows[0]["value_lr"],
                   "critic_lr_mult": rows[0]["critic_lr_mult"], "steps": rows[0]["steps"],
                   "prompts_per_step": rows[0]["batch"] // rows[0]["group_size"],
                   "samples_per_step": rows[0]["batch"],
                   "start_pass1": _mean([r["evals"][0]["pass1"] for r in rows]),
                   "start_avgk": _mean([r["evals"][0]["avgk"] for r in rows]),
                   "final_pass1": _mean(fp), "final_pass1_std": _std(fp),
                   "final_avgk": _mean(fk), "final_avgk_std": _std(fk),
                   "final_tokens": _mean([r["final_tokens"] for r in rows]),
                   "final_train_s": _mean([r["final_train_s"] for r in rows]),
                   "step_s": _mean([r["step_s_median"] for r in rows]),
                   "eval_value_pearson": _mean([r["final_value_pearson"] for r in rows]),
                   "train_value_pearson": _mean([r["train_value_pearson_last10"] for r in rows]),
                   "runs": [r["key"] for r in rows]}
    # accuracy at equal sampled tokens: the smallest final budget of any run, so that every seed of every algorithm
    # has a value there (a seed-mean budget would drop the seeds that sampled fewer tokens)
    t_eq = min(r["final_tokens"] for rows in best.values() for r in rows)
    ref = "grpo8" if "grpo8" in summ else None
    for a, rows in best.items():
        s = summ[a]
        s["equal_tokens"] = t_eq
        for y in ("pass1", "avgk"):
            s[f"{y}_at_equal_tokens"] = _mean([interp(mean_curve([r], "tokens", y), t_eq) for r in rows])
            if ref:
                thr = summ[ref][f"final_{y}"] - opts.margin
                s[f"threshold_{y}"] = thr
                s[f"tokens_to_threshold_{y}"] = first_reach(mean_curve(rows, "tokens", y), thr)
                s[f"train_s_to_threshold_{y}"] = first_reach(mean_curve(rows, "train_s", y), thr)
    verdict = None
    if "sppo" in summ and ref:
        s, g = summ["sppo"], summ[ref]
        verdict = {"kind": "verdict", "reference": ref, "margin": opts.margin,
                   "grpo8_final_tokens": g["final_tokens"], "max_tokens": g["final_tokens"] / 4}
        for y in ("pass1", "avgk"):
            t = s[f"tokens_to_threshold_{y}"]
            verdict[f"sppo_tokens_to_threshold_{y}"] = t
            verdict[f"sppo_token_fraction_{y}"] = t / g["final_tokens"] if t is not None else None
            verdict[f"met_{y}"] = t is not None and t <= g["final_tokens"] / 4
            # by how much: a missed target is reported with its gap, not just "never"
            verdict[f"sppo_at_quarter_{y}"], verdict[f"sppo_gap_at_quarter_{y}"] = quarter_gap(
                best["sppo"], g["final_tokens"], s[f"threshold_{y}"], y)
        for ppo in ("ppo", "ppo_l1"):
            if ppo in summ:
                for y in ("pass1", "avgk"):
                    verdict[f"beats_{ppo}_{y}"] = s[f"final_{y}"] > summ[ppo][f"final_{y}"]
                    verdict[f"sppo_minus_{ppo}_{y}"] = s[f"final_{y}"] - summ[ppo][f"final_{y}"]
    return summ, verdict, best


COMPARISONS = (  # the headline comparisons: (a, b, metric, where); "equal" = at the smallest final token budget
    ("sppo", "grpo8", "pass1", "equal"), ("sppo", "grpo8", "avgk", "equal"),
    ("sppo", "grpo8", "pass1", "final"), ("sppo", "grpo8", "avgk", "final"),
    ("sppo", "grpo4", "pass1", "final"), ("sppo", "ppo", "pass1", "final"), ("sppo", "ppo", "avgk", "final"),
    ("sppo", "ppo_l1", "pass1", "final"), ("sppo", "ppo_l1", "avgk", "final"),
    ("sppo", "sppo_critic", "pass1", "final"), ("sppo", "sppo_critic", "avgk", "final"))


def selection_free(opts, planner, legacy, done):
    """Per algorithm, the numbers over seeds that played no part in selection (every seed but opts.seeds[0], which
    ran the sweep), for the configuration the tie rule chooses; where that configuration has no such seed yet (the
    rule changed the choice and `--fresh-seeds` has not run), the plain maximum's (`legacy`) fresh seeds, flagged.
    Then the headline comparisons on those seeds (`welch`)."""
    n_eval = opts.eval_size
    out = {}
    for a in opts.algos:
        needed, _ = planner.plan(a, done)
        dec = planner.decisions.get(a, [])
        cfg = planner.chosen.get(a)
        rows, source = [], "rule"
        if cfg is not None:
            rows = [done[k] for k in (planner.spec(a, *cfg, sd)["key"] for sd in opts.seeds[1:]) if k in done]
        prev = None
        if legacy is not None:
            legacy.plan(a, done)
            prev = legacy.chosen.get(a)
        if not rows and prev is not None:
            rows = [done[k] for k in (legacy.spec(a, *prev, sd)["key"] for sd in legacy.o.seeds[1:]) if k in done]
            source = "previous"
        # the rule's choice so far: the full config once its runs exist, else its latest step's pick (pending)
        pick = list(cfg) if cfg else (dec[-1]["chosen"] if dec else None)
        out[a] = {"algo": a, "label": ALGOS[a][0], "chosen": pick, "chosen_final": cfg is not None,
                  "previous": list(prev) if prev else None, "source": source,
                  "changed": bool(pick and prev and tuple(pick) != tuple(prev)),
                  "tie_broken": any(d["broken"] for d in dec), "exact_tie": any(d["exact_tie"] for d in dec),
                  "decisions": dec, "seeds": [r["seed"] for r in rows], "runs": [r["key"] for r in rows],
                  "lr": rows[0]["lr"] if rows else None, "value_lr": rows[0]["value_lr"] if rows else None,
                  "missing_seeds": [sd for sd in opts.seeds[1:] if cfg and
                                    planner.spec(a, *cfg, sd)["key"] not in done],
                  "pending_runs": [x["key"] for x in needed if x["key"] not in done], "_rows": rows}
    t_eq = min((r["final_tokens"] for f in out.values() for r in f["_rows"]), default=None)
    for f in out.values():
        rows = f.pop("_rows")
        f["equal_tokens"] = t_eq
        for y in ("pass1", "avgk"):
            f[f"final_{y}_values"] = [r[f"final_{y}"] for r in rows]
            f[f"final_{y}"] = cell_interval(f[f"final_{y}_values"], n_eval)
            f[f"{y}_at_equal_tokens_values"] = [interp(mean_curve([r], "tokens", y), t_eq) for r in rows] if t_eq else []
            f[f"{y}_at_equal_tokens"] = cell_interval(f[f"{y}_at_equal_tokens_values"], n_eval)
    comps = []
    for a, b, y, where in COMPARISONS:
        if a in out and b in out:
            key = f"final_{y}_values" if where == "final" else f"{y}_at_equal_tokens_values"
            w = welch(out[a][key], out[b][key], n_eval)
            comps.append({"a": a, "b": b, "metric": y, "where": where, "test": w})
    return out, comps


# ---------------------------------------------------------------------------------------------------------------------
# report
def fmt(x, f=".3f", none="-"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, f)


def pct(x, sd=None):
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def ci(c, none="-"):
    """'mean [lo, hi] (n=…)' in percent of a cell_interval."""
    if not c:
        return none
    # an accuracy lies in [0, 100]: the interval is shown clipped to it (n=2 gives t = 12.7 and wide intervals)
    return f"{100 * c['mean']:.1f} [{100 * max(c['lo'], 0.0):.1f}, {100 * min(c['hi'], 1.0):.1f}] (n={c['n']})"


def pval(p):
    return "-" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def _cfg(a, cfg):
    if not cfg:
        return "-"
    lr, c = cfg
    return f"{lr:.3g}" + (f" (critic ×{c:g})" if ALGOS[a][3] else "")


def free_markdown(opts, free, comps, horizon):
    """The selection-free table, the headline comparisons and the footer that says how both are computed."""
    k, s0 = opts.eval_k, opts.seeds[0]
    eq = next(iter(free.values()))["equal_tokens"] if free else None
    L = [f"## Selection-free results, horizon {horizon} (seeds other than the selection seed {s0})\n",
         f"Seed {s0} chose each configuration (the lr sweep) and is left out here. Chosen by the rule: ties on seed "
         f"{s0}'s score within one binomial sd of the best (sqrt(s(1-s)/{opts.eval_size})) go to the policy lr nearest "
         f"the preset's, then critic lr ×1, then the smaller lr (`--tie-rule {opts.tie_rule}`). Target: "
         f"{len(opts.seeds) - 1} selection-free seeds per cell (`--fresh-seeds` adds them).\n",
         f"| algorithm | chosen lr (rule) | seed-0 argmax (before) | selection | seeds | pass@1 % [95% CI] | "
         f"avg@{k} % [95% CI] | pass@1 @ {fmt(eq, ',.0f')} tok % [95% CI] | avg@{k} @ equal tok % [95% CI] |",
         "|" + "---|" * 9]
    for a, f in free.items():
        sel = []
        for d in f["decisions"]:
            if d["broken"] or d["exact_tie"]:
                sel.append(("exact tie" if d["exact_tie"] else "tie") + f" within {100 * d['margin']:.1f} pts: "
                           + ", ".join(_cfg(a, t) for t in d["tied"]) + f" → rule picks {_cfg(a, d['chosen'])}")
        # the planner records a decision at every re-plan: the same tie can come back after a resumed sweep
        note = "; ".join(dict.fromkeys(sel)) or "clear maximum"
        if f["changed"]:
            note += " — **the rule changes the choice**"
        if not f.get("chosen_final", True) and f["pending_runs"]:
            note += (f"; the rule's choice is not final until {len(f['pending_runs'])} more seed-{s0} run(s) "
                     "(edge extension / critic lr) finish (`--fresh-seeds`)")
        if f["source"] == "previous":
            note += "; numbers below are the seed-0 argmax's fresh seeds (rule's choice: 0 seeds, run `--fresh-seeds`)"
        elif f["missing_seeds"]:
            note += f"; seeds {','.join(map(str, f['missing_seeds']))} pending (`--fresh-seeds`)"
        pend = "" if f.get("chosen_final", True) else " (so far)"
        L.append(f"| {f['label']} | {_cfg(a, f['chosen'])}{pend} | {_cfg(a, f['previous'])} | {note} | "
                 f"{','.join(map(str, f['seeds'])) or '-'} | {ci(f['final_pass1'])} | {ci(f['final_avgk'])} | "
                 f"{ci(f['pass1_at_equal_tokens'])} | {ci(f['avgk_at_equal_tokens'])} |")
    L += ["", f"### Headline comparisons, horizon {horizon} (selection-free seeds)\n",
          "| comparison | metric | difference, points | n (a / b) | Welch p (seeds, this eval set) | "
          "p incl. eval-set noise |", "|---|---|---|---|---|---|"]
    for c in comps:
        w, name = c["test"], f"{ALGOS[c['a']][0]} − {ALGOS[c['b']][0]}"
        metric = ("pass@1" if c["metric"] == "pass1" else f"avg@{k}") + (" final" if c["where"] == "final" else
                                                                          f" @ {fmt(eq, ',.0f')} tok")
        if w is None:
            L.append(f"| {name} | {metric} | - | - | needs ≥ 2 seeds a side | - |")
        else:
            L.append(f"| {name} | {metric} | {100 * w['diff']:+.1f} | {w['n_a']} / {w['n_b']} | {pval(w['p'])} | "
                     f"{pval(w['p_eval'])} |")
    L += ["", f"How these are computed: per cell, mean over the selection-free seeds; 95% CI = mean ± t·sqrt(s²/n + "
          f"p(1−p)/{opts.eval_size}), s the seed sd, p the mean, {opts.eval_size} the fixed eval prompts (their "
          "binomial noise is shared by every seed, so it does not average out; for avg@k p(1−p) is an upper bound), "
          "t with n−1 df (n=1: normal), shown clipped to [0, 100]. Comparisons: Welch's t-test on the per-seed values (two-sided, "
          "Welch-Satterthwaite df), first conditional on this eval set, then with p_a(1−p_a)/N + p_b(1−p_b)/N "
          "added to the variance of the difference at the same df (eval-set noise as if independent between the two "
          "algorithms: an upper bound, since they share the prompts, so that p is conservative). With n=2 a side the test has "
          "1-2 df and little power: a large p is not evidence of a tie. Only runs made from 2026-12-07 on hold "
          "per-prompt results (`final_pass1_per_prompt`, `final_avgk_counts`), not every seed here, so there is no "
          "paired bootstrap over prompts.", ""]
    return L


def write_markdown(path, opts, env, preset, done, summ, verdict, png_name, failed, total_wall, best_rows=None,
                   free=None, comps=None):
    best_rows = best_rows or {}
    k = opts.eval_k
    L = []
    L.append(f"# Learning efficiency on CPU, horizon {opts.horizon} — {env['timestamp'][:10]}\n")
    L.append(f"Machine: {env['cpu']}, {env['usable_cores']} usable cores (shared with other jobs; 1-min load "
             f"{fmt(env['load_avg_1m'], '.1f')} at start), torch {env['torch']}, transformers {env['transformers']}, "
             f"git {env['git_sha']}{' (dirty tree)' if env['git_dirty'] else ''}. {len(done)} runs, {opts.workers} at a "
             f"time, 1 torch thread each; {total_wall / 60:.1f} min of wall-clock over "
             f"{len(env['wall_s_invocations'])} recorded invocation(s) of the resumable script (invocations killed "
             f"before they finished are not counted), {env['wall_s_all_runs'] / 3600:.2f} "
             f"process-hours in the finished runs.\n")
    L.append(f"Task: horizon {opts.horizon} (responses of ~{opts.horizon} tokens), tiny model "
             f"({opts.model or 'sppo_fast/assets/tiny'}), synthetic addition chains {opts.task}, "
             f"held-out set of {opts.eval_size} prompts. Every algorithm samples {opts.batch} responses per step; "
             f"{opts.steps} steps (GRPO G=8: {opts.steps * opts.grpo8_step_mult}); max {opts.max_new_tokens or preset['max_new_tokens']} "
             f"new tokens, temperature 0.6. pass@1 = greedy accuracy, avg@{k} = mean accuracy of {k} samples per "
             f"prompt at T=0.6. Policy lr sweep: {{{', '.join(f'{m:g}' for m in opts.lrs)}}} (the demo preset's lr is {preset['lr']:g}) "
             f"(extended once past an edge when the best is at the edge), seed {opts.seeds[0]}; critic-LLM algorithms "
             f"also try critic lr = lr × {{{', '.join(f'{m:g}' for m in opts.critic_lr_mults)}}}; selection by final "
             f"(pass@1 + avg@{k})/2; the chosen configuration runs seeds {', '.join(map(str, opts.seeds))}. "
             f"SPPO's shared value head: value_lr {preset['value_lr']:g} (preset).\n")
    L.append(f"![learning curves]({png_name})\n")
    if free:
        L += free_markdown(opts, free, comps, opts.horizon)
    L.append("## Results at each algorithm's best learning rate, selection seed included (mean ± sd over seeds; the "
             "seed-0 argmax, the numbers committed before issue 24)\n")
    hdr = ["algorithm", "lr", "critic lr", "prompts×samples/step", "steps", "pass@1 start→final %",
           f"avg@{k} start→final %", "sampled tokens", "train s", f"pass@1 @ {fmt(next(iter(summ.values()))['equal_tokens'], '.0f')} tok %",
           f"avg@{k} @ equal tok %", "tokens to pass@1 thr", "tokens to avg@k thr", "train s to pass@1 thr",
           "V–R pearson (eval / train)"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "---|" * len(hdr))
    for a, s in summ.items():
        G = ALGOS[a][2]
        L.append("| " + " | ".join([
            s["label"], f"{s['lr']:.3g}", f"{s['value_lr']:.3g}" if ALGOS[a][3] else f"(head {s['value_lr']:g})" if a.startswith("sppo") else "-",
            f"{s['prompts_per_step']}×{G}", str(s["steps"]),
            f"{pct(s['start_pass1'])} → {pct(s['final_pass1'], s['final_pass1_std'])}",
            f"{pct(s['start_avgk'])} → {pct(s['final_avgk'], s['final_avgk_std'])}",
            fmt(s["final_tokens"], ",.0f"), fmt(s["final_train_s"], ".0f"),
            pct(s["pass1_at_equal_tokens"]), pct(s["avgk_at_equal_tokens"]),
            fmt(s.get("tokens_to_threshold_pass1"), ",.0f", "not reached"),
            fmt(s.get("tokens_to_threshold_avgk"), ",.0f", "not reached"),
            fmt(s.get("train_s_to_threshold_pass1"), ".0f", "not reached"),
            f"{fmt(s['eval_value_pearson'], '.2f')} / {fmt(s['train_value_pearson'], '.2f')}"]) + " |")
    L.append("")
    if "grpo8" in summ:
        g = summ["grpo8"]
        L.append(f"Thresholds: GRPO G=8's final accuracy minus {100 * opts.margin:.0f} points: pass@1 "
                 f"{pct(g['threshold_pass1'])} %, avg@{k} {pct(g['threshold_avgk'])} %. \"tokens to thr\": sampled "
                 f"tokens at which the seed-mean curve first reaches it (linear between eval points).\n")
    L.append("Columns: *lr* policy learning rate; *critic lr* the critic LLM's (+ its head's) rate, or SPPO's shared "
             "head's; *sampled tokens* cumulative response tokens at the end; *train s* cumulative training seconds "
             "(rollout + reward + update, evaluation excluded; CPU shared with other jobs, so only roughly "
             "comparable); *@ equal tok* accuracy interpolated at the smallest final token budget among the "
             "algorithms; *V–R pearson* Pearson correlation of the critic's V(prompt) with the reward: eval = "
             "final held-out eval (greedy-prompt V against the k sampled rewards), train = mean of the last 10 "
             "training steps.\n")
    if verdict:
        L.append("## Verdict on the target\n")
        L.append("Target: SPPO reaches GRPO(G=8)'s final accuracy within "
                 f"{100 * opts.margin:.0f} points using ≤ 1/4 of its sampled tokens, and beats PPO.\n")
        for y, name in (("pass1", "greedy pass@1"), ("avgk", f"avg@{k}")):
            t, fr = verdict[f"sppo_tokens_to_threshold_{y}"], verdict[f"sppo_token_fraction_{y}"]
            L.append(f"- {name}: SPPO {'reaches' if t is not None else 'does not reach'} the threshold"
                     + (f" at {t:,.0f} tokens = {fr:.2f} of GRPO G=8's {verdict['grpo8_final_tokens']:,.0f}" if t is not None else "")
                     + f" → **{'met' if verdict[f'met_{y}'] else 'not met'}**; within 1/4 of G=8's tokens it is at "
                     f"{pct(verdict[f'sppo_at_quarter_{y}'])} %, {100 * verdict[f'sppo_gap_at_quarter_{y}']:+.1f} points "
                     f"from the threshold.")
        fr = lambda a, y: (summ[a].get(f"tokens_to_threshold_{y}") / verdict["grpo8_final_tokens"]
                           if summ[a].get(f"tokens_to_threshold_{y}") is not None else None)
        L.append("- The same test for every algorithm (fraction of GRPO G=8's tokens needed to reach the threshold, "
                 f"pass@1 / avg@{k}; ≤ 0.25 passes): " + ", ".join(
                     f"{summ[a]['label']} {fmt(fr(a, 'pass1'), '.2f', 'never')} / {fmt(fr(a, 'avgk'), '.2f', 'never')}"
                     for a in summ) + ".")
        g_rows = best_rows.get("grpo8") or []
        if g_rows:
            g = summ["grpo8"]
            for y, name in (("pass1", "pass@1"), ("avgk", f"avg@{k}")):
                c = mean_curve(g_rows, "tokens", y)
                late = interp(c, 0.75 * c[-1][0])
                if late is not None:
                    gain = c[-1][1] - late
                    L.append(f"- GRPO G=8 {name} over the last quarter of its budget: {pct(late)} → {pct(c[-1][1])} "
                             f"({100 * gain:+.1f} points)" + (": still improving, so its final accuracy is a lower "
                                                              "bound of its plateau." if gain > opts.margin else
                                                              ": about flat."))
        for ppo in ("ppo", "ppo_l1"):
            if f"beats_{ppo}_pass1" in verdict:
                name = summ[ppo]["label"]
                L.append(f"- vs {name} (final, mean over seeds): pass@1 "
                         f"{'beats' if verdict[f'beats_{ppo}_pass1'] else 'does not beat'} it "
                         f"({100 * verdict[f'sppo_minus_{ppo}_pass1']:+.1f} points), avg@{k} "
                         f"{'beats' if verdict[f'beats_{ppo}_avgk'] else 'does not beat'} it "
                         f"({100 * verdict[f'sppo_minus_{ppo}_avgk']:+.1f}).")
        L.append("")
    L.append("## Learning-rate sweep (seed %d, final eval)\n" % opts.seeds[0])
    L.append(f"| algorithm | lr | critic lr | pass@1 % | avg@{k} % | score | train s | chosen |")
    L.append("|---|---|---|---|---|---|---|---|")
    for a in opts.algos:
        rows = sorted((r for r in done.values() if r["algo"] == a and r["seed"] == opts.seeds[0]),
                      key=lambda r: (r["lr"], r["value_lr"]))
        f = (free or {}).get(a) or {}
        for r in rows:
            clr = "-" if ALGOS[a][2] > 1 else f"{r['value_lr']:.3g}" + ("" if ALGOS[a][3] else " (head)")
            cfg = [r["lr"], r["critic_lr_mult"] or 1.0]
            mark = ", ".join(m for m, c in (("rule", f.get("chosen")), ("argmax", f.get("previous"))) if c == cfg)
            L.append(f"| {r['label']} | {r['lr']:.3g} | {clr} | {pct(r['final_pass1'])} | "
                     f"{pct(r['final_avgk'])} | {100 * r['score']:.1f} | {r['final_train_s']:.0f} | {mark} |")
    L.append("")
    L.append("## Every run\n")
    L.append(f"| run | pass@1 % | avg@{k} % | tokens | train s | wall s |")
    L.append("|---|---|---|---|---|---|")
    for r in sorted(done.values(), key=lambda r: r["key"]):
        L.append(f"| {r['key']} | {pct(r['final_pass1'])} | {pct(r['final_avgk'])} | {r['final_tokens']:,.0f} | "
                 f"{r['final_train_s']:.0f} | {r['wall_s']:.0f} |")
    if failed:
        L.append("\nFailed runs: " + ", ".join(failed))
    Path(path).write_text("\n".join(L) + "\n")


def plot(path, opts, summ, best, done, chosen=None, curve_note="seed-mean"):
    """`best`: per algorithm the runs drawn as curves (the selection-free seeds where there are any); `chosen`: per
    algorithm the (lr, critic mult) to ring in the sweep panel."""
    chosen = chosen or {}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = opts.eval_k
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for i in range(2):  # the tokens and seconds panels of one metric are read against each other: one y scale
        axes[i, 1].sharey(axes[i, 0])
    colors = {"sppo": "C0", "grpo4": "C1", "grpo8": "C2", "ppo": "C3", "sppo_critic": "C4", "ppo_l1": "C5"}
    for i, (y, yname) in enumerate((("pass1", "greedy pass@1"), ("avgk", f"avg@{k}"))):
        for j, (x, xname) in enumerate((("tokens", "sampled tokens"), ("train_s", "training seconds (eval excluded)"))):
            ax = axes[i, j]
            for a, rows in best.items():
                if not rows:
                    continue
                c = mean_curve(rows, x, y)
                xs = [p[0] for p in c]
                ax.plot(xs, [p[1] for p in c], color=colors.get(a), marker="o", markersize=3,
                        label=f"{ALGOS[a][0]} (lr {rows[0]['lr']:.2g}, seeds {','.join(str(r['seed']) for r in rows)})")
                ax.fill_between(xs, [p[2] for p in c], [p[3] for p in c], color=colors.get(a), alpha=0.15)
            if "grpo8" in summ and x == "tokens":
                ax.axhline(summ["grpo8"][f"threshold_{y}"], color="gray", ls=":", lw=1)
                ax.axvline(summ["grpo8"]["final_tokens"] / 4, color="gray", ls="--", lw=1)
            ax.set_xlabel(xname)
            ax.set_ylabel(yname)
            ax.set_title(f"horizon {opts.horizon}: {yname} vs {xname.split(' (')[0]}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[i, 0].legend(fontsize=7)
    ax = axes[0, 2]
    for a in opts.algos:
        seed0 = [r for r in done.values() if r["algo"] == a and r["seed"] == opts.seeds[0]]
        rows = sorted((r for r in seed0 if r["critic_lr_mult"] in (None, 1.0)), key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in rows], [r["score"] for r in rows], color=colors.get(a), marker="o", label=ALGOS[a][0])
        for r in seed0:  # the critic-lr runs (×10 at the best policy lr): same colour, an x
            if r["critic_lr_mult"] not in (None, 1.0):
                ax.plot([r["lr"]], [r["score"]], color=colors.get(a), marker="x", ms=8, ls="none",
                        label=f"{ALGOS[a][0]}, critic lr ×{r['critic_lr_mult']:g}")
        cfg = chosen.get(a)
        hit = [r for r in seed0 if cfg and [r["lr"], r["critic_lr_mult"] or 1.0] == list(cfg)]
        if hit:  # the configuration the rule chose: a ring around its point
            ax.plot([hit[0]["lr"]], [hit[0]["score"]], marker="o", ms=13, mfc="none", mec=colors.get(a), mew=1.5,
                    ls="none")
    ax.set_xscale("log")
    ax.set_xlabel("policy lr (seed %d)" % opts.seeds[0])
    ax.set_ylabel(f"final (pass@1 + avg@{k}) / 2")
    ax.set_title(f"horizon {opts.horizon}: learning-rate sweep, seed {opts.seeds[0]} (ring: chosen; x: critic lr ×10)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    for a, rows in best.items():
        for n, r in enumerate(rows):
            curve = r["reward_curve"]
            xs = [(t + 1) * opts.batch for t in range(len(curve))]
            smooth = [sum(curve[max(0, t - 4):t + 1]) / len(curve[max(0, t - 4):t + 1]) for t in range(len(curve))]
            ax.plot(xs, smooth, color=colors.get(a), alpha=0.6, lw=1, label=ALGOS[a][0] if n == 0 else None)
    ax.set_xlabel("samples drawn")
    ax.set_ylabel("training reward (5-step mean)")
    ax.set_title(f"horizon {opts.horizon}: training reward", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Horizon {opts.horizon} (~{opts.horizon}-token responses): SPPO vs GRPO vs PPO on the tiny model "
                 f"({curve_note}, band = min..max over seeds); dotted: GRPO G=8 final − {100 * opts.margin:.0f} pts "
                 "(all seeds), dashed: 1/4 of GRPO G=8's tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_horizons(jsonl_paths, path) -> None:
    """One PNG over horizons: per finished benchmark JSONL (one per --horizon), greedy pass@1 and avg@k against
    sampled tokens for each algorithm's chosen configuration (seed mean, band = min..max over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sppo": "C0", "grpo4": "C1", "grpo8": "C2", "ppo": "C3", "sppo_critic": "C4", "ppo_l1": "C5"}
    files = [Path(p) for p in jsonl_paths]
    # one y scale per row: horizons are compared side by side, and a panel scaled to its own 2 points of range
    # makes eval noise look like learning
    fig, axes = plt.subplots(2, len(files), figsize=(5.5 * len(files), 8), squeeze=False, sharey="row")
    for j, f in enumerate(files):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        env = next((r for r in rows if r["kind"] == "env"), {})
        runs = {r["key"]: r for r in rows if r["kind"] == "run"}
        k = (env.get("settings") or {}).get("eval_k", 4)
        for i, (y, yname) in enumerate((("pass1", "greedy pass@1"), ("avgk", f"avg@{k}"))):
            ax = axes[i, j]
            for s in (r for r in rows if r["kind"] == "summary"):
                # the selection-free seeds where the summary has them (seed 0 chose the lr), else every seed
                keys = [key for key in (s.get("free") or {}).get("runs", []) if key in runs] or s["runs"]
                c = mean_curve([runs[key] for key in keys], "tokens", y)
                xs = [q[0] for q in c]
                lr = runs[keys[0]]["lr"]
                ax.plot(xs, [q[1] for q in c], color=colors.get(s["algo"]), marker="o", markersize=3,
                        label=f"{s['label']} (lr {lr:.2g}, seeds {','.join(str(runs[key]['seed']) for key in keys)})")
                ax.fill_between(xs, [q[2] for q in c], [q[3] for q in c], color=colors.get(s["algo"]), alpha=0.15)
            ax.set_title(f"horizon {env.get('horizon', 20)}: {yname} ({f.stem})", fontsize=9)
            ax.yaxis.set_tick_params(labelleft=True)
            ax.set_xlabel("sampled tokens")
            ax.set_ylabel(yname)
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=7)
    fig.suptitle("Accuracy vs sampled tokens per horizon, each algorithm's chosen configuration: seed mean over the "
                 "selection-free seeds (seed 0 chose the lr), band = min..max over those seeds; one y scale per row",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def horizon_table(jsonl_paths, path) -> None:
    """One markdown table over horizons from finished benchmark JSONLs: per horizon and algorithm, the chosen
    configuration's final accuracy, the sampled tokens (as a fraction of GRPO G=8's) and training seconds to GRPO
    G=8's final accuracy minus the margin, and the critic's Pearson(V, R); then the issue's two tests per horizon."""
    L = ["| horizon | mean response tokens | algorithm | lr (critic) | pass@1 % | avg@k % | tokens to pass@1 / avg@k thr "
         "(× G=8's) | train s to pass@1 thr | V–R Pearson eval / train | step s |", "|" + "---|" * 10]
    tests = []
    for f in (Path(p) for p in jsonl_paths):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        env = next(r for r in rows if r["kind"] == "env")
        runs = {r["key"]: r for r in rows if r["kind"] == "run"}
        summ = {r["algo"]: r for r in rows if r["kind"] == "summary"}
        verdict = next((r for r in rows if r["kind"] == "verdict"), None)
        h = env.get("horizon", 20)
        g8 = summ["grpo8"]["final_tokens"] if "grpo8" in summ else None
        for a, s in summ.items():
            resp = _mean([runs[k]["evals"][-1]["response_len"] for k in s["runs"]])
            frac = lambda y: fmt(s.get(f"tokens_to_threshold_{y}") / g8 if g8 and s.get(f"tokens_to_threshold_{y}")
                                 is not None else None, ".2f", "never")
            crit = f" ({s['value_lr']:.3g})" if ALGOS[a][3] else ""
            L.append(f"| {h} | {fmt(resp, '.0f')} | {s['label']} | {s['lr']:.3g}{crit} | "
                     f"{pct(s['final_pass1'], s['final_pass1_std'])} | {pct(s['final_avgk'], s['final_avgk_std'])} | "
                     f"{frac('pass1')} / {frac('avgk')} | "
                     f"{fmt(s.get('train_s_to_threshold_pass1'), '.0f', 'never')} | "
                     f"{fmt(s['eval_value_pearson'], '.2f')} / {fmt(s['train_value_pearson'], '.2f')} | "
                     f"{fmt(s['step_s'], '.2f')} |")
        if verdict:
            sp = summ["sppo"]
            diff = lambda p, y: f"{100 * (sp[f'final_{y}'] - summ[p][f'final_{y}']):+.1f}"
            ppo = [f"{summ[p]['label']}: pass@1 {'won' if verdict[f'beats_{p}_pass1'] else 'lost'} ({diff(p, 'pass1')}), "
                   f"avg@k {'won' if verdict[f'beats_{p}_avgk'] else 'lost'} ({diff(p, 'avgk')})"
                   for p in ("ppo", "ppo_l1") if f"beats_{p}_pass1" in verdict]

            def test(y):
                acc, gap = quarter_gap([runs[k] for k in sp["runs"]], g8, summ["grpo8"][f"threshold_{y}"], y)
                return (f"{'met' if verdict[f'met_{y}'] else 'not met'} "
                        f"({fmt(verdict[f'sppo_token_fraction_{y}'], '.2f', 'never')}; at 1/4 of the tokens "
                        f"{pct(acc)} % vs threshold {pct(summ['grpo8'][f'threshold_{y}'])} %, {100 * gap:+.1f} points)")
            tests.append(f"- horizon {h}: SPPO within {100 * verdict['margin']:.0f} points of GRPO G=8 with ≤ 1/4 of its "
                         f"tokens: pass@1 {test('pass1')}, avg@k {test('avgk')}. SPPO's final minus PPO's: "
                         + "; ".join(ppo) + ".")
            low = [y for y in ("pass1", "avgk") if "sppo" in summ and "grpo8" in summ
                   and summ["grpo8"][f"threshold_{y}"] <= summ["sppo"][f"start_{y}"]]
            if low:  # G=8 gained less than the margin: any run "reaches" the threshold at its first eval
                tests.append(f"  Degenerate for {' and '.join('pass@1' if y == 'pass1' else 'avg@k' for y in low)}: "
                             f"the threshold is at or below the start accuracy, so the test says nothing.")
    # the selection-free tables, where the JSONLs carry them (written by a run or `--report` since issue 24)
    F = []
    for f in (Path(p) for p in jsonl_paths):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        env = next(r for r in rows if r["kind"] == "env")
        summ = [r for r in rows if r["kind"] == "summary" and r.get("free")]
        comps = next((r["rows"] for r in rows if r["kind"] == "comparisons"), [])
        if not summ:
            continue
        o = argparse.Namespace(**{**env["settings"], "seeds": env["settings"]["seeds"]})
        o.tie_rule = env["settings"].get("tie_rule", "sd")
        free = {r["algo"]: r["free"] for r in summ}
        F += free_markdown(o, free, comps, env.get("horizon", 20))
    head = ["# Per-horizon comparison, CPU (`bench_learning.py --plot-horizons`)\n"]
    if F:
        head += ["The selection-free tables per horizon come first; the seed-0-included table (the numbers before "
                 "issue 24) follows them.\n"]
    Path(path).write_text("\n".join(head + F + ["## All seeds, selection seed included (mean ± sd)\n"] + L + [""]
                                     + tests) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI smoke test: 1 seed, 2 steps, batch 8, eval 8 prompts, "
                                                         "sppo + grpo4, no sweep; writes to a temp dir")
    ap.add_argument("--model", default="", help="model dir (default: the embedded tiny model); the tiny preset's "
                                                "hyperparameters are used either way")
    ap.add_argument("--algos", default=DEFAULT_ALGOS, help=f"comma list of {', '.join(ALGOS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="policy lr sweep (absolute values; the same for every "
                                                             "algorithm)")
    ap.add_argument("--lr-mults", default="", help="policy lr sweep as multiples of the preset lr (overrides --lrs)")
    ap.add_argument("--critic-lr-mults", default="1,10", help="critic-LLM lr, multiples of the policy lr (PPO, "
                                                               "SPPO --critic), tried at the best policy lr")
    ap.add_argument("--extend-edges", type=int, default=1, help="times the sweep may extend past an edge")
    ap.add_argument("--extend-factor", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=60, help="steps per run (the protocol's own, independent of the "
                                                          "demo preset's run length; GRPO G=8 gets x --grpo8-step-mult)")
    ap.add_argument("--grpo8-step-mult", type=int, default=4, help="GRPO G=8 runs this many times the steps")
    ap.add_argument("--batch", type=int, default=0, help="samples per step (default: the preset's batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: the preset's")
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--grpo8-eval-mult", type=int, default=2, help="GRPO G=8 evaluates every eval_every x this")
    ap.add_argument("--eval-size", type=int, default=0, help="held-out prompts (default: the preset's)")
    ap.add_argument("--eval-k", type=int, default=0, help="avg@k samples (default: the preset's)")
    ap.add_argument("--margin", type=float, default=0.02, help="target: within this of GRPO G=8's final accuracy")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (1 torch thread each)")
    ap.add_argument("--run-timeout", type=float, default=1800, help="seconds before a run is killed")
    ap.add_argument("--out", default="", help="output prefix (default bench/results/learning-cpu-<date>; "
                                              "--quick: a temp dir)")
    ap.add_argument("--work-dir", default="", help="run directories and logs (default: a dir beside the temp dir)")
    ap.add_argument("--horizon", type=int, default=20, choices=(20, 60, 150),
                    help="task horizon: approximate response tokens (synthetic.HORIZONS); 60/150 build their model")
    ap.add_argument("--model-cache", default="", help="where --horizon 60/150 models are built (default: a temp "
                                                      "dir); a model built with the same steps/seed is reused")
    ap.add_argument("--estimate", action="store_true", help="only measure the protocol's CPU cost at this horizon: "
                                                            "--estimate-steps steps + 2 evals per algorithm, seed 0")
    ap.add_argument("--estimate-steps", type=int, default=4)
    ap.add_argument("--plot-horizons", default="", help="comma list of finished benchmark JSONLs (one per horizon): "
                                                        "draw accuracy vs sampled tokens per horizon to --out .png and a table to .md")
    ap.add_argument("--tie-rule", default="sd", choices=("sd", "max"),
                    help="selection: 'sd' = scores within one binomial sd of the best (on --eval-size prompts) are a "
                         "tie, won by the lr nearest the preset's, then critic lr x1, then the smaller lr; 'max' = the "
                         "plain maximum (before issue 24)")
    ap.add_argument("--fresh-seeds", type=int, default=0,
                    help="make every chosen configuration have N seeds besides the selection seed (seeds[0]+1 .. "
                         "seeds[0]+N): with an existing --out only the missing runs start (finished rows are reused, "
                         "never rerun; a changed choice also needs its critic-lr run)")
    ap.add_argument("--report", action="store_true",
                    help="re-render .md/.png and the JSONL's summary rows from an existing --out JSONL; trains nothing "
                         "and needs no model")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    o = ap.parse_args(argv)
    if o.quick:
        o.seeds, o.steps, o.batch, o.eval_size, o.eval_k, o.eval_every = "0", 2, 8, 8, 2, 0
        o.lrs, o.lr_mults, o.critic_lr_mults, o.extend_edges, o.grpo8_step_mult = "1e-4", "", "1", 0, 1
        o.max_new_tokens = o.max_new_tokens or 24
        if o.algos == DEFAULT_ALGOS:
            o.algos = "sppo,grpo4"
    o.algos = [a.strip() for a in o.algos.split(",") if a.strip()]
    bad = [a for a in o.algos if a not in ALGOS]
    if bad:
        ap.error(f"unknown algorithm(s) {bad}; choose from {list(ALGOS)}")
    if o.quick and len(o.algos) > 2:
        ap.error("--quick runs at most 2 algorithms")
    o.seeds = [int(s) for s in str(o.seeds).split(",")]
    o.base_seeds = list(o.seeds)  # the protocol's seeds before --fresh-seeds: the "before issue 24" summary uses them
    if o.fresh_seeds < 0:
        ap.error("--fresh-seeds must be >= 0")
    if o.fresh_seeds:
        o.seeds = [o.seeds[0]] + [o.seeds[0] + i for i in range(1, o.fresh_seeds + 1)]
    o.lrs = [float(m) for m in str(o.lrs).split(",")]
    o.lr_mults = [float(m) for m in str(o.lr_mults).split(",")] if o.lr_mults else []
    o.critic_lr_mults = [float(m) for m in str(o.critic_lr_mults).split(",")]
    if o.quick and o.horizon != 20:
        ap.error("--quick runs the embedded model (horizon 20)")
    o.data_flags = []
    return o


def build_horizon_model(horizon: int, cache: str):
    """(path, build metrics) of the tiny model warmed up on the horizon's task: built on first use, then reused
    (the directory name holds the warm-up steps and seed, so a changed recipe builds anew)."""
    import torch
    from sppo_fast import tiny

    steps, acc = tiny.HORIZON_STEPS[horizon], tiny.STOP_AT_ACC
    out = Path(cache or tempfile.gettempdir()) / f"sppo_fast_tiny_h{horizon}_max{steps}_stop{acc:g}_s0"
    info = out / "build.json"
    if not info.is_file():
        print(f"building the horizon-{horizon} tiny model (warm-up until greedy accuracy {acc:g} on the stop-check "
              f"set, at most {steps} steps, 1 thread) in {out}", flush=True)
        n = torch.get_num_threads()
        torch.set_num_threads(1)  # the recipe's thread count: the build is bitwise reproducible per thread count
        try:
            m = tiny.build(out, steps=steps, seed=0, horizon=horizon, verbose=True, log_every=100, do_eval=False,
                           stop_at_acc=acc)
        finally:
            torch.set_num_threads(n)
        m.pop("history", None)
        info.write_text(json.dumps(m))
    return str(out.resolve()), json.loads(info.read_text())


def horizon_data(horizon: int, eval_size: int, cache: str) -> list:
    """The trainer's data flags for a horizon's task: its train/eval JSONL, written once under `cache`."""
    from sppo_fast import synthetic

    data_dir = Path(cache or tempfile.gettempdir()) / f"sppo_fast_synthetic_h{horizon}_e{eval_size}"
    train_path, eval_path = synthetic.write_jsonl_split(data_dir, 10_000, eval_size,
                                                        **synthetic.task_for_horizon(horizon))
    return ["--data", train_path, "--eval-data", eval_path, "--reward", "exact"]


def estimate(o, planner, preset, model_path, built, work_dir, prefix) -> int:
    """The protocol's CPU cost at this horizon from short timed runs, without building the horizon's model.

    Cost is a matter of tokens, not of what the tokens say, so every timed run uses fixed-length rollouts
    (`--min-new-tokens = --max-new-tokens = L`, L = the task's mean response length in tokens, EOS included) on the
    horizon's prompts with whatever model --model names (default: the embedded one; the architecture is the same at
    every horizon). Runs, seed 0, --estimate-steps steps each, evals at start and end: SPPO with the protocol's eval
    (eval_size x (1 + eval_k) generations), GRPO G=8, PPO and SPPO + critic with a 4-prompt eval (their evals cost
    what SPPO's does). GRPO G=4 is costed with GRPO G=8's step time and PPO lambda=1 with PPO's (same samples and
    tokens per step, same compute). Per run: startup + steps x median step time + evals x one eval's time, summed
    over the runs the protocol plans (sweep incl. one edge extension, critic lr, extra seeds). Written to
    <prefix>.json; process-seconds with 1 thread each at this machine's load (recorded)."""
    from sppo_fast import synthetic

    rows = synthetic.make_dataset(2000, synthetic.TRAIN_SEED, **o.task)
    L = round(sum(len(r["solution"]) + 1 for r in rows) / len(rows))
    small_flags = []
    if o.data_flags:  # a JSONL task: the small-eval runs need their own 4-prompt eval file (--eval-size is ignored)
        tr, ev = synthetic.write_jsonl_split(work_dir / "estimate_data_e4", 10_000, 4, **o.task)
        small_flags = ["--data", tr, "--eval-data", ev, "--reward", "exact"]
    lr_mid = sorted(o.lrs)[len(o.lrs) // 2]
    timed = [a for a in ("sppo", "grpo8", "ppo", "sppo_critic") if a in o.algos or a == "sppo"]
    specs = []
    for a in timed:
        spec = planner.spec(a, lr_mid, 1.0, o.seeds[0])
        small = a != "sppo"
        spec.update(steps=o.estimate_steps, eval_every=0, max_new_tokens=L,
                    eval_size=4 if small else o.eval_size, eval_k=1 if small else o.eval_k,
                    data_flags=(small_flags if small else o.data_flags) + ["--min-new-tokens", str(L)],
                    key=f"estimate__{a}__h{o.horizon}_L{L}_st{o.estimate_steps}")
        specs.append(spec)
    done = {}
    failed = run_specs(specs, done, work_dir / "estimate.jsonl", work_dir, workers=1, run_timeout=o.run_timeout)
    if failed:
        print(f"estimate runs failed: {list(failed)}", file=sys.stderr)
        return 1
    r_eval = done[specs[0]["key"]]
    smalls = [done[s["key"]] for s in specs[1:]]
    startup = _mean([r["wall_s"] - r["final_train_s"] for r in smalls]) if smalls else 0.0  # + 2 tiny evals
    eval_s = max(0.0, (r_eval["wall_s"] - r_eval["final_train_s"] - startup) / 2)
    step_s = {s["algo"]: done[s["key"]]["step_s_median"] for s in specs}
    step_s.setdefault("grpo8", step_s.get("grpo8"))
    cost_of = {"grpo4": "grpo8", "ppo_l1": "ppo"}
    per_algo, total = {}, 0.0
    n_sweep = len(o.lrs) + (1 if o.extend_edges else 0)  # the edge extension happens when the best is at an edge
    for a in o.algos:
        src = cost_of.get(a, a)
        if step_s.get(src) is None:
            continue
        steps = o.steps * (o.grpo8_step_mult if a == "grpo8" else 1)
        ee = o.eval_every * (o.grpo8_eval_mult if a == "grpo8" else 1)
        n_evals = (steps // ee if ee else 0) + 1 + (0 if ee and steps % ee == 0 else 1)
        per_run = startup + steps * step_s[src] + n_evals * eval_s
        n_runs = n_sweep + (len([c for c in o.critic_lr_mults if c != 1.0]) if ALGOS[a][3] else 0) + len(o.seeds) - 1
        per_algo[a] = {"label": ALGOS[a][0], "step_s": step_s[src], "timed_as": src, "steps": steps,
                       "evals": n_evals, "run_s": per_run, "runs": n_runs, "total_s": per_run * n_runs}
        total += per_run * n_runs
    out = {"kind": "estimate", "horizon": o.horizon, "task": o.task, "fixed_response_tokens": L,
           "model_path": model_path, "env": environment(), "estimate_steps": o.estimate_steps,
           "eval_s": eval_s, "startup_s": startup, "per_algo": per_algo, "total_process_s": total,
           "workers": o.workers, "wall_h_at_workers": total / o.workers / 3600,
           "timed_runs": [done[s["key"]] for s in specs],
           "settings": {k: v for k, v in vars(o).items() if not k.startswith("_") and k != "task"}}
    path = prefix.with_name(prefix.name + ".json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"horizon {o.horizon}, fixed responses of {L} tokens; one eval {eval_s:.0f}s, startup {startup:.0f}s")
    for a, v in per_algo.items():
        print(f"{v['label']:32s} step {v['step_s']:.2f}s  run {v['run_s'] / 60:.1f} min  x{v['runs']} = "
              f"{v['total_s'] / 3600:.2f} h")
    print(f"horizon {o.horizon}: {total / 3600:.1f} process-hours = {out['wall_h_at_workers']:.1f} h wall at "
          f"{o.workers} workers\nwrote {path}")
    return 0


def analyze(o, preset, model_path, done):
    """(summ, verdict, best, free, comps, chosen) from finished runs: `summ`/`verdict`/`best` under the rule before
    issue 24 (seed-0 argmax, seeds o.base_seeds, selection seed included) when those runs exist, else under the tie
    rule; `free`/`comps` the selection-free numbers (`selection_free`). None while nothing is finished."""
    rule = Planner(o, preset, model_path)
    lo = argparse.Namespace(**{**vars(o), "tie_rule": "max", "seeds": o.base_seeds})
    legacy = Planner(lo, preset, model_path)
    legacy_ok = all(legacy.plan(a, done)[1] for a in o.algos)
    if legacy_ok:
        summ, verdict, best = summarize(lo, legacy, done)
    elif all(rule.plan(a, done)[1] for a in o.algos):
        summ, verdict, best = summarize(o, rule, done)
    else:
        return None
    free, comps = selection_free(o, rule, legacy if legacy_ok else None, done)
    for a in summ:
        summ[a]["free"] = free[a]
    return summ, verdict, best, free, comps, {a: f["chosen"] for a, f in free.items()}


def write_outputs(o, env, preset, model_path, done, kept, failed, total, prefix):
    """Rewrite the JSONL (env, every run, rows of other settings kept as they were, summaries, verdict,
    comparisons), the .md and the .png."""
    jsonl, md, png = (prefix.with_name(prefix.name + ext) for ext in (".jsonl", ".md", ".png"))
    res = analyze(o, preset, model_path, done)
    if res is None:
        raise SystemExit(f"{jsonl}: the protocol's runs are not finished; nothing to report")
    summ, verdict, best, free, comps, chosen = res
    settings = {k: v for k, v in vars(o).items() if not k.startswith("_") and k != "report"}
    with open(jsonl, "w") as f:
        f.write(json.dumps({**env, "settings": settings, "preset": preset, "model_path": model_path}) + "\n")
        for r in sorted(done.values(), key=lambda r: r["key"]):
            f.write(json.dumps(r) + "\n")
        for r in kept:
            f.write(json.dumps(r) + "\n")
        for s in summ.values():
            f.write(json.dumps(s) + "\n")
        if verdict:
            f.write(json.dumps(verdict) + "\n")
        f.write(json.dumps({"kind": "comparisons", "rows": comps}) + "\n")
    curves = {a: [done[k] for k in free[a]["runs"]] or best[a] for a in best}
    plot(png, o, summ, curves, done, chosen,
         curve_note="selection-free seeds (seed %d chose the lr)" % o.seeds[0])
    write_markdown(md, o, env, preset, done, summ, verdict, png.name, failed, total, best, free, comps)
    return jsonl, md, png


def reopen(prefix, tie_rule="sd", fresh_seeds=0):
    """(settings as the planner reads them, env row, all rows, finished runs by key) of a finished benchmark JSONL;
    fresh_seeds > 0 plans that many seeds besides the selection seed (as `--fresh-seeds`)."""
    prefix = Path(prefix)
    path = prefix.with_name(prefix.name + ".jsonl")
    if not path.is_file():
        raise SystemExit(f"{path} not found: give the prefix of a finished benchmark (PREFIX.jsonl)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    env = next((r for r in rows if r.get("kind") == "env"), None)
    if env is None or "settings" not in env:
        raise SystemExit(f"{path} has no env row with the run's settings")
    st = env["settings"]
    ro = argparse.Namespace(**st)
    ro.tie_rule, ro.report, ro.out = tie_rule, True, str(prefix)
    ro.base_seeds = st.get("base_seeds", st["seeds"])
    if fresh_seeds:
        ro.fresh_seeds, ro.seeds = fresh_seeds, [st["seeds"][0]] + [st["seeds"][0] + i for i in
                                                                     range(1, fresh_seeds + 1)]
    else:
        ro.fresh_seeds = st.get("fresh_seeds", 0)
    return ro, env, rows, {r["key"]: r for r in rows if r.get("kind") == "run"}


def report(o) -> int:
    """--report: the tables, figure and summary rows again from a finished JSONL, with this code's analysis."""
    if not o.out:
        raise SystemExit("--report needs --out PREFIX with an existing PREFIX.jsonl")
    prefix = Path(o.out)
    ro, env, rows, done = reopen(prefix, o.tie_rule, o.fresh_seeds)
    kept = [r for r in rows if r.get("kind") not in ("env", "run", "summary", "verdict", "comparisons")]
    env = {k: v for k, v in env.items() if k not in ("settings", "preset")}
    total = sum(env.get("wall_s_invocations", [0.0]))
    out = write_outputs(ro, env, rows[0].get("preset") or env_preset(rows), env["model_path"], done, kept, {},
                        total, prefix)
    print("rewrote " + ", ".join(map(str, out)))
    return 0


def env_preset(rows):
    return next(r["preset"] for r in rows if r.get("kind") == "env")


def fresh_cost(jsonl_path, fresh=3, tie_rule="sd"):
    """Estimated process-seconds of `--fresh-seeds fresh` on a finished JSONL: the runs the planner still needs,
    each costed at the mean wall time of that algorithm's finished runs in the file (an estimate: wall times were
    measured beside other jobs)."""
    rows = [json.loads(line) for line in Path(jsonl_path).read_text().splitlines() if line.strip()]
    env = next(r for r in rows if r.get("kind") == "env")
    st = env["settings"]
    o = argparse.Namespace(**st)
    o.tie_rule, o.base_seeds = tie_rule, st.get("base_seeds", st["seeds"])
    o.seeds = [st["seeds"][0]] + [st["seeds"][0] + i for i in range(1, fresh + 1)]
    done = {r["key"]: r for r in rows if r.get("kind") == "run"}
    pl = Planner(o, env["preset"], env["model_path"])
    out = {}
    for a in o.algos:
        walls = [r["wall_s"] for r in done.values() if r["algo"] == a]
        todo = []
        for _ in range(8):  # the plan unfolds as runs finish: assume each pending seed-0 run leaves the choice as is
            needed, fin = pl.plan(a, done)
            new = [x for x in needed if x["key"] not in done and x["key"] not in todo]
            if not new:
                break
            for x in new:
                todo.append(x["key"])
                done[x["key"]] = {"score": -1.0, "key": x["key"], "algo": a}  # placeholder: never chosen
        out[a] = {"runs": todo, "process_s": len(todo) * (sum(walls) / len(walls) if walls else 0.0)}
    return out


def main(argv=None) -> int:
    o = parse(argv)
    if o._worker:
        return worker(o._worker)
    if o.report:
        return report(o)
    if o.plot_horizons:
        out = Path(o.out or RESULTS / f"horizons-cpu-{datetime.date.today().isoformat()}").with_suffix(".png")
        plot_horizons(o.plot_horizons.split(","), out)
        horizon_table(o.plot_horizons.split(","), out.with_suffix(".md"))
        print(f"wrote {out} and {out.with_suffix('.md')}")
        return 0
    from sppo_fast.cli import PRESETS, load_yaml
    from sppo_fast.tiny import default_model_path
    from sppo_fast.train import Args

    preset = {**{f: getattr(Args(), f) for f in ("lr", "value_lr", "batch_size", "steps", "max_new_tokens",
                                                  "eval_size", "eval_k", "micro_batch_tokens")},
              **load_yaml(PRESETS / "tiny.yaml", Args)}
    if o.lr_mults:
        o.lrs = [preset["lr"] * m for m in o.lr_mults]
    o.batch = o.batch or preset["batch_size"]
    # a count here, always: the trainer's --eval-size also takes a fraction, so the preset reads 256 as 256.0, and a
    # float would change every run key ("e256.0x4") and no committed run would be found again
    o.eval_size = int(o.eval_size or preset["eval_size"])
    o.eval_k = o.eval_k or preset["eval_k"]
    from sppo_fast import synthetic

    o.task = synthetic.task_for_horizon(o.horizon)
    built = None
    if o.horizon != 20:
        # the horizon's own warm-started model (built once, deterministically) and its train/eval JSONL
        o.max_new_tokens = o.max_new_tokens or synthetic.max_solution_chars(**o.task) + 2
        if not o.model and not o.estimate:  # the estimate times fixed-length rollouts: any model of this size
            o.model, built = build_horizon_model(o.horizon, o.model_cache)
        o.data_flags = horizon_data(o.horizon, o.eval_size, o.model_cache)
    o.max_new_tokens = o.max_new_tokens or preset["max_new_tokens"]
    for a in o.algos:
        if o.batch % ALGOS[a][2]:
            raise SystemExit(f"--batch {o.batch} is not a multiple of {a}'s group size {ALGOS[a][2]}")
    date = datetime.date.today().isoformat()
    if o.quick:
        prefix = Path(o.out) if o.out else Path(tempfile.mkdtemp(prefix="sppo_bench_learning_quick-")) / f"learning-cpu-{date}"
        if RESULTS.resolve() in prefix.resolve().parents:
            raise SystemExit("--quick never writes to bench/results (its numbers are a smoke test, not figures)")
    else:
        name = f"learning-cpu-{date}" if o.horizon == 20 else f"horizon{o.horizon}-cpu-{date}"
        if o.estimate:
            name = f"horizon{o.horizon}-cost-cpu-{date}"
        prefix = Path(o.out) if o.out else RESULTS / name
    model_path = str(Path(o.model).resolve()) if o.model else default_model_path()
    if o.model:
        o.model = model_path
    if not (Path(model_path) / "config.json").is_file():
        raise SystemExit(f"no model at {model_path} (the embedded tiny model is built by `python -m sppo_fast.tiny`)")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    jsonl, md, png = (prefix.with_name(prefix.name + ext) for ext in (".jsonl", ".md", ".png"))
    work_dir = Path(o.work_dir) if o.work_dir else (
        prefix.parent / (prefix.name + "-work") if o.quick else Path(tempfile.gettempdir()) / f"sppo_bench_{prefix.name}")
    work_dir.mkdir(parents=True, exist_ok=True)
    work_dir = work_dir.resolve()

    planner = Planner(o, preset, model_path)
    if o.estimate:
        return estimate(o, planner, preset, model_path, built, work_dir, prefix)
    done, prev_env, ignored, kept = {}, None, 0, []
    # keys any plan under these settings can produce (every lr the sweep may reach, every seed and critic rate)
    reach = set(o.lrs)
    for _ in range(o.extend_edges):
        reach |= {min(reach) / o.extend_factor, max(reach) * o.extend_factor}
    protocol_keys = {planner.spec(a, lr, c, seed)["key"] for a in o.algos for lr in reach for seed in o.seeds
                     for c in set(o.critic_lr_mults) | {1.0}}
    sha = _sha256(Path(model_path) / "model.safetensors")
    if jsonl.is_file():  # resume: every finished run of the same configuration is reused
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        prev = next((r for r in rows if r.get("kind") == "env"), None)
        # the same model: the same path, or the same weights (a horizon model rebuilt in another --model-cache)
        same = lambda r: r.get("model_path") == model_path or (prev is not None and sha is not None
                                                               and prev.get("model_sha256") == sha)
        for row in rows:
            if row.get("kind") == "run" and same(row):
                if row["key"] in protocol_keys:
                    done[row["key"]] = row
                else:
                    ignored += 1
                    kept.append(row)
            elif row.get("kind") == "run":
                kept.append(row)  # another model's run: kept in the file, never reused
            elif row.get("kind") == "env" and same(row):
                prev_env = row
        if o.fresh_seeds and rows and not done:
            raise SystemExit(f"--fresh-seeds: none of {jsonl}'s runs matches this model ({model_path}, sha256 {sha}; "
                             f"the file's: {prev and prev.get('model_path')}, {prev and prev.get('model_sha256')}), "
                             "so every run would start again; point --model at the model the file was made with")
        print(f"resuming: {len(done)} finished runs in {jsonl}" +
              (f" ({ignored} runs of other settings kept in it, not reused)" if ignored else ""))
    env = environment()
    env["model_path"] = model_path
    env["model_sha256"] = sha
    env["horizon"], env["task"], env["model_build"] = o.horizon, o.task, built
    n_cached = len(done)
    t0 = time.perf_counter()
    failed = run_all(o, planner, done, jsonl, work_dir)
    total = time.perf_counter() - t0
    # the environment the runs were made in: a rerun that only re-renders keeps the earlier invocation's record
    if prev_env is not None:
        walls = prev_env.get("wall_s_invocations", [prev_env.get("wall_s_this_invocation", 0.0)])
        if len(done) == n_cached:
            env = {k: v for k, v in prev_env.items() if k not in ("settings", "preset")}
        env["wall_s_invocations"] = walls + [round(total, 1)]
    else:
        env["wall_s_invocations"] = [round(total, 1)]
    if failed:
        print(f"{len(failed)} run(s) failed: {list(failed)}; rerun the same command to retry them", file=sys.stderr)
        return 1
    env["wall_s_this_invocation"] = round(total, 1)
    total = sum(env["wall_s_invocations"])
    env["wall_s_all_runs"] = round(sum(r["wall_s"] for r in done.values()), 1)  # process seconds (not wall)
    write_outputs(o, env, preset, model_path, done, kept, failed, total, prefix)
    print(Path(md).read_text())
    print(f"wrote {jsonl}\n      {md}\n      {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
