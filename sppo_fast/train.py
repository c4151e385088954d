"""SPPO — Sequence-Level PPO — for LLM reasoning with verifiable rewards, in one readable loop.

    sppo-fast train                                   # CPU demo: the embedded tiny model learns multi-step addition
    sppo-fast train --model /models/Qwen2.5-1.5B --data gsm8k.jsonl --reward gsm8k --chat-template
    sppo-fast train --algo grpo --group-size 8        # the GRPO baseline, same loop
    python -m sppo_fast.train --config run.yaml --lr 2e-6

One step, as data (../DESIGN.md has the picture):
  prompts -> generate ONE response each (T=0.6) -> verifiable reward R in [0,1]
  -> one backbone forward over prompt+response: hidden states [T, H]
       response rows -> sppo_fast.kernels (log p of each response token, straight from hidden x lm_head, no logits)
       last prompt row -> value head v; V = sigmoid(v) taken before any update (detached); A = R - V per sequence
  -> loss = PPO-clip(logp, old_logp, A) token-mean + value_coef * BCE(v, R) -> backward -> AdamW step
The critic is a Linear(H, 1) on the policy's own prompt state: causal attention makes that state independent of the
response, so the same forward serves the log-probs and the critic, and V needs no extra pass.
"""
import collections
import inspect
import math
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sppo_fast import checkpoint, data, distributed, memory, rewards
from sppo_fast.kernels import ppo_clip_loss, token_logprobs
from sppo_fast.metrics import MetricsLogger
from sppo_fast.hf import lm_head_params
from sppo_fast.model import (attention_implementation, check_model_dir, hidden_states, load_critic, load_policy,
                             load_tokenizer)
from sppo_fast.rollout import BACKENDS, generate, pack, resolve_backend, split_by_tokens
from sppo_fast.value_head import ValueHead, capture_layer, flat_states, pool_prompt_states


# ---------------------------------------------------------------------------------------------------------------------
# Config
@dataclass
class Args:
    # --- model and data
    model: str = ""
    """local Hugging Face model directory; empty = the embedded tiny model (and its demo preset)"""
    data: str = "synthetic"
    """training data: 'synthetic' (the built-in addition-chain task) or a .jsonl / .json / .parquet file"""
    eval_data: str = ""
    """held-out data file; empty = split `eval_size` rows off the training data"""
    eval_size: int = 256
    """number of held-out rows when no eval_data is given"""
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
    states in host RAM); see sppo_fast/memory.py"""
    liger: bool = True
    """apply Liger's RMSNorm/SwiGLU/RoPE kernels to the backbone on GPU when installed"""
    lora_rank: int = 0
    """LoRA rank (0 = full fine-tuning); needs peft"""
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


CHOICES = {"algo": ("sppo", "grpo", "ppo"), "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
           "ratio_level": ("token", "sequence"), "value_loss": ("bce", "mse"), "value_pooling": ("last", "mean"),
           "kernel_impl": ("auto", "chunked", "triton", "torch"), "grad_clip": ("separate", "joint"),
           "code_sandbox": ("namespaces", "none"), "rollout_backend": ("auto", *BACKENDS),
           "value_norm": ("none", "layernorm"),
           "memory_plan": ("auto", "fp32", "ckpt", "bf16", "8bit", "offload")}
