"""Shared test helpers: Triton's CPU interpreter when there is no GPU, and an error-versus-truth assert."""
import os

import torch

# Must run before anything imports triton: without a GPU, Triton kernels run in its numpy interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def max_error(actual, truth):
    return (actual.double() - truth.double()).abs().max().item() if truth.numel() else 0.0


def assert_error_within(name, actual, baseline, truth, eps, show=5):
    """CCE's rule: max|actual - truth| <= max|baseline - truth| + eps, where `baseline` is the plain framework
    computation in the same input dtype and `truth` is an fp64 computation. Prints the worst positions on failure."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    err = (actual.double() - truth.double()).abs()
    bound = max_error(baseline, truth) + eps
    nonfinite = ~torch.isfinite(actual) & torch.isfinite(truth)
    if not nonfinite.any() and (err.numel() == 0 or err.max().item() <= bound):
        return
    bad = torch.where(torch.isnan(err), float("inf"), err).flatten()
    worst = bad.topk(min(show, bad.numel())).indices
    lines = [f"{name}: max error {bad.max().item():.3e} > bound {bound:.3e} "
             f"(baseline error {max_error(baseline, truth):.3e} + eps {eps:.1e}); "
             f"{int((bad > bound).sum())} of {bad.numel()} elements over, {int(nonfinite.sum())} non-finite"]
    for flat in worst.tolist():
        index = tuple(torch.unravel_index(torch.tensor(flat), truth.shape)) if truth.dim() else ()
        index = tuple(int(i) for i in index)
        lines.append(f"  at {index}: actual {actual.flatten()[flat].item():.8g}, "
                     f"truth {truth.flatten()[flat].item():.8g}, baseline {baseline.flatten()[flat].item():.8g}")
    raise AssertionError("\n".join(lines))


# A few seconds of the trainer on the embedded tiny model: 8 prompts a step, an 8-prompt eval at the start and end.
TINY_RUN = ["--batch-size", "8", "--eval-size", "8", "--eval-k", "1", "--eval-every", "0", "--max-new-tokens", "24",
            "--no-progress", "--threads", "1", "--no-tensorboard"]


def train_tiny(tmp_path, name, *flags):
    """sppo_fast.train.main on TINY_RUN + flags (later flags win) into tmp_path/name -> (result, run dir)."""
    from sppo_fast.cli import build_args
    from sppo_fast.train import main

    result = main(build_args([*TINY_RUN, "--out-dir", str(tmp_path), "--run-name", name, *flags]))
    return result, tmp_path / name
