"""SPPO — Sequence-Level PPO — for LLM reasoning with verifiable rewards, in one readable loop.

    sppo-fast train                                   # CPU demo: the embedded tiny model learns multi-step addition
    sppo-fast train --model /models/Qwen2.5-1.5B --data gsm8k.jsonl --reward gsm8k --chat-template
    sppo-fast train --algo grpo --group-size 8        # the GRPO baseline, same loop
    python -m sppo_fast.train --config run.yaml --lr 2e-6

One step, in the order of this file (README.md's 'How one step flows' walks through it):
  rollout    Stepper.generate: ONE response per prompt at T=0.6 (GRPO: group_size)        sppo_fast/rollout.py
  reward     score_rewards: a verifiable R in [0, 1] per response                         sppo_fast/rewards.py
  advantage  algo.batch_rewards(R) now (GRPO's group baseline); SPPO's baseline inside the update's forward: the
             value head on the last prompt row gives v, V = sigmoid(v) detached, A = R - V   sppo_fast/algos.py
  update     Stepper.update: one backbone forward over prompt+response -> hidden [T, H]; the response rows go to
             sppo_fast.kernels (PPO-clip on log p straight from hidden x lm_head, no logits), token-mean,
             + value_coef * BCE(v, R) -> backward -> clip -> AdamW step
  log        log_step: metrics stay on the device until the log interval
The critic is a Linear(H, 1) on the policy's own prompt state: causal attention makes that state independent of the
response, so the same forward serves the log-probs and the critic, and V needs no extra pass.
Options: sppo_fast/config.py. Checks and building (models, optimizer, resume): sppo_fast/prepare.py.
"""
import random
import sys
import time

import torch

from sppo_fast import checkpoint, data, distributed, memory, recovery, rewards
# some names are re-exported (noqa: F401): sppo_fast.train is where tests, bench scripts and users import them from
from sppo_fast.algos import clipped_value_loss, gae_advantages, group_advantages, value_loss_fn, value_of  # noqa: F401
from sppo_fast.config import Args, ConfigError, algorithm, check_args  # noqa: F401
from sppo_fast.hf import compute_dtype, head_operands, lm_head_params
from sppo_fast.kernels import ppo_clip_loss, token_logprobs
from sppo_fast.metrics import (MOMENTS, MetricsLogger, fmt_accuracy_change, fmt_metrics, log_step, pair_moments,
                               pearson, progress_bar)
from sppo_fast.model import hidden_states
from sppo_fast.prepare import (Preflight, build_models, build_optimizer, check_reward_range, init_device,  # noqa: F401
                               open_run_dir, preflight, restore)
from sppo_fast.rollout import generate, pack, resolve_backend, split_by_tokens
from sppo_fast.value_head import ReplayBuffer, capture_layer, flat_states, pool_prompt_states


