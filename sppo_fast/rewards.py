"""Verifiable rewards for SPPO: pure functions of strings.

Every reward follows the TRL convention::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where ``columns`` are the dataset's other fields as lists aligned with ``completions`` (``answer=[...]``,
``tests=[...]``). Reward fns accept and ignore columns they do not use, so one call site serves them all.

Built-ins (``BUILTIN``):

- ``exact`` (``exact_reward``): synthetic task; text after the last ';' equals ``answer`` (after strip).
- ``gsm8k`` (``gsm8k_reward``): numeric match against a GSM8K answer (``42`` or a solution ending ``#### 42``).
- ``math`` (``math_reward``): last ``\\boxed{...}`` checked against ``answer`` with math-verify.
- ``code`` (``code_reward``): the completion's code run against the row's ``tests`` in a subprocess
  (timeout, rlimits, no network).

``get_reward_fn(spec)`` resolves a builtin name or a plugin ``module:fn`` / ``path/to/file.py:fn``;
``compute_rewards`` calls a reward fn and validates what it returns, so a buggy plugin fails loudly with the
offending sample instead of silently poisoning the value head.
"""
from __future__ import annotations

import ast
import concurrent.futures
import functools
import importlib
import importlib.util
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Sequence

RewardFn = Callable[..., Sequence[float]]

BUILTIN = {"exact", "gsm8k", "math", "code"}


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


# ----------------------------------------------------------------------------------------------------------------
# exact (synthetic task)


def exact_reward(prompts: list[str], completions: list[str], answer: Sequence[str] | None = None,
                 **kwargs) -> list[float]:
    """1.0 when the completion's final answer (text after its last ';', see ``synthetic.extract_answer``)
    equals the ``answer`` column after stripping whitespace, else 0.0."""
    from sppo_fast import synthetic  # lazy: the synthetic task module is optional for file datasets

    answers = _column(answer, "answer", len(completions), "exact", kwargs)
    # synthetic.is_correct is the task's own checker, so the reward and the task cannot drift apart.
    return [1.0 if synthetic.is_correct(c, str(gold)) else 0.0 for c, gold in zip(completions, answers)]


# ----------------------------------------------------------------------------------------------------------------
# gsm8k

# A number as written in word problems: optional sign, thousands separators, decimals. The comma form is tried
# first so "1,234" is one number rather than "1" and "234".
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def _to_decimal(text: str) -> Decimal | None:
    """Parse a GSM8K-style number: drops '$', ',', whitespace and a trailing '.'; '18.0' == '18'."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not s:
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        # "#### 18 eggs" or "#### $18.00." — take the first number in what follows the marker
        m = _NUMBER.search(text.replace("$", ""))
        if m is None:
            return None
        try:
            value = Decimal(m.group(0).replace(",", ""))
        except InvalidOperation:
            return None
    return value if value.is_finite() else None


def gsm8k_gold(answer: str) -> Decimal | None:
    """The numeric ground truth from a GSM8K answer: the text after the last '####', or the whole string."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return _to_decimal(text)


def gsm8k_extract(completion: str) -> Decimal | None:
    """The completion's answer: the text after its last '####' if it has one, else the last number in it.

    The last-number fallback is how GSM8K is usually scored for chat models that answer in prose
    ("... so she has 18 eggs left."), at the cost of crediting a stray trailing number.
    """
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1].strip().splitlines()
        return _to_decimal(tail[0]) if tail else None
    numbers = _NUMBER.findall(completion)
    return _to_decimal(numbers[-1]) if numbers else None


