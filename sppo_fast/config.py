"""The run's options: `Args` (one field per flag, a docstring under each), their choices and ranges, and
`check_args`, which checks every option and the combinations that cannot work before anything loads.

`sppo_fast/cli.py` builds an `Args` from a preset, YAML and flags; `sppo_fast/train.py` runs it. `algorithm(args)`
is the one place that reads --algo: it returns the registered algorithm (sppo_fast/algos.py) the run uses.
"""
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from sppo_fast import algos, memory
from sppo_fast.rollout import BACKENDS


@dataclass
class Args:
    # --- model and data
    model: str = ""
    """local Hugging Face model directory; empty = the embedded tiny model (and its demo preset)"""
    data: str = "synthetic"
    """training data: 'synthetic' (the built-in addition-chain task) or a .jsonl / .json / .parquet file"""
    eval_data: str = ""
    """held-out data file; empty = split `eval_size` rows off the training data"""
    eval_size: float = 256
    """held-out rows when no eval_data is given: a count (a whole number >= 1) or a fraction of the file's rows in
    (0, 1), e.g. 0.1 (synthetic data: of its 10,000 training prompts). A split that leaves less than half the rows
    for training is refused unless allow_small_train"""
    allow_small_train: bool = False
    """accept an --eval-size that holds out half or more of the --data rows"""
    prompt_field: str = "prompt"
    """dataset column holding the prompt"""
    answer_field: str = "answer"
    """dataset column holding the reference answer (passed to the reward function as `answer`)"""
    chat_template: bool = False
    """wrap prompts in the tokenizer's chat template (instruct models)"""
    system_prompt: str = ""
    """system message when chat_template is on"""
    max_prompt_tokens: int = 1024
    """prompts longer than this, or than the model's context minus max_new_tokens, are skipped (and counted)"""
    reward: str = "exact"
    """reward: exact | gsm8k | math | code | module:fn | path/to/file.py:fn  (fn(prompts, completions, **columns))"""
    code_sandbox: str = "namespaces"
    """how --reward code contains model-written programs: namespaces (sppo_fast/sandbox.py: mount, PID and network
    namespaces, rlimits) or none (explicit opt-out: the programs run uncontained)"""

    # --- algorithm
    algo: str = "sppo"
    """sppo (one sample per prompt, value-head baseline), grpo (group_size samples, group-mean baseline) or ppo
    (one sample per prompt, a separate critic LLM with token values and GAE)"""
    critic: str = ""
    """separate critic model directory, or 'policy' for a copy of the policy's initial weights: for sppo, the paper's
    separate scalar critic (value head on the critic's prompt state); for ppo, the critic LLM (default: 'policy')"""
    gae_lambda: float = 0.95
    """PPO: GAE lambda (gamma is 1: one terminal reward per response)"""
    value_clip: float = 0.2
    """PPO: value clipping range around the pre-update values"""
    steps: int = 200
    """training steps (one rollout batch each)"""
    batch_size: int = 64
    """prompts per step (GRPO samples group_size responses for each)"""
    group_size: int = 8
    """GRPO: responses per prompt"""
    grpo_scale_std: bool = False
    """GRPO: divide advantages by the group's reward std (Dr. GRPO argues against it; off by default)"""
    temperature: float = 0.6
    """rollout sampling temperature; the log-probs of the update use the same temperature"""
    top_p: float = 1.0
    """rollout nucleus sampling"""
    max_new_tokens: int = 1024
    """response length limit"""
    min_new_tokens: int = 0
    """EOS is suppressed before this many new tokens (= max_new_tokens: fixed-length rollouts for benchmarks)"""
    stop_strings: list = field(default_factory=list)
    """extra strings that end a response (EOS always does)"""
    lr: float = 1e-6
    """policy learning rate (paper: 1e-6)"""
    lora_lr: float = 0.0
    """policy learning rate when the policy trains LoRA adapters (--lora-rank > 0, or the qlora rung), in place of
    --lr: adapters start at zero and want a larger rate than full fine-tuning; 0 = --lr"""
    value_lr: float = 1e-4
    """value-head learning rate (a linear head wants a higher rate than the paper's 5e-6 for a full critic LLM)"""
    weight_decay: float = 0.0
    """AdamW weight decay of the policy"""
    value_weight_decay: float = 0.0
    """AdamW weight decay of the value head and the critic LLM"""
    warmup_steps: int = 0
    """linear learning-rate warm-up steps"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping of the policy's parameters (0 disables)"""
    value_max_grad_norm: float = 1.0
    """gradient-norm clipping of the value head + critic LLM, apart from the policy's (0 disables)"""
    grad_clip: str = "separate"
    """separate: policy and value parameters clipped apart, as the official SPPO code does; joint: one norm over
    both at --max-grad-norm (the demo preset was tuned with it)"""
    clip_low: float = 0.2
    """PPO ratio clip below 1"""
    clip_high: float = 0.2
    """PPO ratio clip above 1"""
    dual_clip: float = 3.0
    """dual-clip constant c for negative advantages (0 disables)"""
    loss_agg: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum"""
    ratio_level: str = "token"
    """token (PPO) or sequence (GSPO-style length-normalised sequence ratio)"""
    entropy_coef: float = 0.0
    """entropy bonus (the paper uses none)"""
    value_coef: float = 1.0
    """weight of the value loss"""
    value_loss: str = "bce"
    """bce (V = sigmoid(v), rewards in [0,1]) or mse (V = v, any real reward)"""
    value_pooling: str = "last"
    """prompt state fed to the value head: last (last prompt token) or mean (over prompt tokens)"""
    value_layer: int = -1
    """decoder layer whose output feeds the value head (-1: the final hidden state; 0-based, negative from the end)"""
    value_norm: str = "none"
    """none | layernorm: standardise the pooled state before the value head (LayerNorm without affine)"""
    value_mlp_hidden: int = 0
    """value head: 0 = Linear(H, 1); N > 0 = Linear(H, N) -> GELU -> Linear(N, 1)"""
    value_grad_to_backbone: bool = False
    """let the value loss's gradient flow into the shared backbone (off: the policy's learning is not perturbed)"""
    value_steps: int = 1
    """SPPO shared head: optimizer steps of the value head per batch. The first is the joint step; each further one
    refits the head alone on the batch's detached prompt states (plus --value-replay earlier batches'): one
    [B, H] x [H, 1] product, no backbone forward"""
    value_replay: int = 0
    """SPPO shared head: earlier batches whose prompt states and rewards the extra value steps also fit"""
    num_minibatches: int = 1
    """optimizer steps per rollout batch (>1 scores old log-probs first with the forward-only kernel)"""
    micro_batch_tokens: int = 16384
    """gradient-accumulation micro-batches hold at most this many prompt+response tokens"""

    # --- evaluation
    eval_every: int = 20
    """evaluate every this many steps (and at the start and end); 0 = start and end only"""
    eval_k: int = 4
    """avg@k: sampled responses per eval prompt at the rollout temperature"""
    log_eval_samples: bool = False
    """also write every evaluation's per-prompt results to RUN_DIR/eval_samples.jsonl (one row per prompt: its
    index in the eval set, the prompt, the greedy response and its reward, the eval_k samples' rewards, V(prompt))"""

    # --- engineering
    seed: int = 0
    """seed for data order, sampling and initialisation"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    bf16: bool = True
    """bf16 autocast on GPU (fp32 master weights and optimizer states); CPU always runs fp32"""
    gradient_checkpointing: bool = False
    """recompute decoder activations in backward"""
    memory_budget: str = ""
    """GPU memory budget, e.g. 20GiB: takes the lightest --memory-plan that fits, lowers micro_batch_tokens and
    gen_batch_size to what it holds, caps the process's CUDA memory at it, reports in memory_report.txt; empty = off"""
    memory_plan: str = "auto"
    """auto (with a budget: the first that fits; without: fp32) or fp32 | ckpt (+ gradient checkpointing) | bf16
    (+ bf16 weights, torchao AdamW with stochastic rounding, fp32 states) | 8bit (+ 8-bit states) | offload (fp32
    states in host RAM) | qlora (frozen NF4 base, bf16 head and norms, fp32 LoRA adapters and value head, torch
    AdamW; needs torchao and peft; single process); see sppo_fast/memory.py"""
    liger: bool = True
    """apply Liger's RMSNorm/SwiGLU/RoPE kernels to the backbone on GPU when installed"""
    lora_rank: int = 0
    """LoRA rank (0 = full fine-tuning, except on --memory-plan qlora, where 0 = the rung's default rank 16); needs
    peft"""
    lora_alpha: int = 16
    """LoRA alpha"""
    kernel_impl: str = "auto"
    """log-prob kernel: auto (chunked on CUDA, torch elsewhere) | chunked (vendor GEMM chunks + Triton row pass) |
    triton (tile-fused) | torch (vendor GEMM chunks + torch row pass); see sppo_fast/kernels"""
    check_inputs_steps: int = 2
    """validate token ids / sequence bounds on the host for the first N steps (later: device-side asserts only)"""
    gen_batch_size: int = 0
    """generate at most this many sequences at once (0 = the whole batch)"""
    rollout_backend: str = "auto"
    """generation engine: auto (measured per device, see sppo_fast/rollout.py) | hf (generate) | hf-static (static
    KV cache, compiled decode step on CUDA) | paged (transformers' continuous batching)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    max_nonfinite_steps: int = 3
    """stop after this many consecutive steps with a NaN/inf loss or gradient (each one is skipped)"""

    # --- logging and checkpoints
    out_dir: str = "runs"
    """parent directory of run directories"""
    run_name: str = ""
    """run directory name; empty = {algo}__{model}__{seed}__{time}"""
    log_every: int = 1
    """log metrics every N steps (the only host sync for metrics)"""
    tensorboard: bool = True
    """also write TensorBoard event files"""
    progress: bool = True
    """show a progress bar"""
    save_every: int = 50
    """checkpoint every N steps (and at the end); 0 = only at the end"""
    keep_last: int = 3
    """checkpoints kept"""
    resume: str = ""
    """resume from a run directory (its newest checkpoint that verifies) or a checkpoint directory"""
    overwrite: bool = False
    """delete an existing run directory of the same name first (without it, an existing run is refused)"""


class ConfigError(ValueError):
    """A mistake in the run's options, data, model path or reward: `sppo-fast` prints the message on one line and
    exits with status 2 (`--debug` shows the traceback). Everything else is a bug and keeps its traceback."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