# ---------------------------------------------------------------------------------------------------------------------
# Rollout and update: the policy, its value function and the optimizer
class Stepper:
    """Everything one step needs: policy, value function, optimizer. `generate` is the rollout, `update` the update.

    What the value function is and how advantages and the value loss are computed belong to the run's algorithm
    (`self.algo`, sppo_fast/algos.py); the Stepper asks it, and never which algorithm it is. Value functions:
      "head": value_head reads the policy's own prompt state (SPPO's default: no extra forward).
      "critic": value_head reads a separate critic LLM's states (SPPO --critic: its prompt state; PPO: the state
        before every response token).
      "none": no value function (GRPO).
    """

    def __init__(self, args, policy, value_head, optimizer, scheduler, tokenizer, device, critic=None):
        self.args, self.policy, self.value_head, self.critic = args, policy, value_head, critic
        self.optimizer, self.scheduler, self.tokenizer, self.device = optimizer, scheduler, tokenizer, device
        self.algo = algorithm(args)
        self.packed = policy.config._attn_implementation == "flash_attention_2"
        # raw prompts get the tokenizer's special tokens (e.g. BOS); chat-templated text already holds them
        self.gen_kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                               stop_strings=args.stop_strings or None, max_batch=args.gen_batch_size or None,
                               add_special_tokens=not args.chat_template,
                               backend=resolve_backend(args.rollout_backend, device))
        # bf16 autocast on GPU only: CPU autocast would slow the tiny demo down and change its numerics
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.bf16)
        self.read_value = {"none": lambda batch, hidden, tap: None, "head": self._shared_head_value,
                           "critic": self._critic_value}[self.algo.value]
        self.tap_layer = args.value_layer if self.algo.value == "head" else -1  # -1: nothing hooked
        self.value_buffer = ReplayBuffer(args.value_replay)
        self.prompt_states = None  # the last forward's detached pooled prompt states (shared head only)
        self.stepped = False  # whether this step's optimizer has touched the weights (the loop resets it)

    def generate(self, texts, **kwargs):
        """Rollouts under the same autocast as the update (bf16 on GPU; with fp32 master weights, generating
        outside autocast would run every decode step in fp32)."""
        with self.autocast:
            return generate(self.policy, self.tokenizer, texts, **self.gen_kwargs, **kwargs)

    def pack(self, samples, group):
        return pack(samples, group, packed=self.packed, pad_token_id=self.tokenizer.pad_token_id).to(self.device)

    def forward(self, batch):
        """One policy forward (+ the critic's, if separate) ->
        (response-token hidden [N, H], lm_head weight, softcap, value logits: [B], [N] (token values) or None)."""
        with self.autocast, capture_layer(self.policy, self.tap_layer) as tap:
            hidden = hidden_states(self.policy, batch)
        weight, softcap, logit_scale = lm_head_params(self.policy)
        h_resp = hidden[batch.resp_rows]
        if logit_scale != 1.0:  # models that scale logits (Cohere, Granite): scaling the rows is the same and cheaper
            h_resp = h_resp * logit_scale
        with self.autocast:  # the dtype `lm_head(hidden)` would run in: bf16 under autocast on GPU
            dtype = compute_dtype(h_resp, weight)
        # the chunked impls take the fp32 master weight beside 16-bit rows: no 16-bit copy of the head, dW in fp32
        h_resp, weight = head_operands(h_resp, weight, dtype, keep_fp32_weight=self.args.kernel_impl != "triton")
        return h_resp, weight, softcap, self.read_value(batch, hidden, tap)

    def _pool(self, hidden, batch):
        return pool_prompt_states(hidden, batch.prompt_rows, batch.prompt_seq_ids, batch.last_prompt_rows,
                                  self.args.value_pooling)

    def _shared_head_value(self, batch, hidden, tap):
        pooled = self._pool(flat_states(tap["hidden"], batch.flat_index) if tap else hidden, batch)  # --value-layer
        self.prompt_states = pooled.detach()  # what --value-steps refits the head on
        return self.value_head(pooled if self.args.value_grad_to_backbone else self.prompt_states)

    def _critic_value(self, batch, hidden, tap):
        with self.autocast, capture_layer(self.critic, self.args.value_layer) as c_tap:  # a second forward
            c_hidden = hidden_states(self.critic, batch)
        c_hidden = flat_states(c_tap["hidden"], batch.flat_index) if c_tap else c_hidden
        return self.value_head(c_hidden[batch.resp_rows] if self.algo.token_values else self._pool(c_hidden, batch))

    def _idle_forward(self, samples):  # for distributed.idle_pass: a forward whose outputs carry the graph
        h_resp, _, _, v = self.forward(self.pack(samples, [0]))
        return h_resp, v

    @torch.no_grad()
    def score(self, samples, groups, check_values: bool):
        """Old log-probs and pre-update value logits per sample, with the forward-only fused kernel: needed only
        when a batch gets several optimizer steps (num_minibatches > 1)."""
        old_logp, old_v = {}, {}
        for group in distributed.even_micro_batches(groups):  # torchrun: as many forwards on every rank
            if not group:
                distributed.idle_pass(lambda: self._idle_forward(samples), backward=False)
                continue
            batch = self.pack(samples, group)
            h_resp, weight, softcap, v = self.forward(batch)
            logp = token_logprobs(h_resp, weight, batch.targets, temperature=self.args.temperature, softcap=softcap,
                                  impl=self.args.kernel_impl, check_values=check_values)
            lengths = [len(samples[i].response_ids) for i in group]  # known on the host: no device sync
            old_logp.update(zip(group, logp.split(lengths)))
            if v is not None:
                old_v.update(zip(group, v.split(lengths) if self.algo.token_values else v.unbind()))
        return old_logp, old_v

    def update(self, samples, R, batch_rewards=None, check_values: bool = False):
        """PPO-clip update(s) on one rollout batch. R [num_samples]: the rewards; batch_rewards: what the advantage
        starts from (`self.algo.batch_rewards(R)`, computed here when None).

        Returns (device-side sums of the step's statistics, pre-update V per sample [num_samples] or None)."""
        args = self.args
        r = self.algo.batch_rewards(R) if batch_rewards is None else batch_rewards
        order = torch.randperm(len(samples)).tolist() if args.num_minibatches > 1 else list(range(len(samples)))
        minibatches = [order[k::args.num_minibatches] for k in range(args.num_minibatches)]
        micro = lambda idx: split_by_tokens(samples, idx, args.micro_batch_tokens)
        t0 = time.perf_counter()
        scored = self.score(samples, micro(order), check_values) if args.num_minibatches > 1 else (None, None)
        self.score_s = time.perf_counter() - t0  # old-log-prob scoring, logged apart from the update proper
        totals, values = {}, torch.zeros(len(samples), device=self.device)
        states = [None] * len(samples) if args.value_steps > 1 else None
        for mb in minibatches:
            # torchrun: token-mean over ALL ranks' tokens (host-side counts summed; FSDP then sums the gradients)
            counts = distributed.sum_counts(sum(len(samples[i].response_ids) for i in mb), len(mb))
            self.optimizer.zero_grad(set_to_none=True)
            for group in distributed.even_micro_batches(micro(mb)):  # torchrun: as many passes on every rank
                if not group:  # this rank ran out of micro-batches: a zero-weight pass joins the collectives
                    distributed.idle_pass(lambda: self._idle_forward(samples))
                    continue
                self.micro_batch(samples, group, R, r, scored, counts, totals, values, check_values)
                if states is not None:
                    for i, row in zip(group, self.prompt_states):
                        states[i] = row
            norms = clip_grad_norms(self.optimizer, args)
            self.stepped = True  # from here an exception may leave the weights half-updated (recovery.save_after_error)
            if step_if_finite(self.optimizer, norms, totals):
                _acc(totals, "stats/grad_norm", norms[0] / args.num_minibatches)
                if norms[1] is not None:
                    _acc(totals, "stats/value_grad_norm", norms[1] / args.num_minibatches)
        if states is not None:
            self.value_buffer.append((torch.stack(states), R.to(self.device)))
            self.refit_value_head(totals)
        self.optimizer.zero_grad(set_to_none=True)  # grads are dead after the step: free them for the rollout
        self.scheduler.step()
        return totals, values if self.algo.value != "none" else None

    def micro_batch(self, samples, group, R, r, scored, counts, totals, values, check_values):
        """Forward, advantage, loss and backward of one micro-batch; its statistics are added to `totals`."""
        args, (scored_logp, scored_v), (n_tok, n_seq) = self.args, scored, counts
        batch = self.pack(samples, group)
        lengths = [len(samples[i].response_ids) for i in group]
        h_resp, weight, softcap, v = self.forward(batch)
        # Old values: from the scoring pass, or this very forward detached (prompt states, and a critic, are still
        # pre-update here: the optimizer steps only after all micro-batches).
        old_v = None if v is None else v.detach() if scored_v is None else torch.cat(
            [scored_v[i].reshape(-1) for i in group])
        R_g = R[group].to(self.device)
        adv, V = self.algo.advantages(r[group].to(self.device), old_v, lengths, batch.cu_seqlens[:-1])
        # First (only) minibatch: the old policy IS the current one, so on_policy=True gives a ratio of exactly 1
        # with no scoring pass; the fused op computes the gradient in its forward either way.
        old = None if scored_logp is None else torch.cat([scored_logp[i] for i in group])
        pg_loss, stats = ppo_clip_loss(h_resp, weight, batch.targets, old, adv, on_policy=old is None,
                                       cu_seqlens=batch.cu_seqlens, clip_low=args.clip_low, clip_high=args.clip_high,
                                       dual_clip=args.dual_clip or None, ratio_level=args.ratio_level,
                                       loss_agg=args.loss_agg, entropy_coef=args.entropy_coef,
                                       temperature=args.temperature, softcap=softcap, impl=args.kernel_impl,
                                       check_values=check_values)
        # micro-batch losses are means over their own tokens/samples: re-weight to the minibatch's mean
        tok_w, seq_w = batch.num_resp_tokens / n_tok, len(group) / n_seq
        w = tok_w if args.loss_agg == "token-mean" else seq_w
        loss = pg_loss * w
        if v is not None:
            values[group] = V
            vf_loss, vf_w = self.algo.value_loss(v, old_v, adv, R_g), tok_w if self.algo.token_values else seq_w
            loss = loss + args.value_coef * vf_loss * vf_w
            _acc(totals, "losses/value", vf_loss.detach() * vf_w / args.num_minibatches)
        loss.backward()
        _acc(totals, "losses/policy", pg_loss.detach() * w / args.num_minibatches)
        for key in ("clipfrac", "dual_clipfrac", "approx_kl", "entropy", "logp"):
            _acc(totals, f"stats/{key}", stats[key] * tok_w / args.num_minibatches)
        _acc(totals, "stats/ratio_max", stats["ratio_max"], reduce=torch.maximum)
        _acc(totals, "stats/ratio_min", stats["ratio_min"], reduce=torch.minimum)
        per_token = torch.tensor(lengths, device=self.device)
        adv_tok = adv if adv.shape[0] == batch.num_resp_tokens else adv.repeat_interleave(per_token)
        _acc(totals, "stats/advantage_abs", adv_tok.abs().sum() / (n_tok * args.num_minibatches))
        # Where each token's advantage comes from, over the step's response tokens: its correlation with R (SPPO's is
        # R minus a per-prompt baseline; GAE with lambda < 1 weights R by lambda^(tokens to the end) and fills the
        # rest with the critic's later values) and, for per-token values, their calibration against R (gamma = 1,
        # one terminal reward: E[R | state] is what every token's value estimates). Sums here, correlations at log
        # time (metrics.correlations), so micro-batches and ranks add up.
        R_tok = R_g.repeat_interleave(per_token)
        for key, x in (("stats/advantage_reward_pearson", adv_tok),
                       ("value/token_pearson", old_v if self.algo.token_values else None)):
            for stat, value in ([] if x is None else pair_moments(x, R_tok).items()):
                _acc(totals, f"{MOMENTS}{key}/{stat}", value)

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
            # the main step's clipping (the policy's norm is 0); a NaN/inf refit is skipped as the main step is
            if not step_if_finite(self.optimizer, clip_grad_norms(self.optimizer, self.args), totals):
                break
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


