"""Where each algorithm's advantage gets its signal, measured on the learning benchmark's own runs (issue 24).

For each finished horizon benchmark (`bench_learning.py`'s JSONL), rerun one selection-free seed of each chosen
configuration with the trainer's per-step token statistics (`Stepper.micro_batch`):
  stats/advantage_reward_pearson  Pearson over the step's response tokens of the advantage against the reward R;
  value/token_pearson             PPO's critic: each response token's value V(s_t) against R (gamma = 1, one
                                  terminal reward, so E[R | s_t] is what every token's value estimates).
The rerun must reproduce the committed run (same final pass@1 / avg@k and per-step reward curve): then the
statistics describe the very runs the tables report. A run that does not reproduce is reported as such.

    python bench/bench_value_calibration.py --from bench/results/learning-cpu-2026-11-29 \
        --from bench/results/horizon150-cpu-2026-11-29 --model-cache DIR --out bench/results/calibration-cpu-DATE

Why it matters for GAE: with gamma = 1 and lambda < 1 a token's advantage is
    A_t = lambda^(T-1-t) R + sum_k lambda^k (1 - lambda) V_{t+k+1} - V_t,
so R reaches a token T-1-t tokens before the end with weight lambda^(T-1-t) (averaged over a response of T tokens:
(1 - lambda^T) / ((1 - lambda) T)), and the rest of its advantage is the critic's later values. Whether those
values carry R's information is `value/token_pearson`; how much of R the advantages carry in the end is
`stats/advantage_reward_pearson` (SPPO: A = R - V(prompt) per sequence; lambda = 1: A_t = R - V_t).
"""
import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import bench_learning as bl  # bench/ is on sys.path when run as a script

ALGOS = "sppo,grpo8,ppo,ppo_l1"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--from", dest="sources", action="append", default=[],
                    help="prefix of a finished bench_learning JSONL (repeat for several horizons)")
    ap.add_argument("--algos", action="append", default=None,
                    help=f"comma list per --from, in the same order (default for each: {ALGOS})")
    ap.add_argument("--seed", type=int, default=1, help="the seed to rerun: one that played no part in selection")
    ap.add_argument("--fresh-seeds", type=int, default=3, help="as the benchmark's --report --fresh-seeds")
    ap.add_argument("--model-cache", default="", help="where horizon 60/150 models are (re)built; checked by sha256")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--run-timeout", type=float, default=5400)
    ap.add_argument("--out", default="", help="output prefix (default bench/results/calibration-cpu-<date>)")
    ap.add_argument("--report", action="store_true", help="re-render .md/.png from an existing --out JSONL")
    o = ap.parse_args(argv)
    if not o.sources and not o.report:
        ap.error("give --from PREFIX (a finished bench_learning JSONL), or --report with --out")
    o.algos = [a.split(",") for a in (o.algos or [ALGOS] * len(o.sources))]
    if len(o.algos) != len(o.sources):
        ap.error(f"--algos given {len(o.algos)} times for {len(o.sources)} --from")
    for algos in o.algos:
        if bad := [a for a in algos if a not in bl.ALGOS]:
            ap.error(f"unknown algorithm(s) {bad}; choose from {list(bl.ALGOS)}")
    return o


def chosen_spec(source, algo, seed, fresh_seeds):
    """(spec of `algo`'s chosen configuration at `seed`, the committed row of that run, the benchmark's env row)."""
    ro, env, _, done = bl.reopen(source, "sd", fresh_seeds)
    spec = next((s for s in bl.Planner(ro, env["preset"], env["model_path"]).best(algo, done) if s["seed"] == seed),
                None)
    if spec is None or spec["key"] not in done:
        raise SystemExit(f"{source}: {algo}'s chosen configuration has no finished run at seed {seed} (seeds "
                         f"{ro.seeds}); run bench_learning.py first")
    return spec, done[spec["key"]], env


def inputs(env, cache):
    """(model, data flags) for a benchmark's horizon, rebuilt under `cache` when needed and checked by sha256."""
    horizon, eval_size = env.get("horizon", 20), int(env["settings"]["eval_size"])
    if horizon == 20:
        return "", []
    model, _ = bl.build_horizon_model(horizon, cache)
    sha = bl._sha256(Path(model) / "model.safetensors")
    if sha != env["model_sha256"]:
        raise SystemExit(f"the horizon-{horizon} model in {model} has sha256 {sha}, not the benchmark's "
                         f"{env['model_sha256']}: its runs cannot be reproduced on it")
    return model, bl.horizon_data(horizon, eval_size, cache)


def run(o, prefix):
    env = {**bl.environment(), "settings": {k: v for k, v in vars(o).items() if k != "report"}}  # as the runs start
    jsonl = prefix.with_name(prefix.name + ".jsonl")
    done = {}
    if jsonl.is_file():  # resume: finished reruns are kept
        done = {r["key"]: r for r in map(json.loads, jsonl.read_text().splitlines()) if r.get("kind") == "rerun"}
    specs, cache = [], {}
    for source, algos in zip(o.sources, o.algos):
        for algo in algos:
            spec, committed, bench_env = chosen_spec(source, algo, o.seed, o.fresh_seeds)
            if source not in cache:
                cache[source] = inputs(bench_env, o.model_cache)
            model, data_flags = cache[source]
            spec = {**spec, "data_flags": data_flags, **({"model": model, "model_path": model} if model else {})}
            specs.append((spec, committed, source))
    todo = [s for s, _, _ in specs if s["key"] not in done]
    if todo:
        work_dir = Path(tempfile.gettempdir()) / f"sppo_bench_{prefix.name}"
        work_dir.mkdir(parents=True, exist_ok=True)
        fresh = {}
        failed = bl.run_specs(todo, fresh, work_dir / "runs.jsonl", work_dir.resolve(), workers=o.workers,
                              run_timeout=o.run_timeout)
        if failed:
            raise SystemExit(f"{len(failed)} rerun(s) failed: {list(failed)}; rerun the same command to retry")
        done.update({k: {**r, "kind": "rerun"} for k, r in fresh.items()})
    rows = []
    for spec, committed, source in specs:
        r = done[spec["key"]]
        same = {f: r[f] == committed[f] for f in ("final_pass1", "final_avgk", "reward_curve")}
        rows.append({**r, "source": str(source), "reproduces": all(same.values()), "reproduced": same,
                     "committed_final_pass1": committed["final_pass1"], "committed_final_avgk": committed["final_avgk"],
                     "horizon": spec["horizon"]})
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in [env, *rows]))
    return env, rows