CHOICES = {"algo": tuple(algos.ALGOS), "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
           "ratio_level": ("token", "sequence"), "value_loss": ("bce", "mse"), "value_pooling": ("last", "mean"),
           "kernel_impl": ("auto", "chunked", "triton", "torch"), "grad_clip": ("separate", "joint"),
           "code_sandbox": ("namespaces", "none"), "rollout_backend": ("auto", *BACKENDS),
           "value_norm": ("none", "layernorm"),
           "memory_plan": ("auto", *memory.LEVELS)}
# Valid ranges in interval notation, exactly as the error messages print them. Fields not listed take any value of
# their type (floats must still be finite).
RANGES = {
    "eval_size": "(0, inf)", "max_prompt_tokens": "[1, inf)", "gae_lambda": "[0, 1]", "value_clip": "(0, inf)",
    "steps": "[1, inf)", "batch_size": "[1, inf)", "group_size": "[1, inf)", "temperature": "(0, inf)",
    "top_p": "(0, 1]", "max_new_tokens": "[1, inf)", "min_new_tokens": "[0, inf)", "lr": "[0, inf)",
    "value_lr": "[0, inf)", "weight_decay": "[0, inf)", "value_weight_decay": "[0, inf)", "warmup_steps": "[0, inf)",
    "max_grad_norm": "[0, inf)", "value_max_grad_norm": "[0, inf)", "clip_low": "[0, 1)", "clip_high": "[0, inf)",
    "dual_clip": "[0, inf)", "value_coef": "[0, inf)", "num_minibatches": "[1, inf)", "micro_batch_tokens": "[1, inf)",
    "eval_every": "[0, inf)", "eval_k": "[1, inf)", "seed": "[0, inf)", "lora_rank": "[0, inf)",
    "lora_alpha": "[1, inf)", "check_inputs_steps": "[0, inf)", "gen_batch_size": "[0, inf)", "threads": "[0, inf)",
    "max_nonfinite_steps": "[1, inf)", "log_every": "[1, inf)", "save_every": "[0, inf)", "keep_last": "[0, inf)",
    "value_mlp_hidden": "[0, inf)", "value_steps": "[1, inf)", "value_replay": "[0, inf)", "lora_lr": "[0, inf)",
}


