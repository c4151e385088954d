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

    python bench/bench_value_head.py --probe RUN_DIR --out probe.jsonl   # what the features allow, fitted offline

Probe: is the online head limited by its input features or by how it is trained? The run's final policy samples
--probe-k responses for each of --probe-train train prompts; per decoder layer, heads are fitted offline to those
(standardised features, L2 chosen on a held-out fifth of the prompts): logistic regression on 6,400 samples (what
the demo's head sees in 100 steps) and on all, and a 64-wide MLP on all. Each is scored like the run's own head:
Pearson(V, R) over --ceiling-k samples per held-out eval prompt.

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
    "steps4": ("4 value steps per batch (3 head-only refits on the batch's prompt states)", ["--value-steps", "4"]),
    "steps4_replay4": ("4 value steps per batch over this and the 4 previous batches",
                       ["--value-steps", "4", "--value-replay", "4"]),
    "steps8_replay8": ("8 value steps per batch over this and the 8 previous batches",
                       ["--value-steps", "8", "--value-replay", "8"]),
    "steps8_replay16": ("8 value steps per batch over this and the 16 previous batches",
                        ["--value-steps", "8", "--value-replay", "16"]),
    "mlp64_steps8_replay8": ("MLP head (64 hidden), 8 value steps per batch over this and the 8 previous batches",
                             ["--value-mlp-hidden", "64", "--value-steps", "8", "--value-replay", "8"]),
    "mlp64_steps8_replay16": ("MLP head (64 hidden), 8 value steps per batch over this and the 16 previous batches",
                              ["--value-mlp-hidden", "64", "--value-steps", "8", "--value-replay", "16"]),
    "layer1_ln_steps8_replay16": ("layer 1 of 4, LayerNorm, 8 value steps per batch over this and the 16 previous "
                                  "batches", ["--value-layer", "0", "--value-norm", "layernorm", "--value-steps", "8",
                                              "--value-replay", "16"]),
    "layer1_ln_mlp64_steps8_replay16": ("layer 1 of 4, LayerNorm, MLP head (64 hidden), 8 value steps per batch over "
                                        "this and the 16 previous batches",
                                        ["--value-layer", "0", "--value-norm", "layernorm", "--value-mlp-hidden", "64",
                                         "--value-steps", "8", "--value-replay", "16"]),
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


def _load_run(run_dir: Path):
    """(args, policy, tokenizer, trained value head, train rows, eval rows, Stepper) of a finished run's last
    checkpoint, on the CPU with 1 thread."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from sppo_fast import checkpoint, data
    from sppo_fast.model import load_policy, load_tokenizer
    from sppo_fast.train import Args, Stepper
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
    train_rows, eval_rows = data.load_dataset(args.data, eval_fraction=args.eval_size,
                                              synthetic_n_eval=args.eval_size, seed=args.seed)
    return args, policy, tok, head, train_rows, eval_rows, Stepper(args, policy, head, None, None, tok, device)


def _sample(stepper, tok, rows, k, seed):
    """k samples per row at the run's temperature -> (samples, R [len(rows) * k])."""
    import torch

    from sppo_fast import data, rewards
    from sppo_fast.train import score_rewards

    torch.manual_seed(seed)
    with torch.no_grad():
        samples = stepper.generate(data.format_prompts(rows, tok, chat_template=False), num_samples=k,
                                   temperature=stepper.args.temperature)
    return samples, score_rewards(rewards.get_reward_fn(stepper.args.reward), rows, samples, stepper.args)


def _prompt_features(stepper, samples, k, layer):
    """The pooled prompt state the shared head would read at decoder layer `layer` (-1: final, normed), one row per
    prompt [len(samples) / k, H]: the trainer's own forward, with an identity in place of the head."""
    import torch

    from sppo_fast.rollout import pack

    head, stepper.value_head = stepper.value_head, torch.nn.Identity()
    layer_was, stepper.args.value_layer = stepper.args.value_layer, layer
    try:
        firsts = list(range(0, len(samples), k))
        with torch.no_grad():
            return torch.cat([stepper.forward(pack(samples, firsts[i:i + 64], packed=False,
                                                   pad_token_id=stepper.tokenizer.pad_token_id))[3]
                              for i in range(0, len(firsts), 64)]).double()
    finally:
        stepper.value_head, stepper.args.value_layer = head, layer_was


def ceiling(run_dir: Path, k: int, seed: int = 0) -> dict:
    """Pearson(V, R) of a run's final head against its oracle ceiling (see the module docstring)."""
    import torch

    from sppo_fast.train import pearson, value_of

    args, policy, tok, head, _, eval_rows, stepper = _load_run(run_dir)
    samples, R = _sample(stepper, tok, eval_rows, k, seed)
    with torch.no_grad():
        V = value_of(head(_prompt_features(stepper, samples, k, args.value_layer).float()), args.value_loss).double()
    p_hat = R.view(-1, k).double().mean(1)
    m = R.double().mean().item()
    var_p = max(0.0, p_hat.var(unbiased=False).item() - (p_hat * (1 - p_hat)).mean().item() / (k - 1))
    cov_vp = ((V - V.mean()) * (p_hat - p_hat.mean())).mean().item()  # unbiased for cov(V, p): noise is independent
    return {"kind": "ceiling", "run_dir": str(run_dir), "k": k, "n_prompts": len(eval_rows), "mean_R": m,
            "var_p": var_p, "ceiling_pearson": math.sqrt(var_p / (m * (1 - m))) if 0 < m < 1 else None,
            "pearson_V_R": pearson(V.repeat_interleave(k), R),
            "corr_V_p": cov_vp / math.sqrt(V.var(unbiased=False).item() * var_p) if var_p > 0 else None,
            "frac_prompts_p_hat_0": (p_hat == 0).float().mean().item(),
            "frac_prompts_p_hat_1": (p_hat == 1).float().mean().item()}


def fit_probe(X, y, l2: float, hidden: int = 0, X_val=None, R_val=None, k_val: int = 1):
    """An offline value head on standardised features: y are soft labels in [0, 1] (each prompt's success rate over
    its samples). hidden=0: L2-regularised logistic regression, full batch L-BFGS in float64. hidden>0: Linear ->
    GELU -> Linear with AdamW (weight decay l2), 600 full-batch steps, the step kept that scores best on the
    validation prompts (Pearson with their k_val rewards each). Returns predict(X') -> P(success)."""
    import torch

    from sppo_fast.train import pearson

    mu, sd = X.mean(0), X.std(0).clamp_min(1e-8)
    Z = (X - mu) / sd
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    if hidden == 0:
        theta = torch.zeros(Z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = bce(Z @ theta[:-1] + theta[-1], y) + l2 * theta[:-1].square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        w = theta.detach()
        return lambda Xn: torch.sigmoid(((Xn - mu) / sd) @ w[:-1] + w[-1])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(Z.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)).double()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=l2)
    predict = lambda Xn: torch.sigmoid(net((Xn - mu) / sd).squeeze(-1))
    best, state = -2.0, None
    for it in range(600):
        opt.zero_grad()
        bce(net(Z).squeeze(-1), y).backward()
        opt.step()
        if it % 20 == 19:
            with torch.no_grad():
                score = pearson(predict(X_val).repeat_interleave(k_val), R_val) or -1.0
            if score > best:
                best, state = score, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    return lambda Xn: predict(Xn).detach()


