"""The embedded tiny model: a character-level Llama warmed up on the synthetic addition-chain task.

What it is for: the demo (``sppo-fast train`` with no arguments) and the CPU tests run SPPO on this model so that
the whole loop -- generate, reward, value head, PPO update, eval -- works offline on a laptop in minutes. It is
shipped in ``sppo_fast/assets/tiny/`` (``default_model_path()``) and loads with ``AutoTokenizer`` /
``AutoModelForCausalLM.from_pretrained(default_model_path())``.

Task (``sppo_fast.synthetic``, default difficulty ``DEFAULT_TASK``): an addition chain of 2-4 terms, first term
0-99, further operands 1-9. The prompt is the expression, the completion writes every step and then the answer::

    "27+2+5="  ->  "27+2=29,29+5=34;34</s>"

The reward is 1 when the text after the last ';' equals the true sum (``synthetic.is_correct``).

Tokenizer: character level (``tokenizers`` WordLevel over single characters, a pre-tokenizer that isolates every
character, a ``Fuse`` decoder so ``decode(encode(s)) == s``), wrapped as ``PreTrainedTokenizerFast``. Specials:
``<pad>``=0, ``<s>``=1 (prepended to every encoded text, as in Llama), ``</s>``=2 (EOS), ``<unk>``=3; then digits,
``+-*/=,;:?.()``, space, newline and ``a-z``. Vocab size 64 (the model's embedding rows; a few are unused).
Left and right padding both work (the trainer sets ``padding_side``).

Model: ``LlamaForCausalLM``, hidden 128, 4 layers, 4 heads (head dim 32), MLP 384, max positions 64, tied
embeddings, RoPE theta 10000: 0.86M parameters, fp32 safetensors (3.4 MB).

Warm-up: supervised next-token loss on ``<s> prompt solution </s>``, loss on the completion tokens only; AdamW
(lr 2e-3, betas (0.9, 0.98), weight decay 0.01), 20 linear warm-up steps then constant, batch 64, drawn from 20,000
train problems; deterministic on CPU (``torch.manual_seed``, ``torch.use_deterministic_algorithms(True)``, batches
from a seeded ``random.Random``); it stops after a fixed number of steps (``DEFAULT_STEPS``), never by time.
The step count is chosen so the shipped model is only partly trained: RL has room to improve it and signal to do so.

Longer horizons (``synthetic.HORIZONS``: responses of ~61 or ~153 tokens instead of ~19): the same model with a
larger position budget (``max_positions``: 128 or 256), warmed up on that task until the greedy accuracy on a
128-problem stop-check set first reaches ``STOP_AT_ACC`` (checked every 25 steps, at most ``HORIZON_STEPS``), so
RL starts from a comparable 20-40%. They are not shipped: ``bench/bench_learning.py --horizon 60|150`` builds them
on first use (deterministically, 1 thread) into a cache directory::

    python -m sppo_fast.tiny --horizon 150 --out /tmp/tiny150 --threads 1   # stops at 25% stop-check accuracy

Rebuild (about a minute on 2 idle CPU cores; the checkpoint is bitwise reproducible on the same machine and
thread count -- the shipped one was built with ``--threads 1``)::

    python -m sppo_fast.tiny --threads 1           # writes sppo_fast/assets/tiny/, prints the accuracies
    python -m sppo_fast.tiny --out /tmp/t --steps 300 --seed 0 --eval-every 25

Measured on the shipped checkpoint (225 steps, seed 0; 500 held-out problems from
``synthetic.train_eval_datasets(20000, 500)``): greedy accuracy 27.6%, sampled (temperature 0.6) accuracy 26.8%.
By chain length (greedy): 2 terms 38%, 3 terms 26%, 4 terms 20% -- the errors are mostly off-by-one
sums and carries, which RL fixes. The same warm-up continued reaches ~18% at 200 steps, ~49% at 250, ~78% at 300
and ~85% at 350, so the model has the capacity for far more than the shipped 27.6%.

RL headroom (measured with a prototype pure SPPO loop: batch 64 prompts, one sample each at temperature 0.6,
max_new_tokens 36, reward ``is_correct``; value head ``Linear(128, 1)`` zero-initialised on the detached hidden state
of the last prompt token, BCE-with-logits, AdamW lr 1e-2; A = R - sigmoid(v); token-mean -A*logp on the response;
AdamW policy lr 5e-5, no warm-up, grad clip 1.0): held-out greedy accuracy (first 200 eval problems) goes from
26.5% to 50-55% by step 50 and 56-61% by step 200, for all 4 seeds tried (+20 points within 20-60 steps). About
0.36 CPU-seconds per step with one torch thread, so 200 steps plus evals take ~1.5 minutes. Policy lr 3e-5 and
5e-5 are reliable; 1e-4 is reliable only with a faster value head (lr 3e-2) -- with 1e-2 one seed in three fell
back to the start; 2e-4 and above collapse to 0% (the value head lags, negative advantages flatten the policy).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from . import synthetic

DEFAULT_STEPS = 225
# Warm-up of the longer horizons (synthetic.HORIZONS): instead of a step count tuned by hand per task, the build
# checks greedy accuracy on STOP_CHECK_N problems (seed STOP_CHECK_SEED, not the held-out set) every
# STOP_CHECK_EVERY steps and stops at the first check that reaches STOP_AT_ACC, so RL starts at 20-40% like the
# shipped model; HORIZON_STEPS caps the steps. Still deterministic: the checks are greedy. Horizon 20 keeps the
# shipped model's fixed recipe.
HORIZON_STEPS = {20: DEFAULT_STEPS, 60: 3000, 150: 3000}
STOP_AT_ACC = 0.25
STOP_CHECK_EVERY = 25
STOP_CHECK_N = 128
STOP_CHECK_SEED = 777
DEFAULT_SEED = 0
N_TRAIN = 20_000
N_EVAL = 500

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789+-*/=,;:?.() \n") + [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB_SIZE = 64

MODEL_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=384,
    max_position_embeddings=64,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
)


def default_model_path() -> str:
    """The directory of the shipped tiny model and tokenizer (``sppo_fast/assets/tiny``)."""
    return str(Path(__file__).resolve().parent / "assets" / "tiny")


# ----------------------------------------------------------------------------------------------------------------
# tokenizer / model construction
# ----------------------------------------------------------------------------------------------------------------
def build_tokenizer(model_max_length: int = MODEL_CONFIG["max_position_embeddings"]):
    """The character-level tokenizer as a ``PreTrainedTokenizerFast`` (not yet saved)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tk.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",
    )
    return tok