# Valid ranges in interval notation, exactly as the error messages print them. Fields not listed take any value of
# their type (floats must still be finite).
RANGES = {
    "eval_size": "[1, inf)", "max_prompt_tokens": "[1, inf)", "gae_lambda": "[0, 1]", "value_clip": "(0, inf)",
    "steps": "[1, inf)", "batch_size": "[1, inf)", "group_size": "[1, inf)", "temperature": "(0, inf)",
    "top_p": "(0, 1]", "max_new_tokens": "[1, inf)", "min_new_tokens": "[0, inf)", "lr": "[0, inf)",
    "value_lr": "[0, inf)", "weight_decay": "[0, inf)", "value_weight_decay": "[0, inf)", "warmup_steps": "[0, inf)",
    "max_grad_norm": "[0, inf)", "value_max_grad_norm": "[0, inf)", "clip_low": "[0, 1)", "clip_high": "[0, inf)",
    "dual_clip": "[0, inf)", "value_coef": "[0, inf)", "num_minibatches": "[1, inf)", "micro_batch_tokens": "[1, inf)",
    "eval_every": "[0, inf)", "eval_k": "[1, inf)", "seed": "[0, inf)", "lora_rank": "[0, inf)",
    "lora_alpha": "[1, inf)", "check_inputs_steps": "[0, inf)", "gen_batch_size": "[0, inf)", "threads": "[0, inf)",
    "max_nonfinite_steps": "[1, inf)", "log_every": "[1, inf)", "save_every": "[0, inf)", "keep_last": "[0, inf)",
    "value_mlp_hidden": "[0, inf)", "value_steps": "[1, inf)", "value_replay": "[0, inf)",
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
    if args.num_minibatches > args.batch_size * (args.group_size if args.algo == "grpo" else 1):
        raise ConfigError(f"--num-minibatches {args.num_minibatches} is larger than the {args.batch_size} samples "
                          f"of a step (--batch-size)")
    if (args.value_steps > 1 or args.value_replay) and (args.algo != "sppo" or args.critic
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


# ---------------------------------------------------------------------------------------------------------------------
# Rollout -> reward -> value/advantage -> update
def score_rewards(reward_fn, rows, samples, args) -> torch.Tensor:
    """R [num_samples] fp32 on the CPU; every sample's own row columns go to the reward fn (TRL-style)."""
    sample_rows = [rows[s.row] for s in samples]
    columns = {k: [r.get(k) for r in sample_rows] for k in sample_rows[0] if k != "prompt"}
    values = rewards.compute_rewards(reward_fn, [r["prompt"] for r in sample_rows], [s.text for s in samples],
                                     columns, allow_outside_unit=True)
    check_reward_range(values, args)
    return torch.tensor(values, dtype=torch.float32)


def check_reward_range(values, args) -> None:
    """SPPO's BCE value loss reads V as P(success): rewards must lie in [0, 1]; MSE (and GRPO/PPO) take any."""
    if args.algo != "sppo" or args.value_loss != "bce":
        return
    for i, v in enumerate(values):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"--reward {args.reward} gave {v:g} for sample {i}, outside [0, 1]: the BCE value loss "
                              f"predicts a probability of success; use --value-loss mse for rewards on another scale")


def group_advantages(R: torch.Tensor, group_size: int, scale_std: bool) -> torch.Tensor:
    """GRPO: A = R - mean over the prompt's group (optionally / std); samples are prompt-major."""
    groups = R.view(-1, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (groups.std(dim=1, keepdim=True) + 1e-6)
    return adv.reshape(-1)


def value_of(v: torch.Tensor, value_loss: str) -> torch.Tensor:
    """SPPO's V(prompt) from the head's logit: a probability of success under BCE, the raw output under MSE."""
    return torch.sigmoid(v) if value_loss == "bce" else v


def value_loss_fn(v: torch.Tensor, R: torch.Tensor, value_loss: str) -> torch.Tensor:
    if value_loss == "bce":
        return F.binary_cross_entropy_with_logits(v, R)
    return 0.5 * F.mse_loss(v, R)


class Stepper:
    """Everything one update needs: policy, critic, optimizer. Its methods are the loop's update phase.

    Value designs (`value_head` + `critic`):
      SPPO, shared head (default): critic is None; value_head reads the policy's own prompt state.
      SPPO, separate critic (--critic PATH, the paper's design): value_head reads the critic LLM's prompt state.
      PPO: value_head reads the critic LLM's state before every response token (token values, GAE).
    """

    def __init__(self, args, policy, value_head, optimizer, scheduler, tokenizer, device, critic=None):
        self.args, self.policy, self.value_head, self.critic = args, policy, value_head, critic
        self.optimizer, self.scheduler, self.tokenizer, self.device = optimizer, scheduler, tokenizer, device
        self.packed = policy.config._attn_implementation == "flash_attention_2"
        # raw prompts get the tokenizer's special tokens (e.g. BOS); chat-templated text already holds them
        self.gen_kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                               stop_strings=args.stop_strings or None,
                               max_batch=args.gen_batch_size or None, add_special_tokens=not args.chat_template,
                               backend=resolve_backend(args.rollout_backend, device))
        # bf16 autocast on GPU only: CPU autocast would slow the tiny demo down and change its numerics
        use_bf16 = device.type == "cuda" and args.bf16
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.compute_dtype = torch.bfloat16 if use_bf16 else None
        # --value-steps/--value-replay: (detached prompt states [B, H], R [B]) of this batch and earlier ones
        self.value_buffer = collections.deque(maxlen=args.value_replay + 1)
        self.prompt_states = None  # the last forward's detached pooled prompt states (shared head only)

    def forward(self, batch):
        """One policy forward (+ the critic's, if separate) ->
        (response-token hidden [N, H], lm_head weight, softcap, value logits: [B] (SPPO), [N] (PPO) or None)."""
        shared_layer = self.args.value_layer if self.critic is None and self.value_head is not None else -1
        with self.autocast, capture_layer(self.policy, shared_layer) as tap:
            hidden = hidden_states(self.policy, batch)
        weight, softcap, logit_scale = lm_head_params(self.policy)
        h_resp = hidden[batch.resp_rows]
        if logit_scale != 1.0:  # models that scale logits (Cohere, Granite): scaling the rows is the same and cheaper
            h_resp = h_resp * logit_scale
        # The head runs in the dtype autocast would give `lm_head(hidden)` (bf16 on GPU: tensor-core GEMMs in the
        # kernel; the residual stream of fp32 master weights comes out fp32). Differentiable casts: grads reach the
        # fp32 master weight. Without autocast (CPU, or bf16 weights) the wider of the two dtypes.
        dtype = self.compute_dtype or torch.promote_types(h_resp.dtype, weight.dtype)
        h_resp = h_resp.to(dtype)
        # The chunked impls take the fp32 master weight beside 16-bit hidden states (GEMMs on its 16-bit rounding, as
        # autocast would; dW straight into fp32): no 16-bit copy of the head and no 16-bit grad to cast back.
        if not (weight.dtype == torch.float32 and self.args.kernel_impl != "triton"):
            weight = weight.to(dtype)
        v = None
        if self.critic is not None:  # a separate critic LLM: a second forward over the same tokens
            with self.autocast, capture_layer(self.critic, self.args.value_layer) as tap:
                c_hidden = hidden_states(self.critic, batch)
            c_hidden = flat_states(tap["hidden"], batch.flat_index) if tap else c_hidden
            v = self.value_head(c_hidden[batch.resp_rows] if self.args.algo == "ppo" else pool_prompt_states(
                c_hidden, batch.prompt_rows, batch.prompt_seq_ids, batch.last_prompt_rows, self.args.value_pooling))
        elif self.value_head is not None:
            v_hidden = flat_states(tap["hidden"], batch.flat_index) if tap else hidden  # --value-layer
            pooled = pool_prompt_states(v_hidden, batch.prompt_rows, batch.prompt_seq_ids, batch.last_prompt_rows,
                                        self.args.value_pooling)
            self.prompt_states = pooled.detach()  # what --value-steps refits the head on
            v = self.value_head(pooled if self.args.value_grad_to_backbone else self.prompt_states)
        return h_resp, weight, softcap, v

    def generate(self, texts, **kwargs):
        """Rollouts under the same autocast as the update (bf16 on GPU; with fp32 master weights, generating
        outside autocast would run every decode step in fp32)."""
        with self.autocast:
            return generate(self.policy, self.tokenizer, texts, **self.gen_kwargs, **kwargs)

    def pack(self, samples, group):
        return pack(samples, group, packed=self.packed, pad_token_id=self.tokenizer.pad_token_id).to(self.device)

    @torch.no_grad()
    def score(self, samples, groups, check_values: bool):
        """Old log-probs and pre-update value logits per sample, with the forward-only fused kernel.

        Needed only when a batch gets several optimizer steps (num_minibatches > 1)."""
        old_logp, old_v = {}, {}
        for group in distributed.even_micro_batches(groups):  # torchrun: as many forwards on every rank
            if not group:
                distributed.idle_pass(self, samples, backward=False)
                continue
            batch = self.pack(samples, group)
            h_resp, weight, softcap, v = self.forward(batch)
            logp = token_logprobs(h_resp, weight, batch.targets, temperature=self.args.temperature, softcap=softcap,
                                  impl=self.args.kernel_impl, check_values=check_values)
            lengths = [len(samples[i].response_ids) for i in group]  # known on the host: no device sync
            old_logp.update(zip(group, logp.split(lengths)))
            if v is not None:
                pieces = v.split(lengths) if self.args.algo == "ppo" else v.unbind()
                old_v.update(zip(group, pieces))
        return old_logp, old_v

    def update(self, samples, R, fixed_adv, check_values: bool):
        """PPO-clip update(s) on one rollout batch.

        Returns (device-side sums of the step's statistics, pre-update V per sample [num_samples] or None)."""
        args = self.args
        order = torch.randperm(len(samples)).tolist() if args.num_minibatches > 1 else list(range(len(samples)))
        minibatches = [order[k::args.num_minibatches] for k in range(args.num_minibatches)]
        micro = lambda idx: split_by_tokens(samples, idx, args.micro_batch_tokens)
        t0 = time.perf_counter()
        scored_logp, scored_v = (self.score(samples, micro(order), check_values)
                                 if args.num_minibatches > 1 else (None, None))
        self.score_s = time.perf_counter() - t0  # old-log-prob scoring, logged apart from the update proper
        totals, values = {}, torch.zeros(len(samples), device=self.device)
        refit = args.value_steps > 1
        states = [None] * len(samples) if refit else None
        for mb in minibatches:
            # torchrun: token-mean over ALL ranks' tokens (host-side counts summed; FSDP then sums the gradients)
            n_tok, n_seq = distributed.sum_counts(sum(len(samples[i].response_ids) for i in mb), len(mb))
            self.optimizer.zero_grad(set_to_none=True)
            for group in distributed.even_micro_batches(micro(mb)):  # torchrun: as many passes on every rank
                if not group:  # this rank ran out of micro-batches: a zero-weight pass joins the collectives
                    distributed.idle_pass(self, samples)
                    continue
                batch = self.pack(samples, group)
                lengths = [len(samples[i].response_ids) for i in group]
                h_resp, weight, softcap, v = self.forward(batch)
                R_g = R[group].to(self.device)
                if refit:
                    for i, row in zip(group, self.prompt_states):
                        states[i] = row
                # Old values: from the scoring pass, or this very forward detached (prompt states, and in PPO the
                # critic, are still pre-update here: the optimizer steps only after all micro-batches).
                old_v = None if v is None else v.detach() if scored_v is None else torch.cat(
                    [scored_v[i].reshape(-1) for i in group])
                if fixed_adv is not None:  # GRPO: group baseline, computed from rewards alone
                    adv = fixed_adv[group].to(self.device)
                elif args.algo == "ppo":  # token values -> GAE (gamma = 1), per token
                    adv = gae_advantages(old_v, R_g, lengths, args.gae_lambda)
                    values[group] = old_v[batch.cu_seqlens[:-1]]  # V of the state before the first response token
                else:  # SPPO: A = R - V(prompt), one number per sequence
                    V = value_of(old_v, args.value_loss)
                    adv = R_g - V
                    values[group] = V
                kernel_kw = dict(cu_seqlens=batch.cu_seqlens, clip_low=args.clip_low, clip_high=args.clip_high,
                                 dual_clip=args.dual_clip or None, ratio_level=args.ratio_level,
                                 loss_agg=args.loss_agg, entropy_coef=args.entropy_coef)
                # First (only) minibatch: the old policy IS the current one, so on_policy=True gives a ratio of
                # exactly 1 with no scoring pass; the fused op computes the gradient in its forward either way.
                old = None if scored_logp is None else torch.cat([scored_logp[i] for i in group])
                pg_loss, stats = ppo_clip_loss(h_resp, weight, batch.targets, old, adv, on_policy=old is None,
                                               temperature=args.temperature, softcap=softcap, impl=args.kernel_impl,
                                               check_values=check_values, **kernel_kw)
                # micro-batch losses are means over their own tokens/samples: re-weight to the minibatch's mean
                tok_w, seq_w = batch.num_resp_tokens / n_tok, len(group) / n_seq
                w = tok_w if args.loss_agg == "token-mean" else seq_w
                loss = pg_loss * w
                if v is not None:
                    if args.algo == "ppo":
                        returns = adv + old_v
                        vf_loss = clipped_value_loss(v, old_v, returns, args.value_clip)
                        vf_w = tok_w
                    else:
                        vf_loss, vf_w = value_loss_fn(v, R_g, args.value_loss), seq_w
                    loss = loss + args.value_coef * vf_loss * vf_w
                    _acc(totals, "losses/value", vf_loss.detach() * vf_w / args.num_minibatches)
                loss.backward()
                _acc(totals, "losses/policy", pg_loss.detach() * w / args.num_minibatches)
                for key in ("clipfrac", "dual_clipfrac", "approx_kl", "entropy", "logp"):
                    _acc(totals, f"stats/{key}", stats[key] * tok_w / args.num_minibatches)
                _acc(totals, "stats/ratio_max", stats["ratio_max"], reduce=torch.maximum)
                _acc(totals, "stats/ratio_min", stats["ratio_min"], reduce=torch.minimum)
                adv_tok = adv if adv.shape[0] == batch.num_resp_tokens else adv.repeat_interleave(
                    torch.tensor(lengths, device=self.device))
                _acc(totals, "stats/advantage_abs", adv_tok.abs().sum() / (n_tok * args.num_minibatches))
            grad_norm, value_grad_norm = clip_grad_norms(self.optimizer, args)
            # The host sync of the update: a NaN/inf step is skipped instead of poisoning the weights.
            if not all(torch.isfinite(n) for n in (grad_norm, value_grad_norm) if n is not None):
                self.optimizer.zero_grad(set_to_none=True)
                totals["nonfinite"] = torch.ones(())
                continue
            self.optimizer.step()
            _acc(totals, "stats/grad_norm", grad_norm / args.num_minibatches)
            if value_grad_norm is not None:
                _acc(totals, "stats/value_grad_norm", value_grad_norm / args.num_minibatches)
        if refit:
            self.value_buffer.append((torch.stack(states), R.to(self.device)))
            self.refit_value_head(totals)
        self.optimizer.zero_grad(set_to_none=True)  # grads are dead after the step: free them for the rollout
        self.scheduler.step()
        return totals, values if self.value_head is not None else None

    def value_buffer_state(self) -> dict:
        """The replay buffer as named tensors, for the checkpoint (resume continues with the same refits)."""
        return {f"value_buffer.{i}.{name}": t for i, (x, r) in enumerate(self.value_buffer)
                for name, t in (("states", x), ("rewards", r))}

    def load_value_buffer(self, tensors: dict) -> None:
        n = sum(1 for k in tensors if k.startswith("value_buffer.") and k.endswith(".states"))
        self.value_buffer.extend((tensors[f"value_buffer.{i}.states"].to(self.device),
                                  tensors[f"value_buffer.{i}.rewards"].to(self.device)) for i in range(n))

    def refit_value_head(self, totals):
        """--value-steps: value_steps - 1 more optimizer steps on the value head alone, each over every buffered batch
        (this one and --value-replay earlier ones; their states came from the policy as it was then). The policy's
        grads are None, so the optimizer leaves the policy as it is."""
        X = torch.cat([x for x, _ in self.value_buffer])
        y = torch.cat([r for _, r in self.value_buffer])
        for _ in range(self.args.value_steps - 1):
            self.optimizer.zero_grad(set_to_none=True)
            loss = value_loss_fn(self.value_head(X), y, self.args.value_loss)
            loss.backward()
            norms = clip_grad_norms(self.optimizer, self.args)  # the main step's clipping (the policy's norm is 0)
            if not all(torch.isfinite(n) for n in norms if n is not None):
                totals["nonfinite"] = torch.ones(())  # as in the main step: skip rather than poison the head
                break
            self.optimizer.step()
        totals["losses/value_refit"] = loss.detach()


def clip_grad_norms(optimizer, args):
    """Clip the policy's gradient and the value parameters' (head + critic LLM) each to its own norm, as the official
    SPPO code clips actor and critic apart: under one joint norm a large value gradient would shrink the policy's
    step. Returns both pre-clip norms (the value one is None without a value function, or under --grad-clip joint,
    whose one norm is the first)."""
    params = memory.params_for_clipping(optimizer)  # offload: waits until the host grads the step will use landed
    if args.grad_clip == "joint":
        return torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else 1e30), None
    limits = (args.max_grad_norm, args.value_max_grad_norm)  # param group 0 is the policy, group 1 the value side
    norms = [torch.nn.utils.clip_grad_norm_(group["params"], limit if limit > 0 else 1e30)
             for group, limit in zip(optimizer.param_groups, limits)]
    return norms[0], norms[1] if len(norms) > 1 else None


