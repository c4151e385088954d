"""Rewards on real-looking completions (a table per reward, each case with its reason), bounded grading, the
code harness's pass signal, plugin loading, and compute_rewards validation (CPU, ~30 s)."""
import concurrent.futures
import math
import os
import textwrap
import time

import pytest

from sppo_fast import rewards as R


def score(fn, completions, **columns):
    return fn(["prompt"] * len(completions), list(completions), **columns)


# ----------------------------------------------------------------------------------------------------------------
# exact


def test_exact_on_synthetic_rows():
    from sppo_fast import synthetic

    rows = synthetic.make_dataset(4, seed=0)
    good = [r["solution"] for r in rows]
    bad = [r["solution"].rsplit(";", 1)[0] + ";" + str(int(r["answer"]) + 1) for r in rows]
    answers = [r["answer"] for r in rows]
    assert score(R.exact_reward, good, answer=answers) == [1.0] * 4
    assert score(R.exact_reward, bad, answer=answers) == [0.0] * 4
    assert score(R.exact_reward, ["no separator here"], answer=["3"]) == [0.0]
    assert score(R.exact_reward, ["1+2=3; 3 "], answer=[" 3"], tests=["unused column"]) == [1.0]


# ----------------------------------------------------------------------------------------------------------------
# gsm8k

GSM8K_GOLD = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
              "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18")

# (completion, gold, expected, reason); expected None = ungradable (never a score)
GSM8K_CASES = [
    ("She eats 3 and bakes 4, so she has 16 - 7 = 9 eggs... 9 * 2 = 18 dollars.\n#### 18", GSM8K_GOLD, 1.0,
     "answer marker line, gold taken from the solution's last '####'"),
    ("... so she has 18 eggs left.", "#### 18", 1.0, "no marker: the last number"),
    ("The answer is $1,234.", "1234", 1.0, "'$', thousands comma and a trailing '.'"),
    ("#### 18.0", "18", 1.0, "'18.0' == '18' as decimals"),
    ("#### $1,234.00", "1234", 1.0, "marker with currency and decimals"),
    ("#### **18**", "18", 1.0, "marker with markdown bold"),
    ("Total: 2,500,000 dollars", "#### 2500000", 1.0, "several thousands groups"),
    ("It drops to -4 degrees.", "-4", 1.0, "negative number"),
    ("I computed 16-7=9.", "9", 1.0, "'16-7' is a subtraction, not the number -7"),
    ("#### 17\nwait, actually it's 18", GSM8K_GOLD, 0.0, "the marker wins over a later number"),
    ("I computed 16 - 3 = 13, then 13 * 2 = 26.", GSM8K_GOLD, 0.0, "wrong number"),
    ("I do not know.", "18", 0.0, "no number at all"),
    ("#### eighteen", "18", 0.0, "a word is not a number"),
    # issue 12: markdown headings are not answer markers
    ("#### Final Answer\nShe has 18 eggs.", "18", 1.0, "'#### Final Answer' is a heading; the answer is 18"),
    ("#### Step 2\nThe total is 18 dollars.", "2", 0.0, "the step number of a heading is not the answer"),
    ("#### Step 1\nShe has 9 eggs.\n#### 18\n#### Step 2: check", "18", 1.0,
     "the marker line among headings is the answer"),
    # issue 12: a number is one number
    ("#### 2, 3", "23", 0.0, "'2, 3' is two numbers, not 23"),
    ("#### 0,5", "5", 0.0, "'0,5' is not the number 5 (nor 05)"),
    ("The pieces are 0,5 long", "5", 0.0, "a malformed grouping is no number"),
    ("The total is 1{,}234.", "1234", 1.0, "LaTeX thousands separator {,}"),
    (r"The total is $1\,234$.", "1234", 1.0, r"LaTeX thin-space thousands separator \,"),
    ("The total is 12,3456.", "123456", 0.0, "'12,3456' is not a thousands grouping"),
    # answer region
    (r"So she makes $\boxed{18}$. Check: 18 * 2 = 36.", "18", 1.0, "a boxed number beats a later stray number"),
    ("<think>maybe 17? no...</think>\nThe answer is 18.", "18", 1.0, "graded after </think>"),
    ("<think>18 is tempting</think>\nThe answer is 17.", "18", 0.0, "a number inside <think> is not the answer"),
    ("<think>she makes 9 * 2 = 18", "18", 0.0, "unfinished thinking: no answer was given"),
    ("thinking in the prompt's open tag ... 17</think> #### 18", "18", 1.0, "only the closing tag is required"),
    # ungradable golds
    ("#### 18", None, None, "missing gold"),
    ("#### 18", "  ", None, "blank gold"),
    ("#### 18", "#### about eighteen", None, "gold that is not a number"),
]


