"""Dataset rows -> prompts for SPPO.

A *row* is a dict with at least ``prompt`` and ``answer`` plus any other columns (``tests``, ``solution``, ...);
every column travels with the row so reward fns can use it. The flow is::

    train_rows, eval_rows = load_dataset("data/gsm8k.jsonl", prompt_field="question", eval_fraction=0.05)
    train_rows, n_skipped = filter_long_prompts(train_rows, tok, max_prompt_tokens=512, chat_template=True)
    sampler = PromptSampler(len(train_rows), batch_size=64, seed=0)
    batch = [train_rows[i] for i in sampler.next_batch()]
    texts = format_prompts(batch, tok, chat_template=True)

``PromptSampler.state_dict()`` goes into the checkpoint so a resumed run draws exactly the batches the
uninterrupted run would have.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

Row = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# loading


class MissingFieldError(ValueError):
    """A row lacks a required column; ``field`` names it (the trainer maps it to the flag that fixes it)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _check_row(row: Any, required: Sequence[str], prompt_field: str, where: str) -> Row:
    """Validate one row; ``where`` is e.g. "data.jsonl line 7" and starts every error message."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in required:
        if field not in row:
            raise MissingFieldError(f"{where}: missing field '{field}' (fields present: {sorted(row)})", field)
        if row[field] is None:
            raise ValueError(f"{where}: field '{field}' is null")
    if prompt_field in row and not isinstance(row[prompt_field], str):
        raise ValueError(f"{where}: field '{prompt_field}' must be a string, got {type(row[prompt_field]).__name__}")
    return row


def _read_jsonl(path: Path, required: Sequence[str], prompt_field: str) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            rows.append(_check_row(obj, required, prompt_field, f"{path} line {lineno}"))
    return rows


def _read_json(path: Path, required: Sequence[str], prompt_field: str) -> list[Row]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        if not e.doc.strip():
            return []  # empty file: reported by the caller like the other formats
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json dataset must be a list of objects, got {type(data).__name__} "
                         f"(use .jsonl for one object per line)")
    return [_check_row(obj, required, prompt_field, f"{path} row {i} (0-based)") for i, obj in enumerate(data)]


def _read_parquet(path: Path, required: Sequence[str], prompt_field: str) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    rows = pq.read_table(path).to_pylist()
    return [_check_row(obj, required, prompt_field, f"{path} row {i} (0-based)") for i, obj in enumerate(rows)]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".pq": _read_parquet}


def load_rows(path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer",
              required: Sequence[str] | None = None) -> list[Row]:
    """Read a dataset file into a list of row dicts, keeping every column.

    Formats by suffix: ``.jsonl`` (one object per line, blank lines skipped), ``.json`` (a list of objects),
    ``.parquet`` (needs pyarrow). ``required`` defaults to ``(prompt_field, answer_field)``; pass e.g.
    ``(prompt_field, "tests")`` for a code dataset without answers. Errors name the file and the line (JSONL,
    1-based) or row (JSON/Parquet, 0-based), the missing field and the fields present.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"dataset path is a directory, expected a file: {path}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unknown dataset format '{path.suffix}'; use one of {sorted(_READERS)}")
    if required is None:
        required = (prompt_field, answer_field)
    rows = reader(path, tuple(required), prompt_field)
    if not rows:
        raise ValueError(f"{path}: dataset is empty (no rows)")
    return rows


def normalize_rows(rows: Sequence[Row], *, prompt_field: str = "prompt", answer_field: str = "answer") -> list[Row]:
    """Copies of ``rows`` with ``prompt`` and ``answer`` keys taken from the configured fields.

    Other columns are kept (reward fns may need them); an existing ``prompt``/``answer`` column is overwritten
    when the configured field is a different one. Rows without ``answer_field`` get ``answer=None``
    (e.g. code datasets, whose reward reads ``tests``).
    """
    out = []
    for row in rows:
        new = dict(row)
        new["prompt"] = row[prompt_field]
        new["answer"] = row.get(answer_field)
        out.append(new)
    return out


