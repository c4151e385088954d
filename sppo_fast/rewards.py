"""Verifiable rewards for SPPO: pure functions of strings.

Every reward follows the TRL convention::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

where ``columns`` are the dataset's other fields as lists aligned with ``completions`` (``answer=[...]``,
``tests=[...]``). Reward fns accept and ignore columns they do not use, so one call site serves them all. A
sample the reward cannot grade (its gold answer or tests are missing) is ``None``, as in TRL; never a score.

Built-ins (``BUILTIN``); what each grades is decided here, the comparison is exact (GSM8K) or math-verify (MATH):

- ``exact`` (``exact_reward``): synthetic task; text after the last ';' equals ``answer`` (after strip).
- ``gsm8k`` (``gsm8k_reward``): numeric match against a GSM8K answer (``42`` or a solution ending ``#### 42``).
- ``math`` (``math_reward``): the final ``\\boxed`` answer checked against ``answer`` with math-verify, in a
  grader process with a wall-clock limit.
- ``code`` (``code_reward``): the completion's program run against the row's ``tests`` in the code sandbox
  (``sppo_fast.sandbox``: mount/PID/network namespaces, rlimits, killed as a whole at the timeout).

The answer region of a completion (``final_region``): the text after its last ``</think>``; a completion that
opens ``<think>`` and never closes it has no answer (it ran out of tokens while thinking) and scores 0.

``get_reward_fn(spec)`` resolves a builtin name or a plugin ``module:fn`` / ``path/to/file.py:fn``;
``compute_rewards`` calls a reward fn and validates what it returns, so a buggy plugin fails loudly with the
offending sample instead of silently poisoning the value head. ``required_columns`` / ``check_rows`` let a caller
validate a dataset against a builtin reward before loading a model.
"""
from __future__ import annotations

import ast
import atexit
import concurrent.futures
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import secrets
import select
import subprocess
import sys
import threading
import time
import warnings
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Sequence

from sppo_fast import sandbox as sandbox_mod

RewardFn = Callable[..., Sequence[float]]

BUILTIN = {"exact", "gsm8k", "math", "code"}

# The dataset column each builtin grades against (``data`` maps the user's field to this name).
_REQUIRED = {"exact": ("answer",), "gsm8k": ("answer",), "math": ("answer",), "code": ("tests",)}


def required_columns(spec: str) -> tuple[str, ...]:
    """Columns the reward ``spec`` reads from each row: ``("answer",)`` for exact/gsm8k/math, ``("tests",)`` for
    code, ``()`` for a plugin (it declares nothing)."""
    return _REQUIRED.get(spec.strip(), ())


def check_rows(spec: str, rows: Sequence[dict], *, where: str = "dataset") -> None:
    """Raise ValueError naming the first row that a builtin reward could not grade (column absent or empty), so a
    run fails before its model loads rather than training on samples that can never score."""
    for column in required_columns(spec):
        for i, row in enumerate(rows):
            value = row.get(column)
            if _missing(value) or isinstance(value, (list, tuple)) and not value:
                raise ValueError(f"{where} row {i}: reward '{spec}' needs a non-empty '{column}' column, got "
                                 f"{value!r} (row keys: {sorted(row)})")
            if column == "tests" and _tests_check_nothing(value):
                raise ValueError(f"{where} row {i}: {_INERT_TESTS_MSG}: {_head(str(value))}")


def _missing(value: Any) -> bool:
    """A gold that is not there: None, NaN (pandas' missing), or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _column(values: Sequence | None, name: str, n: int, reward: str, other: dict[str, Any]) -> list:
    """A required per-sample column as a list, with an error that says which reward needed it."""
    if values is None:
        raise KeyError(
            f"reward '{reward}' needs the '{name}' column; got columns {sorted(other)} "
            f"(map your dataset's field to '{name}' in the data options)"
        )
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward '{reward}': column '{name}' has {len(values)} values for {n} completions")
    return values


def final_region(completion: str) -> str | None:
    """The part of a completion that holds its final answer: the text after the last ``</think>`` when there is
    one (chat templates often open ``<think>`` in the prompt, so only the close is required), the whole text when
    there are no think tags, and None when a ``<think>`` is opened and never closed (no answer was given)."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    if "<think>" in completion:
        return None
    return completion