def max_positions(task: dict | None = None) -> int:
    """Position budget of the model for a task: the shipped 64 for the default task, else the next power of two
    above BOS + the longest prompt + the longest solution + EOS (RoPE has no learned positions; this only sizes the
    config and the tokenizer's model_max_length)."""
    kw = {**synthetic.DEFAULT_TASK, **(task or {})}
    if kw == synthetic.DEFAULT_TASK:
        return MODEL_CONFIG["max_position_embeddings"]
    prompt = len(str(kw["max_first"])) + (kw["max_terms"] - 1) * (1 + len(str(kw["max_operand"]))) + 1
    need = 1 + prompt + synthetic.max_solution_chars(**kw) + 1
    return 1 << (need - 1).bit_length()


def build_model(tok, seed: int, task: dict | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**MODEL_CONFIG, "max_position_embeddings": max_positions(task)},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def _generation_config(tok, task: dict | None = None):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=synthetic.max_solution_chars(**(task or {})) + 2,
    )


# ----------------------------------------------------------------------------------------------------------------
# supervised warm-up
# ----------------------------------------------------------------------------------------------------------------
def _encode_example(tok, ex: dict) -> tuple[list[int], list[int]]:
    p = tok(ex["prompt"])["input_ids"]  # <s> + prompt chars
    c = tok(ex["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + c, [-100] * len(p) + c


def _collate(batch, pad_id: int):
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), n), -100, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return ids, att, lab


@__import__("functools").lru_cache(maxsize=1)
def _datasets(n_train: int, n_eval: int, task_items: tuple = ()):
    return synthetic.train_eval_datasets(n_train, n_eval, **dict(task_items))


