"""Preparing a run: everything between the parsed options and the first step.

`preflight` checks what can be wrong before anything loads or is written (options, model and critic directories,
the run directory, the reward, the data, prompt lengths, the memory plan), each mistake a ConfigError naming the flag.
Then `open_run_dir`, `build_models`, `build_optimizer` and `restore` set up what `sppo_fast/train.py`'s loop runs.
"""
import inspect
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sppo_fast import checkpoint, data, distributed, memory, rewards, rollout
from sppo_fast.config import Args, ConfigError, algorithm, check_args, check_qlora
from sppo_fast.config import flag as option_flag
from sppo_fast.model import attention_implementation, check_model_dir, load_critic, load_policy, with_pad_token
from sppo_fast.value_head import ValueHead


# ---------------------------------------------------------------------------------------------------------------------
# Preflight: every check that needs no model
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
    algo = algorithm(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device is available here (use --device cpu or auto)")
    model_path = os.path.abspath(_user_errors(check_model_dir, args.model or default_model_path(), flag="--model"))
    critic_path = None
    if algo.value == "critic":  # PPO, or SPPO with --critic
        critic_path = model_path if args.critic in ("", "policy") else str(
            _user_errors(check_model_dir, args.critic, flag="--critic"))
    notes = []
    tokenizer = check_tokenizer(model_path, critic_path)

    resume_ckpt, run_dir = _run_dir(args, algo, model_path, notes)

    # --- reward and data: the reward decides which columns every row must have
    sandbox = {"code_sandbox": args.code_sandbox} if args.code_sandbox != "namespaces" else {}  # the opt-out
    reward_fn = _user_errors(rewards.get_reward_fn, args.reward, **sandbox, flag="--reward")
    columns = reward_columns(args.reward, reward_fn)
    train_rows, eval_rows = load_data(args, columns)
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
                        batch_sequences=args.batch_size * algo.samples_per_prompt,
                        gradient_checkpointing=args.gradient_checkpointing, cuda=device.type == "cuda",
                        kernel_impl=args.kernel_impl, lora_rank=args.lora_rank,
                        flag="--memory-budget / --memory-plan")
    if plan.quantize and args.memory_plan != "qlora":  # a budget chose the rung (a forced one was checked already)
        check_qlora(f"--memory-budget {args.memory_budget} (it chose the qlora rung)")
    # config.yaml records what the run uses: the plan's sizes and checkpointing, the qlora rung's effective LoRA rank
    args = replace(args, gradient_checkpointing=plan.gradient_checkpointing, micro_batch_tokens=plan.micro_batch_tokens,
                   gen_batch_size=plan.gen_batch_size, lora_rank=plan.lora_rank,
                   **absolute_paths(vars(args)))
    if args.resume:
        notes += _moved_paths(run_dir, args)
    return Preflight(args, model_path, critic_path, resume_ckpt, run_dir, tokenizer, train_rows, eval_rows,
                     train_texts, eval_texts, reward_fn, shape, plan, notes)


def _run_dir(args: Args, algo, model_path: str, notes: list) -> tuple[Path | None, Path]:
    """(checkpoint to resume or None, run directory): the resumed run's own, or a new one (an existing run is never
    mixed into); refused with a ConfigError when it cannot be used."""
    resume_ckpt, resume = None, Path(args.resume).expanduser()
    if args.resume and _not_started(resume):
        run_dir = resume.resolve()
        notes.append(f"--resume: {run_dir} has no checkpoint (it stopped before its first save): starting it from "
                     f"step 0 with its config.yaml")
    elif args.resume:
        resume_ckpt, skipped = _user_errors(checkpoint.newest_valid, args.resume, flag="--resume")
        notes += [f"--resume: skipped {path}: {why}" for path, why in skipped]
        run_dir = resume_ckpt.resolve().parent.parent  # a checkpoint lives at RUN_DIR/checkpoints/step_N
    else:
        name = args.run_name or f"{algo.name}__{Path(model_path).name}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(os.path.abspath(Path(args.out_dir) / name))  # absolute: printed for --resume from anywhere
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
    return resume_ckpt, run_dir


def _not_started(path: Path) -> bool:
    """A run directory stopped (a signal, an exception) before its first checkpoint: its config.yaml and no
    checkpoint. `--resume` starts it again from step 0 with that config."""
    return (not checkpoint.STEP_DIR.match(path.name) and (path / "config.yaml").is_file()
            and not checkpoint.list_checkpoints(path))