def step_if_finite(optimizer, norms, totals: dict) -> bool:
    """optimizer.step(), unless a gradient norm is NaN/inf: then the gradients are dropped, totals["nonfinite"] is
    set and the weights stay as they were. The step's one host sync, once per optimizer step: whether to step must
    be known before the weights (and AdamW's moments, which a NaN would poison for good) are touched, so it cannot
    wait for the log interval; with one minibatch per batch it is one sync per training step."""
    if all(torch.isfinite(n) for n in norms if n is not None):
        optimizer.step()
        return True
    optimizer.zero_grad(set_to_none=True)
    totals["nonfinite"] = torch.ones(())
    return False


def _acc(totals: dict, key: str, value: torch.Tensor, reduce=torch.add) -> None:
    value = value.detach() if value.dtype == torch.float64 else value.detach().float()  # float64: moment sums
    totals[key] = value if key not in totals else reduce(totals[key], value)


# ---------------------------------------------------------------------------------------------------------------------
# Reward
def score_rewards(reward_fn, rows, samples, args) -> torch.Tensor:
    """R [num_samples] fp32 on the CPU; every sample's own row columns go to the reward fn (TRL-style)."""
    sample_rows = [rows[s.row] for s in samples]
    columns = {k: [r.get(k) for r in sample_rows] for k in sample_rows[0] if k != "prompt"}
    values = rewards.compute_rewards(reward_fn, [r["prompt"] for r in sample_rows], [s.text for s in samples],
                                     columns, allow_outside_unit=True)
    check_reward_range(values, args)
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: greedy pass@1, sampled avg@k, and the critic's calibration (Pearson of V against R)
@torch.no_grad()
def evaluate(stepper, eval_rows, eval_texts, reward_fn, args):
    """(metrics, per-prompt rows or None), see `_evaluate`."""
    # Sample under a forked, fixed-seed RNG: evaluation neither perturbs the training trajectory (so eval_every does
    # not change what is learned, and a resumed run matches an uninterrupted one) nor varies its own noise by step.
    devices = [stepper.device] if stepper.device.type == "cuda" else []
    # torchrun: each rank evaluates its share of the prompts with full weights; _evaluate gathers the results
    with torch.random.fork_rng(devices=devices), distributed.full_params(stepper.policy, stepper.critic,
                                                                          stepper.value_head):
        torch.manual_seed(args.seed + 1_000_003 + distributed.rank())
        return _evaluate(stepper, distributed.local_slice(eval_rows), distributed.local_slice(eval_texts),
                         reward_fn, args)


