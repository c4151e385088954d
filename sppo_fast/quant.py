"""A 4-bit frozen base for the "qlora" memory rung: torchao's NF4 weights under LoRA adapters.

Format: NF4 (QLoRA's 4-bit NormalFloat, Dettmers et al. 2023) as torchao's `NF4Tensor`. Each block of 64 weights
stores 16-level codes (two per byte) and one absmax scale; the scales are themselves quantized to int8 in blocks of
256 ("double quantization") with one float factor per scaler block and one mean. Bytes per parameter:
0.5 (codes) + 1/64 (int8 scales) + 2/16384 (a bf16 factor per scaler block) ~= 0.516, against 2 for bf16.

The weight stays an `nn.Parameter` of its `nn.Linear`: `F.linear` on an NF4 weight dequantizes it to the input's
dtype, computes, and frees the dense copy; the backward gives the input its grad and the weight none, so the base is
frozen by construction and LoRA's `lora_A`/`lora_B` are the only trainable weights beside the value head.
Embeddings, norms and the output head stay in the load dtype (bf16 on the rung): the fused log-prob kernels read
`lm_head.weight` densely, and a tied head is the input embedding.

Why torchao's NF4 and not bitsandbytes' 4-bit layers: bench/results/quant-format-cpu-2026-12-07.md measures both.
They are the same format (relative weight error 0.092, 0.516 bytes/param at Qwen shapes); bitsandbytes is ~2x faster
on CPU, but torchao is already our `[memory]` extra (a 3.2 MiB wheel against 41 MiB), and bitsandbytes' CPU path
looks for a kernel on the hub at import, where this project loads nothing from the network at run time.

A saved adapter says how its base was quantized in `quantization.json` (`save_description`); `model._load_adapter`
reads it and rebuilds the same base, so a resume or an export needs no flag.
"""
import json
from pathlib import Path

import torch

FORMATS = ("nf4",)
DESCRIPTION = "quantization.json"


def _torchao():
    """(to_nf4, NF4Tensor), or an ImportError that says how to install torchao."""
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError as err:
        raise ImportError("the 4-bit base (--memory-plan qlora, quantize='nf4') needs torchao's NF4 tensors: "
                          "pip install 'torchao>=0.18' (or pip install -e '.[memory]' in the checkout)") from err
    return to_nf4, NF4Tensor


def _is_nf4(tensor) -> bool:
    # by class name: checking a model for NF4 weights must not need torchao when the model has none
    return type(tensor).__name__ == "NF4Tensor"


def _targets(model) -> list:
    """[(name, nn.Linear)] to quantize: every Linear except the output head and any tied to the input embeddings."""
    if any(name.startswith("base_model.") or ".lora_" in name for name, _ in model.named_modules()):
        raise ValueError("quantize_linears: the model already has LoRA adapters; quantize the base first, then wrap "
                         "it (model.load_policy does it in that order)")
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    in_weight = getattr(in_emb, "weight", None)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out_emb:
            continue
        if in_weight is not None and module.weight is in_weight:  # a head tied to the embedding, under any name
            continue
        found.append((name, module))
    return found


def check_shapes(model, *, block_size: int = 64, scaler_block_size: int = 256) -> None:
    """A ValueError naming the first layer NF4 cannot hold: its value count must be a multiple of
    block_size * scaler_block_size (one int8 scale per block, the scales quantized in whole scaler blocks)."""
    if block_size <= 0 or scaler_block_size <= 0:
        raise ValueError(f"block_size and scaler_block_size must be positive, got {block_size}, {scaler_block_size}")
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes per byte), got {block_size}")
    unit = block_size * scaler_block_size
    for name, module in _targets(model):
        if module.weight.numel() % unit:
            raise ValueError(f"cannot quantize {name} to NF4: its weight of shape {tuple(module.weight.shape)} has "
                             f"{module.weight.numel()} values, not a multiple of block_size * scaler_block_size = "
                             f"{block_size} * {scaler_block_size} = {unit}")


@torch.no_grad()
def quantize_linears(model, *, device=None, block_size: int = 64, scaler_block_size: int = 256) -> int:
    """Replace the weight of every decoder nn.Linear of `model` (not the output head, nothing tied to the input
    embeddings) by a frozen NF4 weight, in place; returns how many were quantized.

    One weight at a time: it moves to `device` (default: where it is) in its load dtype, is quantized there, and
    replaces the Parameter, so the 16-bit model never exists whole on the GPU; the caller moves the rest (embeddings,
    norms, head) afterwards. Every shape is checked before any weight changes: a ValueError names the layer."""
    to_nf4, _ = _torchao()
    check_shapes(model, block_size=block_size, scaler_block_size=scaler_block_size)
    count = 0
    for _, module in _targets(model):
        if _is_nf4(module.weight):
            continue
        dense = module.weight.detach().to(device if device is not None else module.weight.device)
        module.weight = torch.nn.Parameter(to_nf4(dense.contiguous(), block_size, scaler_block_size),
                                           requires_grad=False)
        del dense  # the 16-bit copy on the device; the host one goes with the old Parameter
        count += 1
    return count


def is_quantized(model) -> bool:
    return any(_is_nf4(p) for p in model.parameters())


@torch.no_grad()
def dequantize_linears(model, dtype: torch.dtype):
    """Every NF4 weight of `model` back to a dense `dtype` weight (still frozen), in place; returns `model`."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and _is_nf4(module.weight):
            module.weight = torch.nn.Parameter(module.weight.get_original_weight().to(dtype), requires_grad=False)
    return model


def describe(model) -> dict | None:
    """How `model`'s base is quantized (what `quantization.json` holds), or None when nothing is."""
    weights = [p for p in model.parameters() if _is_nf4(p)]
    if not weights:
        return None
    first = weights[0]
    return {"format": "nf4", "library": "torchao", "block_size": int(first.block_size),
            "scaler_block_size": int(first.scaler_block_size),
            "dtype": str(first.dtype).removeprefix("torch."),  # the weights were quantized from this dtype
            "quantized_linears": len(weights)}


def save_description(model, directory) -> None:
    """Write `quantization.json` into `directory` (beside a saved adapter) when `model` is quantized; otherwise
    remove a stale one, so the file always tells the truth about the adapter next to it."""
    path = Path(directory) / DESCRIPTION
    description = describe(model)
    if description is None:
        path.unlink(missing_ok=True)
        return
    path.write_text(json.dumps(description, indent=1) + "\n")


def load_description(directory) -> dict | None:
    """The checked contents of `directory/quantization.json`, or None when there is none (a dense base)."""
    path = Path(directory) / DESCRIPTION
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    found = description.get("format") if isinstance(description, dict) else description
    if found not in FORMATS:
        raise ValueError(f"{path}: unknown quantization format {found!r} (this version reads {', '.join(FORMATS)})")
    for key in ("block_size", "scaler_block_size"):
        value = description.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
    dtype = description.get("dtype", "bfloat16")
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"{path}: dtype {dtype!r} is not a torch dtype")
    return description


def dtype_of(description: dict) -> torch.dtype:
    """The dtype the base was quantized from, which a reload must use to get the same NF4 codes and scales."""
    return getattr(torch, description.get("dtype", "bfloat16"))