# the options that name files or directories (Args), and the values of them that are names, not paths
PATH_OPTIONS = {"model": ("",), "data": ("synthetic",), "eval_data": ("",), "critic": ("", "policy")}


def absolute_paths(values: dict) -> dict:
    """The file and directory options among `values` made absolute, as config.yaml stores them, so that `--resume`
    works from any working directory: --model, --data, --eval-data, --critic and a path/to/file.py:fn reward.
    Names stay as given: the embedded model (''), 'synthetic', 'policy', a builtin reward, a module:fn plugin."""
    out = {k: os.path.abspath(os.path.expanduser(v)) for k, names in PATH_OPTIONS.items()
           if isinstance(v := values.get(k), str) and v not in names}
    target, colon, fn = str(values.get("reward", "")).strip().rpartition(":")
    if colon and (target.endswith(".py") or "/" in target or os.sep in target):  # rewards.get_reward_fn's rule
        out["reward"] = f"{os.path.abspath(os.path.expanduser(target))}:{fn}"
    return out


def _moved_paths(run_dir: Path, args: Args) -> list:
    """Notes for the paths a resumed run now takes from the command line instead of its config.yaml (e.g. the data
    moved): which one it uses, and which one it had."""
    import yaml
    try:
        stored = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    before, now = absolute_paths(stored), absolute_paths(vars(args))
    return [f"--resume: using {option_flag(k)} {now[k]} (config.yaml had {before[k]})"
            for k in now if k in before and before[k] != now[k]]


def check_tokenizer(model_path: str, critic_path: str | None = None):
    """The model directory's tokenizer, checked before anything is written: its files are there and load, its
    vocabulary is not empty, every id it can produce has a row in the model's (and the critic's) embedding, and an
    EOS token ends generation (a pad token defaults to it). Each failure is a ConfigError naming the fix."""
    path = Path(model_path)
    fix = (f"copy the tokenizer files of the model these weights came from into {path} (`tokenizer.save_pretrained"
           f"('{path}')` writes them)")
    names = [p.name for p in path.iterdir() if p.is_file()]
    if not any(n.startswith(("tokenizer", "vocab")) or n.endswith((".model", ".tiktoken")) for n in names):
        raise ConfigError(f"--model: {path} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                          f"tokenizer.model, vocab.json, ...): {fix}")
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # tokenizers and transformers raise many types (Exception included) for a bad file
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"--model: the tokenizer in {path} does not load ({type(e).__name__}: {first}): "
                          f"{fix}") from e
    vocab = tokenizer.get_vocab()
    if not set(vocab.values()) - set(tokenizer.all_special_ids) or not tokenizer("1 + 2 = 3").input_ids:
        # transformers 5 builds a tokenizer class from tokenizer_config.json alone: special tokens, no vocabulary
        raise ConfigError(f"--model: the tokenizer in {path} has an empty vocabulary ({len(vocab)} tokens, all "
                          f"special; tokenizer.json or tokenizer.model is missing or empty): {fix}")
    top = max(vocab.values())
    for flag, where in (("--model", model_path), ("--critic", critic_path)):
        if where is None or (flag == "--critic" and where == model_path):
            continue
        try:
            config = AutoConfig.from_pretrained(where)
        except (OSError, ValueError):  # a LoRA adapter directory: its base model's config is elsewhere
            continue
        rows = config.get_text_config().vocab_size
        if top >= rows:
            raise ConfigError(f"{flag}: the tokenizer in {path} has token ids up to {top}, but the model in {where} "
                              f"embeds only {rows} (config.json vocab_size): the tokenizer belongs to another model; "
                              f"use the one saved with these weights")
        if flag == "--model":
            try:
                generation = GenerationConfig.from_pretrained(where)
            except OSError:  # no generation_config.json: the model takes the ids of its config.json
                generation = GenerationConfig.from_model_config(config)
            eos = rollout.eos_ids(generation, tokenizer)
            if not eos:
                raise ConfigError(f"--model: no EOS token in {path}: neither generation_config.json, config.json nor "
                                  f"the tokenizer names one, so no response could end; set eos_token in "
                                  f"tokenizer_config.json or eos_token_id in generation_config.json")
            if max(eos) >= rows:
                raise ConfigError(f"--model: the EOS id {max(eos)} in {path} is outside the model's {rows}-token "
                                  f"embedding (config.json vocab_size)")
    return _user_errors(with_pad_token, tokenizer, path, flag="--model")


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
    return tuple(p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and p.name not in rewards.TRL_CALL_ARGS)  # TRL passes those at call time; compute_rewards says so


