"""Interruptions and failures end resumable (issue 23, items 1, 2 and 4): real `sppo-fast train` processes in their
own session get SIGINT / SIGTERM at the process group (as a terminal, docker stop or SLURM send them) at a moment the
test waits for, never guesses: a reward plugin prints a line and holds when it reaches a chosen call, until the test
releases it. Each run then continues with `--resume` from another working directory (the first run's paths were
relative), in-process to keep CI short.

Reward calls of a run: 1 the one-row check before the model loads, 2-3 the start evaluation (greedy, sampled),
then one per step (step s: call s + 3)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sppo_fast
from sppo_fast import checkpoint
from sppo_fast.cli import main as cli_main

# the tiny model, 4 prompts a step, a 4-prompt evaluation at the start and end; a run's time is mostly its imports
FLAGS = ["--batch-size", "4", "--eval-size", "4", "--eval-k", "1", "--eval-every", "0", "--max-new-tokens", "8",
         "--no-progress", "--threads", "1", "--no-tensorboard", "--save-every", "0", "--reward", "plugin.py:fn",
         "--out-dir", "runs", "--run-name", "r"]
PLUGIN = '''
import os, sys, time
from pathlib import Path

calls = 0


def fn(prompts, completions, answer, **kw):
    global calls
    calls += 1
    if calls == int(os.environ.get("HOLD_AT_CALL", "0")):
        print(f"plugin: holding at call {calls}", flush=True)
        release = Path(os.environ["RELEASE_FILE"])
        deadline = time.time() + 120
        while not release.exists() and time.time() < deadline:
            time.sleep(0.01)
    if calls >= int(os.environ.get("RAISE_AT_CALL") or 10**9):
        raise RuntimeError("reward plugin failed on purpose")
    return [float(c.strip().startswith(a)) for c, a in zip(completions, answer)]
'''
REPO = Path(sppo_fast.__file__).resolve().parents[1]  # the subprocess runs the same checkout as this test


class Run:
    """`python -m sppo_fast.cli train FLAGS` in its own session (process group); its stdout and stderr are read as
    they come, so a test waits for a line instead of sleeping."""

    def __init__(self, cwd: Path, *flags, **env):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "PYTHONUNBUFFERED": "1", "RELEASE_FILE": str(cwd / "release"), **env}
        self.proc = subprocess.Popen([sys.executable, "-m", "sppo_fast.cli", "train", *FLAGS, *flags], cwd=cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.cwd, self.out, self.err = cwd, [], []
        self.readers = [threading.Thread(target=lambda f=f, into=into: into.extend(f), daemon=True)
                        for f, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def text(self) -> str:
        return f"--- stdout\n{''.join(self.out)}--- stderr\n{''.join(self.err)}"

    def wait_for(self, text: str, timeout: float = 180) -> None:
        """Until stdout or stderr holds a line containing `text`."""
        deadline = time.time() + timeout
        while not any(text in line for line in self.out + self.err):
            if self.proc.poll() is not None and not any(r.is_alive() for r in self.readers):
                pytest.fail(f"the run ended (status {self.proc.returncode}) before printing {text!r}\n{self.text()}")
            if time.time() > deadline:
                self.proc.kill()
                pytest.fail(f"no {text!r} within {timeout} s\n{self.text()}")
            time.sleep(0.01)

    def send(self, sig) -> None:
        os.killpg(self.proc.pid, sig)  # the whole group, as a terminal's Ctrl-C or `kill -TERM -PGID` does

    def release(self) -> None:
        (self.cwd / "release").touch()

    def finish(self, timeout: float = 180) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            pytest.fail(f"the run did not end within {timeout} s\n{self.text()}")
        for reader in self.readers:
            reader.join(timeout=10)
        return self.proc.returncode


# each test's first run: its flags and the plugin's instructions (see the module docstring for the call numbers)
FIRST_RUNS = {
    "sigint_at_start": (["--steps", "2"], {"HOLD_AT_CALL": "2"}),  # the start evaluation's greedy pass
    "sigterm_in_step": (["--steps", "4"], {"HOLD_AT_CALL": "5"}),  # step 2's reward
    "sigint_twice": (["--steps", "4", "--save-every", "1"], {"HOLD_AT_CALL": "5"}),
    "raises_in_step_3": (["--steps", "3"], {"RAISE_AT_CALL": "6"}),
}


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory):
    """Every test's first run, started together: their imports (most of a run's time) overlap on CI's two cores.
    Each test drives its own and finds it in tmp_path/first."""
    runs = {}
    for name, (flags, env) in FIRST_RUNS.items():
        cwd = tmp_path_factory.mktemp(name).resolve() / "first"  # resolved: as the run's os.getcwd() sees it
        cwd.mkdir()
        (cwd / "plugin.py").write_text(PLUGIN)
        runs[name] = Run(cwd, *flags, **env)
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.send(signal.SIGKILL)


def resume_elsewhere(run: Run, monkeypatch, capsys, *flags) -> tuple[int, str]:
    """`sppo-fast train --resume ../first/runs/r` from another directory, in-process: (status, stdout)."""
    for var in ("HOLD_AT_CALL", "RAISE_AT_CALL"):
        monkeypatch.delenv(var, raising=False)
    elsewhere = run.cwd.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    rc = cli_main(["train", "--resume", "../first/runs/r", *flags])
    return rc, capsys.readouterr().out


def steps_on_disk(run_dir) -> list:
    return [int(p.name.split("_")[1]) for p in checkpoint.list_checkpoints(run_dir)]


def test_sigint_during_the_start_evaluation_leaves_a_run_that_resumes_from_step_0(first_runs, monkeypatch, capsys):
    run = first_runs["sigint_at_start"]
    run.wait_for("plugin: holding at call 2")  # inside the start evaluation's greedy pass
    run.send(signal.SIGINT)
    assert run.finish() == 130, run.text()
    lines = "".join(run.err).strip().splitlines()
    run_dir = run.cwd / "runs" / "r"
    assert "Traceback" not in "".join(run.err) and len(lines) == 1, run.text()
    assert lines[0] == (f"sppo-fast train: SIGINT: stopped before a step completed, nothing to save; "
                        f"`sppo-fast train --resume {run_dir}` starts it again from step 0 (no step was saved)")
    assert (run_dir / "config.yaml").is_file() and steps_on_disk(run_dir) == []
    # config.yaml holds absolute paths: the relative --reward plugin.py:fn resolves from anywhere
    assert f"reward: {run.cwd / 'plugin.py'}:fn" in (run_dir / "config.yaml").read_text()

    rc, out = resume_elsewhere(run, monkeypatch, capsys)
    assert rc == 0, out
    assert "has no checkpoint (it stopped before its first save): starting it from step 0" in out
    assert "eval at end" in out and steps_on_disk(run_dir) == [2]


def test_sigterm_during_a_step_saves_it_and_resume_finishes_the_run(first_runs, monkeypatch, capsys):
    run = first_runs["sigterm_in_step"]
    run.wait_for("plugin: holding at call 5")
    run.send(signal.SIGTERM)
    run.wait_for("SIGTERM: finishing this step")  # the handler ran: now let the step end
    run.release()
    assert run.finish() == 143, run.text()
    run_dir = run.cwd / "runs" / "r"
    lines = "".join(run.err).strip().splitlines()
    assert "Traceback" not in "".join(run.err) and len(lines) == 2, run.text()  # the notice, then the outcome
    assert lines[1] == (f"sppo-fast train: interrupted: saved {run_dir}/checkpoints/step_000002 (SIGTERM during "
                        f"step 2); `sppo-fast train --resume {run_dir}` continues it")
    assert steps_on_disk(run_dir) == [2]

    rc, out = resume_elsewhere(run, monkeypatch, capsys)
    assert rc == 0 and "at step 2" in out, out
    assert steps_on_disk(run_dir)[-1] == 4
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "losses/policy" in r] == [1, 2, 3, 4]  # every step logged once


def test_a_second_signal_quits_at_once_keeping_the_last_checkpoint(first_runs):
    run = first_runs["sigint_twice"]
    run.wait_for("plugin: holding at call 5")  # step 1 is saved; step 2 is in its reward
    run.send(signal.SIGINT)
    run.wait_for("SIGINT: finishing this step")
    run.send(signal.SIGINT)  # the plugin still holds: only the second signal can end the step
    assert run.finish() == 130, run.text()
    run_dir = run.cwd / "runs" / "r"
    lines = "".join(run.err).strip().splitlines()
    assert "Traceback" not in "".join(run.err) and len(lines) == 2, run.text()
    assert lines[1] == (f"sppo-fast train: SIGINT: quit at once, without saving (during step 2); "
                        f"`sppo-fast train --resume {run_dir}` continues from step_000001")
    assert steps_on_disk(run_dir) == [1]


def test_an_exception_in_step_3_saves_step_2_and_keeps_its_traceback(first_runs, monkeypatch, capsys):
    run = first_runs["raises_in_step_3"]
    assert run.finish() == 1, run.text()
    err = "".join(run.err)
    assert "Traceback" in err and "reward plugin failed on purpose" in err, run.text()
    run_dir = run.cwd / "runs" / "r"
    assert (f"sppo-fast train: step 3 raised RuntimeError; saved the last completed step, {run_dir}/checkpoints/"
            f"step_000002; `sppo-fast train --resume {run_dir}` continues from it") in err, run.text()
    assert steps_on_disk(run_dir) == [2]

    # the save put the data position and RNG back to the end of step 2: the resumed step 3 is the uninterrupted one
    rc, _ = resume_elsewhere(run, monkeypatch, capsys)
    assert rc == 0
    assert cli_main(["train", *FLAGS, "--steps", "3", "--run-name", "straight", "--reward",
                     f"{run.cwd / 'plugin.py'}:fn"]) == 0

    def step_3(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["step"] == 3 and "losses/policy" in r)

    resumed, straight = step_3(run_dir), step_3(run.cwd.parent / "elsewhere" / "runs" / "straight")
    for key in ("losses/policy", "losses/value", "reward/mean", "rollout/response_len"):
        assert resumed[key] == straight[key], key


def test_resume_names_the_path_it_uses_when_the_original_moved(tmp_path, monkeypatch):
    """config.yaml stores --data absolute; when that file moved, the path given now wins and the run says so.
    Preflight and the run directory only: no model loads."""
    import torch

    from sppo_fast.cli import build_args
    from sppo_fast.config import ConfigError
    from sppo_fast.prepare import open_run_dir, preflight

    cpu = torch.device("cpu")
    (tmp_path / "old").mkdir()
    rows = "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(20))
    (tmp_path / "old" / "d.jsonl").write_text(rows)
    monkeypatch.chdir(tmp_path / "old")
    open_run_dir(preflight(build_args(["--eval-size", "4", "--data", "d.jsonl", "--out-dir", "../runs"]), cpu), cpu)
    run_dir = next((tmp_path / "runs").iterdir())
    assert f"data: {tmp_path / 'old' / 'd.jsonl'}\n" in (run_dir / "config.yaml").read_text()

    (tmp_path / "new").mkdir()
    (tmp_path / "old" / "d.jsonl").rename(tmp_path / "new" / "d.jsonl")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"--data .*{tmp_path / 'old' / 'd.jsonl'}"):
        preflight(build_args(["--resume", str(run_dir)]), cpu)
    pre = preflight(build_args(["--resume", str(run_dir), "--data", "new/d.jsonl"]), cpu)
    assert (f"--resume: using --data {tmp_path / 'new' / 'd.jsonl'} (config.yaml had {tmp_path / 'old' / 'd.jsonl'})"
            in pre.notes)
    assert pre.args.data == str(tmp_path / "new" / "d.jsonl")