@pytest.mark.parametrize("completion, gold, expected, reason", GSM8K_CASES, ids=[c[3] for c in GSM8K_CASES])
def test_gsm8k(completion, gold, expected, reason):
    assert score(R.gsm8k_reward, [completion], answer=[gold]) == [expected], reason


def test_gsm8k_missing_answer_column_is_a_clear_error():
    with pytest.raises(KeyError, match="needs the 'answer' column"):
        score(R.gsm8k_reward, ["#### 1"], tests=["x"])


# ----------------------------------------------------------------------------------------------------------------
# math

# (completion, gold, expected, reason, agrees): `agrees` says whether math-verify run on the raw completion gives
# the same verdict; where it does not, the reason says why ours is the right one.
MATH_CASES = [
    (r"Half of the pie remains, so the answer is $\boxed{\frac{1}{2}}$.", "0.5", 1.0, "fraction == decimal", True),
    (r"Therefore $\boxed{0.5}$", r"\frac12", 1.0, r"\frac12 without braces", True),
    (r"The probability is $\boxed{\dfrac{3}{4}}$.", r"\frac{3}{4}", 1.0, r"\dfrac", True),
    (r"There are $\boxed{2^{10}}$ subsets.", "1024", 1.0, "nested braces in the box", True),
    (r"So $x \in \boxed{(1, 2]}$.", "(1,2]", 1.0, "interval", True),
    (r"First guess \boxed{3}; on reflection the answer is \boxed{4}.", "4", 1.0,
     "the last box counts (math-verify grades the first: the revised answer is the final one)", False),
    (r"The answer is $\boxed{5}$.", r"$\boxed{5}$", 1.0, "gold already boxed", True),
    (r"The answer is \fbox{7}.", "7", 1.0, r"\fbox, as in the MATH reference grader (math-verify skips it)", False),
    (r"So $\boxed{\frac{\sqrt{3}}{2}}$.", r"We get $\cos 30^\circ = \boxed{\frac{\sqrt3}{2}}$.", 1.0,
     "gold is a full solution: its last box", True),
    (r"The answer is $\boxed{10\%}$.", r"10\%", 1.0, "percent", True),
    (r"The answer is $\boxed{\frac{2}{3}}$.", r"\frac{3}{4}", 0.0, "wrong", True),
    (r"So $x \in \boxed{[1, 2)}$.", "(1,2]", 0.0, "wrong interval ends", True),
    (r"The answer is \boxed{\frac{1}{2}", "0.5", 0.0,
     "box never closes: a truncated answer is no answer (math-verify still reads it)", False),
    (r"The answer is 0.5.", "0.5", 0.0, "no box: MATH answers are graded from the box (math-verify reads the last "
     "number)", False),
    # issue 12
    (r"The answer is $\boxed 5$.", "5", 1.0, r"brace-less \boxed 5", True),
    (r"Thus \boxed 12", "12", 1.0, r"brace-less \boxed at the end of the text", True),
    (r"The price is $\boxed{18.90}$.", r"\$18.90", 1.0, "escaped-dollar gold (MATH-500)", False),
    (r"The price is $\boxed{\$18.90}$.", r"\$18.90", 1.0, "escaped dollar on both sides", False),
    (r"The sum is $\boxed{32,\!348}$.", r"\$32,\!348", 1.0, r"escaped dollar and \! thousands separator", False),
    (r"The sum is $\boxed{32348}$.", r"\$32,\!348", 1.0, "gold's thousands separator vs a plain number", False),
    (r"<think>so \boxed{4}</think> The answer is 5.", "4", 0.0,
     "a box inside <think> is not the final answer (the official SPPO grader reads after </think>)", False),
    (r"<think>\boxed{4} hmm</think> The answer is $\boxed{5}$.", "5", 1.0, "graded after </think>", True),
    (r"<think>Let me compute... \boxed{4}", "4", 0.0, "unfinished thinking: no answer was given", False),
    (r"\boxed{None}", None, None, "missing gold: ungradable, not a match with 'None'", False),
    (r"\boxed{}", "", None, "blank gold: ungradable", False),
]


