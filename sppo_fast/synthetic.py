"""Synthetic multi-step arithmetic task: addition chains with a verifiable final answer.

A problem is a chain of additions. The prompt is the bare expression, the target completion writes every
intermediate sum as a step (steps separated by ``,``) and then the final answer after ``;``::

    prompt   "27+2+5="
    solution "27+2=29,29+5=34;34"
    answer   "34"

The reward used for RL is binary: ``is_correct(completion, answer)`` compares the text after the last ``;`` in the
completion (up to the end-of-sequence token or a newline) with the answer. Only the final answer counts; the steps
are there to make the task multi-step (each step is a 1-2 digit + 1 digit addition with a possible carry, and the
final answer is right only if every step is).

Everything is pure Python and seeded: ``make_dataset(n, seed)`` is a deterministic function of its arguments, and
``train_eval_datasets`` builds a held-out eval set of distinct prompts (from ``EVAL_SEED``) and a train set (from
``TRAIN_SEED``) that shares no prompt with it.

Horizon: the response length is set by the chain length (every extra term adds one ``acc+op=new,`` step of
7-11 characters). ``HORIZONS`` names three settings of the same family whose character-level responses (EOS
included) average about 19, 61 and 153 tokens: ``task_for_horizon(60)`` is the task kwargs of the ~60-token one,
and ``write_jsonl_split`` writes a task's train/eval sets as JSONL for ``sppo-fast train --data ... --eval-data``.
"""
from __future__ import annotations

import random

__all__ = [
    "DEFAULT_TASK",
    "HORIZONS",
    "EVAL_SEED",
    "TRAIN_SEED",
    "extract_answer",
    "is_correct",
    "make_dataset",
    "make_problem",
    "max_solution_chars",
    "task_for_horizon",
    "train_eval_datasets",
    "write_jsonl_split",
]

TRAIN_SEED = 1234
EVAL_SEED = 4321

# The default difficulty (the one the shipped tiny model was trained on): 2-4 terms, first term 0-99, every
# further operand 1-9, so running sums stay below 130 and a chain is 1-3 steps.
DEFAULT_TASK = dict(min_terms=2, max_terms=4, max_first=99, max_operand=9)

# The horizon knob: the same task with longer chains, keyed by the approximate mean response length in tokens of a
# character-level tokenizer (solution + EOS; measured over 2,000 problems: 19.3, 61.5 and 153.3). Running sums stay
# below 100 + 19 * 9 = 271, so the per-step arithmetic is the same 1-3 digit + 1 digit addition at every horizon:
# only the number of steps whose intermediate result must be carried (and so the credit-assignment distance from
# the first mistake to the terminal reward) grows.
HORIZONS = {
    20: DEFAULT_TASK,
    60: dict(min_terms=7, max_terms=9, max_first=99, max_operand=9),
    150: dict(min_terms=16, max_terms=20, max_first=99, max_operand=9),
}