def _evaluate(stepper, eval_rows, eval_texts, reward_fn, args):
    """(metrics, per-prompt rows or None: --log-eval-samples)."""
    greedy = stepper.generate(eval_texts, greedy=True)
    R_greedy = score_rewards(reward_fn, eval_rows, greedy, args)
    sampled = stepper.generate(eval_texts, num_samples=args.eval_k, temperature=args.temperature, top_p=args.top_p)
    R_sampled = score_rewards(reward_fn, eval_rows, sampled, args)
    lengths = torch.tensor([len(s.response_ids) for s in greedy], dtype=torch.float64)
    R_greedy, R_sampled, lengths = map(distributed.all_gather_cat, (R_greedy, R_sampled, lengths))  # all ranks'
    out = {"eval/pass@1": R_greedy.mean().item(), f"eval/avg@{args.eval_k}": R_sampled.mean().item(),
           "eval/response_len": lengths.mean().item()}
    V = None
    if stepper.algo.value != "none":
        values = []
        for start in range(0, len(greedy), 64):
            batch = stepper.pack(greedy, list(range(start, min(start + 64, len(greedy)))))
            values.append(stepper.algo.prompt_values(stepper.forward(batch)[3], batch.cu_seqlens[:-1]).cpu())
        V = distributed.all_gather_cat(torch.cat(values))  # one per prompt (torchrun: all ranks', in rank order)
        out["eval/value_mean"] = V.mean().item()
        # each prompt's V against each of its k samples; omitted, not NaN, when all rewards (or values) are equal
        if (r := pearson(V.repeat_interleave(args.eval_k), R_sampled)) is not None:
            out["eval/value_pearson"] = r
    if not args.log_eval_samples:
        return out, None
    # torchrun: the ranks hold contiguous slices of the eval set, so rank order is eval-set order
    texts = distributed.all_gather_list([(row["prompt"], s.text) for row, s in zip(eval_rows, greedy)])
    k = args.eval_k
    return out, [{"index": i, "prompt": prompt, "greedy": text, "reward": R_greedy[i].item(),
                  "sampled_rewards": R_sampled[i * k:(i + 1) * k].tolist(), "value": None if V is None else V[i].item()}
                 for i, (prompt, text) in enumerate(texts)]