def gae_advantages(values: torch.Tensor, R: torch.Tensor, lengths: list, lam: float) -> torch.Tensor:
    """GAE with gamma = 1 for a terminal reward. values [N]: V of the state before each response token, sequences
    back to back (`lengths` tokens each); R [B]. Returns A [N]; the returns are A + values.

    delta_t = r_t + V_{t+1} - V_t (r only at the last token, V after it = 0); A_t = delta_t + lam * A_{t+1}.
    The recursion runs over a [B, L] padded grid, one vector op per position (L Python steps, no host sync).
    """
    B, L = len(lengths), max(lengths)
    flat = torch.tensor([b * L + t for b, n in enumerate(lengths) for t in range(n)], device=values.device)
    V = torch.zeros(B * L, device=values.device, dtype=torch.float32).index_copy(0, flat, values.float()).view(B, L)
    valid = torch.zeros(B * L, device=values.device, dtype=torch.bool).index_fill(0, flat, True).view(B, L)
    next_V = torch.cat([V[:, 1:], V.new_zeros(B, 1)], dim=1)  # 0 past the end: padding holds zeros
    last = torch.tensor([n - 1 for n in lengths], device=values.device)
    rewards = torch.zeros_like(V).index_put_((torch.arange(B, device=values.device), last), R.float())
    delta = (rewards + next_V - V) * valid
    adv = torch.zeros_like(V)
    running = V.new_zeros(B)
    for t in reversed(range(L)):
        running = delta[:, t] + lam * running
        adv[:, t] = running
    return adv.view(-1)[flat]