def probe(run_dir: Path, n_train: int, k_train: int, k_eval: int, seed: int = 0) -> list:
    """How far a head on the shared backbone's prompt state can go when fitted offline with plenty of data: the
    run's final policy samples k_train responses for each of n_train train prompts; per decoder layer, a logistic
    regression and a 64-wide MLP (L2 / weight decay chosen on a held-out fifth of those prompts) map the last prompt
    token's state to P(success); each is scored like the run's own head, by Pearson(V, R) over k_eval samples per
    held-out eval prompt. The linear one is also fitted on the first 6,400 train samples only (what the demo's head
    sees in 100 steps x 64), to split data from features. Rows: one per fit, plus the run's own head."""
    import torch

    from sppo_fast.train import pearson, value_of

    args, policy, tok, head, train_rows, eval_rows, stepper = _load_run(run_dir)
    train_rows = train_rows[:n_train]
    s_tr, R_tr = _sample(stepper, tok, train_rows, k_train, seed)
    s_ev, R_ev = _sample(stepper, tok, eval_rows, k_eval, seed + 1)
    y_tr = R_tr.view(-1, k_train).double().mean(1)
    n_layers = policy.config.num_hidden_layers
    with torch.no_grad():
        V_head = value_of(head(_prompt_features(stepper, s_ev, k_eval, args.value_layer).float()), args.value_loss)
    out = [{"kind": "probe", "probe": "the run's own head (trained online)", "layer": args.value_layer,
            "pearson_V_R": pearson(V_head.double().repeat_interleave(k_eval), R_ev)}]
    print(json.dumps(out[-1]), flush=True)
    n_val = len(train_rows) // 5
    val = (slice(0, n_val), R_tr[:n_val * k_train])
    fits = [(0, n, (0.0, 1e-5, 1e-4, 1e-3)) for n in sorted({min(6400 // k_train, len(train_rows) - n_val),
                                                                 len(train_rows) - n_val})]
    fits.append((64, len(train_rows) - n_val, (1e-3, 1e-2)))
    for layer in [*range(n_layers - 1), -1]:
        X_tr = _prompt_features(stepper, s_tr, k_train, layer)
        X_ev = _prompt_features(stepper, s_ev, k_eval, layer)
        for hidden, n, l2s in fits:
            Xa, ya = X_tr[n_val:n_val + n], y_tr[n_val:n_val + n]
            fitted = {l2: fit_probe(Xa, ya, l2, hidden, X_tr[val[0]], val[1], k_train) for l2 in l2s}
            scores = {l2: pearson(f(X_tr[val[0]]).repeat_interleave(k_train), val[1]) or -1.0
                      for l2, f in fitted.items()}
            l2 = max(scores, key=scores.get)
            out.append({"kind": "probe", "probe": f"MLP {hidden} hidden" if hidden else "logistic regression",
                        "layer": layer,
                        "layer_name": "final (normed)" if layer == -1 else f"decoder layer {layer + 1} of {n_layers}",
                        "n_train_prompts": n, "n_train_samples": n * k_train, "l2": l2, "val_pearson": scores[l2],
                        "pearson_V_R": pearson(fitted[l2](X_ev).repeat_interleave(k_eval), R_ev)})
            print(json.dumps(out[-1]), flush=True)
    return out


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
    ap.add_argument("--probe", default="", help="a finished run dir: offline logistic-regression heads per layer")
    ap.add_argument("--probe-train", type=int, default=4000, help="train prompts the probe samples")
    ap.add_argument("--probe-k", type=int, default=4, help="samples per train prompt")
    o = ap.parse_args(argv)
    if o.probe:
        rows = probe(Path(o.probe), o.probe_train, o.probe_k, o.ceiling_k)
        if o.out:
            with open(o.out, "a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        return 0
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