def in_range(value, interval: str) -> bool:
    lo, hi = (x.strip() for x in interval[1:-1].split(","))
    lo, hi = float(lo), float(hi)
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
               list: "a list of strings"}


def type_ok(value, kind) -> bool:
    """`value` is a valid `kind` for an Args field (an int is a valid float; a bool is never a number)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def check_args(args: Args) -> None:
    """Every option's type and range, and the combinations that cannot work: the first mistake is a ConfigError
    naming the flag and what it accepts. Runs before anything is loaded or written."""
    for f in fields(Args):
        value = getattr(args, f.name)
        if not type_ok(value, f.type):
            raise ConfigError(f"{flag(f.name)} must be {_TYPE_NAMES[f.type]}, got {value!r}")
    for name, allowed in CHOICES.items():
        if getattr(args, name) not in allowed:
            raise ConfigError(f"{flag(name)} must be one of {', '.join(allowed)}; got {getattr(args, name)!r}")
    for name, interval in RANGES.items():
        if not in_range(getattr(args, name), interval):
            raise ConfigError(f"{flag(name)} must be in {interval}, got {getattr(args, name)}")
    if args.eval_size >= 1 and not float(args.eval_size).is_integer():
        raise ConfigError(f"--eval-size must be a whole number of rows or a fraction in (0, 1), got {args.eval_size}")
    if 0 < args.dual_clip <= 1:
        raise ConfigError(f"--dual-clip must be 0 (off) or > 1 (the dual-clip bound c > 1), got {args.dual_clip}")
    if args.min_new_tokens > args.max_new_tokens:
        raise ConfigError(f"--min-new-tokens {args.min_new_tokens} is larger than --max-new-tokens "
                          f"{args.max_new_tokens}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {args.device!r}")
    if args.algo == "grpo" and args.group_size < 2:
        raise ConfigError("--group-size must be >= 2 for --algo grpo (its baseline is the group mean)")
    if args.critic and args.algo == "grpo":
        raise ConfigError("--critic is for --algo sppo and ppo; GRPO has no value function")
    if args.num_minibatches > args.batch_size * algorithm(args).samples_per_prompt:
        raise ConfigError(f"--num-minibatches {args.num_minibatches} is larger than the {args.batch_size} samples "
                          f"of a step (--batch-size)")
    if (args.value_steps > 1 or args.value_replay) and (algorithm(args).value != "head"
                                                        or args.value_grad_to_backbone):
        raise ConfigError("--value-steps/--value-replay refit SPPO's shared value head on detached prompt states: "
                          "they need --algo sppo without --critic or --value-grad-to-backbone")
    if args.value_replay and args.value_steps < 2:
        raise ConfigError(f"--value-replay {args.value_replay} is only fitted by the extra value steps: give "
                          f"--value-steps 2 or more")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite deletes it: give one of them")
    if args.run_name and (Path(args.run_name).name != args.run_name or args.run_name in (".", "..")):
        raise ConfigError(f"--run-name must be a plain directory name (it goes under --out-dir), got "
                          f"{args.run_name!r}")
    if args.memory_budget:
        try:
            memory.parse_bytes(args.memory_budget)
        except ValueError as e:
            raise ConfigError(f"--memory-budget: {e}") from None
    if args.memory_plan == "qlora":  # a budget that reaches the rung by itself is checked once it is chosen (preflight)
        check_qlora("--memory-plan qlora")


def check_qlora(why: str) -> None:
    """The qlora rung's requirements, before anything loads: torchao (the NF4 base) and peft (the adapters)
    importable, and one process. FSDP2 sharding of NF4 weights under torchrun is untested here, so it is refused
    rather than left to fail (or silently mis-shard) in the first forward."""
    missing = [name for name in ("torchao", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{why} needs {' and '.join(missing)} (a frozen NF4 base from torchao, LoRA adapters from "
                          f"peft): pip install 'torchao>=0.18' 'peft>=0.13' (in the checkout: pip install -e "
                          f"'.[memory,lora]')")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{why} runs in one process: sharding its NF4 base with FSDP2 under torchrun is not "
                          f"supported; run it without torchrun (it is the rung for one GPU)")


def algorithm(args: Args) -> algos.Algorithm:
    """The run's algorithm (sppo_fast/algos.py), built from its options: the one lookup of --algo in the registry.
    Everything else asks the algorithm what it needs (samples per prompt, its value function) instead of the name."""
    return algos.get_algo(args.algo)(args)