# Special-token texts that can appear in a completion decoded without skip_special_tokens.
_STOP_MARKERS = ("\n", "</s>", "<pad>", "<s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


def make_problem(
    rng: random.Random,
    min_terms: int = DEFAULT_TASK["min_terms"],
    max_terms: int = DEFAULT_TASK["max_terms"],
    max_first: int = DEFAULT_TASK["max_first"],
    max_operand: int = DEFAULT_TASK["max_operand"],
) -> dict:
    """One addition-chain problem drawn from ``rng``.

    Returns ``{"prompt": "27+2+5=", "answer": "34", "solution": "27+2=29,29+5=34;34"}``. The first term is drawn
    from ``[0, max_first]``, every further operand from ``[1, max_operand]``, and the number of terms from
    ``[min_terms, max_terms]``.
    """
    if min_terms < 2 or max_terms < min_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    if max_first < 0 or max_operand < 1:
        raise ValueError(f"need max_first >= 0 and max_operand >= 1, got {max_first}, {max_operand}")
    n_terms = rng.randint(min_terms, max_terms)
    terms = [rng.randint(0, max_first)] + [rng.randint(1, max_operand) for _ in range(n_terms - 1)]
    steps = []
    acc = terms[0]
    for t in terms[1:]:
        new = acc + t
        steps.append(f"{acc}+{t}={new}")
        acc = new
    prompt = "+".join(str(t) for t in terms) + "="
    answer = str(acc)
    return {"prompt": prompt, "answer": answer, "solution": ",".join(steps) + ";" + answer}


def make_dataset(n: int, seed: int, unique: bool = False, **task_kwargs) -> list[dict]:
    """``n`` problems drawn i.i.d. from ``random.Random(seed)``: a deterministic function of the arguments.

    With ``unique=True`` every prompt appears once (a few task settings have few distinct short prompts, e.g. 900
    two-term chains by default, so deduping a large set skews it toward long chains; eval sets dedupe, train sets
    need not). Raises ``ValueError`` when ``unique`` and the task has too few distinct prompts.
    """
    return _draw(n, random.Random(seed), set(), unique, task_kwargs)


def train_eval_datasets(n_train: int, n_eval: int, **task_kwargs) -> tuple[list[dict], list[dict]]:
    """``(train, eval)``: ``n_eval`` distinct held-out problems from ``EVAL_SEED`` and ``n_train`` i.i.d. problems
    from ``TRAIN_SEED`` with every eval prompt left out, so train and eval share no prompt. (Train prompts may
    repeat; the task distribution is otherwise the same for both.)"""
    eval_set = make_dataset(n_eval, EVAL_SEED, unique=True, **task_kwargs)
    exclude = {p["prompt"] for p in eval_set}
    train_set = _draw(n_train, random.Random(TRAIN_SEED), exclude, False, task_kwargs)
    return train_set, eval_set


def _draw(n: int, rng: random.Random, exclude: set, unique: bool, task_kwargs: dict) -> list[dict]:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: list[dict] = []
    seen = set(exclude)
    misses = 0
    while len(out) < n:
        p = make_problem(rng, **task_kwargs)
        if p["prompt"] in seen:
            misses += 1
            if misses > 100 * n + 10_000:
                raise ValueError(f"could not draw {n} problems (got {len(out)}) outside the excluded/seen prompts "
                                 f"for task {task_kwargs}")
            continue
        if unique:
            seen.add(p["prompt"])
        out.append(p)
    return out


def extract_answer(completion: str) -> str | None:
    """The text after the last ``;`` in ``completion``, cut at the first newline or special-token marker
    (``</s>``, ``<pad>``, ...) and stripped; ``None`` when there is no ``;``."""
    if completion is None:
        return None
    # Cut at the first stop marker *before* looking for ';' so text generated after EOS never counts.
    cut = len(completion)
    for m in _STOP_MARKERS:
        i = completion.find(m)
        if i != -1:
            cut = min(cut, i)
    text = completion[:cut]
    i = text.rfind(";")
    if i == -1:
        return None
    return text[i + 1 :].strip()


def is_correct(completion: str, answer: str) -> bool:
    """True when the extracted final answer equals ``answer`` (both stripped)."""
    got = extract_answer(completion)
    return got is not None and got != "" and got == str(answer).strip()


def task_for_horizon(horizon: int) -> dict:
    """The task kwargs (for ``make_problem`` / ``train_eval_datasets``) of a named horizon: 20, 60 or 150."""
    if horizon not in HORIZONS:
        raise ValueError(f"horizon must be one of {sorted(HORIZONS)} (approximate response tokens), got {horizon!r}")
    return dict(HORIZONS[horizon])


def write_jsonl_split(out_dir, n_train: int, n_eval: int, **task_kwargs) -> tuple[str, str]:
    """Write ``train_eval_datasets(n_train, n_eval, **task_kwargs)`` as ``train.jsonl`` and ``eval.jsonl`` (one
    ``{"prompt", "answer", "solution"}`` object a line) under ``out_dir``; returns their paths. The trainer reads
    them with ``--data train.jsonl --eval-data eval.jsonl --reward exact``."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "eval"), train_eval_datasets(n_train, n_eval, **task_kwargs)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        paths.append(str(path))
    return paths[0], paths[1]


def max_solution_chars(**task_kwargs) -> int:
    """The longest possible solution (in characters, without EOS) for a task: a bound to size ``max_new_tokens``
    with a character-level tokenizer (add 1 for EOS)."""
    kw = {**DEFAULT_TASK, **task_kwargs}
    n_steps = kw["max_terms"] - 1
    top = kw["max_first"] + n_steps * kw["max_operand"]
    w_acc, w_op = len(str(top)), len(str(kw["max_operand"]))
    step = w_acc + 1 + w_op + 1 + w_acc  # "acc+op=new"
    return n_steps * step + (n_steps - 1) + 1 + w_acc