# ---------------------------------------------------------------------------------------------------------------------
# The loop
def param_counts(model) -> str:
    """'0.86M params', or with a frozen base (LoRA, the qlora rung's NF4 base counted at its logical size)
    '1.03M params, 0.16M trainable'."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total / 1e6:.2f}M params" + (f", {trainable / 1e6:.2f}M trainable" if trainable != total else "")


@recovery.resumable
def main(args: Args, interrupts, where: dict) -> dict:
    """Train: `main(args)`. Returns {"run_dir", "start", "end", "step"}, or {"interrupted": True, "signal", "step",
    "run_dir"} when SIGINT or SIGTERM stopped the run (the CLI then exits with 128 + the signal's number: 130 or 143).
    `recovery.resumable` installs the signal handlers before anything slow and passes them in as `interrupts`."""
    check_args(args)
    device = init_device(args)  # torchrun: the process group, this rank's device; only rank 0 prints
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    pre = preflight(args, device)  # every check that needs no model; nothing is written before it passes
    args, run_dir, reward_fn = pre.args, pre.run_dir, pre.reward_fn
    where["run_dir"] = run_dir
    memory_mode = open_run_dir(pre, device)  # config.yaml first: from here on the run can be resumed
    policy, critic, value_head = build_models(pre, device)
    optimizer, scheduler = build_optimizer(args, policy, critic, value_head, pre.plan, device)
    sampler = data.PromptSampler(len(pre.train_rows), args.batch_size, seed=args.seed)
    start_step, history, extra_tensors = restore(pre.resume_ckpt, value_head, optimizer, scheduler, sampler)
    stepper = Stepper(args, policy, value_head, optimizer, scheduler, pre.tokenizer, device, critic=critic)
    stepper.value_buffer.load(extra_tensors, device)
    algo = stepper.algo
    # a resumed run's metrics.jsonl and TensorBoard events are cut back to the checkpoint's step: no step twice
    logger = MetricsLogger(run_dir, tensorboard=args.tensorboard,
                           resume_step=start_step if pre.resume_ckpt is not None else None) \
        if distributed.is_main() else distributed.NullLogger()  # torchrun: rank 0 logs
    print(f"run dir: {run_dir}\nmodel: {pre.model_path} ({param_counts(policy)}, {policy.config._attn_implementation}, "
          f"{device}); train {len(pre.train_rows)} / eval {len(pre.eval_rows)} prompts")
    # completed: the newest step whose update (weights, optimizer, scheduler, data position, RNG) is whole;
    # saved: the newest step on disk (0: none), with its directory
    progress = {"completed": start_step, "saved": start_step if pre.resume_ckpt is not None else 0,
                "ckpt": pre.resume_ckpt}

    def save(step, sampler_state=None):
        progress["ckpt"] = checkpoint.save(
            run_dir, step, policy=policy, critic=critic, tokenizer=pre.tokenizer, value_head=value_head,
            optimizer=optimizer, scheduler=scheduler, sampler_state=sampler_state or sampler.state_dict(),
            extra={"history": history}, keep_last=args.keep_last, extra_tensors=stepper.value_buffer.tensors())
        progress["saved"] = step
        return progress["ckpt"]

    def run_eval(step, key=None):
        ev, per_prompt = evaluate(stepper, pre.eval_rows, pre.eval_texts, reward_fn, args)
        logger.log(step, {**ev, **counters})
        if per_prompt is not None:
            logger.log_eval_samples(step, per_prompt)
        if key is not None:
            history[key] = ev
        return ev

    # cumulative work, for learning-efficiency plots (accuracy against sampled tokens / training time; eval excluded)
    counters = history.setdefault("counters", {"rollout/sampled_tokens": 0, "time/train_s": 0.0})
    if start_step == 0:
        print("eval at start: " + fmt_metrics(run_eval(0, "start")))
    bar = progress_bar(args.steps, start_step, algo.name, args.progress and distributed.is_main())
    nonfinite_in_a_row, step, step_start = 0, start_step, None
    # from here a first signal waits for the end of the step (never a half-done update); evaluations stop at once
    interrupts.deferred = True
    try:
        for step in range(start_step + 1, args.steps + 1):
            where["step"] = step
            # the data position and RNG at the end of the last completed step, which the weights do not hold: an
            # exception in this step's rollout or reward saves that step with them (host-side copies, no device sync)
            step_start, stepper.stepped = (sampler.state_dict(), checkpoint.rng_state()), False
            # --- rollout
            t0 = time.perf_counter()
            memory.phase_peak_gib(device)  # reset the CUDA peak counter: each phase below is measured alone
            batch_ids = distributed.local_slice(sampler.next_batch())  # torchrun: this rank's share of the batch
            rows = [pre.train_rows[i] for i in batch_ids]
            with distributed.full_params(policy):  # torchrun: full weights, no collective per generated token
                samples = stepper.generate([pre.train_texts[i] for i in batch_ids],
                                           num_samples=algo.samples_per_prompt, temperature=args.temperature,
                                           top_p=args.top_p)
            t1 = time.perf_counter()
            rollout_peak = memory.phase_peak_gib(device)  # None on CPU (not measured there)
            if memory_mode:
                memory.release_cached(device)  # generate's KV cache blocks go back before the update
            # --- reward
            R = score_rewards(reward_fn, rows, samples, args)
            t2 = time.perf_counter()
            # --- advantage (from the rewards alone: GRPO's group baseline) and update (SPPO's A = R - V inside)
            check_values = step <= start_step + args.check_inputs_steps  # host-side input checks, first steps only
            totals, values = stepper.update(samples, R, algo.batch_rewards(R), check_values=check_values)
            t3 = time.perf_counter()
            samples, R, values = distributed.gather_step(samples, R, values)  # torchrun: all ranks', for metrics
            update_peak = memory.phase_peak_gib(device)
            if memory_mode:
                memory.release_cached(device)
            # --- log
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if "nonfinite" in totals else 0
            if nonfinite_in_a_row >= args.max_nonfinite_steps:
                raise FloatingPointError(f"{nonfinite_in_a_row} consecutive steps had a NaN/inf loss or gradient "
                                         f"(last at step {step}); stopping without saving a checkpoint")
            counters["rollout/sampled_tokens"] += sum(len(s.response_ids) for s in samples)
            counters["time/train_s"] += t3 - t0
            progress["completed"] = step
            if step % args.log_every == 0 or step == args.steps:
                log_step(step, totals, R, values, samples, (t0, t1, t2, t3), (rollout_peak, update_peak), stepper,
                         counters, logger, bar)
            bar.update(1)
            stop = distributed.any_rank(interrupts.requested)  # torchrun: all ranks stop (and save) at the same step
            if args.eval_every and step % args.eval_every == 0 and step != args.steps and not stop:
                if (ev := recovery.interruptible(interrupts, lambda: run_eval(step))) is not None:
                    bar.write(f"step {step}: " + fmt_metrics(ev))
            if args.save_every and step % args.save_every == 0 and not nonfinite_in_a_row:
                save(step)
            if stop or distributed.any_rank(interrupts.requested):  # or a signal during the evaluation or the save
                ckpt = save(step) if progress["saved"] != step else progress["ckpt"]
                return recovery.saved_on_signal(interrupts, ckpt, run_dir, step, bar)
        bar.close()
        ended = recovery.interruptible(interrupts, lambda: run_eval(step, "end")) is not None
        ckpt = save(step)
        if not ended:  # a signal stopped the end evaluation: the last step is saved, and --resume runs it
            return recovery.saved_on_signal(interrupts, ckpt, run_dir, step, bar)
    except Exception as e:
        recovery.save_after_error(e, step, step_start, progress, stepper, save, run_dir)
        raise
    finally:
        bar.close()
        logger.close()
    start, end = history.get("start", {}), history["end"]
    print("eval at end:   " + fmt_metrics(end) + (f"\n{fmt_accuracy_change(start, end)}" if start else ""))
    print(f"checkpoint: {ckpt}\nplot: sppo-fast plot {run_dir}")
    return {"run_dir": str(run_dir), "start": start, "end": end, "step": step}


if __name__ == "__main__":
    # `python -m sppo_fast.train ...` is `sppo-fast train ...`; runs only as a script, never on import
    from sppo_fast.cli import main as cli_main
    raise SystemExit(cli_main(["train", *sys.argv[1:]]))
