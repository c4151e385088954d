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
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sppo_fast import checkpoint, data, distributed, memory, rewards
from sppo_fast.kernels import ppo_clip_loss, ppo_clip_loss_from_logp, token_logprobs
from sppo_fast.metrics import MetricsLogger
from sppo_fast.hf import lm_head_params
from sppo_fast.model import (attention_implementation, check_model_dir, hidden_states, load_critic, load_policy,
                             load_tokenizer)
from sppo_fast.rollout import generate, pack, split_by_tokens
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
    """prompts longer than this are skipped (and counted)"""
    reward: str = "exact"
    """reward: exact | gsm8k | math | code | module:fn | path/to/file.py:fn  (fn(prompts, completions, **columns))"""

    # --- algorithm
    algo: str = "sppo"
    """sppo (one sample per prompt, value-head baseline), grpo (group_size samples, group-mean baseline) or ppo
    (one sample per prompt, a separate critic LLM with token values and GAE)"""
    critic: str = ""
    """separate critic model directory: for sppo, the paper's separate scalar critic (value head on the critic's
    prompt state); for ppo, the critic LLM (default: a copy of the policy's initial weights)"""
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
    warmup_steps: int = 0
    """linear learning-rate warm-up steps"""
    max_grad_norm: float = 1.0
    """gradient clipping of policy + value head (0 disables)"""
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
    """log-prob kernel: auto (triton on CUDA) | triton | torch"""
    check_inputs_steps: int = 2
    """validate token ids / sequence bounds on the host for the first N steps (later: device-side asserts only)"""
    gen_batch_size: int = 0
    """generate at most this many sequences at once (0 = the whole batch)"""
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
    """resume from a run directory (its latest checkpoint) or a checkpoint directory"""


