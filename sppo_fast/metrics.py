"""Metrics: JSONL + TensorBoard writers, and `sppo-fast plot RUN_DIR` to draw the curves as a PNG."""
import json
import math
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir, tensorboard: bool = True, append: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        if not append:  # a fresh run reusing a directory starts a fresh file (a resumed one continues it)
            self.path.unlink(missing_ok=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                self.tb = None

    def log(self, step: int, scalars: dict) -> None:
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a sppo-fast run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir, out=None, keys=None) -> Path:
    """Draw every logged key (or `keys`) against step, one panel per key, into RUN_DIR/curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = keys or sorted({k for r in rows for k in r if k != "step"})
    if not keys:
        raise ValueError(f"{run_dir}/metrics.jsonl has no metrics to plot")
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