def load_data(args: Args, columns: tuple) -> tuple[list, list]:
    """(train_rows, eval_rows); every error names the file, the row and the flag that fixes it."""
    if args.data == "synthetic":
        return data.load_dataset("synthetic", synthetic_n_train=SYNTHETIC_TRAIN, seed=args.seed,
                                 synthetic_n_eval=eval_count(args.eval_size, SYNTHETIC_TRAIN))
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
    else:
        n_eval = eval_count(args.eval_size, len(rows))
        fix = "hold out fewer with --eval-size (a count, or a fraction such as 0.1), or give a separate --eval-data " \
              "file"
        if n_eval >= len(rows):
            raise ConfigError(f"--eval-size {args.eval_size:g} leaves no training rows: {args.data} has {len(rows)} "
                              f"rows ({fix})")
        if len(rows) - n_eval < n_eval and not args.allow_small_train:  # a default 256 silently ate a small file
            raise ConfigError(f"--eval-size {args.eval_size:g} holds out {n_eval} of the {len(rows)} rows of "
                              f"{args.data}, leaving {len(rows) - n_eval} (less than half) for training: {fix}, or "
                              f"pass --allow-small-train to train on them anyway")
        train, evals = data.split_rows(rows, n_eval, args.seed)
    norm = dict(prompt_field=args.prompt_field, answer_field=args.answer_field)
    return data.normalize_rows(train, **norm), data.normalize_rows(evals, **norm)


SYNTHETIC_TRAIN = 10_000  # prompts of the synthetic task's training set; its eval set is generated apart


def eval_count(eval_size: float, n_rows: int) -> int:
    """--eval-size as a row count: a fraction in (0, 1) of `n_rows` (at least one row), else the count itself."""
    return max(1, round(eval_size * n_rows)) if eval_size < 1 else int(eval_size)