def clipped_value_loss(v, old_v, returns, clip: float):
    """PPO's value loss with value clipping: 0.5 * max((v - G)^2, (old + clip(v - old, +-clip) - G)^2), token-mean."""
    v_clipped = old_v + (v - old_v).clamp(-clip, clip)
    return 0.5 * torch.maximum((v - returns).square(), (v_clipped - returns).square()).mean()


def _acc(totals: dict, key: str, value: torch.Tensor, reduce=torch.add) -> None:
    value = value.detach().float()
    totals[key] = value if key not in totals else reduce(totals[key], value)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: greedy pass@1, sampled avg@k, and the critic's calibration (Pearson of V against R)
@torch.no_grad()
def evaluate(stepper, eval_rows, eval_texts, reward_fn, args) -> dict:
    # Sample under a forked, fixed-seed RNG: evaluation neither perturbs the training trajectory (so eval_every does
    # not change what is learned, and a resumed run matches an uninterrupted one) nor varies its own noise by step.
    devices = [stepper.device] if stepper.device.type == "cuda" else []
    # torchrun: each rank evaluates its share of the prompts with full weights; _evaluate gathers the results
    with torch.random.fork_rng(devices=devices), distributed.full_params(stepper.policy, stepper.critic,
                                                                          stepper.value_head):
        torch.manual_seed(args.seed + 1_000_003 + distributed.rank())
        return _evaluate(stepper, distributed.local_slice(eval_rows), distributed.local_slice(eval_texts),
                         reward_fn, args)