def evaluate(model, tok, problems: list[dict], temperature: float = 0.0, batch_size: int = 256, seed: int = 0,
             task: dict | None = None):
    """Accuracy of ``model`` on ``problems`` (of ``task``: sizes the generation budget): greedy when
    ``temperature == 0``, else sampled (seeded)."""
    import torch

    old_side = tok.padding_side
    tok.padding_side = "left"
    model.eval()
    correct = 0
    max_new = synthetic.max_solution_chars(**(task or {})) + 2
    gen = dict(max_new_tokens=max_new, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if temperature > 0:
        gen.update(do_sample=True, temperature=temperature, top_k=None, top_p=None)
        torch.manual_seed(seed)
    else:
        gen.update(do_sample=False)
    try:
        with torch.no_grad():
            for i in range(0, len(problems), batch_size):
                chunk = problems[i : i + batch_size]
                enc = tok([p["prompt"] for p in chunk], return_tensors="pt", padding=True)
                out = model.generate(**enc, **gen)
                texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                correct += sum(synthetic.is_correct(t, p["answer"]) for t, p in zip(texts, chunk))
    finally:
        tok.padding_side = old_side
    return correct / max(1, len(problems))


def build(out_dir: str | os.PathLike | None = None, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
          batch_size: int = 64, lr: float = 2e-3, warmup_steps: int = 20, n_train: int = N_TRAIN, n_eval: int = N_EVAL,
          do_eval: bool = True, log_every: int = 50, eval_every: int = 0, verbose: bool = True, horizon: int = 20,
          stop_at_acc: float | None = None, check_every: int = STOP_CHECK_EVERY, check_n: int = STOP_CHECK_N) -> dict:
    """Build tokenizer + model, run ``steps`` warm-up steps on the task of ``horizon`` (``synthetic.HORIZONS``;
    20 is the default task), evaluate, save to ``out_dir`` (the shipped directory when None; required for another
    horizon). With ``stop_at_acc``, ``steps`` is a cap: every ``check_every`` steps the greedy accuracy on
    ``check_n`` problems drawn with STOP_CHECK_SEED is measured and the warm-up stops at the first check at or above
    it. Deterministic for fixed arguments on one machine. Returns a dict of metrics."""
    import torch

    task = synthetic.task_for_horizon(horizon)
    if out_dir is None and horizon != 20:
        raise ValueError("only the horizon-20 model is shipped: give out_dir for another horizon")
    out_dir = Path(out_dir) if out_dir is not None else Path(default_model_path())
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        tok = build_tokenizer(max_positions(task))
        model = build_model(tok, seed, task)
        n_params = sum(p.numel() for p in model.parameters())
        train, held = _datasets(n_train, n_eval, tuple(sorted(task.items())))
        encoded = [_encode_example(tok, ex) for ex in train]
        rng = random.Random(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
        history = []
        checks = synthetic.make_dataset(check_n, STOP_CHECK_SEED, unique=True, **task) if stop_at_acc else []
        stopped_at = None
        t0 = time.perf_counter()
        model.train()
        step, loss = 0, None
        for step in range(1, steps + 1):
            ids, att, lab = _collate(rng.sample(encoded, batch_size), tok.pad_token_id)
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if verbose and (step % log_every == 0 or step == steps):
                print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.1f}s", flush=True)
            if eval_every and step % eval_every == 0 and step != steps:
                acc = evaluate(model, tok, held, task=task)
                history.append((step, loss.item(), acc))
                if verbose:
                    print(f"step {step:5d}  held-out greedy acc {acc:.3f}", flush=True)
                model.train()
            if stop_at_acc is not None and step % check_every == 0:
                acc = evaluate(model, tok, checks, task=task)
                history.append((step, loss.item(), acc))
                if verbose:
                    print(f"step {step:5d}  stop-check greedy acc {acc:.3f} (stops at {stop_at_acc})", flush=True)
                model.train()
                if acc >= stop_at_acc:
                    stopped_at = step
                    break
        train_s = time.perf_counter() - t0
        model.eval()
        metrics = {"horizon": horizon, "task": task, "steps": step, "max_steps": steps, "stop_at_acc": stop_at_acc,
                   "stopped_at": stopped_at, "seed": seed, "n_params": n_params, "train_seconds": round(train_s, 1),
                   "final_loss": float(loss.item()) if loss is not None else None, "history": history}
        if do_eval:
            metrics["greedy_acc"] = evaluate(model, tok, held, task=task)
            metrics["sampled_acc_t0.6"] = evaluate(model, tok, held, temperature=0.6, seed=seed, task=task)
            if verbose:
                print(f"held-out ({len(held)}) greedy acc {metrics['greedy_acc']:.3f}  "
                      f"sampled(T=0.6) acc {metrics['sampled_acc_t0.6']:.3f}", flush=True)
        _save(model, tok, task, out_dir)
        return metrics
    finally:
        torch.use_deterministic_algorithms(prev_det)


def _save(model, tok, task: dict, out_dir: Path) -> None:
    """The model directory: weights (safetensors), generation config, a fresh tokenizer, world-readable files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = _generation_config(tok, task)
    model.save_pretrained(out_dir, safe_serialization=True)
    # save a fresh tokenizer: the one used above carries padding state from batched generation
    build_tokenizer(max_positions(task)).save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir)
    for f in out_dir.iterdir():  # safetensors writes 0600; the shipped files should be world-readable
        if f.is_file():
            f.chmod(0o644)


def _portable_tokenizer_config(out_dir: Path) -> None:
    # transformers 5 writes its new class name "TokenizersBackend"; "PreTrainedTokenizerFast" loads the same
    # tokenizer.json in transformers 4.x and 5.x alike.
    p = out_dir / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Build the embedded tiny char-level Llama for the synthetic task.")
    ap.add_argument("--out", default=None, help="output dir (default: the shipped sppo_fast/assets/tiny)")
    ap.add_argument("--horizon", type=int, default=20, choices=sorted(synthetic.HORIZONS),
                    help="task: approximate response tokens (20 = the shipped default task; others need --out)")
    ap.add_argument("--steps", type=int, default=None, help="warm-up steps (default: HORIZON_STEPS[horizon]; a cap "
                                                          "when --stop-at-acc is on)")
    ap.add_argument("--stop-at-acc", type=float, default=None,
                    help=f"stop at the first check with this greedy accuracy (default: {STOP_AT_ACC} for horizons "
                         "60/150, off for 20: the shipped fixed recipe)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.out is None and args.horizon != 20:
        ap.error("--horizon other than 20 needs --out (only the horizon-20 model is shipped)")
    steps = HORIZON_STEPS[args.horizon] if args.steps is None else args.steps
    stop = args.stop_at_acc if args.stop_at_acc is not None else (None if args.horizon == 20 else STOP_AT_ACC)
    m = build(args.out, steps=steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
              eval_every=args.eval_every, do_eval=not args.no_eval, horizon=args.horizon, stop_at_acc=stop)
    print(json.dumps({k: v for k, v in m.items() if k != "history"}))


if __name__ == "__main__":
    main()
