"""Small helpers shared by the ops: implementation choice, input checks (shapes, dtypes, devices), and the Triton
device functions that more than one kernel calls."""
import functools
import re

import torch
import triton
import triton.language as tl

IMPLS = ("auto", "chunked", "triton", "torch")


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """'auto' means the row-chunked path with its Triton row pass on CUDA tensors, and the same chunks with a torch
    row pass elsewhere (CPU, MPS).

    Why "chunked" on CUDA: its three GEMMs are cuBLAS's, measured at ~82% of peak on an H200 at our shapes
    (shared/anchors), plus one or two memory passes per chunk; the tile-fused "triton" backward with fp32 atomics is
    the design family of CCE's exact mode, measured at 3.8x the three-GEMM floor. No GPU measurement of either of
    our paths is committed yet: when one in bench/results/ shows "triton" faster at a shape, this is the place to
    pick it there.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "chunked" if all(t.is_cuda for t in tensors) else "torch"
    return impl


def check_chunk_bytes(chunk_bytes, device: torch.device) -> int:
    """None -> the device's default budget; else a positive int (bytes of per-chunk scratch)."""
    from .chunked import default_chunk_bytes

    if chunk_bytes is None:
        return default_chunk_bytes(device)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be None or a positive int (bytes), got {chunk_bytes!r}")
    return chunk_bytes


@functools.cache
def _interpreter_problem():
    """Why Triton's CPU interpreter cannot run here, or None. triton < 3.7's interpreter calls int() on a shape-(1,)
    numpy array for every runtime loop bound, which numpy >= 2.4 refuses: a TypeError from deep inside a kernel
    ("only 0-dimensional arrays can be converted to Python scalars") unless it is named up front."""
    import numpy

    def version(text):
        return tuple(int(x) for x in re.findall(r"\d+", text)[:2])

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run with numpy "
                f"{numpy.__version__}: install 'numpy<2.4' or triton >= 3.7, or use impl='torch'")
    return None


def check_interpreter(tensor: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel would run on `tensor` under an interpreter that cannot work here."""
    if not tensor.is_cuda and _interpreter_problem() is not None:
        raise RuntimeError(_interpreter_problem())


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


@triton.jit
def tanh(x):
    # tl has no tanh (libdevice's does not run in the interpreter). exp(-2|x|) <= 1 never overflows; the absolute
    # error (~1e-7, times softcap in the logits) is what matters here, and it is as good near 0 as elsewhere.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
