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


# The CUDA-only GEMMs of kernels/chunked.py, emulated on CPU with CUDA's own dtype rules. torch.mm/addmm with
# out_dtype have no CPU kernel, and their meta kernels check the output but not the operands (measured, torch 2.13),
# so the operand rules of the CUDA implementation (aten/src/ATen/native/cuda/Blas.cpp, `mm.dtype`) are spelled out
# here: one dtype for both operands ("input dtypes must be the same"), 16-bit operands for an fp32 output, and an
# `out` of exactly the output dtype. The values are fp32 math on the exactly representable 16-bit operands, which is
# what cuBLAS's fp32 accumulation computes up to summation order. A looser stand-in (`a.float() @ b.float()`) hid a
# real bug: the torch row pass's fp32 dZ meeting a 16-bit weight.
def _cuda_out_dtype_rules(a, b, out):
    if a.dtype != b.dtype:
        raise RuntimeError(f"input dtypes must be the same (got {a.dtype} and {b.dtype})")
    if a.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs (got {a.dtype})")
    if out is not None and out.dtype != torch.float32:
        raise RuntimeError(f"Expected out tensor to have dtype float, but got {out.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({tuple(a.shape)} and {tuple(b.shape)})")
    if out is not None and tuple(out.shape) != (a.shape[0], b.shape[1]):
        raise RuntimeError(f"out has shape {tuple(out.shape)}, expected {(a.shape[0], b.shape[1])}")


def emulate_cuda_16bit_gemms(monkeypatch, addmm_in_place=True):
    """Make the chunk loop take its CUDA 16-bit branch on CPU (16-bit GEMM operands with fp32 outputs, a 16-bit dZ)
    under CUDA's dtype rules; `addmm_in_place` picks which dW accumulation path the branch takes."""
    from sppo_fast.kernels import chunked

    def mm_f32(a, b, out):
        _cuda_out_dtype_rules(a, b, out)
        result = a.float() @ b.float()
        return result if out is None else out.copy_(result)

    def addmm_f32_(acc, a, b):
        _cuda_out_dtype_rules(a, b, acc)
        return acc.add_(a.float() @ b.float())

    monkeypatch.setattr(chunked, "_native_16bit", lambda device, what: what == "mm" or addmm_in_place)
    monkeypatch.setattr(chunked, "_mm_f32", mm_f32)
    monkeypatch.setattr(chunked, "_addmm_f32_", addmm_f32_)


# A few seconds of the trainer on the embedded tiny model: 8 prompts a step, an 8-prompt eval at the start and end.
TINY_RUN = ["--batch-size", "8", "--eval-size", "8", "--eval-k", "1", "--eval-every", "0", "--max-new-tokens", "24",
            "--no-progress", "--threads", "1", "--no-tensorboard"]


def train_tiny(tmp_path, name, *flags):
    """sppo_fast.train.main on TINY_RUN + flags (later flags win) into tmp_path/name -> (result, run dir)."""
    from sppo_fast.cli import build_args
    from sppo_fast.train import main

    result = main(build_args([*TINY_RUN, "--out-dir", str(tmp_path), "--run-name", name, *flags]))
    return result, tmp_path / name
