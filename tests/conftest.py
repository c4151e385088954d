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