def model_context(model_path: str) -> int | None:
    """The model's trained context (max_position_embeddings), or None when its config does not say."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_path).get_text_config()
    except (OSError, ValueError):  # e.g. a LoRA adapter directory: its base model's config is elsewhere
        return None
    return getattr(config, "max_position_embeddings", None)


def check_reward_range(values, args) -> None:
    """The algorithm's reward range (sppo_fast/algos.py): SPPO's BCE value loss reads V as P(success), so its
    rewards must lie in [0, 1]; MSE (and GRPO/PPO) take any."""
    bounds = algorithm(args).reward_range
    if bounds is None:
        return
    lo, hi = bounds
    for i, v in enumerate(values):
        if not lo <= v <= hi:
            raise ConfigError(f"--reward {args.reward} gave {v:g} for sample {i}, outside [{lo:g}, {hi:g}]: the BCE "
                              f"value loss predicts a probability of success; use --value-loss mse for rewards on "
                              f"another scale")


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
# Building the run: its directory, models, optimizer and resumed state
def open_run_dir(pre: Preflight, device: torch.device) -> bool:
    """Create (or, with --overwrite, recreate) the run directory, write config.yaml and the memory report, and apply
    the memory budget. Returns whether a memory plan or budget was asked for (its report is printed then)."""
    args, run_dir = pre.args, pre.run_dir
    if distributed.is_main():
        if args.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
            print(f"--overwrite: deleted the previous run in {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.resume:  # interrupted saves: never resumed from, never left to confuse
            pre.notes += [f"removed the unfinished checkpoint {p}" for p in checkpoint.remove_unfinished(run_dir)]
        if args.resume and pre.resume_ckpt is None:  # started again from step 0: the stopped start's events go
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        # first thing in the directory: with it, a run stopped from here on can be resumed (from step 0 at worst)
        import yaml
        config = asdict(args) | {"resolved_model": str(pre.model_path)}
        tmp = run_dir / "config.yaml.tmp"  # atomic: a signal here leaves the old config or the new, never half
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")
    distributed.barrier()
    for note in pre.notes:
        print(note)
    memory_mode = bool(args.memory_budget) or args.memory_plan != "auto"
    if distributed.is_main():
        report = memory.save_report(pre.plan, pre.shape, run_dir)  # memory_report.{txt,json}: the estimate per phase
        if memory_mode:
            print(report)
    if warning := memory.apply_budget(pre.plan, device):
        print(warning)
    if pre.args.num_minibatches == 1:
        print("--num-minibatches 1: one optimizer step per batch, so the PPO ratio is 1 and the clip never acts "
              "(the bar omits clip=)")
    return memory_mode


def build_models(pre: Preflight, device: torch.device):
    """(policy, critic LLM or None, value head or None), as the algorithm asks, sharded under torchrun (FSDP2)."""
    args, resume_ckpt, algo, plan = pre.args, pre.resume_ckpt, algorithm(pre.args), pre.plan
    # The qlora rung quantizes the base (policy and critic alike) under LoRA adapters of the plan's rank (preflight
    # put it in args.lora_rank); other rungs give --lora-rank to the policy alone and train a critic in full. A
    # resumed checkpoint's adapter directory says its own rank and quantization (quantization.json): no flags then.
    fresh = resume_ckpt is None
    quantize, lora_rank = (plan.quantize, args.lora_rank) if fresh else ("", 0)
    load = dict(device=device, attn_implementation=attention_implementation(device),
                gradient_checkpointing=args.gradient_checkpointing, dtype=plan.dtype, quantize=quantize,
                lora_alpha=args.lora_alpha)
    policy = load_policy(pre.model_path if fresh else resume_ckpt / "policy", liger=args.liger, lora_rank=lora_rank,
                         **load)
    policy.train()
    critic = None
    if pre.critic_path is not None:  # a separate critic LLM (decoder only: it needs no lm_head); on qlora its own
        # NF4 copy of the base with its own adapters, under the shared fp32 value head
        critic = load_critic(pre.critic_path if fresh else resume_ckpt / "critic",
                             lora_rank=lora_rank if quantize else 0, **load)
        critic.train()
    value_head = None
    if algo.value != "none":
        text_config = (critic or policy).config.get_text_config()
        hidden_size, n_layers = text_config.hidden_size, text_config.num_hidden_layers
        if not -n_layers <= args.value_layer < n_layers:
            raise ConfigError(f"--value-layer must be in [{-n_layers}, {n_layers - 1}] for this model's {n_layers} "
                              f"decoder layers (-1: the final hidden state), got {args.value_layer}")
        value_head = ValueHead(hidden_size, norm=args.value_norm, mlp_hidden=args.value_mlp_hidden).to(device)
    return distributed.shard(policy, critic, value_head)  # torchrun: FSDP2; else no-op


def build_optimizer(args: Args, policy, critic, value_head, plan, device: torch.device):
    """(optimizer, scheduler): param group 0 is the policy; group 1, when there is a value function, the value head
    and the critic LLM, with their own rate, decay and gradient clipping. The plan picks the optimizer class."""
    lr = args.lora_lr if args.lora_rank > 0 and args.lora_lr > 0 else args.lr  # (preflight set the effective rank)
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": lr,
               "weight_decay": args.weight_decay}]
    if value_head is not None:
        # a LoRA critic (qlora) trains only its adapters: its frozen base never reaches the optimizer
        value_params = list(value_head.parameters()) + (
            [p for p in critic.parameters() if p.requires_grad] if critic is not None else [])
        groups.append({"params": value_params, "lr": args.value_lr, "weight_decay": args.value_weight_decay})
    optimizer = memory.build_optimizer(groups, plan.optimizer, device, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0)
    return optimizer, scheduler


def restore(resume_ckpt: Path | None, value_head, optimizer, scheduler, sampler) -> tuple[int, dict, dict]:
    """(start step, history, extra tensors) of the checkpoint being resumed (its value head, optimizer, scheduler
    and data order restored in place), or (0, {}, {}) for a fresh run."""
    if resume_ckpt is None:
        return 0, {}, {}
    meta = checkpoint.restore(resume_ckpt, value_head=value_head, optimizer=optimizer, scheduler=scheduler)
    sampler.load_state_dict(meta["sampler"])
    print(f"resumed from {resume_ckpt} at step {meta['step']}")
    return meta["step"], meta["extra"].get("history", {}), meta["extra_tensors"]


def init_device(args: Args) -> torch.device:
    """The run's device (under torchrun: this rank's, with the process group up; only rank 0 prints) and threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    device = distributed.init(device)
    if distributed.enabled() and args.value_steps > 1:
        raise ConfigError("--value-steps > 1 is single-process only: the head-only refit is not written for "
                          "torchrun's sharded value head")
    return device