def split_rows(rows: Sequence[Row], eval_size: float | int, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministically split ``rows`` into (train, eval) by ``seed``; both keep the original row order.

    ``eval_size`` is a fraction in [0, 1) or an integer count of eval rows. A positive fraction gives at
    least one eval row; train must keep at least one row.
    """
    n = len(rows)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise TypeError(f"eval size must be a fraction or an int, got {eval_size!r}")
    if isinstance(eval_size, float):
        if not 0.0 <= eval_size < 1.0:
            raise ValueError(f"eval fraction must be in [0, 1), got {eval_size}")
        k = 0 if eval_size == 0 else max(1, round(eval_size * n))
    else:
        k = eval_size
    if k < 0 or k >= n:
        raise ValueError(f"eval size {k} leaves no training rows out of {n}")
    perm = list(range(n))
    random.Random(f"sppo_fast.split:{seed}").shuffle(perm)  # str seed: stable across Python runs
    eval_idx = set(perm[:k])
    train = [rows[i] for i in range(n) if i not in eval_idx]
    evals = [rows[i] for i in range(n) if i in eval_idx]
    return train, evals


def load_dataset(spec: str, *, prompt_field: str = "prompt", answer_field: str = "answer",
                 eval_fraction: float | int = 0.05, eval_path: str | Path | None = None, seed: int = 0,
                 synthetic_n_train: int = 10_000, synthetic_n_eval: int = 500,
                 synthetic_kwargs: dict[str, Any] | None = None,
                 required: Sequence[str] | None = None) -> tuple[list[Row], list[Row]]:
    """Load (train_rows, eval_rows), each row normalised to have ``prompt`` and ``answer`` keys.

    ``spec == "synthetic"`` builds the synthetic task (``synthetic.train_eval_datasets``, disjoint by prompt,
    with ``synthetic_kwargs`` passed through). Otherwise ``spec`` is a file for ``load_rows``; with
    ``eval_path`` that file is the eval set, else ``eval_fraction`` (a fraction or a row count) of ``spec``
    is held out, chosen deterministically by ``seed``.
    """
    if spec == "synthetic":
        from sppo_fast import synthetic  # lazy: only needed for the synthetic task

        train, evals = synthetic.train_eval_datasets(synthetic_n_train, synthetic_n_eval, **(synthetic_kwargs or {}))
        return normalize_rows(train), normalize_rows(evals)

    kw = dict(prompt_field=prompt_field, answer_field=answer_field, required=required)
    rows = load_rows(spec, **kw)
    if eval_path is not None:
        train, evals = rows, load_rows(eval_path, **kw)
    else:
        train, evals = split_rows(rows, eval_fraction, seed)
    norm = dict(prompt_field=prompt_field, answer_field=answer_field)
    return normalize_rows(train, **norm), normalize_rows(evals, **norm)


# ----------------------------------------------------------------------------------------------------------------
# prompts


def _prompt_text(row: Row | str) -> str:
    return row if isinstance(row, str) else row["prompt"]


def format_prompts(rows: Sequence[Row | str], tokenizer, *, chat_template: bool,
                   system_prompt: str | None = None) -> list[str]:
    """The text the policy is conditioned on, one per row (rows are dicts with ``prompt``, or strings).

    With ``chat_template`` the prompt becomes a user turn (after an optional system turn) rendered by
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)``; the rendered text
    already holds the template's special tokens, so tokenize it with ``add_special_tokens=False``. Without it
    the raw prompt is used, prefixed by ``system_prompt`` and a blank line if one is given.
    """
    prompts = [_prompt_text(r) for r in rows]
    if not chat_template:
        return [f"{system_prompt}\n\n{p}" if system_prompt else p for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat template; use a chat/instruct model's tokenizer or "
                         f"pass --no-chat-template to feed raw prompts")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        tokenizer.apply_chat_template(system + [{"role": "user", "content": p}],
                                      add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]


def prompt_lengths(texts: Sequence[str], tokenizer, *, add_special_tokens: bool) -> list[int]:
    """Token count of each text (one batched call: fast tokenizers encode the batch in parallel in Rust)."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens)
    return [len(ids) for ids in enc["input_ids"]]


def filter_long_prompts(rows: Sequence[Row], tokenizer, max_prompt_tokens: int, *, chat_template: bool = False,
                        system_prompt: str | None = None) -> tuple[list[Row], int]:
    """Drop rows whose formatted prompt exceeds ``max_prompt_tokens``; returns (kept_rows, n_skipped).

    Length is measured on exactly what the policy sees: ``format_prompts`` output, tokenized with special
    tokens only for raw prompts (a chat template already contains its own). Skipping is expected on real
    data and is only counted; it is an error only when nothing is left.
    """
    if max_prompt_tokens <= 0:
        raise ValueError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
    rows = list(rows)
    if not rows:
        return [], 0
    texts = format_prompts(rows, tokenizer, chat_template=chat_template, system_prompt=system_prompt)
    lengths = prompt_lengths(texts, tokenizer, add_special_tokens=not chat_template)
    kept = [r for r, n in zip(rows, lengths) if n <= max_prompt_tokens]
    if not kept:
        raise ValueError(f"all {len(rows)} prompts are longer than {max_prompt_tokens} tokens (the shortest has "
                         f"{min(lengths)})")
    return kept, len(rows) - len(kept)


# ----------------------------------------------------------------------------------------------------------------
# sampling


class PromptSampler:
    """An infinite stream of row indices, reshuffled every epoch, drawn ``batch_size`` at a time.

    Epoch ``e`` is a permutation seeded by ``(seed, e)`` alone, so the stream is a pure function of
    ``(seed, n_rows)`` and the state is just ``(epoch, position)``: a run resumed from ``state_dict()`` draws
    exactly the batches the uninterrupted run would have. Batches run across epoch boundaries rather than
    dropping a remainder, so every row is seen once per epoch; a batch larger than the dataset therefore
    repeats rows.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int = 0):
        if n_rows <= 0:
            raise ValueError(f"PromptSampler needs at least one row, got n_rows={n_rows}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.n_rows))
        random.Random(f"sppo_fast.sampler:{self.seed}:{epoch}").shuffle(perm)  # str seed: stable across runs
        return perm

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices of the stream."""
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.position == self.n_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), self.n_rows - self.position)
            out.extend(self._perm[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore (epoch, position). The seed and dataset size must match the saved run, or the stream differs."""
        for key in ("seed", "n_rows"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"PromptSampler state has {key}={state[key]} but this sampler has "
                                 f"{key}={getattr(self, key)}; the resumed run would draw different prompts")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_rows:
            raise ValueError(f"invalid PromptSampler state epoch={epoch} position={position} for {self.n_rows} rows")
        self.epoch, self.position = epoch, position
        self._perm = self._permutation(epoch)