@pytest.mark.parametrize("completion, gold, expected, reason, agrees", MATH_CASES, ids=[c[3] for c in MATH_CASES])
def test_math(completion, gold, expected, reason, agrees):
    assert score(R.math_reward, [completion], answer=[gold]) == [expected], reason
    if agrees:  # math-verify's own verdict on the whole completion, where it is the right one
        from math_verify import parse, verify

        mv = verify(parse(f"${R.math_gold(gold)}$"), parse(completion))
        assert float(mv) == expected, f"math-verify disagrees: {reason}"


def test_last_boxed_balances_braces():
    assert R.last_boxed(r"\boxed{1} and \boxed{\frac{a^{2}}{b}} end") == r"\frac{a^{2}}{b}"
    assert R.last_boxed(r"\boxed 5$ and more") == "5"
    assert R.last_boxed(r"\boxedfoo{1}") is None  # another macro
    assert R.last_boxed("nothing") is None


def test_math_off_the_main_thread():
    # math-verify's signal-based timeout raises off the main thread; the reward must still work there.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda c: score(R.math_reward, [c], answer=["0.5"])[0],
                            [r"\boxed{\frac{1}{2}}", r"\boxed{3}"]))
    assert out == [1.0, 0.0]


PATHOLOGICAL = r"The answer is $\boxed{9^{9^{9}}}$."  # sympy works on 9**387420489 (a C-level bignum power)


def _bounded_call(limit):
    score(R.math_reward, [r"\boxed{1}"], answer=["1"])  # the grader's start-up is not the sample's cost
    t0 = time.perf_counter()
    out = score(R.math_reward, [PATHOLOGICAL], answer=["5"], timeout=limit)
    return out, time.perf_counter() - t0


def test_math_pathological_answer_is_bounded_on_any_thread():
    limit = 1.0
    out, took = _bounded_call(limit)  # main thread
    assert out == [0.0] and took < limit + 1.0, took
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # off the main thread, where signals cannot help
        out, took = pool.submit(_bounded_call, limit).result(timeout=60)
    assert out == [0.0] and took < limit + 1.0, took
    # the killed grader is replaced: the next sample is graded normally
    assert score(R.math_reward, [r"\boxed{\frac{1}{2}}"], answer=["0.5"]) == [1.0]


def _in_worker_process(limit):
    return _bounded_call(limit)


def test_math_pathological_answer_is_bounded_in_a_worker_process():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        out, took = pool.submit(_in_worker_process, 1.0).result(timeout=120)
    assert out == [0.0] and took < 2.0, took


def test_math_grader_that_cannot_start_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(R, "_POOL", R._GraderPool())
    monkeypatch.setattr(R, "_GRADER", "raise SystemExit(1)")
    with pytest.raises(RuntimeError, match="math grader process could not start"):
        score(R.math_reward, [r"\boxed{1}"], answer=["1"])


