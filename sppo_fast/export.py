"""`sppo-fast export CHECKPOINT_OR_RUN --out DIR`: a checkpoint's policy as one plain model for inference.

A LoRA checkpoint (its policy/ is an adapter, on a 4-bit NF4 base when quantization.json says so) is loaded the way a
resume loads it, its NF4 weights are dequantized, the adapters merged into them, and the result saved as a
transformers model (safetensors) with the tokenizer: `AutoModelForCausalLM.from_pretrained(DIR)` needs neither peft
nor torchao. A full-parameter checkpoint's policy is saved as it is (in --dtype).
"""
import os
import shutil
from pathlib import Path

import torch

from sppo_fast import checkpoint, quant

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export(source, out, *, dtype: str = "bfloat16") -> tuple[Path, list]:
    """Write the merged policy of `source` (a checkpoint directory, or a run directory: its newest checkpoint that
    verifies, as --resume picks it) to `out`. Returns (out, [(skipped checkpoint, why), ...]).

    `out` must not exist or be empty; it is written as OUT.tmp and renamed into place, so a failed export leaves no
    half model under the final name."""
    from transformers import AutoModelForCausalLM

    from sppo_fast.model import load_policy, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not an empty directory: choose a new path")
    ckpt, skipped = checkpoint.newest_valid(Path(source).expanduser())
    policy_dir = ckpt / "policy"
    if not policy_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {ckpt} has no policy/ directory")
    target = DTYPES[dtype]
    tokenizer = load_tokenizer(policy_dir)
    if (policy_dir / "adapter_config.json").is_file():
        # loaded as a resume loads it: on the base quantized as quantization.json says, so the merge starts from
        # the very weights the adapters were trained on
        model = load_policy(policy_dir, device=torch.device("cpu"), attn_implementation="sdpa", liger=False,
                            dtype=target)
        # dense in the target dtype, then peft adds each fp32 delta into it: one rounding per merged weight
        quant.dequantize_linears(model, target)
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=target, attn_implementation="sdpa")
    model.to(target)  # every weight is dense here: embeddings, norms, head in the target dtype too
    model.config.use_cache = True  # a training run may have saved it off (gradient checkpointing)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # an empty directory (checked above)
        out.rmdir()
    os.replace(tmp, out)
    return out, skipped