def _evaluate(stepper, eval_rows, eval_texts, reward_fn, args) -> dict:
    greedy = stepper.generate(eval_texts, greedy=True)
    R_greedy = score_rewards(reward_fn, eval_rows, greedy, args)
    sampled = stepper.generate(eval_texts, num_samples=args.eval_k, temperature=args.temperature, top_p=args.top_p)
    R_sampled = score_rewards(reward_fn, eval_rows, sampled, args)
    lengths = torch.tensor([len(s.response_ids) for s in greedy], dtype=torch.float64)
    R_greedy, R_sampled, lengths = map(distributed.all_gather_cat, (R_greedy, R_sampled, lengths))  # all ranks'
    out = {"eval/pass@1": R_greedy.mean().item(), f"eval/avg@{args.eval_k}": R_sampled.mean().item(),
           "eval/response_len": lengths.mean().item()}
    if stepper.value_head is not None:
        values = []
        for start in range(0, len(greedy), 64):
            batch = pack(greedy, list(range(start, min(start + 64, len(greedy)))), packed=stepper.packed,
                         pad_token_id=stepper.tokenizer.pad_token_id).to(stepper.device)
            v = stepper.forward(batch)[3]
            # PPO's critic gives token values: its V(prompt) is the value before the first response token
            values.append((v[batch.cu_seqlens[:-1]] if args.algo == "ppo" else value_of(v, args.value_loss)).cpu())
        # each prompt's V against each of its k samples (torchrun: all ranks', in the order of R_sampled)
        V = distributed.all_gather_cat(torch.cat(values)).repeat_interleave(args.eval_k)
        out["eval/value_mean"] = V.mean().item()
        if (r := pearson(V, R_sampled)) is not None:  # omitted, not NaN, when all rewards (or values) are equal
            out["eval/value_pearson"] = r
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else None  # undefined when either side is constant


# ---------------------------------------------------------------------------------------------------------------------
# Setup and the loop
@dataclass
class Preflight:
    """What `preflight` checked and resolved, before any model loads or any directory is written."""
    args: Args
    model_path: str
    critic_path: str | None  # the separate critic LLM's initial weights (PPO, or SPPO with --critic)
    resume_ckpt: Path | None
    run_dir: Path
    tokenizer: object
    train_rows: list
    eval_rows: list
    train_texts: list  # what the policy sees (chat template applied once, up front); rows keep the raw prompt
    eval_texts: list
    reward_fn: object
    shape: object
    plan: object
    notes: list  # lines to print once the run starts