# ----------------------------------------------------------------------------------------------------------------
# code

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
GOOD_ADD = "Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds two numbers."

CODE_CASES = [
    (GOOD_ADD, ADD_TESTS, 1.0, "one python block"),
    ("def add(a, b): return a + b", ADD_TESTS, 1.0, "no fences: the whole text"),
    ("```\ndef add(a, b):\n    return a + b\n```", ADD_TESTS, 1.0, "a bare fence"),
    ("```python\ndef add(a, b):\n    return a - b\n```", ADD_TESTS, 0.0, "wrong"),
    (GOOD_ADD + "\nUsage:\n```python\nprint(add(2, 3))\n```", ADD_TESTS, 1.0,
     "solution then a usage example: all blocks run, in order (issue 12: only the last one ran)"),
    ("```python\ndef add(a, b):\n    return a - b\n```\nOops, fixed:\n```python\ndef add(a, b):\n    return a + b\n```",
     ADD_TESTS, 1.0, "a later block redefines the first attempt"),
    (GOOD_ADD + "\n```python\n>>> add(1, 2)\n3\n```", ADD_TESTS, 1.0, "a console transcript block is left out"),
    ("```python\ndef add(a, b):\n    return a + b\nif __name__ == '__main__':\n    add(input(), 1)\n```", ADD_TESTS,
     1.0, "a main guard does not run (and input() would see EOF)"),
    ("<think>```python\ndef add(a, b):\n    return a - b\n```</think>" + GOOD_ADD, ADD_TESTS, 1.0,
     "graded after </think>"),
    ("<think>```python\ndef add(a, b):\n    return a + b\n```", ADD_TESTS, 0.0, "unfinished thinking: no program"),
    ("import sys\nsys.exit(0)", ADD_TESTS, 0.0, "exit 0 before the tests is not a pass"),
    ("import os\nos._exit(0)", ADD_TESTS, 0.0, "os._exit(0) before the tests is not a pass"),
    ("import sys\nprint('all tests passed')\nsys.exit(0)", ADD_TESTS, 0.0, "printing is not a pass"),
    ("import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b): return 0", ADD_TESTS, 0.0,
     "an exit hook cannot turn a failure into a pass"),
    ("import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b): return 0", ADD_TESTS, 0.0,
     "replacing builtins.exec cannot skip the tests"),
    ("```python\ndef add(a, b):\n    return a - b\n```", "def check(f):\n    assert f(1, 2) == 3\n"
     "if __name__ == '__main__':\n    check(add)", 0.0, "a main guard in the tests runs (else every program passed)"),
    (GOOD_ADD, "def check(f):\n    assert f(1, 2) == 3\nif __name__ == '__main__':\n    check(add)", 1.0,
     "a main guard in the tests runs, and passes a right program"),
    (GOOD_ADD, None, None, "missing tests: ungradable"),
    (GOOD_ADD, [], None, "empty test list: ungradable"),
]


@pytest.mark.parametrize("completion, tests, expected, reason", CODE_CASES, ids=[c[3] for c in CODE_CASES])
def test_code(completion, tests, expected, reason):
    assert score(R.code_reward, [completion], tests=[tests]) == [expected], reason


@pytest.mark.parametrize("tests", [
    "def check(candidate):\n    assert candidate(1, 2) == 3\n",  # HumanEval's `test` field: the call is left out
    ["import math", "def check(f):\n    assert f(1, 2) == 3"],
    "# only a comment",
], ids=["humaneval-check-uncalled", "list-of-definitions", "comment-only"])
def test_code_tests_that_check_nothing_are_refused(tests):
    """Tests that define but never assert or call would pass every program (a reward of 1.0 for anything)."""
    with pytest.raises(ValueError, match="only define names.*check\\(<entry_point>\\)"):
        R.code_reward(["p"], ["def add(a, b): return 0"], tests=[tests])
    with pytest.raises(ValueError, match="row 0: its tests only define names"):
        R.check_rows("code", [{"tests": tests}])
    called = tests + "\ncheck(add)" if isinstance(tests, str) and "check" in tests else None
    if called:
        assert score(R.code_reward, [GOOD_ADD], tests=[called]) == [1.0]
        assert score(R.code_reward, ["def add(a, b): return 0"], tests=[called]) == [0.0]


