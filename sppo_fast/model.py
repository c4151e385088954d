"""Loading a Hugging Face causal LM from a local directory, and running its backbone for the fused kernels.

The trainer never asks the model for logits: it runs the decoder (`model.get_decoder()`), keeps the final hidden
states, and hands them with `lm_head.weight` to `sppo_fast.kernels`, so [tokens x vocab] logits never exist.
"""
import importlib.util
import json
import logging
import warnings
from pathlib import Path

import torch

from sppo_fast import quant


def check_model_dir(path) -> Path:
    """A clear error for the common mistakes: a missing path, a hub id (nothing downloads here), no config.json."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist (sppo-fast loads models from a local "
                                f"directory; nothing is downloaded at run time)")
    is_adapter = (path / "adapter_config.json").is_file()  # a LoRA checkpoint: config.json lives with the base
    if not path.is_dir() or not ((path / "config.json").is_file() or is_adapter):
        raise ValueError(f"{str(path)!r} is not a Hugging Face model directory: no config.json in it")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ValueError(f"{str(path)!r} has a config but no weights (*.safetensors or *.bin)")
    return path


def load_tokenizer(path):
    from transformers import AutoTokenizer

    path = check_model_dir(path)
    return with_pad_token(AutoTokenizer.from_pretrained(str(path)), path)


def with_pad_token(tokenizer, path):
    """`tokenizer`, its pad token defaulting to its EOS token (rollout batches are padded)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad token nor an EOS token; set pad_token or "
                             f"eos_token in its tokenizer_config.json")
        warnings.warn(f"the tokenizer in {path} has no pad token: using its EOS token {tokenizer.eos_token!r} "
                      f"as the pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(device: torch.device) -> str:
    """flash-attn varlen when installed and on CUDA (sequences are then packed without padding), SDPA otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_policy(path, *, device, attn_implementation: str, gradient_checkpointing: bool = False,
                liger: bool = True, lora_rank: int = 0, lora_alpha: int = 16, lora_target: str = "all-linear",
                dtype: torch.dtype = torch.float32, quantize: str = ""):
    """The policy in fp32 master weights (bf16 compute comes from autocast, so the optimizer never loses precision).

    dtype=torch.bfloat16 is the memory mode's choice (sppo_fast/memory.py): then only an optimizer that rounds
    stochastically may update it, or lr ~ 1e-6 steps vanish. LoRA adapters stay fp32 (peft's default).
    quantize="nf4" (the qlora rung, sppo_fast/quant.py) turns the base's linear weights, loaded in `dtype`, into
    frozen 4-bit NF4 before LoRA wraps them, so it needs lora_rank > 0. An adapter directory (a LoRA checkpoint's
    policy/) rebuilds its base as its quantization.json says, and the flag is not needed there."""
    path = check_model_dir(path)
    if (path / "adapter_config.json").exists():
        return _load_adapter(path, device=device, attn_implementation=attn_implementation,
                             gradient_checkpointing=gradient_checkpointing, dtype=dtype, quantize=quantize,
                             liger=liger)
    _check_quantize(quantize, lora_rank)
    model = _load_base(path, critic=False, dtype=dtype, attn_implementation=attn_implementation, device=device,
                       nf4={} if quantize else None)
    if liger and device.type == "cuda":
        apply_liger(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if lora_rank > 0:
        model = wrap_lora(model, lora_rank, lora_alpha, lora_target)
    return model


def load_critic(path, *, device, attn_implementation: str, gradient_checkpointing: bool = False,
                dtype: torch.dtype = torch.float32, quantize: str = "", lora_rank: int = 0, lora_alpha: int = 16):
    """A separate critic LLM: the decoder of a causal LM (AutoModel: no lm_head, whose V x H weights a critic
    never uses), fp32 master weights like the policy. quantize and lora_rank as in load_policy (LoRA on every
    linear layer; peft's feature-extraction task, as the model has no head); an adapter directory (a LoRA critic's
    checkpoint) is loaded with its base."""
    path = check_model_dir(path)
    if (path / "adapter_config.json").exists():
        return _load_adapter(path, device=device, attn_implementation=attn_implementation,
                             gradient_checkpointing=gradient_checkpointing, dtype=dtype, quantize=quantize,
                             critic=True)
    _check_quantize(quantize, lora_rank)
    model = _load_base(path, critic=True, dtype=dtype, attn_implementation=attn_implementation, device=device,
                       nf4={} if quantize else None)
    if gradient_checkpointing:
        enable_checkpointing(model)
    if lora_rank > 0:
        model = wrap_lora(model, lora_rank, lora_alpha, "all-linear", task_type="FEATURE_EXTRACTION")
    return model


def _check_quantize(quantize: str, lora_rank: int) -> None:
    if quantize and quantize not in quant.FORMATS:
        raise ValueError(f"quantize={quantize!r}: the formats are {', '.join(quant.FORMATS)} ('' for none)")
    if quantize and lora_rank <= 0:
        raise ValueError(f"quantize={quantize!r} freezes the base's linear weights: it needs LoRA adapters to train "
                         f"(lora_rank > 0, got {lora_rank})")


def _load_base(path, *, critic: bool, dtype, attn_implementation, device, nf4: dict | None = None):
    """A causal LM from `path`, or for a critic its decoder alone (AutoModel), on `device`. nf4 (None: dense) holds
    quant.quantize_linears' block sizes ({}: its defaults): the linears are quantized on the device one weight at a
    time while the model is still on the host, so the 16-bit base never sits on the device whole."""
    from transformers import AutoModel, AutoModelForCausalLM

    if not critic:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = _without_expected_load_report(
            lambda: AutoModel.from_pretrained(str(path), dtype=dtype, attn_implementation=attn_implementation,
                                              output_loading_info=True), expected_unexpected=("lm_head.",))
    if nf4 is not None:
        quant.quantize_linears(model, device=device, **nf4)
    return model.to(device)


def _without_expected_load_report(load, expected_unexpected: tuple):
    """The model from `load()` (a from_pretrained(..., output_loading_info=True)), without transformers' "LOAD
    REPORT ... not ok if you expect identical arch" warning when the only keys it reports are unexpected ones that
    start with `expected_unexpected` (a causal LM's lm_head, which a critic's decoder leaves out by design). Any other
    missing, unexpected or mismatched key gets the report, as it would have. The report is held back by a logging
    filter that lives only during the load."""
    held = []

    class HoldReport(logging.Filter):
        def filter(self, record):
            if "LOAD REPORT" in record.getMessage():
                held.append(record)
                return False
            return True

    log, hold = logging.getLogger("transformers.modeling_utils"), HoldReport()
    log.addFilter(hold)
    try:
        model, info = load()
    finally:
        log.removeFilter(hold)
    expected = (not info.get("missing_keys") and not info.get("mismatched_keys")
                and all(k.startswith(expected_unexpected) for k in info.get("unexpected_keys", ())))
    if not expected:
        for record in held:
            log.handle(record)
    return model


def enable_checkpointing(model) -> None:
    """Activation checkpointing of the decoder layers (transformers >= 5.2 renamed gradient_checkpointing_enable)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_liger(model) -> bool:
    """Liger's RMSNorm / SwiGLU / RoPE kernels on the backbone. Its fused CE is off: our kernels own the head."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    try:
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    except (TypeError, ValueError, NotImplementedError) as err:  # model type Liger does not cover
        warnings.warn(f"Liger kernels not applied: {err}")
        return False
    return True


def wrap_lora(model, rank: int, alpha: int, target: str, task_type: str = "CAUSAL_LM"):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("--lora-rank needs peft: pip install 'peft>=0.13' (or pip install -e '.[lora]' in the "
                          "checkout)") from err
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target, lora_dropout=0.0, task_type=task_type)
    return get_peft_model(model, config)


def _load_adapter(path, *, device, attn_implementation, gradient_checkpointing, dtype=torch.float32,
                  quantize: str = "", liger: bool = False, critic: bool = False):
    """A LoRA checkpoint (policy/ or critic/) on its base. When quantization.json is there, the base is loaded in
    the dtype it records and quantized with its block sizes, so the NF4 codes and scales are the ones the adapters
    were trained on (quantize="nf4" quantizes a base that has no description)."""
    from peft import PeftModel

    if quantize and quantize not in quant.FORMATS:
        raise ValueError(f"quantize={quantize!r}: the formats are {', '.join(quant.FORMATS)} ('' for none)")
    base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    described = quant.load_description(path)
    if described is None and quantize:
        described = {"format": quantize, "block_size": 64, "scaler_block_size": 256,
                     "dtype": str(dtype).removeprefix("torch.")}
    model = _load_base(check_model_dir(base), critic=critic, attn_implementation=attn_implementation, device=device,
                       dtype=quant.dtype_of(described) if described else dtype,
                       nf4={key: described[key] for key in ("block_size", "scaler_block_size")} if described else None)
    if liger and not critic and device.type == "cuda":  # the kernels a run that started from the base had
        apply_liger(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    return PeftModel.from_pretrained(model, str(path), is_trainable=True)


def unwrap(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, batch) -> torch.Tensor:
    """Run the decoder on a PackedBatch and return the flat final hidden states [T, H] of its valid tokens."""
    decoder = unwrap(model).get_decoder()
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    hidden = out.last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat if batch.flat_index is None else flat[batch.flat_index]