def gsm8k_reward(prompts: list[str], completions: list[str], answer: Sequence[str] | None = None,
                 **kwargs) -> list[float]:
    """1.0 when the completion's number (see ``gsm8k_extract``) equals the gold number, compared exactly as
    decimals after normalising commas, '$' and trailing '.' / '.0'; else 0.0."""
    answers = _column(answer, "answer", len(completions), "gsm8k", kwargs)
    out = []
    for completion, gold in zip(completions, answers):
        g, p = gsm8k_gold(gold), gsm8k_extract(completion)
        out.append(1.0 if g is not None and p is not None and g == p else 0.0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# math (MATH / boxed answers, checked by math-verify)

# Answers longer than this are not parsed: a correct MATH answer is short, and sympy on a pathological
# multi-kilobyte expression can take minutes, which matters off the main thread where no timeout applies.
MAX_BOXED_CHARS = 1000


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, matching nested braces; None if
    there is none or its braces never close."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _math_verify_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works on the main thread; elsewhere it raises.
    # Off the main thread we pass None (no timeout) and rely on MAX_BOXED_CHARS to bound the work.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_equal(pred: str, gold: str) -> bool:
    """Whether the answer ``pred`` (a boxed body) is mathematically equal to ``gold`` per math-verify.

    ``gold`` may be bare LaTeX (``\\frac{1}{2}``), ``$...$``-wrapped, or contain ``\\boxed{...}``; bare answers
    are wrapped in ``$...$`` because math-verify's LaTeX extractor looks for math delimiters.
    """
    from math_verify import parse, verify  # lazy: sympy import is ~0.2 s

    timeout = _math_verify_timeout()
    gold = str(gold).strip()
    if "\\boxed" not in gold and "$" not in gold:
        gold = f"${gold}$"
    gold_parsed = parse(gold, parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def math_reward(prompts: list[str], completions: list[str], answer: Sequence[str] | None = None,
                **kwargs) -> list[float]:
    """1.0 when the completion's last ``\\boxed{...}`` equals the ``answer`` column per math-verify
    (``\\frac{1}{2}`` == ``0.5``, ``\\dfrac``, ``2^{10}`` == ``1024``, intervals, sets); 0.0 when wrong or
    when the completion has no boxed answer."""
    answers = _column(answer, "answer", len(completions), "math", kwargs)
    out = []
    for completion, gold in zip(completions, answers):
        pred = last_boxed(completion)
        ok = pred is not None and pred.strip() != "" and len(pred) <= MAX_BOXED_CHARS and math_equal(pred, gold)
        out.append(1.0 if ok else 0.0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# code (unit tests in a subprocess)

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_PY_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last ```python fenced block of the completion; else its last bare ``` block; else all of it."""
    blocks = _PY_FENCE.findall(completion) or _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


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


# Runs inside the child before the completion. Limits are set here rather than in a preexec_fn because
# preexec_fn is documented as unsafe when the parent has threads (we run samples on a thread pool); setting
# soft == hard means the completion cannot raise them again. The socket patch is the network guard that always
# applies; where an unprivileged network namespace is available (`unshare -rn`) the child also has no
# interfaces at all. None of this is a security sandbox (ctypes can still make raw syscalls): run untrusted
# model code in a container.
_PRELUDE = """\
import sys
def _sppo_guard(cpu_s, mem_bytes, fsize_bytes):
    try:
        import resource
        for lim, val in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, mem_bytes),
                         (resource.RLIMIT_FSIZE, fsize_bytes), (resource.RLIMIT_CORE, 0)):
            if val is not None:
                resource.setrlimit(lim, (val, val))
    except (ImportError, ValueError, OSError):
        pass  # non-Linux: the parent's wall-clock timeout still applies
    import socket, _socket
    def _blocked(*args, **kwargs):
        raise OSError(101, "network access is disabled in the sppo_fast code sandbox")
    for mod in (socket, _socket):
        for name in ("socket", "create_connection", "socketpair", "fromfd", "create_server", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, _blocked)
_sppo_guard({cpu_s}, {mem_bytes}, {fsize_bytes})
del _sppo_guard
def _sppo_main():
    # The pass token comes from stdin and lives only in this frame (not in this file or a module global), so a
    # completion that calls sys.exit(0)/os._exit(0) before the tests exits without it and scores 0. A
    # completion that digs through frames can still find it: this stops accidents and casual hacks only.
    token = sys.stdin.readline().strip()
    ns = {{"__name__": "__solution__", "__builtins__": __builtins__}}
    exec(compile({code!r}, "<completion>", "exec"), ns)
    exec(compile({tests!r}, "<tests>", "exec"), ns)
    sys.stdout.flush()
    sys.stdout.write("\\n" + token + "\\n")
    sys.stdout.flush()
_sppo_main()
"""


@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """``("unshare", "-rn")`` when an unprivileged network namespace works on this host, else ``()``."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (exe, "-rn") if ok else ()


def run_code_tests(code: str, tests: str, *, timeout: float = 5.0, memory_mb: int = 1024,
                   max_output_mb: int = 16) -> bool:
    """Run ``code`` then ``tests`` in a fresh ``python -I`` subprocess; True iff both finish without error.

    The child runs in an empty temp dir with a minimal environment (no proxies, no PYTHONPATH), a CPU-time
    and address-space limit, a cap on file size, sockets disabled and, where possible, no network namespace.
    A wall-clock ``timeout`` kills its whole process group, so forked grandchildren die too.
    """
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="sppo_code_") as tmp:
        script = Path(tmp, "_sppo_run.py")
        script.write_text(_PRELUDE.format(
            cpu_s=int(math.ceil(timeout)) + 1, mem_bytes=memory_mb * 2**20, fsize_bytes=max_output_mb * 2**20,
            code=code, tests=tests,
        ), encoding="utf-8")
        work = Path(tmp, "work")
        work.mkdir()
        out_path = Path(tmp, "stdout")
        # No proxies or credentials from the parent. One BLAS/OpenMP thread: samples already run in parallel,
        # and per-thread BLAS buffers on a many-core host would eat the address-space limit.
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work),
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [*_netns_prefix(), sys.executable, "-I", str(script)]
        with open(out_path, "wb") as out:
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
            except OSError:
                return False
            try:
                proc.communicate((token + "\n").encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return False
            finally:
                if proc.poll() is None:
                    _kill_group(proc)
        if proc.returncode != 0:
            return False
        with open(out_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace")
        return token in tail


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError, OSError):
        proc.kill()
    proc.wait()


def code_score(completion: str, tests: str | Sequence[str], *, partial: bool = False,
                    timeout: float = 5.0, memory_mb: int = 1024) -> float:
    """Reward for one completion: 1.0 if all tests pass else 0.0, or with ``partial`` the fraction of
    asserts that pass, each in its own subprocess (so one hanging assert costs only itself)."""
    code = extract_code(completion)
    if not partial:
        text = tests if isinstance(tests, str) else "\n".join(str(t) for t in tests)
        return 1.0 if run_code_tests(code, text, timeout=timeout, memory_mb=memory_mb) else 0.0
    setup, asserts = split_tests(tests)
    if not asserts:
        return 0.0
    passed = sum(run_code_tests(code, f"{setup}\n{a}", timeout=timeout, memory_mb=memory_mb) for a in asserts)
    return passed / len(asserts)


def code_reward(prompts: list[str], completions: list[str], tests: Sequence | None = None, *, partial: bool = False,
         timeout: float = 5.0, memory_mb: int = 1024, max_workers: int = 4, **kwargs) -> list[float]:
    """Unit-test reward: each completion's code (last ```python block, else the whole text) runs with its
    row's ``tests`` (a string of asserts or a list of them). See ``code_score``. Samples run on a small
    thread pool; each is a separate process, so threads only wait on I/O."""
    all_tests = _column(tests, "tests", len(completions), "code", kwargs)
    if not completions:
        return []
    one = functools.partial(code_score, partial=partial, timeout=timeout, memory_mb=memory_mb)
    workers = max(1, min(max_workers, len(completions)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sppo_code") as pool:
        return list(pool.map(one, completions, all_tests))


# ----------------------------------------------------------------------------------------------------------------
# registry and validation

_BUILTIN_FNS: dict[str, RewardFn] = {
    "exact": exact_reward, "gsm8k": gsm8k_reward, "math": math_reward, "code": code_reward,
}
assert set(_BUILTIN_FNS) == BUILTIN


def get_reward_fn(spec: str) -> RewardFn:
    """Resolve a reward spec: a builtin name (``BUILTIN``), ``package.module:fn``, or ``path/to/file.py:fn``."""
    spec = spec.strip()
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
        if r is None or not isinstance(r, (int, float)) and not hasattr(r, "__float__"):
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