def test_code_partial_scores_each_assert():
    bad = "```python\ndef add(a, b):\n    return a - b if a < 0 else a + b\n```"  # passes test 1 only
    assert score(R.code_reward, [GOOD_ADD, bad], tests=[ADD_TESTS, ADD_TESTS]) == [1.0, 0.0]
    assert score(R.code_reward, [bad], tests=[ADD_TESTS], partial=True) == [0.5]
    assert score(R.code_reward, ["def add(a, b): return a + b"], tests=[["assert add(2, 2) == 4"]]) == [1.0]


def test_code_partial_keeps_test_setup():
    tests = "import math\nassert add(1, 2) == 3\nassert math.isclose(add(0.1, 0.2), 0.3)\nassert add(1, 1) == 3"
    assert R.split_tests(tests) == ("import math", ["assert add(1, 2) == 3",
                                                    "assert math.isclose(add(0.1, 0.2), 0.3)",
                                                    "assert add(1, 1) == 3"])
    assert score(R.code_reward, [GOOD_ADD], tests=[tests], partial=True) == [pytest.approx(2 / 3)]


def test_code_infinite_loop_times_out_fast():
    loop = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    t0 = time.perf_counter()
    assert score(R.code_reward, [loop], tests=[ADD_TESTS], timeout=1.0) == [0.0]
    assert time.perf_counter() - t0 < 4.0


@pytest.mark.parametrize("sandbox", ["namespaces", "none"])
def test_code_runs_in_empty_dir_without_parent_env(monkeypatch, sandbox):
    monkeypatch.setenv("SPPO_SECRET", "x")
    probe = ("import os\nassert os.listdir('.') == []\nassert 'SPPO_SECRET' not in os.environ\n"
             "open('scratch.txt', 'w').write('x')\ndef add(a, b): return a + b")
    assert score(R.code_reward, [probe], tests=[ADD_TESTS], sandbox=sandbox) == [1.0]
    assert not os.path.exists("scratch.txt")


def test_code_stdlib_users_of_frames_still_work():
    # logging, typing.NamedTuple, namedtuple and enum look at the caller's frame and tolerate ValueError
    program = textwrap.dedent("""
        import logging, collections, enum, typing
        logging.getLogger('x').warning('hi')
        P = collections.namedtuple('P', 'a b')
        class Q(typing.NamedTuple):
            a: int
        E = enum.Enum('E', 'A B')
        import numpy  # an installed package is importable
        def add(a, b): return P(a, b).a + Q(b).a
        """)
    assert score(R.code_reward, [program], tests=[ADD_TESTS]) == [1.0]


# Ways a program could try to forge the pass signal. Each finds the harness's token and writes it to the result
# channel, then exits before the (failing) tests. With the guard off (control) each one does forge a pass, so the
# test below can fail.
FORGERIES = {
    "sys._getframe": "f = sys._getframe(1)",
    "traceback frame": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    f = e.__traceback__.tb_frame.f_back",
    "generator frame": "g = (x for x in [0])\nf = g.gi_frame.f_back or sys._getframe(1)",
    "signal handler": ("import signal\nfs = []\nsignal.signal(signal.SIGUSR1, lambda s, fr: fs.append(fr))\n"
                       "os.kill(os.getpid(), signal.SIGUSR1)\nf = fs[0].f_back"),
    "inspect.stack": "import inspect\nf = inspect.stack()[1].frame",
}


