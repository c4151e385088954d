"""Metrics: JSONL + TensorBoard writers, and `sppo-fast plot RUN_DIR` to draw the curves as a PNG."""
import json
import math
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard;
    `log_eval_samples` appends an evaluation's per-prompt rows to RUN_DIR/eval_samples.jsonl.

    `resume_step=N` continues a run from its checkpoint at step N: rows logged after N (by the run that went past
    its last checkpoint before it stopped) are dropped from both files, and TensorBoard is told to hide its events
    after N (`purge_step`), so every step appears once. Without it the files start empty."""

    def __init__(self, run_dir, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "eval_samples.jsonl"
        for path in (self.path, self.samples_path):
            if resume_step is None:
                path.unlink(missing_ok=True)
            elif path.is_file():
                kept = [r for r in read_rows(path) if r.get("step", 0) <= resume_step]
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(path)  # atomic: a crash here leaves the old file, never half of it
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                self.tb = None

    def log(self, step: int, scalars: dict) -> None:
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, float(value), step)

    def log_eval_samples(self, step: int, rows: list) -> None:
        with open(self.samples_path, "a") as f:
            f.write("".join(json.dumps({"step": step, **r}) + "\n" for r in rows))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_rows(path) -> list:
    """The rows of a metrics.jsonl. A last line cut short (the process died mid-write) is dropped; a bad line
    anywhere else is an error naming it."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ValueError(f"{path} line {i}: not valid JSON ({e.msg}); the file is damaged") from None
    return rows


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a sppo-fast run directory?")
    return read_rows(path)


# Panel order: what a user reads first. Learning (held-out accuracy, train reward), then the critic's calibration,
# then the losses and PPO statistics; timing, memory, learning rates and counters last.
PANEL_ORDER = ("eval/pass@1", "eval/avg@", "reward/", "eval/value_pearson", "value/pearson", "value/token_pearson",
               "eval/value_mean", "value/mean", "eval/", "losses/", "stats/", "rollout/", "value/", "perf/", "time/",
               "memory/", "lr/")
# The learning curves: drawn even when flat, since "accuracy and reward stayed at 0" is the news a user needs
ALWAYS_DRAWN = ("eval/pass@1", "eval/avg@", "reward/")


def panel_keys(rows: list) -> list:
    """The keys worth a panel, in PANEL_ORDER: the learning curves (ALWAYS_DRAWN) whenever they have a finite value,
    other series when they have at least two distinct finite values (a constant line, e.g. the clip fraction when
    the ratio is 1 by construction, says nothing)."""
    series = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, set()).add(v)
    keys = [k for k, values in series.items() if len(values) > 1 or k.startswith(ALWAYS_DRAWN)]
    rank = lambda k: next((i for i, prefix in enumerate(PANEL_ORDER) if k.startswith(prefix)), len(PANEL_ORDER))
    return sorted(keys, key=lambda k: (rank(k), k))


