"""Rewards on real-looking completions, plugin loading, and compute_rewards validation (CPU, < 30 s)."""
import math
import socket
import subprocess
import sys
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


@pytest.mark.parametrize("completion, gold, expected", [
    ("She eats 3 and bakes 4, so she has 16 - 7 = 9 eggs... 9 * 2 = 18 dollars.\n#### 18", GSM8K_GOLD, 1.0),
    ("... so she has 18 eggs left.", "#### 18", 1.0),                    # last number, no marker
    ("The answer is $1,234.", "1234", 1.0),                             # '$', ',' and trailing '.'
    ("#### 18.0", "18", 1.0),                                           # trailing '.0'
    ("Total: 2,500,000 dollars", "#### 2500000", 1.0),
    ("It drops to -4 degrees.", "-4", 1.0),
    ("#### 17\nwait, actually it's 18", GSM8K_GOLD, 0.0),               # '####' wins over the last number
    ("I computed 16 - 3 = 13, then 13 * 2 = 26.", GSM8K_GOLD, 0.0),
    ("I do not know.", "18", 0.0),
    ("#### eighteen", "18", 0.0),
])
def test_gsm8k(completion, gold, expected):
    assert score(R.gsm8k_reward, [completion], answer=[gold]) == [expected]


def test_gsm8k_missing_answer_column_is_a_clear_error():
    with pytest.raises(KeyError, match="needs the 'answer' column"):
        score(R.gsm8k_reward, ["#### 1"], tests=["x"])


# ----------------------------------------------------------------------------------------------------------------
# math

@pytest.mark.parametrize("completion, gold, expected", [
    (r"Half of the pie remains, so the answer is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
    (r"Therefore $\boxed{0.5}$", r"\frac12", 1.0),
    (r"The probability is $\boxed{\dfrac{3}{4}}$.", r"\frac{3}{4}", 1.0),
    (r"There are $\boxed{2^{10}}$ subsets.", "1024", 1.0),                 # nested braces in the box
    (r"So $x \in \boxed{(1, 2]}$.", "(1,2]", 1.0),                         # interval
    (r"First guess \boxed{3}; on reflection the answer is \boxed{4}.", "4", 1.0),  # last box counts
    (r"The answer is $\boxed{5}$.", r"$\boxed{5}$", 1.0),                  # gold already boxed
    (r"The answer is $\boxed{\frac{2}{3}}$.", r"\frac{3}{4}", 0.0),         # wrong
    (r"So $x \in \boxed{[1, 2)}$.", "(1,2]", 0.0),                         # wrong interval ends
    (r"The answer is 0.5.", "0.5", 0.0),                                   # no box
    (r"The answer is \boxed{\frac{1}{2}", "0.5", 0.0),                     # box never closes
])
def test_math(completion, gold, expected):
    assert score(R.math_reward, [completion], answer=[gold]) == [expected]


def test_last_boxed_balances_braces():
    assert R.last_boxed(r"\boxed{1} and \boxed{\frac{a^{2}}{b}} end") == r"\frac{a^{2}}{b}"
    assert R.last_boxed("nothing") is None


def test_math_off_the_main_thread():
    # math-verify's signal-based timeout raises off the main thread; the reward must still work there.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        out = list(pool.map(lambda c: score(R.math_reward, [c], answer=["0.5"])[0],
                            [r"\boxed{\frac{1}{2}}", r"\boxed{3}"]))
    assert out == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# code

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
GOOD_ADD = "Here is the function:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds two numbers."


def test_code_pass_fail_and_partial():
    bad = "```python\ndef add(a, b):\n    return a - b if a < 0 else a + b\n```"  # passes test 1 only
    assert score(R.code_reward, [GOOD_ADD, bad], tests=[ADD_TESTS, ADD_TESTS]) == [1.0, 0.0]
    assert score(R.code_reward, [bad], tests=[ADD_TESTS], partial=True) == [0.5]
    # tests as a list, and a whole completion without fences
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


def test_code_early_exit_is_not_a_pass():
    # A completion that exits 0 before the tests run must not be read as "all tests passed".
    for cheat in ["import sys\nsys.exit(0)", "import os\nos._exit(0)"]:
        assert score(R.code_reward, [cheat], tests=[ADD_TESTS]) == [0.0]


def test_code_runs_in_empty_dir_without_parent_env(monkeypatch):
    monkeypatch.setenv("SPPO_SECRET", "x")
    probe = ("import os\nassert os.listdir('.') == []\nassert 'SPPO_SECRET' not in os.environ\n"
             "def add(a, b): return a + b")
    assert score(R.code_reward, [probe], tests=[ADD_TESTS]) == [1.0]


@pytest.fixture
def listening_port():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("netns", [True, False], ids=["default", "prelude-only"])
def test_code_network_is_blocked(listening_port, netns, monkeypatch):
    connect = textwrap.dedent(f"""
        import socket
        def reach(port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return "connected"
            except OSError:
                return "refused"
        """)
    # Control: the same code outside the sandbox does reach the server, so 'refused' below is the guard.
    ctl = subprocess.run([sys.executable, "-c", connect + f"\nprint(reach({listening_port}))"],
                         capture_output=True, text=True, timeout=20)
    assert ctl.stdout.strip() == "connected"
    if not netns:  # the socket prelude alone, as on hosts without unprivileged network namespaces
        monkeypatch.setattr(R, "_netns_prefix", lambda: ())
    assert score(R.code_reward, [connect], tests=[f"assert reach({listening_port}) == 'refused'"]) == [1.0]
    assert score(R.code_reward, [connect], tests=[f"assert reach({listening_port}) == 'connected'"]) == [0.0]
    raw = "import _socket\ns = _socket.socket()"  # the C-level constructor is patched too
    assert score(R.code_reward, [raw], tests=["pass"]) == [0.0]


def test_extract_code_prefers_last_python_block():
    text = "```\nplain\n```\n```python\nfirst\n```\ntext\n```python\nsecond\n```"
    assert R.extract_code(text) == "second\n"
    assert R.extract_code("```\nonly plain\n```") == "only plain\n"
    assert R.extract_code("x = 1") == "x = 1"


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