def preflight(args: Args, device: torch.device) -> Preflight:
    """Check everything that can be wrong with a run before anything is loaded or written, each mistake a
    ConfigError naming the flag: options, model and critic directories, the run directory, the reward (importable,
    and callable on one row), the data (readable, the columns the reward reads, an eval split), prompt lengths against
    the model's context, the memory plan. Costs a tokenizer load and one reward call."""
    from sppo_fast.tiny import default_model_path  # the embedded model ships inside the package

    check_args(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device is available here (use --device cpu or auto)")
    model_path = str(_user_errors(check_model_dir, args.model or default_model_path(), flag="--model"))
    critic_path = None
    if args.algo == "ppo" or args.critic:
        critic_path = model_path if args.critic in ("", "policy") else str(
            _user_errors(check_model_dir, args.critic, flag="--critic"))
    notes = []

    # --- the run directory: the resumed run's own, or a new one (an existing run is never mixed into)
    resume_ckpt = None
    if args.resume:
        resume_ckpt, skipped = _user_errors(checkpoint.newest_valid, args.resume, flag="--resume")
        notes += [f"--resume: skipped {path}: {why}" for path, why in skipped]
        run_dir = resume_ckpt.resolve().parent.parent  # a checkpoint lives at RUN_DIR/checkpoints/step_N
    else:
        name = args.run_name or f"{args.algo}__{Path(model_path).name}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.out_dir) / name
    refused = None
    if run_dir.exists() and not run_dir.is_dir():
        refused = f"run directory {run_dir} exists and is not a directory (--out-dir / --run-name)"
    elif not args.resume and not args.overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        refused = (f"run directory {run_dir} already exists: continue it with --resume {run_dir}, replace it with "
                   f"--overwrite, or choose another --run-name")
    # torchrun: rank 0's directory (the name holds a time stamp) and rank 0's verdict, taken before it writes there
    run_dir, refused = distributed.broadcast_object((run_dir, refused))
    if refused:
        raise ConfigError(refused)

    # --- reward and data: the reward decides which columns every row must have
    sandbox = {"code_sandbox": args.code_sandbox} if args.code_sandbox != "namespaces" else {}  # the opt-out
    reward_fn = _user_errors(rewards.get_reward_fn, args.reward, **sandbox, flag="--reward")
    columns = reward_columns(args.reward, reward_fn)
    train_rows, eval_rows = load_data(args, columns)
    tokenizer = load_tokenizer(model_path)
    fmt = dict(chat_template=args.chat_template, system_prompt=args.system_prompt or None)
    context = model_context(model_path)
    limit, why = args.max_prompt_tokens, f"--max-prompt-tokens {args.max_prompt_tokens}"
    if context is not None:
        room = context - args.max_new_tokens  # prompt + response must fit the positions the model was trained on
        if room < 1:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {context} tokens (max_position_embeddings)")
        if room < limit:
            limit, why = room, f"the model's context {context} minus --max-new-tokens {args.max_new_tokens}"
    _user_errors(data.format_prompts, train_rows[:1], tokenizer, **fmt, flag="--chat-template")
    kept, skipped = {}, {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        try:
            kept[split], skipped[split] = data.filter_long_prompts(rows, tokenizer, limit, **fmt)
        except ValueError as e:  # every prompt is too long
            raise ConfigError(f"{split} data: {e}; the limit is {why}") from None
    train_rows, eval_rows = kept["train"], kept["eval"]
    if skipped["train"] or skipped["eval"]:
        notes.append(f"skipped {skipped['train']} train and {skipped['eval']} eval prompts longer than {limit} tokens "
                     f"({why})")
    train_texts = data.format_prompts(train_rows, tokenizer, **fmt)
    eval_texts = data.format_prompts(eval_rows, tokenizer, **fmt)
    check_reward_on_one_row(reward_fn, train_rows[0], args)

    # --- memory plan (sppo_fast/memory.py): weights dtype, optimizer, checkpointing and batch sizes from the budget;
    # a budget that cannot work fails here, saying what each phase needs
    shape = memory.model_shape(model_path, lora_rank=args.lora_rank, critic=critic_path is not None)
    plan = _user_errors(memory.make_plan, shape, budget=args.memory_budget or None, level=args.memory_plan,
                        seq_len=args.max_prompt_tokens + args.max_new_tokens, prompt_len=args.max_prompt_tokens,
                        micro_batch_tokens=args.micro_batch_tokens, gen_batch_size=args.gen_batch_size,
                        batch_sequences=args.batch_size * (args.group_size if args.algo == "grpo" else 1),
                        gradient_checkpointing=args.gradient_checkpointing, cuda=device.type == "cuda",
                        kernel_impl=args.kernel_impl, flag="--memory-budget / --memory-plan")
    args = replace(args, gradient_checkpointing=plan.gradient_checkpointing, micro_batch_tokens=plan.micro_batch_tokens,
                   gen_batch_size=plan.gen_batch_size)  # resolved once; config.yaml records them
    return Preflight(args, model_path, critic_path, resume_ckpt, run_dir, tokenizer, train_rows, eval_rows,
                     train_texts, eval_texts, reward_fn, shape, plan, notes)


def _user_errors(fn, *a, flag: str, **kw):
    """fn(*a, **kw), its input errors (bad path, bad value, unimportable module) turned into a ConfigError."""
    try:
        return fn(*a, **kw)
    except ConfigError:
        raise
    except (ValueError, OSError, ImportError, AttributeError, TypeError) as e:
        raise ConfigError(f"{flag}: {e}") from e


# the dataset columns each built-in reward reads (a plugin's are its keyword parameters without a default)
REWARD_COLUMNS = {"exact": ("answer",), "gsm8k": ("answer",), "math": ("answer",), "code": ("tests",)}


def reward_columns(spec: str, fn) -> tuple:
    if spec.strip() in REWARD_COLUMNS:
        return REWARD_COLUMNS[spec.strip()]
    try:
        params = list(inspect.signature(fn).parameters.values())[2:]  # after (prompts, completions)
    except (TypeError, ValueError):  # a callable without an inspectable signature: checked by the one-row call
        return ()
    return tuple(p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def load_data(args: Args, columns: tuple) -> tuple[list, list]:
    """(train_rows, eval_rows); every error names the file, the row and the flag that fixes it."""
    if args.data == "synthetic":
        return data.load_dataset("synthetic", synthetic_n_eval=args.eval_size, seed=args.seed)
    fields_needed = (args.prompt_field, *(args.answer_field if c == "answer" else c for c in columns))
    hints = {args.prompt_field: "--prompt-field names the column holding the prompts",
             args.answer_field: f"--answer-field names the column holding the reference answers (--reward "
                                f"{args.reward} reads it)"}

    def read(path, which):
        try:
            return data.load_rows(path, prompt_field=args.prompt_field, required=fields_needed)
        except data.MissingFieldError as e:
            hint = hints.get(e.field, f"--reward {args.reward} reads the column {e.field!r}")
            raise ConfigError(f"{which} {e} ({hint})") from None
        except (ValueError, OSError, ImportError) as e:
            raise ConfigError(f"{which} {e}") from None

    rows = read(args.data, "--data")
    if args.eval_data:
        train, evals = rows, read(args.eval_data, "--eval-data")
    elif args.eval_size >= len(rows):
        raise ConfigError(f"--eval-size {args.eval_size} leaves no training rows: {args.data} has {len(rows)} rows "
                          f"(hold out fewer with --eval-size, or give a separate --eval-data file)")
    else:
        train, evals = data.split_rows(rows, args.eval_size, args.seed)
    norm = dict(prompt_field=args.prompt_field, answer_field=args.answer_field)
    return data.normalize_rows(train, **norm), data.normalize_rows(evals, **norm)


def model_context(model_path: str) -> int | None:
    """The model's trained context (max_position_embeddings), or None when its config does not say."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_path).get_text_config()
    except (OSError, ValueError):  # e.g. a LoRA adapter directory: its base model's config is elsewhere
        return None
    return getattr(config, "max_position_embeddings", None)


def check_reward_on_one_row(reward_fn, row: dict, args: Args) -> None:
    """Call the reward once on the first training row (with an empty completion, and with the reference answer as
    the completion when there is one), so a reward that cannot run fails now rather than after the model loaded."""
    completions = [""] + ([row["answer"]] if isinstance(row.get("answer"), str) else [])
    columns = {k: [row.get(k)] * len(completions) for k in row if k != "prompt"}
    try:
        values = rewards.compute_rewards(reward_fn, [row["prompt"]] * len(completions), completions, columns,
                                         allow_outside_unit=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"--reward {args.reward} fails on the first training row: {e}") from e
    check_reward_range(values, args)


# ---------------------------------------------------------------------------------------------------------------------
# The loop
def main(args: Args) -> dict:
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    device = distributed.init(device)  # torchrun: the process group, this rank's device; only rank 0 prints
    if distributed.enabled() and args.value_steps > 1:
        raise ConfigError("--value-steps > 1 is single-process only: the head-only refit is not written for "
                          "torchrun's sharded value head")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    pre = preflight(args, device)  # every check that needs no model; nothing is written before it passes
    args, model_path, resume_ckpt, run_dir, plan, shape = (pre.args, pre.model_path, pre.resume_ckpt, pre.run_dir,
                                                          pre.plan, pre.shape)
    tokenizer, reward_fn = pre.tokenizer, pre.reward_fn
    train_rows, eval_rows, train_texts, eval_texts = pre.train_rows, pre.eval_rows, pre.train_texts, pre.eval_texts

    if distributed.is_main():
        if args.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
            print(f"--overwrite: deleted the previous run in {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_ckpt is not None:  # interrupted saves: never resumed from, never left to confuse
            pre.notes += [f"removed the unfinished checkpoint {p}" for p in checkpoint.remove_unfinished(run_dir)]
    distributed.barrier()
    for note in pre.notes:
        print(note)
    memory_mode = bool(args.memory_budget) or args.memory_plan != "auto"
    if distributed.is_main():
        report = memory.save_report(plan, shape, run_dir)  # memory_report.{txt,json}: the estimate per phase
        if memory_mode:
            print(report)
    if warning := memory.apply_budget(plan, device):
        print(warning)
    if distributed.is_main():
        _save_config(args, run_dir, model_path)

    # --- model, value head, optimizer
    policy_path = resume_ckpt / "policy" if resume_ckpt is not None else model_path
    policy = load_policy(policy_path, device=device, attn_implementation=attention_implementation(device),
                         gradient_checkpointing=args.gradient_checkpointing, liger=args.liger,
                         lora_rank=0 if resume_ckpt is not None else args.lora_rank, lora_alpha=args.lora_alpha,
                         dtype=plan.dtype)
    policy.train()
    critic = None
    if pre.critic_path is not None:  # a separate critic LLM (decoder only: it needs no lm_head)
        critic_path = resume_ckpt / "critic" if resume_ckpt is not None else pre.critic_path
        critic = load_critic(critic_path, device=device, attn_implementation=attention_implementation(device),
                             gradient_checkpointing=args.gradient_checkpointing, dtype=plan.dtype)
        critic.train()
    text_config = (critic or policy).config.get_text_config()
    hidden_size, n_layers = text_config.hidden_size, text_config.num_hidden_layers
    if args.algo != "grpo" and not -n_layers <= args.value_layer < n_layers:
        raise ConfigError(f"--value-layer must be in [{-n_layers}, {n_layers - 1}] for this model's {n_layers} decoder "
                          f"layers (-1: the final hidden state), got {args.value_layer}")
    value_head = ValueHead(hidden_size, norm=args.value_norm, mlp_hidden=args.value_mlp_hidden).to(device) \
        if args.algo != "grpo" else None
    policy, critic, value_head = distributed.shard(policy, critic, value_head)  # torchrun: FSDP2; else no-op
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": args.lr,
               "weight_decay": args.weight_decay}]
    if value_head is not None:  # group 1: the value side, with its own rate, decay and gradient clipping
        value_params = list(value_head.parameters()) + (list(critic.parameters()) if critic is not None else [])
        groups.append({"params": value_params, "lr": args.value_lr, "weight_decay": args.value_weight_decay})
    optimizer = memory.build_optimizer(groups, plan.optimizer, device, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0)

    sampler = data.PromptSampler(len(train_rows), args.batch_size, seed=args.seed)

    start_step, history = 0, {}
    if resume_ckpt is not None:
        meta = checkpoint.restore(resume_ckpt, value_head=value_head, optimizer=optimizer, scheduler=scheduler)
        sampler.load_state_dict(meta["sampler"])
        start_step, history = meta["step"], meta["extra"].get("history", {})
        print(f"resumed from {resume_ckpt} at step {start_step}")

    stepper = Stepper(args, policy, value_head, optimizer, scheduler, tokenizer, device, critic=critic)
    if resume_ckpt is not None:
        stepper.load_value_buffer(meta["extra_tensors"])
    # a resumed run's metrics.jsonl and TensorBoard events are cut back to the checkpoint's step: no step twice
    logger = MetricsLogger(run_dir, tensorboard=args.tensorboard,
                           resume_step=start_step if resume_ckpt is not None else None) \
        if distributed.is_main() else distributed.NullLogger()  # torchrun: rank 0 logs
    print(f"run dir: {run_dir}\nmodel: {model_path} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M params,"
          f" {policy.config._attn_implementation}, {device}); train {len(train_rows)} / eval {len(eval_rows)} prompts")
    if args.num_minibatches == 1:
        print("--num-minibatches 1: one optimizer step per batch, so the PPO ratio is 1 and the clip never acts "
              "(the bar omits clip=)")

    def save(step):
        return checkpoint.save(run_dir, step, policy=policy, critic=critic, tokenizer=tokenizer, value_head=value_head,
                               optimizer=optimizer, scheduler=scheduler, sampler_state=sampler.state_dict(),
                               extra={"history": history}, keep_last=args.keep_last,
                               extra_tensors=stepper.value_buffer_state())

    # cumulative work, for learning-efficiency plots (accuracy against sampled tokens / training time; eval excluded)
    counters = history.setdefault("counters", {"rollout/sampled_tokens": 0, "time/train_s": 0.0})
    if start_step == 0:
        history["start"] = evaluate(stepper, eval_rows, eval_texts, reward_fn, args)
        logger.log(0, {**history["start"], **counters})
        print("eval at start: " + _fmt(history["start"]))

    # Ctrl-C: finish nothing half-way; save at the next safe point and exit cleanly
    interrupted = {"flag": False}

    def on_sigint(*_):
        if interrupted["flag"]:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        interrupted["flag"] = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit at once)")

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    bar = _progress(args, start_step)
    nonfinite_in_a_row, step = 0, start_step
    try:
        for step in range(start_step + 1, args.steps + 1):
            t0 = time.perf_counter()
            memory.phase_peak_gib(device)  # reset the CUDA peak counter: each phase below is measured alone
            batch_ids = distributed.local_slice(sampler.next_batch())  # torchrun: this rank's share of the batch
            rows = [train_rows[i] for i in batch_ids]
            n_per_prompt = args.group_size if args.algo == "grpo" else 1
            with distributed.full_params(policy):  # torchrun: full weights, no collective per generated token
                samples = stepper.generate([train_texts[i] for i in batch_ids], num_samples=n_per_prompt,
                                           temperature=args.temperature, top_p=args.top_p)
            t1 = time.perf_counter()
            rollout_peak = memory.phase_peak_gib(device)  # None on CPU (not measured there)
            if memory_mode:
                memory.release_cached(device)  # generate's KV cache blocks go back before the update
            R = score_rewards(reward_fn, rows, samples, args)
            t2 = time.perf_counter()
            fixed_adv = group_advantages(R, args.group_size, args.grpo_scale_std) if args.algo == "grpo" else None
            check_values = step <= start_step + args.check_inputs_steps  # host-side input checks, first steps only
            totals, values = stepper.update(samples, R, fixed_adv, check_values=check_values)
            t3 = time.perf_counter()
            samples, R, values = distributed.gather_step(samples, R, values)  # torchrun: all ranks', for metrics
            update_peak = memory.phase_peak_gib(device)
            if memory_mode:
                memory.release_cached(device)

            nonfinite_in_a_row = nonfinite_in_a_row + 1 if "nonfinite" in totals else 0
            if nonfinite_in_a_row >= args.max_nonfinite_steps:
                raise FloatingPointError(f"{nonfinite_in_a_row} consecutive steps had a NaN/inf loss or gradient "
                                         f"(last at step {step}); stopping without saving a checkpoint")
            resp_tokens = sum(len(s.response_ids) for s in samples)
            counters["rollout/sampled_tokens"] += resp_tokens
            counters["time/train_s"] += t3 - t0
            if step % args.log_every == 0 or step == args.steps:
                scalars = {k: v.item() for k, v in distributed.reduce_totals(totals).items()}  # host sync, per log
                scalars.update({"reward/mean": R.mean().item(), "reward/solved": (R > 0.5).float().mean().item(),
                                "rollout/response_len": resp_tokens / len(samples),
                                "rollout/finished": sum(s.finished for s in samples) / len(samples),
                                "perf/rollout_s": t1 - t0, "perf/reward_s": t2 - t1,
                                "perf/update_s": t3 - t2 - stepper.score_s, "perf/score_s": stepper.score_s,
                                "perf/tokens_per_s": resp_tokens / (t3 - t0),
                                "perf/samples_per_s": len(samples) / (t3 - t0),
                                "lr/policy": scheduler.get_last_lr()[0], **counters})
                if rollout_peak is not None:  # this step's measured peaks, CUDA only (CPU runs log no memory/ keys)
                    scalars.update({"memory/rollout_peak_gib": rollout_peak, "memory/update_peak_gib": update_peak})
                if values is not None:
                    scalars["value/mean"] = values.mean().item()
                    if (r := pearson(values.cpu(), R)) is not None:
                        scalars["value/pearson"] = r
                logger.log(step, scalars)
                # clip= only when it can move: with one optimizer step per batch the ratio is 1 by construction
                clip = {"clip": f"{scalars['stats/clipfrac']:.3f}"} if args.num_minibatches > 1 else {}
                bar.set_postfix(reward=f"{scalars['reward/mean']:.2f}", **clip,
                                tok_s=f"{scalars['perf/tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if args.eval_every and step % args.eval_every == 0 and step != args.steps:
                ev = evaluate(stepper, eval_rows, eval_texts, reward_fn, args)
                logger.log(step, {**ev, **counters})
                bar.write(f"step {step}: " + _fmt(ev))
            if args.save_every and step % args.save_every == 0 and not nonfinite_in_a_row:
                save(step)
            if distributed.any_rank(interrupted["flag"]):  # torchrun: all ranks save at the same step
                bar.write(f"interrupted: saved {save(step)}")
                return {"interrupted": True, "step": step, "run_dir": str(run_dir)}
        bar.close()
        history["end"] = evaluate(stepper, eval_rows, eval_texts, reward_fn, args)
        logger.log(step, {**history["end"], **counters})
        ckpt = save(step)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        logger.close()
    start, end = history.get("start", {}), history["end"]
    print("eval at end:   " + _fmt(end))
    if start:
        print(f"held-out accuracy (greedy pass@1): {100 * start['eval/pass@1']:.1f}% -> {100 * end['eval/pass@1']:.1f}%"
              f"  ({100 * (end['eval/pass@1'] - start['eval/pass@1']):+.1f} points)")
    print(f"checkpoint: {ckpt}\nplot: sppo-fast plot {run_dir}")
    return {"run_dir": str(run_dir), "start": start, "end": end, "step": step}


def _save_config(args: Args, run_dir: Path, model_path: str) -> None:
    import yaml
    config = asdict(args) | {"resolved_model": str(model_path)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in metrics.items())


def _progress(args, start_step):
    from tqdm.auto import tqdm
    return tqdm(total=args.steps, initial=start_step, disable=not args.progress or not distributed.is_main(),
                desc=args.algo, unit="step", dynamic_ncols=True)


if __name__ == "__main__":
    from sppo_fast.cli import main as cli_main
    raise SystemExit(cli_main(["train", *sys.argv[1:]]))