@pytest.mark.parametrize("route", sorted(FORGERIES))
def test_code_pass_token_is_out_of_the_programs_reach(route, monkeypatch):
    attack = ("import os, sys\n" + FORGERIES[route] + "\n"
              "while 'token' not in f.f_locals:\n    f = f.f_back\n"
              "os.write(f.f_locals['fd'], f.f_locals['token'])\nos._exit(0)\n")
    assert score(R.code_reward, [attack], tests=[ADD_TESTS]) == [0.0]
    if route == "signal handler":  # closed by design (the main thread holds no token), not by the audit hook
        inline = R._HARNESS.replace("    worker.start()\n    worker.join()\n", "    _sppo_run(box, fd)\n")
        inline = inline.replace("    del box, hook\n", "    del hook\n")
        monkeypatch.setattr(R, "_HARNESS", inline.replace("sys.addaudithook(hook)", "pass"))
    else:
        monkeypatch.setattr(R, "_HARNESS", R._HARNESS.replace("sys.addaudithook(hook)", "pass"))
    assert score(R.code_reward, [attack], tests=[ADD_TESTS]) == [1.0], "control: the attack works unguarded"


def test_code_memory_of_the_harness_is_not_readable():
    probe = textwrap.dedent("""
        import os, subprocess, sys
        def blocked(path):
            try:
                open(path, 'rb').close()
                return False
            except OSError:
                return True
        assert blocked('/proc/self/mem')
        child = 'import os,sys\\ntry:\\n open(f"/proc/{os.getppid()}/mem","rb")\\nexcept OSError: sys.exit(3)'
        assert subprocess.run([sys.executable, '-c', child]).returncode == 3
        def add(a, b): return a + b
        """)
    assert score(R.code_reward, [probe], tests=[ADD_TESTS]) == [1.0]


def test_code_sandbox_opt_out_and_unknown_mode():
    assert score(R.code_reward, [GOOD_ADD], tests=[ADD_TESTS], sandbox="none") == [1.0]
    with pytest.raises(ValueError, match="unknown sandbox mode"):
        score(R.code_reward, [GOOD_ADD], tests=[ADD_TESTS], sandbox="docker")


def test_get_reward_fn_passes_the_code_sandbox_choice():
    fn = R.get_reward_fn("code", code_sandbox="none")
    assert fn.keywords == {"sandbox": "none"} and fn(["p"], [GOOD_ADD], tests=[ADD_TESTS]) == [1.0]
    assert R.get_reward_fn("code") is R.code_reward
    assert R.get_reward_fn("math", code_sandbox="none") is R.math_reward
    with pytest.raises(ValueError, match="unknown code sandbox 'docker'"):
        R.get_reward_fn("code", code_sandbox="docker")


def test_extract_code_joins_python_blocks_in_order():
    text = "```\nplain\n```\n```python\nfirst = 1\n```\ntext\n```python\nsecond = 2\n```"
    assert R.extract_code(text) == "first = 1\n\nsecond = 2\n"
    assert R.extract_code("```\nonly = 'plain'\n```") == "only = 'plain'\n"
    assert R.extract_code("x = 1") == "x = 1"


# ----------------------------------------------------------------------------------------------------------------
# dataset checks


def test_required_columns_and_check_rows():
    assert R.required_columns("code") == ("tests",)
    assert R.required_columns("math") == ("answer",)
    assert R.required_columns("my_module:fn") == ()
    R.check_rows("code", [{"prompt": "p", "tests": "assert True"}])  # no 'answer' needed for code
    with pytest.raises(ValueError, match=r"row 1: reward 'gsm8k' needs a non-empty 'answer'"):
        R.check_rows("gsm8k", [{"answer": "1"}, {"answer": None}])
    with pytest.raises(ValueError, match=r"row 0: reward 'code' needs a non-empty 'tests'"):
        R.check_rows("code", [{"prompt": "p", "answer": "x"}])


