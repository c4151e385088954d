"""Small helpers shared by the ops: implementation choice and input checks (shapes, dtypes, devices)."""
import torch

IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """'auto' means triton on CUDA tensors and the chunked torch path elsewhere (CPU, MPS)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if all(t.is_cuda for t in tensors) else "torch"
    return impl


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