def check_args(args: Args) -> None:
    choices = {"algo": ("sppo", "grpo", "ppo"), "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
               "ratio_level": ("token", "sequence"), "value_loss": ("bce", "mse"), "value_pooling": ("last", "mean"),
               "kernel_impl": ("auto", "triton", "torch")}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(args, name)!r}")
    for name in ("steps", "batch_size", "group_size", "max_new_tokens", "num_minibatches", "micro_batch_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.algo == "grpo" and args.group_size < 2:
        raise ValueError("GRPO needs --group-size >= 2 (its baseline is the group mean)")
    if args.critic and args.algo == "grpo":
        raise ValueError("--critic is for sppo and ppo; GRPO has no value function")
    if args.num_minibatches > args.batch_size * (args.group_size if args.algo == "grpo" else 1):
        raise ValueError("--num-minibatches is larger than the number of samples per step")


# ---------------------------------------------------------------------------------------------------------------------
# Rollout -> reward -> value/advantage -> update
def score_rewards(reward_fn, rows, samples, args) -> torch.Tensor:
    """R [num_samples] fp32 on the CPU; every sample's own row columns go to the reward fn (TRL-style)."""
    sample_rows = [rows[s.row] for s in samples]
    columns = {k: [r.get(k) for r in sample_rows] for k in sample_rows[0] if k != "prompt"}
    values = rewards.compute_rewards(reward_fn, [r["prompt"] for r in sample_rows], [s.text for s in samples],
                                     columns, allow_outside_unit=args.value_loss == "mse" or args.algo != "sppo")
    return torch.tensor(values, dtype=torch.float32)


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
                               max_batch=args.gen_batch_size or None, add_special_tokens=not args.chat_template)
        # bf16 autocast on GPU only: CPU autocast would slow the tiny demo down and change its numerics
        use_bf16 = device.type == "cuda" and args.bf16
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.compute_dtype = torch.bfloat16 if use_bf16 else None

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
        h_resp, weight = h_resp.to(dtype), weight.to(dtype)
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
            v = self.value_head(pooled if self.args.value_grad_to_backbone else pooled.detach())
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
                if scored_logp is None:
                    # First (only) minibatch: the old policy IS the current one, so old_logp = logp.detach() gives a
                    # ratio of exactly 1 with no scoring pass. Same kernel, same numbers.
                    logp, entropy = token_logprobs(h_resp, weight, batch.targets, temperature=args.temperature,
                                                   softcap=softcap, return_entropy=True, impl=args.kernel_impl,
                                                   check_values=check_values)
                    pg_loss, stats = ppo_clip_loss_from_logp(logp, logp.detach(), adv, entropy=entropy, **kernel_kw)
                else:
                    old = torch.cat([scored_logp[i] for i in group])
                    pg_loss, stats = ppo_clip_loss(h_resp, weight, batch.targets, old, adv, temperature=args.temperature,
                                                   softcap=softcap, impl=args.kernel_impl, check_values=check_values,
                                                   **kernel_kw)
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
            params = memory.params_for_clipping(self.optimizer)  # offload: the host grads the step will use
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else 1e30)
            # The one host sync of the update: a NaN/inf step is skipped instead of poisoning the weights.
            if not torch.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                totals["nonfinite"] = torch.ones(())
                continue
            self.optimizer.step()
            _acc(totals, "stats/grad_norm", grad_norm / args.num_minibatches)
        self.optimizer.zero_grad(set_to_none=True)  # grads are dead after the step: free them for the rollout
        self.scheduler.step()
        return totals, values if self.value_head is not None else None


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
        out["eval/value_pearson"] = pearson(V, R_sampled)
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Setup and the loop
def main(args: Args) -> dict:
    check_args(args)
    from sppo_fast.tiny import default_model_path  # the embedded model ships inside the package

    model_path = str(check_model_dir(args.model or default_model_path()))  # a clear error before anything else
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    device = distributed.init(device)  # torchrun: the process group, this rank's device; only rank 0 prints
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    # memory plan (sppo_fast/memory.py): weights dtype, optimizer, checkpointing and batch sizes from the budget,
    # before any directory or model exists, so a budget that cannot work fails first, saying what each phase needs
    shape = memory.model_shape(model_path, lora_rank=args.lora_rank, critic=args.algo == "ppo" or bool(args.critic))
    plan = memory.make_plan(shape, budget=args.memory_budget or None, level=args.memory_plan,
                            seq_len=args.max_prompt_tokens + args.max_new_tokens, prompt_len=args.max_prompt_tokens,
                            micro_batch_tokens=args.micro_batch_tokens, gen_batch_size=args.gen_batch_size,
                            batch_sequences=args.batch_size * (args.group_size if args.algo == "grpo" else 1),
                            gradient_checkpointing=args.gradient_checkpointing, cuda=device.type == "cuda",
                            kernel_impl=args.kernel_impl)
    args = replace(args, gradient_checkpointing=plan.gradient_checkpointing, micro_batch_tokens=plan.micro_batch_tokens,
                   gen_batch_size=plan.gen_batch_size)  # resolved once; config.yaml records them

    resume_ckpt = checkpoint.resolve(args.resume) if args.resume else None
    # a checkpoint lives at RUN_DIR/checkpoints/step_N, whether --resume named the run or the checkpoint
    run_dir = resume_ckpt.resolve().parent.parent if resume_ckpt is not None else None
    if run_dir is None:
        name = args.run_name or f"{args.algo}__{Path(model_path).name}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.out_dir) / name
    run_dir = distributed.broadcast_object(run_dir)  # torchrun: rank 0's (the name holds a time stamp)
    run_dir.mkdir(parents=True, exist_ok=True)
    memory_mode = bool(args.memory_budget) or args.memory_plan != "auto"
    if distributed.is_main():
        report = memory.save_report(plan, shape, run_dir)  # memory_report.{txt,json}: the estimate per phase
        if memory_mode:
            print(report)
    if warning := memory.apply_budget(plan, device):
        print(warning)
    if distributed.is_main():
        _save_config(args, run_dir, model_path)

    # --- model, tokenizer, value head, optimizer
    tokenizer = load_tokenizer(model_path)
    policy_path = resume_ckpt / "policy" if resume_ckpt is not None else model_path
    policy = load_policy(policy_path, device=device, attn_implementation=attention_implementation(device),
                         gradient_checkpointing=args.gradient_checkpointing, liger=args.liger,
                         lora_rank=0 if resume_ckpt is not None else args.lora_rank, lora_alpha=args.lora_alpha,
                         dtype=plan.dtype)
    policy.train()
    critic = None
    if args.algo == "ppo" or args.critic:  # a separate critic LLM (decoder only: it needs no lm_head)
        critic_path = resume_ckpt / "critic" if resume_ckpt is not None else args.critic or model_path
        critic = load_critic(critic_path, device=device, attn_implementation=attention_implementation(device),
                             gradient_checkpointing=args.gradient_checkpointing, dtype=plan.dtype)
        critic.train()
    hidden_size = (critic or policy).config.get_text_config().hidden_size
    value_head = ValueHead(hidden_size, norm=args.value_norm, mlp_hidden=args.value_mlp_hidden).to(device) \
        if args.algo != "grpo" else None
    policy, critic, value_head = distributed.shard(policy, critic, value_head)  # torchrun: FSDP2; else no-op
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": args.lr,
               "weight_decay": args.weight_decay}]
    if value_head is not None:
        value_params = list(value_head.parameters()) + (list(critic.parameters()) if critic is not None else [])
        groups.append({"params": value_params, "lr": args.value_lr, "weight_decay": 0.0})
    optimizer = memory.build_optimizer(groups, plan.optimizer, device, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0)

    # --- data and reward
    train_rows, eval_rows = data.load_dataset(
        args.data, prompt_field=args.prompt_field, answer_field=args.answer_field, eval_path=args.eval_data or None,
        eval_fraction=args.eval_size, synthetic_n_eval=args.eval_size, seed=args.seed)
    fmt = dict(chat_template=args.chat_template, system_prompt=args.system_prompt or None)
    train_rows, skipped = data.filter_long_prompts(train_rows, tokenizer, args.max_prompt_tokens, **fmt)
    eval_rows, skipped_eval = data.filter_long_prompts(eval_rows, tokenizer, args.max_prompt_tokens, **fmt)
    if skipped or skipped_eval:
        print(f"skipped {skipped} train and {skipped_eval} eval prompts longer than {args.max_prompt_tokens} tokens")
    # what the policy sees (chat template applied once, up front); rows keep the raw prompt for the reward fn
    train_texts = data.format_prompts(train_rows, tokenizer, **fmt)
    eval_texts = data.format_prompts(eval_rows, tokenizer, **fmt)
    reward_fn = rewards.get_reward_fn(args.reward)
    sampler = data.PromptSampler(len(train_rows), args.batch_size, seed=args.seed)

    start_step, history = 0, {}
    if resume_ckpt is not None:
        meta = checkpoint.restore(resume_ckpt, value_head=value_head, optimizer=optimizer, scheduler=scheduler)
        sampler.load_state_dict(meta["sampler"])
        start_step, history = meta["step"], meta["extra"].get("history", {})
        print(f"resumed from {resume_ckpt} at step {start_step}")

    stepper = Stepper(args, policy, value_head, optimizer, scheduler, tokenizer, device, critic=critic)
    logger = MetricsLogger(run_dir, tensorboard=args.tensorboard, append=start_step > 0) if distributed.is_main() \
        else distributed.NullLogger()  # torchrun: rank 0 logs
    print(f"run dir: {run_dir}\nmodel: {model_path} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M params,"
          f" {policy.config._attn_implementation}, {device}); train {len(train_rows)} / eval {len(eval_rows)} prompts")

    def save(step):
        return checkpoint.save(run_dir, step, policy=policy, critic=critic, tokenizer=tokenizer, value_head=value_head,
                               optimizer=optimizer, scheduler=scheduler, sampler_state=sampler.state_dict(),
                               extra={"history": history}, keep_last=args.keep_last)

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
                    scalars["value/pearson"] = pearson(values.cpu(), R)
                logger.log(step, scalars)
                bar.set_postfix(reward=f"{scalars['reward/mean']:.2f}", clip=f"{scalars.get('stats/clipfrac', 0):.3f}",
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