def test_compute_rewards_names_an_ungradable_sample():
    with pytest.raises(ValueError, match=r"returned None for sample 1: it could not grade it .*gold answer.*'q2'"):
        R.compute_rewards(R.gsm8k_reward, ["q1", "q2"], ["#### 1", "#### 2"], {"answer": ["1", None]})


# ----------------------------------------------------------------------------------------------------------------
# registry

PLUGIN = """
def length_reward(prompts, completions, **kwargs):
    return [min(1.0, len(c) / 10) for c in completions]

NOT_CALLABLE = 3
"""


def test_builtin_names():
    assert R.BUILTIN == {"exact", "gsm8k", "math", "code"}
    assert R.get_reward_fn("gsm8k") is R.gsm8k_reward
    with pytest.raises(ValueError, match="unknown reward 'gsm8"):
        R.get_reward_fn("gsm8")


def test_plugin_from_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    fn = R.get_reward_fn(f"{path}:length_reward")
    assert fn(["p"], ["12345"], answer=["x"]) == [0.5]
    with pytest.raises(AttributeError, match="no attribute 'nope'.*length_reward"):
        R.get_reward_fn(f"{path}:nope")
    with pytest.raises(TypeError, match="not callable"):
        R.get_reward_fn(f"{path}:NOT_CALLABLE")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        R.get_reward_fn(f"{tmp_path / 'missing.py'}:fn")


def test_plugin_from_module(tmp_path, monkeypatch):
    (tmp_path / "sppo_test_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = R.get_reward_fn("sppo_test_plugin_mod:length_reward")
    assert fn(["p"], ["1234567890abc"]) == [1.0]
    with pytest.raises(ModuleNotFoundError, match="'sppo_no_such_module' not found"):
        R.get_reward_fn("sppo_no_such_module:fn")


# ----------------------------------------------------------------------------------------------------------------
# compute_rewards


def const(values):
    return lambda prompts, completions, **kw: values


def test_compute_rewards_accepts_lists_tuples_arrays_and_passes_columns():
    import torch

    assert R.compute_rewards(const((0, 1.0, True)), ["a"] * 3, ["b"] * 3) == [0.0, 1.0, 1.0]
    assert R.compute_rewards(const(torch.tensor([0.25, 0.5])), ["a"] * 2, ["b"] * 2) == [0.25, 0.5]
    out = R.compute_rewards(R.gsm8k_reward, ["q1", "q2"], ["#### 3", "#### 4"], {"answer": ["3", "5"], "id": [1, 2]})
    assert out == [1.0, 0.0]


def test_compute_rewards_wrong_length():
    with pytest.raises(ValueError, match="returned 2 rewards; expected 3"):
        R.compute_rewards(const([0.0, 1.0]), ["a"] * 3, ["b"] * 3)


@pytest.mark.parametrize("bad", [math.nan, None, math.inf])
def test_compute_rewards_non_finite_names_sample(bad):
    with pytest.raises(ValueError, match="for sample 1"):
        R.compute_rewards(const([0.0, bad]), ["a"] * 2, ["b"] * 2)


def test_compute_rewards_outside_unit():
    with pytest.raises(ValueError, match=r"reward 1.7 for sample 3 is outside \[0,1\].*value loss"):
        R.compute_rewards(const([0, 0, 0, 1.7]), ["a"] * 4, ["b"] * 4)
    assert R.compute_rewards(const([0, 0, 0, 1.7]), ["a"] * 4, ["b"] * 4, allow_outside_unit=True)[3] == 1.7


def test_compute_rewards_raising_fn_names_the_sample():
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]  # ZeroDivisionError on 3-char completions

    completions = ["long enough", "abc", "also fine"]
    with pytest.raises(RuntimeError, match=r"picky raised ZeroDivisionError.*sample 1.*prompt 'P1'.*completion 'abc'"):
        R.compute_rewards(picky, ["P0", "P1", "P2"], completions)
