"""TRL (>= 1.16) with `sppo_fast.kernels`: fused GRPO log-probs, and SPPO as a TRL trainer.

    from sppo_fast.integrations.trl import FusedGRPOTrainer, SPPOConfig, SPPOTrainer

    trainer = FusedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds)  # GRPO
    trainer = SPPOTrainer(model=model, reward_funcs=reward, args=SPPOConfig(...), train_dataset=ds)       # SPPO

How TRL scores tokens (1.16): `GRPOTrainer.__init__` patches the policy's (and reference model's) `forward` with
`trl.trainer.utils.add_fused_lm_head`; `_get_per_token_logps_and_entropies` then calls
`model(input_ids, attention_mask, labels=labels, fused_lm_head=True)` with labels = -100 on the prompt and padding,
and reads `log_probs[:, -logits_to_keep:]` and `entropy[:, -logits_to_keep:]` ([B, L - 1] with 0 at -100 labels).

FusedGRPOTrainer overrides exactly one thing: after TRL's `__init__`, it re-patches those models' forward with
`add_fused_lm_head` from this module, which has the same contract (same arguments, same output fields, same
temperature, same shift, same -100 convention, `shift_labels` for pre-shifted labels) but computes the scored rows
with `sppo_fast.kernels.token_logprobs`. Everything else (batch slicing, logits_to_keep, masks, the loss types,
the KL, importance sampling, metrics) is TRL's own code, unchanged. Non-fused calls (generation) go to the
forward that was there before, so generation is untouched.

SPPOTrainer (Sequence-level PPO, one sample per prompt) on top of it:
  * SPPOConfig is a GRPOConfig with num_generations=1 and the value-head settings.
  * A `sppo_fast.value_head.ValueHead` (Linear(H, 1)) reads the policy's hidden state at the last prompt token from
    the same forward that scores the completion (TRL left-pads prompts, so that is column P - 1 of every row).
  * A = R - sigmoid(v) per sequence, with v detached and pre-update: taken from that same forward when TRL
    updates once per rollout (it then passes no old log-probs: the parameters are still the rollout's), or frozen at
    rollout time by a no-grad prompt-only forward when TRL takes several steps per rollout (num_iterations > 1 or
    steps_per_generation > gradient_accumulation_steps), exactly as `sppo_fast.train` does with its scoring pass.
    R is the weighted sum of the reward functions (TRL's reward weights), captured from TRL's own reward pass.
    The advantage and the BCE value loss are `sppo_fast.algos`' functions, the same the trainer uses.
  * loss = PPO clip with dual clip (`ppo_clip_loss_from_logp`: epsilon / epsilon_high, `dual_clip`,
    `sppo_loss_agg`, TRL's `importance_sampling_level` as the ratio level, TRL's static `entropy_coef`)
    + value_coef * BCE(v, R); divided by the gradient-accumulation steps like TRL's losses.
  * The value head is added to the trainer's optimizer as its own parameter group (lr = value_learning_rate,
    no weight decay). It is not part of the model, so the Trainer's `model.zero_grad()` does not reach it: a
    callback clears its gradients at the same two points (the start of training and right after every optimizer
    step, after the Trainer zeroes the model's), averages them over processes before the step (DDP only reduces
    the model's), and logs their norm as `sppo/value_grad_norm`.
  * The head is saved as `value_head.safetensors` next to the model, by `save_model` and in every checkpoint; a
    resume loads it and raises if the checkpoint has none, unless `SPPOConfig.value_head_on_resume="fresh"`.
    A `value_head.pt` from older versions is still read (tensors only, `weights_only=True`) with a FutureWarning.

Limits (checked at construction where possible): TRL's `advantages`, `loss_type`, `scale_rewards` and
`multi_objective_aggregation` are not used by SPPOTrainer (TRL still computes its advantages; with one sample per
prompt they are 0, and they are what TRL's completion table logs); no KL to a reference (beta must be 0), no
high-entropy token mask, no off-policy mask, no adaptive entropy, no vLLM importance-sampling correction;
rewards must be in [0, 1] (the value loss is a BCE); text-only models; max_grad_norm clips the policy only (TRL
clips `model.parameters()`); the value head takes the learning-rate schedule of the policy. DeepSpeed ZeRO-3 is not
supported by either trainer (the kernel reads the lm_head weight outside the head module's gather hooks), nor
is an lm_head with a bias (the kernels compute h W^T; both trainers refuse such a model at construction).
"""
from __future__ import annotations