def plot(run_dir, out=None, keys=None) -> Path:
    """Draw the logged keys (or `keys`) against step, one panel each, learning curves first, into curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = keys or panel_keys(rows)
    if not keys:
        raise ValueError(f"{run_dir}/metrics.jsonl has no reward or eval metric and no metric that changes over the "
                         f"run: nothing to plot")
    cols = 3
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# what the trainer prints
def log_step(step, totals, R, values, samples, times, peaks, stepper, counters, logger, bar) -> None:
    """sppo_fast/train.py's log phase: the step's metrics, device tensors until here, one host sync per log interval
    (torchrun: reduced over ranks; rank 0 writes)."""
    from sppo_fast import distributed  # here, not at the top: `sppo-fast plot` needs no torch
    t0, t1, t2, t3 = times
    resp_tokens = sum(len(s.response_ids) for s in samples)
    scalars = correlations({k: v.item() for k, v in distributed.reduce_totals(totals).items()})  # host sync, per log
    scalars.update({"reward/mean": R.mean().item(), "reward/solved": (R > 0.5).float().mean().item(),
                    "rollout/response_len": resp_tokens / len(samples),
                    "rollout/finished": sum(s.finished for s in samples) / len(samples),
                    "perf/rollout_s": t1 - t0, "perf/reward_s": t2 - t1,
                    "perf/update_s": t3 - t2 - stepper.score_s, "perf/score_s": stepper.score_s,
                    "perf/tokens_per_s": resp_tokens / (t3 - t0), "perf/samples_per_s": len(samples) / (t3 - t0),
                    "lr/policy": stepper.scheduler.get_last_lr()[0], **counters})
    if peaks[0] is not None:  # this step's measured peaks, CUDA only (CPU runs log no memory/ keys)
        scalars.update({"memory/rollout_peak_gib": peaks[0], "memory/update_peak_gib": peaks[1]})
    if values is not None:
        scalars["value/mean"] = values.mean().item()
        if (r := pearson(values.cpu(), R)) is not None:
            scalars["value/pearson"] = r
    logger.log(step, scalars)
    # clip= only when it can move: with one optimizer step per batch the ratio is 1 by construction
    clip = {"clip": f"{scalars['stats/clipfrac']:.3f}"} if stepper.args.num_minibatches > 1 else {}
    bar.set_postfix(reward=f"{scalars['reward/mean']:.2f}", **clip, tok_s=f"{scalars['perf/tokens_per_s']:.0f}",
                    refresh=False)


def pearson(x, y) -> float | None:
    """Pearson correlation of two 1-D tensors (the critic's calibration: V against R), in float64."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else None  # undefined when either side is constant


# Token-level correlations summed over micro-batches (and ranks): the update adds each pair's moments under
# f"{MOMENTS}{key}/{stat}", `correlations` turns them into `key` at log time.
MOMENTS = "moments/"


def pair_moments(x, y) -> dict:
    """The sums Pearson(x, y) needs, in float64 (1-D tensors of the same length; device tensors, no sync)."""
    x, y = x.detach().double(), y.detach().double()
    return {"n": x.new_tensor(float(x.numel())), "x": x.sum(), "y": y.sum(), "xx": x.square().sum(),
            "yy": y.square().sum(), "xy": (x * y).sum()}


def correlations(scalars: dict) -> dict:
    """`scalars` with each key's moment sums replaced by its Pearson correlation (omitted, not NaN, when either
    side is constant, as `pearson` does)."""
    out = {k: v for k, v in scalars.items() if not k.startswith(MOMENTS)}
    for key in {k[len(MOMENTS):].rsplit("/", 1)[0] for k in scalars if k.startswith(MOMENTS)}:
        m = {stat: scalars[f"{MOMENTS}{key}/{stat}"] for stat in ("n", "x", "y", "xx", "yy", "xy")}
        var_x, var_y = m["xx"] - m["x"] ** 2 / m["n"], m["yy"] - m["y"] ** 2 / m["n"]
        # relative to the sums: rounding can leave a tiny nonzero variance where the data has none
        if var_x > 1e-9 * max(m["xx"], 1e-30) and var_y > 1e-9 * max(m["yy"], 1e-30):
            out[key] = max(-1.0, min(1.0, (m["xy"] - m["x"] * m["y"] / m["n"]) / math.sqrt(var_x * var_y)))
    return out


def fmt_accuracy_change(start: dict, end: dict) -> str:
    """A run's headline: held-out greedy pass@1 at its start and its end."""
    return (f"held-out accuracy (greedy pass@1): {100 * start['eval/pass@1']:.1f}% -> {100 * end['eval/pass@1']:.1f}%"
            f"  ({100 * (end['eval/pass@1'] - start['eval/pass@1']):+.1f} points)")


def fmt_metrics(metrics: dict) -> str:
    return "  ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items())


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)