# ----------------------------------------------------------------------------------------------------------------
# exact (synthetic task)


def exact_reward(prompts: list[str], completions: list[str], answer: Sequence[str] | None = None,
                 **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer (text after its last ';', see ``synthetic.extract_answer``)
    equals the ``answer`` column after stripping whitespace, else 0.0; None when the gold is missing."""
    from sppo_fast import synthetic  # lazy: the synthetic task module is optional for file datasets

    answers = _column(answer, "answer", len(completions), "exact", kwargs)
    # synthetic.is_correct is the task's own checker, so the reward and the task cannot drift apart.
    return [None if _missing(gold) else 1.0 if synthetic.is_correct(c, str(gold)) else 0.0
            for c, gold in zip(completions, answers)]


# ----------------------------------------------------------------------------------------------------------------
# gsm8k

# One number as written: optional sign, then either digits grouped by commas in threes (1,234,567) or plain
# digits, then decimals. "0,5" is not one (nor two); "2, 3" is two. In running text a '-' directly after a word
# character or ')' is a minus between terms, not a sign ("16-7").
_NUM = r"(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|\.\d+"
_TOKEN = re.compile(r"(?:(?<![\w)])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_NUMBER_FULL = re.compile(rf"-?(?:{_NUM})")
# LaTeX thousands separators between digit groups: 1{,}234, 1\,234, 1\!234, 32,\!348.
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|\\,|\\!|,\\!)(?=\d{3}(?!\d))")
_MARKER = re.compile(r"^[ \t]*####(.*)$", re.MULTILINE)  # greedy: no backtracking on long lines


def _normalize_numbers(text: str) -> str:
    return _LATEX_THOUSANDS.sub(",", text).replace("\\$", "$").replace("\\%", "%")


def _parse_number(text: str) -> Decimal | None:
    """``text`` as one number, or None when it is anything else: '$1,234.', '18.0', '-4', '50%' parse; '0,5',
    '2, 3', 'Step 2', '18 eggs' do not."""
    s = _normalize_numbers(text).strip().strip("*").strip()  # markdown bold around the number
    s = s.removeprefix("$").strip()
    s = s.rstrip(".").removesuffix("%").strip()
    if not _NUMBER_FULL.fullmatch(s):
        return None
    try:
        value = Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def gsm8k_gold(answer: Any) -> Decimal | None:
    """The numeric ground truth from a GSM8K answer: the line after its last '####', or the whole string; None
    when it is missing or not one number."""
    if _missing(answer):
        return None
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
    return _parse_number(text)


def gsm8k_extract(completion: str) -> Decimal | None:
    """The completion's answer, looked for in its answer region (``final_region``), in order:

    1. the last line that is exactly a GSM8K answer marker, ``#### <number>``; a markdown heading such as
       ``#### Step 2`` or ``#### Final Answer`` is not a marker;
    2. the last ``\\boxed{...}`` whose content is one number;
    3. the last number in the region (how GSM8K is usually scored for chat models that answer in prose, at the
       cost of crediting a stray trailing number).
    """
    region = final_region(completion)
    if region is None:
        return None
    markers = [v for v in (_parse_number(m) for m in _MARKER.findall(region)) if v is not None]
    if markers:
        return markers[-1]
    box = last_boxed(region)
    if box is not None and (value := _parse_number(box)) is not None:
        return value
    # number-like tokens, each read strictly: a malformed grouping such as "0,5" is no number at all
    numbers = [v for v in (_parse_number(t.rstrip(",")) for t in _TOKEN.findall(_normalize_numbers(region)))
               if v is not None]
    return numbers[-1] if numbers else None


def gsm8k_reward(prompts: list[str], completions: list[str], answer: Sequence[str] | None = None,
                 **kwargs) -> list[float | None]:
    """1.0 when the completion's number (see ``gsm8k_extract``) equals the gold number, compared exactly as
    decimals ('18.0' == '18', '$1,234' == '1234'); else 0.0; None when the gold is missing or not a number.

    Pure string work in linear time (no sympy), so it needs no separate time bound."""
    answers = _column(answer, "answer", len(completions), "gsm8k", kwargs)
    out: list[float | None] = []
    for completion, gold in zip(completions, answers):
        g = gsm8k_gold(gold)
        if g is None:
            out.append(None)
            continue
        p = gsm8k_extract(completion)
        out.append(1.0 if p is not None and g == p else 0.0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# math (MATH / boxed answers, checked by math-verify in a bounded grader process)

# Answers longer than this are not parsed: a correct MATH answer is short. The grader's wall-clock limit is the
# real bound; this only saves sending megabytes to it.
MAX_BOXED_CHARS = 1000

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces matched), or of a
    brace-less ``\\boxed 5`` (up to the next '$' or line end, as in the MATH reference code); None if there is none
    or its braces never close."""
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 1
        for j in range(i + 1, len(text)):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
        return None
    rest = re.split(r"\$|\n|\\\]|\\\)", text[i:], maxsplit=1)[0].strip().rstrip(".")
    return rest or None


def math_gold(answer: Any) -> str | None:
    """A MATH gold answer as bare LaTeX for math-verify: the last ``\\boxed`` of a full solution, math delimiters
    and escaped dollars (``\\$18.90``: a currency sign) removed; None when missing."""
    if _missing(answer):
        return None
    text = str(answer).strip()
    if _BOX.search(text):
        text = last_boxed(text) or ""
    text = _strip_math(text)
    return text or None


def _strip_math(text: str) -> str:
    text = text.replace("\\$", "").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
            text = text[len(left):len(text) - len(right)].strip()
    return text


# The grader process: math-verify (sympy) on the main thread of a child, so its own signal timeouts work, and a
# parent that kills it at the wall-clock limit, which bounds even work that never returns to the interpreter (a
# C-level bignum power from 9^{9^{9}}) and works from any thread or worker process. One JSON line in, "1"/"0" out.
_GRADER = r"""
import json, os, resource, sys, threading
try:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
except (ValueError, OSError):
    pass
parent = int(sys.argv[1])
def watch():  # exit when the trainer is gone (a parent killed with SIGKILL never closes our stdin otherwise)
    import time
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from math_verify import parse, verify
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
    t = max(1, int(req["t"]))
    # CPU-time fuse per request: the kernel ends a comparison that outlives its parent (which would kill it)
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(used.ru_utime + used.ru_stime) + 3 * t + 5
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    except (ValueError, OSError):
        pass
    try:
        g = parse(req["g"], parsing_timeout=t)
        p = parse(req["p"], parsing_timeout=t)
        ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=t))
    except Exception:
        ok = False
    sys.stdout.write("1\n" if ok else "0\n")
    sys.stdout.flush()
"""


class _Grader:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _GRADER, str(os.getpid())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buf = b""
        self.ready = False

    def ask(self, request: dict | None, timeout: float) -> bool | None:
        """The verdict, or None when the grader did not answer within ``timeout`` (it is then killed). With
        ``request=None``, wait for its start-up line instead."""
        if request is not None:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.close()
                return None
            chunk = os.read(fd, 64)
            if not chunk:  # crashed (memory limit, signal): no verdict
                self.close()
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if request is None:
            self.ready = line.strip() == b"ready"
            return self.ready
        return line.strip() == b"1"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _grader_failed() -> RuntimeError:
    probe = subprocess.run([sys.executable, "-c", "import math_verify"], capture_output=True, text=True)
    why = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit status {probe.returncode}"
    return RuntimeError(f"the math grader process could not start ({why}); the math reward needs math-verify "
                        f"importable by {sys.executable}")


class _GraderPool:
    """Idle grader processes, one per concurrent caller, started on demand and reused. A grader that times out is
    killed and a replacement started at once, so its start-up (~1 s: python + sympy) overlaps the next samples.
    Reset after a fork (a child must not share its parent's pipes)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.idle: list[_Grader] = []
        self.pid = os.getpid()

    def grade(self, request: dict, timeout: float) -> bool | None:
        with self.lock:
            if self.pid != os.getpid():
                self.idle, self.pid = [], os.getpid()
            grader = self.idle.pop() if self.idle else None
        try:
            if grader is None or grader.proc.poll() is not None:
                grader = _Grader()
            # start-up is waited for apart, so the sample's limit is its own
            if not grader.ready and not grader.ask(None, 60.0):
                raise _grader_failed()
            verdict = grader.ask(request, timeout)
        except OSError:  # a broken pipe to a grader that died: no verdict, and a fresh one next time
            if grader is not None:
                grader.close()
            return None
        replacement = grader if verdict is not None else _Grader()
        with self.lock:
            self.idle.append(replacement)
        return verdict

    def close(self) -> None:
        with self.lock:
            if self.pid == os.getpid():
                for grader in self.idle:
                    grader.close()
            self.idle = []


_POOL = _GraderPool()
atexit.register(_POOL.close)


def math_equal(pred: str, gold: str, *, timeout: float = 5.0) -> bool:
    """Whether the answer ``pred`` (a boxed body) is mathematically equal to ``gold`` per math-verify, decided
    within ``timeout`` wall-clock seconds on any thread (past it: False).

    ``gold`` may be bare LaTeX (``\\frac{1}{2}``), ``$...$``-wrapped, a full solution with ``\\boxed{...}``, or
    contain escaped dollars (``\\$18.90``).
    """
    g = math_gold(gold)
    if g is None or not pred.strip() or len(pred) > MAX_BOXED_CHARS or len(g) > MAX_BOXED_CHARS:
        return False
    # math-verify's LaTeX extractor looks for math delimiters / a box: give it exactly what we decided to grade.
    request = {"g": f"${g}$", "p": f"\\boxed{{{_strip_math(pred)}}}", "t": timeout}
    return bool(_POOL.grade(request, timeout))


def math_reward(prompts: list[str], completions: list[str], answer: Sequence[str] | None = None, *,
                timeout: float = 5.0, max_workers: int = 4, **kwargs) -> list[float | None]:
    """1.0 when the completion's final boxed answer equals the ``answer`` column per math-verify
    (``\\frac{1}{2}`` == ``0.5``, ``\\dfrac``, ``2^{10}`` == ``1024``, intervals, sets, ``\\$18.90`` == ``18.90``);
    0.0 when wrong, when it has no boxed answer in its answer region (after ``</think>``), or when grading takes
    longer than ``timeout`` seconds; None when the gold answer is missing (ungradable, never a pass).

    Each comparison runs in a grader process with a wall-clock limit (see ``math_equal``), up to
    ``max_workers`` at once."""
    answers = _column(answer, "answer", len(completions), "math", kwargs)

    def one(completion: str, gold: Any) -> float | None:
        if math_gold(gold) is None:
            return None
        region = final_region(completion)
        pred = last_boxed(region) if region is not None else None
        return 1.0 if pred is not None and math_equal(pred, gold, timeout=timeout) else 0.0

    if len(completions) <= 1 or max_workers <= 1:
        return [one(c, g) for c, g in zip(completions, answers)]
    workers = min(max_workers, len(completions), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sppo_math") as pool:
        return list(pool.map(one, completions, answers))


# ----------------------------------------------------------------------------------------------------------------
# code (unit tests in the sandbox)

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_PY_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The program a completion defines: all its ```python blocks in order, joined (else all its bare ```
    blocks; else the whole text).

    Run in order, the blocks behave like a notebook: a solution followed by a usage example runs both, and a fixed
    version after a first attempt redefines it. A block that is not valid Python on its own (a ``>>>`` console
    transcript, an output listing) is left out rather than failing the whole program. The text after a final
    ``</think>`` is used when there is one (reasoning drafts are not the answer).
    """
    region = final_region(completion)
    if region is None:
        return ""
    blocks = _PY_FENCE.findall(region) or _FENCE.findall(region)
    if not blocks:
        return region
    kept = []
    for block in blocks:
        try:
            ast.parse(block, _BLOCK_FILENAME)
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # the last two: pathological nesting
            continue
        kept.append(block)
    return "\n".join(kept)


# Model code parsed here must not print warnings ("invalid escape sequence") into the trainer's output; the
# filter matches only code parsed under this name.
_BLOCK_FILENAME = "<sppo_code_block>"
for _category in (SyntaxWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category, module=re.escape(_BLOCK_FILENAME))
del _category


# Top-level statements that check nothing by themselves. Tests made only of these pass every program: HumanEval's
# `test` field defines `check(candidate)` and leaves the call to the harness.
_INERT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
_INERT_TESTS_MSG = ("its tests only define names (no assert or call at top level), so every program would pass; "
                    "append the call, e.g. HumanEval's `check(<entry_point>)`")


def _tests_check_nothing(tests: str | Sequence[str]) -> bool:
    text = tests if isinstance(tests, str) else "\n".join(str(t) for t in tests)
    if not text.strip():
        return False  # missing: ungradable, not this error
    try:
        body = ast.parse(text).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False  # fails when run
    return all(isinstance(n, _INERT) or isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def split_tests(tests: str | Sequence[str]) -> tuple[str, list[str]]:
    """Split a row's tests into (setup, asserts).

    ``tests`` is a list of assert statements or one string of them. For a string, top-level ``assert``
    statements become the asserts and everything else (imports, helper defs) the setup, run before each
    assert. A string that does not parse is kept whole as a single test, so it fails when run rather than here.
    """
    if not isinstance(tests, str):
        return "", [str(t) for t in tests]
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return "", [tests]
    setup, asserts = [], []
    for node in tree.body:
        segment = ast.get_source_segment(tests, node)
        (asserts if isinstance(node, ast.Assert) else setup).append(segment)
    return "\n".join(setup), asserts or ([tests] if tests.strip() else [])


# The harness the sandbox runs (`python -I -c HARNESS <channel fd>`). The verdict: the parent sends 32 random
# bytes first on stdin, and counts a pass only when exactly those bytes come back on the result channel, which the
# harness writes after the tests, then exits at once (os._exit: no atexit hooks, no finalisers). Exiting early
# (sys.exit(0), os._exit(0)), crashing or printing anything is therefore never a pass.
# Keeping the token out of the program's reach: the program and tests run on a worker thread whose bottom frame
# takes the token from a C queue only once it is running (so no Thread attribute holds it), and the main thread
# keeps nothing (signal handlers, which run on the main thread with its frame, find no token there). Before the
# program runs, an audit hook closes the ways Python code reaches a frame or raw memory: sys._getframe /
# _current_frames (ValueError, which logging, typing and namedtuple tolerate), the frame attributes of tracebacks,
# generators and coroutines, gc.get_objects/get_referrers, settrace/setprofile, ctypes symbol lookup and raw reads
# (loading ctypes stays allowed: numpy imports it) and /proc/*/mem; the process is non-dumpable, so its children
# cannot read its memory either. This stops ordinary and casually adversarial code; a program that corrupts the
# interpreter itself (ctypes.memmove over its own heap) could still forge a pass, and the sandbox still contains
# it. Value-level hacks the tests allow (an object whose __eq__ is always True) are the tests' to prevent.
# The price: a program that reads a traceback's frames fails with AttributeError, so a correct solution that calls
# traceback.format_exc() or logging.exception() scores 0 (measured; plain logging, dataclasses, typing, enum,
# asyncio, threads, numpy and deep recursion all work).
_HARNESS = r"""
def _sppo_run(box, fd):
    import json, os
    # bound before the program runs: it shares the builtins module and could replace exec (skipping the tests)
    write, exit_, run = os.write, os._exit, exec
    data = box.get()
    token = data[:32]
    job = json.loads(data[32:].decode("utf-8"))
    del data
    try:
        program = compile(job["code"], "<completion>", "exec")
        tests = compile(job["tests"], "<tests>", "exec")
    except (SyntaxError, ValueError):
        exit_(1)
    del job
    ns = {"__name__": "__solution__", "__builtins__": __builtins__}
    run(program, ns)
    ns["__name__"] = "__main__"  # a main guard in the tests runs (the program's own was skipped: no input())
    run(tests, ns)
    write(fd, token)
    exit_(0)


def _sppo_main():
    import os, sys, threading
    from queue import SimpleQueue
    fd = int(sys.argv[1])
    del sys.argv[1:]
    chunks = []
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    box = SimpleQueue()
    box.put(b"".join(chunks))
    del chunks
    try:
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem for other processes
    except Exception:
        pass

    def hook(event, args):
        if event == "sys._getframe":
            raise ValueError("call stack is not inspectable in the sppo_fast code sandbox")
        if event == "object.__getattr__":
            if args[1] in ("tb_frame", "gi_frame", "cr_frame", "ag_frame"):
                raise AttributeError(f"{args[1]} is not readable in the sppo_fast code sandbox")
            return
        if event in ("sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
                     "gc.get_referents", "ctypes.dlsym", "ctypes.cdata", "ctypes.string_at", "ctypes.wstring_at"):
            raise RuntimeError(f"{event} is disabled in the sppo_fast code sandbox")
        if event == "open" and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            if os.path.basename(path.rstrip("/")) in ("mem", "pagemap") or "/proc/" in path and "/mem" in path:
                raise PermissionError(f"{path} is not readable in the sppo_fast code sandbox")

    sys.addaudithook(hook)
    worker = threading.Thread(target=_sppo_run, args=(box, fd), name="solution")
    del box, hook
    worker.start()
    worker.join()
    os._exit(1)  # the worker exits the process itself when the tests pass


_sppo_main()
"""


def run_code_tests(code: str, tests: str, *, timeout: float = 5.0, memory_mb: int = 1024,
                   max_output_mb: int = 16, sandbox: str = "namespaces", max_procs: int = 32) -> bool:
    """Run ``code`` then ``tests`` in the code sandbox (see ``sppo_fast.sandbox``); True iff both finish without
    error. ``sandbox="none"`` is the explicit opt-out (a plain subprocess with rlimits; contains nothing)."""
    token = secrets.token_bytes(32)
    payload = token + json.dumps({"code": code, "tests": tests}).encode("utf-8")
    limits = sandbox_mod.Limits(timeout=timeout, memory_mb=memory_mb, file_mb=max_output_mb, max_procs=max_procs)
    result = sandbox_mod.run(_HARNESS, payload, mode=sandbox, limits=limits)
    return not result.timed_out and result.returncode == 0 and secrets.compare_digest(result.channel, token)


def code_score(completion: str, tests: str | Sequence[str], *, partial: bool = False, timeout: float = 5.0,
               memory_mb: int = 1024, sandbox: str = "namespaces") -> float:
    """Reward for one completion: 1.0 if all tests pass else 0.0, or with ``partial`` the fraction of
    asserts that pass, each in its own sandbox (so one hanging assert costs only itself)."""
    code = extract_code(completion)
    if not code.strip():
        return 0.0
    run = functools.partial(run_code_tests, timeout=timeout, memory_mb=memory_mb, sandbox=sandbox)
    if not partial:
        text = tests if isinstance(tests, str) else "\n".join(str(t) for t in tests)
        return 1.0 if run(code, text) else 0.0
    setup, asserts = split_tests(tests)
    if not asserts:
        return 0.0
    return sum(run(code, f"{setup}\n{a}") for a in asserts) / len(asserts)


def code_reward(prompts: list[str], completions: list[str], tests: Sequence | None = None, *, partial: bool = False,
                timeout: float = 5.0, memory_mb: int = 1024, max_workers: int = 4, sandbox: str = "namespaces",
                **kwargs) -> list[float | None]:
    """Unit-test reward: each completion's program (see ``extract_code``) runs with its row's ``tests`` (a string
    of asserts or a list of them) in the code sandbox. See ``code_score``.

    ``sandbox``: ``"namespaces"`` (default; mount/PID/network namespaces via util-linux ``unshare``, see
    ``sppo_fast.sandbox``) or ``"none"`` (explicit opt-out: runs model code uncontained). Raises
    ``SandboxUnavailable`` before running anything when the sandbox cannot work on this host. A row whose tests are
    missing or empty is ungradable: None; tests that only define names (HumanEval's ``check`` without its call)
    would pass every program and are a ValueError. Samples run on a small thread pool; each is a separate process.
    """
    all_tests = _column(tests, "tests", len(completions), "code", kwargs)
    if not completions:
        return []
    for i, row_tests in enumerate(all_tests):
        if not _missing(row_tests) and _tests_check_nothing(row_tests):
            raise ValueError(f"code reward, sample {i}: {_INERT_TESTS_MSG}: {_head(str(row_tests))}")
    sandbox_mod.check_available(sandbox)
    one = functools.partial(code_score, partial=partial, timeout=timeout, memory_mb=memory_mb, sandbox=sandbox)

    def score_one(completion, row_tests):
        if _missing(row_tests) or not isinstance(row_tests, str) and len(list(row_tests)) == 0:
            return None
        return one(completion, row_tests)

    workers = max(1, min(max_workers, len(completions)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sppo_code") as pool:
        return list(pool.map(score_one, completions, all_tests))


# ----------------------------------------------------------------------------------------------------------------
# registry and validation

_BUILTIN_FNS: dict[str, RewardFn] = {
    "exact": exact_reward, "gsm8k": gsm8k_reward, "math": math_reward, "code": code_reward,
}
assert set(_BUILTIN_FNS) == BUILTIN


def get_reward_fn(spec: str, *, code_sandbox: str | None = None) -> RewardFn:
    """Resolve a reward spec: a builtin name (``BUILTIN``), ``package.module:fn``, or ``path/to/file.py:fn``.

    ``code_sandbox`` (``sandbox.MODES``: "namespaces" or "none") sets how the builtin ``code`` reward contains the
    programs it runs; None keeps its default ("namespaces"). Other rewards run no code and ignore it."""
    spec = spec.strip()
    if code_sandbox is not None and code_sandbox not in sandbox_mod.MODES:
        raise ValueError(f"unknown code sandbox {code_sandbox!r}; use one of {sandbox_mod.MODES}")
    if spec == "code" and code_sandbox is not None:
        return functools.partial(code_reward, sandbox=code_sandbox)
    if spec in _BUILTIN_FNS:
        return _BUILTIN_FNS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward '{spec}': use one of {sorted(BUILTIN)}, or a plugin "
                         f"'module:fn' / 'path/to/file.py:fn'")
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ValueError(f"reward plugin '{spec}' must look like 'module:fn' or 'path/to/file.py:fn'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward plugin file not found: {path} (from '{spec}')")
        mod_name = f"sppo_reward_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import reward plugin file {path} (from '{spec}')")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module  # so dataclasses/pickle inside the plugin can find their module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
        where = str(path)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            # Only translate "the plugin itself is missing"; a missing dependency inside it keeps its own message.
            if e.name and target.split(".")[0] == e.name.split(".")[0] and target.startswith(e.name):
                raise ModuleNotFoundError(f"reward plugin module '{target}' not found (from '{spec}'); is it "
                                          f"installed or on PYTHONPATH?", name=e.name) from e
            raise
        where = f"module '{target}'"
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise AttributeError(f"reward plugin {where} has no attribute '{attr}' (from '{spec}'); callables "
                             f"there: {public}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"reward plugin '{spec}': {attr} is a {type(fn).__name__}, not callable")
    return fn


def _head(text: Any, n: int = 80) -> str:
    s = str(text)
    return repr(s if len(s) <= n else s[:n] + "...")


def _fn_name(fn: Callable) -> str:
    if isinstance(fn, functools.partial):
        return _fn_name(fn.func)
    mod = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{mod}.{name}" if mod else name


# How the trainer calls every reward; a plugin written for another convention is told this instead of failing
# somewhere inside itself.
CALL_CONVENTION = ("sppo-fast calls a reward as fn(prompts, completions, **columns): the prompts and completions as "
                   "two positional lists of str, then each other dataset column as a keyword list (answer=[...], "
                   "tests=[...]); TRL's completion_ids, trainer_state, log_extra and log_metric are not passed, so "
                   "accept them with defaults or **kwargs")
# Arguments TRL's GRPOTrainer passes at call time; here they are neither dataset columns nor passed
TRL_CALL_ARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric")


def signature_mismatch(fn, prompts, completions, columns) -> str | None:
    """Why `fn` cannot take the call compute_rewards makes (CALL_CONVENTION), or None: an argument it cannot bind,
    or a TRL-style signature that binds but would swap arguments (`def f(completions, solution, **kw)`: TRL passes
    everything by keyword, so `completions` first is fine there and reads the prompts here)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: the call itself is the check
        return None
    try:
        sig.bind(prompts, completions, **columns)
    except TypeError as e:
        return str(e)
    positional = [p.name for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    for i, name in enumerate(("prompts", "completions")):
        if name in positional and positional.index(name) != i:
            return f"its parameter {name!r} is in position {positional.index(name) + 1}, so it would receive the " \
                   f"{('prompts', 'completions')[positional.index(name)]}"
    return None


def compute_rewards(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                    columns: dict[str, Sequence] | None = None, *, allow_outside_unit: bool = False) -> list[float]:
    """Call ``fn(prompts, completions, **columns)`` and validate the result.

    Checks: a list/tuple/array with one value per completion, each a finite real number, each in [0, 1]
    unless ``allow_outside_unit``. If ``fn`` raises, it is retried one sample at a time to find the first
    sample that fails, and a RuntimeError names the fn and that sample.
    """
    prompts, completions = list(prompts), list(completions)
    columns = {k: list(v) for k, v in (columns or {}).items()}
    name = _fn_name(fn)
    if why := signature_mismatch(fn, prompts, completions, columns):
        raise TypeError(f"reward fn {name} does not fit the trainer's call ({why}): {CALL_CONVENTION}")
    try:
        raw = fn(prompts, completions, **columns)
    except Exception as e:
        bad = _first_failing_sample(fn, prompts, completions, columns)
        if bad is None:
            raise RuntimeError(f"reward fn {name} raised {type(e).__name__}: {e} on a batch of "
                               f"{len(completions)} samples (no single sample fails on its own)") from e
        i, err = bad
        raise RuntimeError(
            f"reward fn {name} raised {type(err).__name__}: {err} on sample {i} "
            f"(prompt {_head(prompts[i] if i < len(prompts) else '')}, completion {_head(completions[i])})"
        ) from e

    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):  # numpy / torch
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise TypeError(f"reward fn {name} must return a list of floats, got {type(raw).__name__}")
    if len(raw) != len(completions):
        raise ValueError(f"reward fn {name} returned {len(raw)} rewards; expected {len(completions)} "
                         f"(one per completion)")
    out = []
    for i, r in enumerate(raw):
        if isinstance(r, bool):
            r = float(r)
        if r is None:
            raise ValueError(f"reward fn {name} returned None for sample {i}: it could not grade it (its gold answer "
                             f"or tests are missing; prompt {_head(prompts[i] if i < len(prompts) else '')}); fix or "
                             f"drop that row (rewards.check_rows finds such rows before a run)")
        if not isinstance(r, (int, float)) and not hasattr(r, "__float__"):
            raise ValueError(f"reward fn {name} returned {r!r} for sample {i}; expected a finite float")
        v = float(r)
        if not math.isfinite(v):
            raise ValueError(f"reward fn {name} returned {v} for sample {i}; expected a finite float")
        if not allow_outside_unit and not 0.0 <= v <= 1.0:
            raise ValueError(
                f"reward {v:g} for sample {i} is outside [0,1]; SPPO's value head predicts P(success), "
                f"so rewards must lie in [0,1] unless a value loss that accepts them is selected"
            )
        out.append(v)
    return out


def _first_failing_sample(fn: RewardFn, prompts: list, completions: list,
                          columns: dict[str, list]) -> tuple[int, Exception] | None:
    for i in range(len(completions)):
        cols = {k: v[i:i + 1] for k, v in columns.items()}
        try:
            fn(prompts[i:i + 1], completions[i:i + 1], **cols)
        except Exception as e:
            return i, e
    return None