import functools
import os
import types
import warnings
from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version
from transformers import TrainerCallback
from transformers.utils import ModelOutput

from sppo_fast.algos import sppo_advantages, value_loss_fn, value_of
from sppo_fast.hf import backbone, lm_head_logprobs
from sppo_fast.value_head import ValueHead

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError("sppo_fast.integrations.trl needs TRL: pip install 'trl>=1.16,<2' (or pip install -e "
                      "'.[trl]' in the checkout)") from err

__all__ = ["FusedLMHeadOutput", "add_fused_lm_head", "FusedGRPOTrainer", "SPPOConfig", "SPPOTrainer",
           "save_value_head", "load_value_head"]

VALUE_HEAD_FILE = "value_head.safetensors"  # the name sppo_fast.train's checkpoints use too
LEGACY_VALUE_HEAD_FILE = "value_head.pt"  # a torch.save pickle, written by earlier versions of SPPOTrainer


# ---------------------------------------------------------------------------------------------------------------
# the fused LM head, with TRL's `add_fused_lm_head` contract
@dataclass
class FusedLMHeadOutput(ModelOutput):
    """What a model patched by `add_fused_lm_head` returns when called with `fused_lm_head=True`.

    The fields TRL reads (same names and shapes as `trl.trainer.utils.FusedCausalLMOutput`):
        loss: 0-dim, -sum(log_probs) / (num_items_in_batch or the number of labels != -100), + MoE aux loss.
        log_probs: [B, L - 1] fp32 (or [B, L] with `shift_labels`), 0 where the label is -100.
        entropy: same shape, when "entropy" is in the patch's `outputs`; else None.
        label_mask: [B, L - 1] bool, labels != -100.
        aux_loss: MoE load-balancing loss when router logits were requested, else None.
    TRL's optional diagnostics (log_sum_sq_probs, mean_logits, is_top1) are not computed (None).
    Added here:
        hidden_at: [B, H] final hidden state of row b at position `hidden_at[b]` when the call passed
            `hidden_at=` (SPPO's value-head input), else None.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    hidden_at: torch.Tensor | None = None


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), impl: str = "auto") -> None:
    """Patch `model.forward` so that `model(..., labels=labels, fused_lm_head=True)` returns a `FusedLMHeadOutput`
    computed by `sppo_fast.kernels.token_logprobs`: a drop-in for `trl.trainer.utils.add_fused_lm_head`.

    Only the positions whose next-token label is not -100 are sent to the kernel ([N, H] rows), and no [N, V]
    logits are stored. Without `fused_lm_head=True` the call goes to the forward that was there before (the
    model's own, or TRL's patch), so `generate` is unchanged. Patch the base model under a peft wrapper.

    Args:
        model: a transformers causal LM (text config with `final_logit_softcapping` / logit scales is honoured).
        temperature: the logits are divided by it (TRL's `args.temperature`).
        cast_lm_head_to_fp32: run the head in fp32 (TRL's `cast_lm_head_to_fp32`); otherwise the head runs in the
            autocast dtype when autocast is on, else in the hidden/weight dtype.
        outputs: per-token fields to compute: "log_probs" (always) and optionally "entropy". TRL's other
            diagnostics ("log_sum_sq_probs", "mean_logits", "is_top1") raise NotImplementedError.
        impl: the kernel implementation, "auto" (chunked with the Triton row pass on CUDA, the torch row pass elsewhere) | "chunked" | "triton" | "torch".
    """
    unsupported = set(outputs) - {"log_probs", "entropy"}
    if unsupported:
        raise NotImplementedError(f"sppo_fast's fused LM head computes log_probs and entropy only, not "
                                  f"{sorted(unsupported)}")
    want_entropy = "entropy" in outputs
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    # As TRL: before transformers 5, vision-language models expose their language backbone as `model`.
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)  # keeps the signature that `generate` validates its kwargs against
    def _fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                       hidden_at=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return previous_forward(*args, **kwargs)

        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):  # MoE: as the model's own forward would
            kwargs.setdefault("output_router_logits", True)
        # looked up on each call: FSDP and peft replace the backbone's modules after patching
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        hidden = backbone_outputs.last_hidden_state  # [B, L, H]
        if shift_labels is None:
            hidden_scored, labels = hidden[:, :-1], labels[:, 1:]  # position t predicts token t + 1
        else:
            hidden_scored, labels = hidden, shift_labels  # already shifted (context/sequence parallelism)
        labels = labels.to(hidden.device)
        mask = labels != -100
        # Only the scored rows reach the kernel: prompt and padding rows cost nothing.
        result = lm_head_logprobs(self, hidden_scored[mask], labels[mask], temperature=temperature,
                                  return_entropy=want_entropy, impl=impl, force_fp32=cast_lm_head_to_fp32)
        logp, entropy = result if want_entropy else (result, None)
        mask = mask.to(logp.device)
        # masked_scatter keeps the output attached to the graph even when no label is valid, so an all-masked
        # micro-batch gives a differentiable zero rather than failing in backward (TRL does the same)
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        entropy = None if entropy is None else entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denominator

        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _moe_aux_loss(self, text_config, backbone_outputs.router_logits, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss

        picked = None
        if hidden_at is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            picked = hidden[rows, hidden_at.to(hidden.device)]
        return FusedLMHeadOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask,
                                 aux_loss=aux_loss, hidden_at=picked)

    model.forward = types.MethodType(_fused_forward, model)
    model._sppo_fast_fused_lm_head = True


def _moe_aux_loss(model, text_config, router_logits, attention_mask):
    """An MoE model's load-balancing loss, as its own forward adds it (Mixtral's formula, which TRL uses too)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(model, "num_experts")
    top_k = getattr(text_config, "num_experts_per_tok", None) or getattr(model, "num_experts_per_tok")
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


def _check_no_zero3() -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise NotImplementedError("DeepSpeed ZeRO-3 is not supported by the sppo_fast fused LM head: the kernel "
                                  "reads lm_head.weight directly and recomputes in backward, outside ZeRO-3's "
                                  "gather hooks")


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _check_lm_head_without_bias(trainer) -> None:
    """Refuse, when the trainer is built, a model whose lm_head has a bias (the kernels compute h W^T only), rather
    than at the first training step."""
    model = _base_model(trainer.model)
    if getattr(model.get_output_embeddings(), "bias", None) is None:
        return
    if isinstance(trainer, SPPOTrainer):
        alternative = ("SPPOTrainer has no path without these kernels, so SPPO is not available for this model; "
                       "trl.GRPOTrainer trains it with GRPO (TRL's own fused LM head adds the bias)")
    else:
        alternative = "use trl.GRPOTrainer instead: same training, and TRL's own fused LM head adds the bias"
    raise ValueError(f"{type(trainer).__name__}: {type(model).__name__}'s lm_head has a bias, which sppo_fast's "
                     f"fused log-prob kernels do not support (they compute hidden @ weight.T); {alternative}")


# ---------------------------------------------------------------------------------------------------------------
# GRPO with the kernels
class FusedGRPOTrainer(GRPOTrainer):
    """TRL's `GRPOTrainer`, with per-token log-probs and entropies from `sppo_fast.kernels`.

    Same constructor as GRPOTrainer, plus `kernel_impl` ("auto" | "chunked" | "triton" | "torch"). The only change is the
    models' fused LM head (see the module docstring): losses, metrics and data flow are TRL's.
    """

    def __init__(self, *args, kernel_impl: str = "auto", **kwargs):
        _check_no_zero3()
        super().__init__(*args, **kwargs)
        _check_lm_head_without_bias(self)  # after TRL's __init__, which loads the model when it is given by name
        self.kernel_impl = kernel_impl
        # the same call sites and arguments as TRL's own GRPOTrainer.__init__, which patched these models already
        add_fused_lm_head(_base_model(self.model), temperature=self.temperature,
                          cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32, outputs=("log_probs", "entropy"),
                          impl=kernel_impl)
        if self.ref_model is not None:
            add_fused_lm_head(self.accelerator.unwrap_model(self.ref_model), temperature=self.temperature,
                              cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32, impl=kernel_impl)


# ---------------------------------------------------------------------------------------------------------------
# SPPO on TRL
class _OneGeneration(int):
    """The int 1, except that `value < 2` is False: lets GRPOConfig's "at least 2 generations" check pass (GRPO's
    group baseline needs a group; SPPO's baseline is the value head) while every other check still runs."""

    def __lt__(self, other):
        return False


@dataclass
class SPPOConfig(GRPOConfig):
    """GRPOConfig for SPPOTrainer: one completion per prompt, and the value head's settings.

    TRL's clip settings are used as is: `epsilon` (lower clip) and `epsilon_high` (upper clip, defaults to
    `epsilon`), `importance_sampling_level` ("token" | "sequence" ratio), `entropy_coef` (static), `temperature`.
    """

    num_generations: int | None = field(
        default=1, metadata={"help": "SPPO samples one completion per prompt; must be 1."})
    value_learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate of the value head (its own optimizer parameter group)."})
    value_coef: float = field(default=1.0, metadata={"help": "Weight of the value head's BCE loss."})
    value_init: float = field(
        default=0.5, metadata={"help": "Initial value prediction sigmoid(v) for every prompt, in (0, 1)."})
    value_grad_to_backbone: bool = field(
        default=False, metadata={"help": "Let the value loss's gradient reach the policy's backbone."})
    dual_clip: float | None = field(
        default=3.0, metadata={"help": "Dual-clip constant c > 1 for negative advantages; None disables it."})
    sppo_loss_agg: str = field(
        default="token-mean",
        metadata={"help": "PPO loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum "
                          "(over the micro-batch)."})
    value_head_on_resume: str = field(
        default="load",
        metadata={"help": "On resume_from_checkpoint: 'load' the checkpoint's value head (an error if it has none), "
                          "or start a 'fresh' head (value_init, no optimizer state), ignoring any saved one."})

    def __post_init__(self):
        if self.num_generations != 1:
            raise ValueError(f"SPPO samples one completion per prompt: num_generations must be 1, got "
                             f"{self.num_generations}")
        self.num_generations = _OneGeneration(1)
        try:
            super().__post_init__()
        finally:
            self.num_generations = 1
        from sppo_fast.kernels import LOSS_AGGS

        if self.sppo_loss_agg not in LOSS_AGGS:
            raise ValueError(f"sppo_loss_agg must be one of {LOSS_AGGS}, got {self.sppo_loss_agg!r}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if not 0 < self.value_init < 1:
            raise ValueError(f"value_init must be in (0, 1), got {self.value_init}")
        if self.value_head_on_resume not in ("load", "fresh"):
            raise ValueError(f"value_head_on_resume must be 'load' or 'fresh', got {self.value_head_on_resume!r}")


def _check_sppo_args(args: SPPOConfig) -> None:
    if not isinstance(args, SPPOConfig):
        raise TypeError(f"SPPOTrainer needs an SPPOConfig, got {type(args).__name__}")
    unsupported = {
        "beta != 0 (KL to a reference model)": args.beta != 0.0,
        "top_entropy_quantile < 1": args.top_entropy_quantile < 1.0,
        "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
        "use_adaptive_entropy": args.use_adaptive_entropy,
        "vLLM importance-sampling correction (set vllm_importance_sampling_correction=False)":
            args.use_vllm and args.vllm_importance_sampling_correction,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise NotImplementedError(f"SPPOTrainer does not support: {', '.join(bad)}")


def save_value_head(head: torch.nn.Module, directory: str) -> str:
    """Write `head`'s state as `directory/value_head.safetensors` (no pickle); returns the file's path."""
    from safetensors.torch import save_model

    path = os.path.join(directory, VALUE_HEAD_FILE)
    save_model(head, path)
    return path


def find_value_head(directory: str) -> str | None:
    """The value-head file in `directory`: value_head.safetensors, else a legacy value_head.pt, else None."""
    for name in (VALUE_HEAD_FILE, LEGACY_VALUE_HEAD_FILE):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def load_value_head(head: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load a saved value head into `head` (in place, strict: every key must match); returns `head`.

    `path` is the file or the directory that holds it (a `save_model` output or a checkpoint). A legacy
    `value_head.pt` is read with `torch.load(weights_only=True)`, which loads tensors and refuses arbitrary pickled
    objects, and a FutureWarning asks to re-save it.
    """
    file = find_value_head(path) if os.path.isdir(path) else path
    if file is None or not os.path.isfile(file):
        raise FileNotFoundError(f"no value head at {path} (expected {VALUE_HEAD_FILE})")
    device = next(head.parameters()).device
    if file.endswith(".safetensors"):
        from safetensors.torch import load_model

        load_model(head, file, strict=True, device=str(device))
    else:
        warnings.warn(f"{file} is a pickle written by an older sppo_fast; it was read with weights_only=True. "
                      f"Reading {LEGACY_VALUE_HEAD_FILE} will be removed: re-save the head (trainer.save_model or "
                      f"sppo_fast.integrations.trl.save_value_head) to get {VALUE_HEAD_FILE}", FutureWarning,
                      stacklevel=2)
        head.load_state_dict(torch.load(file, map_location=device, weights_only=True))
    return head


class _ValueHeadGradients(TrainerCallback):
    """Treats the value head's gradients as the Trainer treats the model's, which it cannot see.

    transformers' training loop (`_inner_training_loop` / `_run_epoch`, 5.x) calls `model.zero_grad()` once before
    the first step and once after every `optimizer.step()`, followed by `on_train_begin` and `on_step_end`
    respectively; the head's gradients are cleared at those two callbacks, so each optimizer step applies the sum over
    exactly its own micro-batches (gradient accumulation, `num_iterations`, `steps_per_generation` all go through
    this loop). `on_pre_optimizer_step` comes after the policy's gradients were all-reduced (DDP) and clipped: the
    head's are averaged over processes there, as DDP does for the model's, and their norm is logged.
    """

    def __init__(self, trainer: "SPPOTrainer"):
        self.trainer = trainer

    def _clear(self):
        self.trainer.value_head.zero_grad(set_to_none=True)  # as model.zero_grad()

    def on_train_begin(self, args, state, control, **kwargs):
        self._clear()

    def on_step_end(self, args, state, control, **kwargs):
        self._clear()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        params = [p for p in trainer.value_head.parameters() if p.requires_grad]
        if trainer.accelerator.num_processes > 1:
            for p in params:  # every rank joins every all-reduce, in the same order, even one without a gradient
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(trainer.accelerator.reduce(p.grad, reduction="mean"))
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        # one host sync per optimizer step, as the Trainer's own grad_norm
        trainer._metrics["train"]["sppo/value_grad_norm"].append(norm.item())


class SPPOTrainer(FusedGRPOTrainer):
    """SPPO on TRL: one completion per prompt, A = R - sigmoid(v(prompt)), PPO clip + BCE value loss.

    Args: those of GRPOTrainer (with `args` an SPPOConfig), plus
        value_head: a `ValueHead` (or any module [B, H] -> [B] logits) to train; default ValueHead(H, value_init).
        kernel_impl: the kernel implementation, "auto" | "chunked" | "triton" | "torch".
    After training, `trainer.value_head` holds the critic; `save_model` and every checkpoint write it as
    `value_head.safetensors` (read it back with `load_value_head(ValueHead(H), output_dir)`).
    """

    def __init__(self, model, reward_funcs, args: SPPOConfig, *pos_args, value_head=None, kernel_impl="auto",
                 **kwargs):
        _check_sppo_args(args)
        super().__init__(model, reward_funcs, args, *pos_args, kernel_impl=kernel_impl, **kwargs)
        hidden_size = _base_model(self.model).config.get_text_config().hidden_size
        if value_head is None:
            value_head = ValueHead(hidden_size, init_value=args.value_init)
        self.value_head = value_head.to(self.accelerator.device)
        self._sppo_rewards_per_func = None
        self._fresh_head_on_resume = False
        self.add_callback(_ValueHeadGradients(self))

    # --- optimizer and checkpoints --------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """TRL/transformers' optimizer for the policy, plus one parameter group for the value head."""
        optimizer = super().create_optimizer(model)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        head_params = [p for p in self.value_head.parameters() if id(p) not in in_optimizer]
        if head_params:
            optimizer.add_param_group({"params": head_params, "lr": self.args.value_learning_rate,
                                       "weight_decay": 0.0})
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            save_value_head(self.value_head, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._fresh_head_on_resume = self.args.value_head_on_resume == "fresh"
        if self._fresh_head_on_resume:
            return  # the head keeps its initial weights; its optimizer state is dropped after the optimizer load
        if find_value_head(resume_from_checkpoint) is None:
            raise FileNotFoundError(
                f"{resume_from_checkpoint} holds no value head ({VALUE_HEAD_FILE}): resuming would pair the trained "
                f"policy with an untrained critic. Set SPPOConfig(value_head_on_resume='fresh') to start a fresh "
                f"head on purpose")
        load_value_head(self.value_head, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as err:
            if "parameter group" not in str(err):
                raise
            raise ValueError(f"the optimizer state in {checkpoint} does not have SPPOTrainer's parameter groups (the "
                             f"policy's plus the value head's): it is not an SPPOTrainer checkpoint. To start SPPO "
                             f"from its weights, pass the checkpoint as the model and do not resume") from err
        if checkpoint is not None and self._fresh_head_on_resume:
            for p in self.value_head.parameters():  # a fresh head starts with fresh Adam moments too
                self.optimizer.state.pop(p, None)

    def _load_best_model(self):
        super()._load_best_model()
        load_value_head(self.value_head, self.state.best_model_checkpoint)

    # --- rollout: rewards and (when needed) frozen pre-update values ----------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL gathers these over processes ([num_processes * B, num_funcs]); keep them to build R below
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._sppo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        per_func = self._sppo_rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(dim=1)
        rewards = torch.where(torch.isnan(per_func).all(dim=1), float("nan"), rewards)  # unscorable: NaN
        batch = out["prompt_ids"].shape[0]
        start = self.accelerator.process_index * batch
        rewards = rewards[start:start + batch].to(out["prompt_ids"].device)
        scored = rewards[~torch.isnan(rewards)]
        if ((scored < 0) | (scored > 1)).any():
            raise ValueError("SPPO's value loss is a BCE: rewards must be in [0, 1], got values in "
                             f"[{scored.min().item()}, {scored.max().item()}]")
        out["sppo_rewards"] = rewards
        if out.get("old_per_token_logps") is not None:
            # TRL takes several optimizer steps on this rollout (it scored old log-probs): freeze the baseline
            # now, with the rollout's parameters, so every step uses the same A (sppo_fast.train's scoring pass)
            out["sppo_values"] = self._prompt_values(out["prompt_ids"], out["prompt_mask"])
        return out

    @torch.no_grad()
    def _prompt_values(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """sigmoid(v) [B] from a no-grad forward over the (left-padded) prompts: column -1 is the last token."""
        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            hidden = backbone(model)(input_ids=prompt_ids, attention_mask=prompt_mask,
                                     use_cache=False).last_hidden_state
        return value_of(self._value_logits(hidden[:, -1]))

    def _value_logits(self, prompt_states: torch.Tensor) -> torch.Tensor:
        # fp32 outside autocast: a [B, H] x [H, 1] product, where bf16 would only cost precision
        with torch.autocast(prompt_states.device.type, enabled=False):
            return self.value_head(prompt_states.float())

    # --- the loss ---------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        """PPO clip (dual clip) on the completion tokens with A = R - V, plus value_coef * BCE(v, R)."""
        from sppo_fast.kernels import ppo_clip_loss_from_logp

        args = self.args
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        batch, prompt_len = prompt_ids.shape
        keep = completion_ids.shape[1]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        # TRL's labels: only completion tokens are scored. One forward gives the log-probs and the last prompt
        # token's hidden state (prompts are left-padded, so it is column P - 1 in every row).
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-keep] = -100
        last_prompt = torch.full((batch,), prompt_len - 1, dtype=torch.long, device=input_ids.device)
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        hidden_at=last_prompt)
        logp, entropy = out.log_probs[:, -keep:], out.entropy[:, -keep:]  # [B, C]

        prompt_states = out.hidden_at if args.value_grad_to_backbone else out.hidden_at.detach()
        v = self._value_logits(prompt_states)  # [B]
        rewards = inputs["sppo_rewards"]
        scorable = ~torch.isnan(rewards)
        values = inputs.get("sppo_values")
        if values is None:
            values = value_of(v.detach())  # same forward, parameters not yet updated: the pre-update value
        advantages = torch.where(scorable, sppo_advantages(rewards, values), 0.0)  # unscorable: no policy signal

        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp
        entropy_coef = float(self.entropy_coef)
        cu_seqlens = torch.arange(batch + 1, device=logp.device) * keep  # row b = tokens [b C, (b + 1) C)
        pg_loss, stats = ppo_clip_loss_from_logp(
            logp.reshape(-1), old_logp.reshape(-1), advantages, mask.reshape(-1).bool(), cu_seqlens,
            entropy=entropy.reshape(-1) if entropy_coef != 0 else entropy.reshape(-1).detach(),
            clip_low=self.epsilon_low, clip_high=self.epsilon_high, dual_clip=args.dual_clip,
            ratio_level=self.importance_sampling_level, loss_agg=args.sppo_loss_agg, entropy_coef=entropy_coef,
            impl=self.kernel_impl)

        bce = value_loss_fn(v, torch.nan_to_num(rewards), "bce", reduction="none")
        value_loss = torch.where(scorable, bce, 0.0).sum() / scorable.sum().clamp(min=1)
        loss = pg_loss + args.value_coef * value_loss

        mode = "train" if self.model.training else "eval"
        if mode == "train":  # TRL turns off the HF loss scaling and divides by the accumulation steps itself
            loss = loss / self.current_gradient_accumulation_steps

        metrics = self._metrics[mode]
        gather_mean = lambda x: self.accelerator.gather(x.detach().float().reshape(1)).mean().item()  # noqa: E731
        metrics["entropy"].append(gather_mean(stats["entropy"]))
        metrics["clip_ratio/region_mean"].append(gather_mean(stats["clipfrac"]))
        metrics["sppo/dual_clipfrac"].append(gather_mean(stats["dual_clipfrac"]))
        metrics["sppo/approx_kl"].append(gather_mean(stats["approx_kl"]))
        metrics["sppo/policy_loss"].append(gather_mean(stats["pg_loss"]))
        metrics["sppo/value_loss"].append(gather_mean(value_loss))
        metrics["sppo/value_mean"].append(gather_mean(values.mean()))
        metrics["sppo/advantage_abs_mean"].append(gather_mean(advantages.abs().mean()))
        return loss