def gae_reward_weight(lam, T):
    """Mean over a T-token response of lambda^(tokens to the end): R's weight in a token's GAE advantage."""
    return 1.0 if lam == 1.0 else (1 - lam ** T) / ((1 - lam) * T)


def summary(r):
    """Per-run means of the per-step statistics (all steps, the first and last 10)."""
    out = {}
    for name, key in (("adv", "train_advantage_reward_pearson"), ("tokv", "train_token_value_pearson")):
        xs = r.get(key) or []
        for part, sl in (("all", slice(None)), ("first10", slice(0, 10)), ("last10", slice(-10, None))):
            out[f"{name}_{part}"] = bl._mean(xs[sl])
    lam = {"ppo": 0.95, "ppo_l1": 1.0}.get(r["algo"])
    T = r["evals"][-1]["response_len"]
    out["gae_r_weight"] = gae_reward_weight(lam, T) if lam is not None and T else None
    return out


def write_markdown(path, env, rows, png):
    f2 = lambda x: "-" if x is None else f"{x:+.2f}"  # noqa: E731
    lines = [f"# Where the advantage's signal comes from: token statistics of the learning benchmark's runs",
             "", f"`bench/bench_value_calibration.py` (issue 24), {env['timestamp']}, {env['cpu']}, torch "
             f"{env['torch']}, transformers {env['transformers']}, git {env['git_sha']}"
             + (" (dirty)" if env.get("git_dirty") else "") + f". Seed {env['settings']['seed']} of each chosen "
             "configuration (a seed that played no part in choosing it), rerun with the trainer's per-step "
             "statistics: Pearson over each step's response tokens (64 samples) of the advantage against R, and "
             "of PPO's per-token critic value V(s_t) against R. Means over the steps (first 10, last 10, all).",
             "", "| horizon | algorithm | reproduces committed run | final pass@1 | resp. tokens | "
             "Pearson(A, R) first 10 / last 10 / all | Pearson(V_t, R) first 10 / last 10 / all | "
             "R's mean weight in A_t |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = summary(r)
        rep = "yes" if r["reproduces"] else "no (" + ", ".join(k for k, v in r["reproduced"].items() if not v) + \
            f" differ; committed pass@1 {100 * r['committed_final_pass1']:.1f})"
        tokv = " / ".join(f2(s[f"tokv_{p}"]) for p in ("first10", "last10", "all")) if r["algo"] in ("ppo", "ppo_l1") \
            else "- (per-sequence value)" if r["algo"] in ("sppo", "sppo_critic") else "- (no value)"
        lines.append(f"| {r['horizon']} | {r['label']} | {rep} | {100 * r['final_pass1']:.1f} | "
                     f"{r['evals'][-1]['response_len']:.0f} | "
                     + " / ".join(f2(s[f"adv_{p}"]) for p in ("first10", "last10", "all")) + f" | {tokv} | "
                     + ("1 (per sequence)" if s["gae_r_weight"] is None else f"{s['gae_r_weight']:.2f}") + " |")
    lines += ["", "R's mean weight in A_t: (1 − λ^T) / ((1 − λ) T) at the final eval's mean greedy response length "
              "T (GAE with γ = 1; SPPO and GRPO give every token R itself, minus a baseline).", "",
              f"![per-step statistics]({png.name})", ""]
    path.write_text("\n".join(lines))


def plot(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizons = sorted({r["horizon"] for r in rows})
    color = {a: f"C{i}" for i, a in enumerate(bl.ALGOS)}  # one colour per algorithm in every panel
    fig, axes = plt.subplots(2, len(horizons), figsize=(5.2 * len(horizons), 7), squeeze=False, sharey="row")
    for j, h in enumerate(horizons):
        for r in (r for r in rows if r["horizon"] == h):
            for i, key in enumerate(("train_advantage_reward_pearson", "train_token_value_pearson")):
                ys = [float("nan") if y is None else y for y in r.get(key) or []]
                if any(y == y for y in ys):
                    axes[i][j].plot(range(1, len(ys) + 1), ys, label=r["label"], lw=1.2, color=color[r["algo"]])
        axes[0][j].set_title(f"horizon {h}: Pearson(advantage, R) over response tokens", fontsize=9)
        axes[1][j].set_title(f"horizon {h}: Pearson(critic V(s_t), R), PPO's per-token critic", fontsize=9)
        for i in range(2):
            axes[i][j].axhline(0, color="grey", lw=0.6)
            axes[i][j].set_xlabel("step", fontsize=8)
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    o = parse(argv)
    prefix = Path(o.out) if o.out else bl.RESULTS / f"calibration-cpu-{datetime.date.today().isoformat()}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if o.report:
        lines = prefix.with_name(prefix.name + ".jsonl").read_text().splitlines()
        env, *rows = map(json.loads, lines)
    else:
        env, rows = run(o, prefix)
    md, png = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".png")
    plot(png, rows)
    write_markdown(md, env, rows, png)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
