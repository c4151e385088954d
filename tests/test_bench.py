"""Smoke tests of the benchmark scripts: each `--quick` mode runs as a subprocess (cwd = a temp dir, outputs under
it) and must exit 0 and write its results. The quick modes run on CPU; bench_kernels.py is another script's owner's
and is skipped only when it is absent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_script(name, tmp_path, *flags, timeout):
    script = BENCH / name
    if not script.is_file():
        pytest.skip(f"bench/{name} is not in this checkout")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script), "--quick", *flags], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{name} --quick exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def jsonl_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_bench_learning_quick(tmp_path):
    prefix = tmp_path / "out" / "learning"
    run_script("bench_learning.py", tmp_path, "--out", str(prefix), timeout=300)
    rows = jsonl_rows(str(prefix) + ".jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert {r["algo"] for r in runs} == {"sppo", "grpo4"}
    assert all(r["evals"] and r["final_tokens"] > 0 for r in runs)
    assert {r["algo"] for r in rows if r["kind"] == "summary"} == {"sppo", "grpo4"}
    assert rows[0]["kind"] == "env" and rows[0]["torch"] and "git_dirty" in rows[0]
    assert "| SPPO (shared head) |" in Path(str(prefix) + ".md").read_text()
    assert Path(str(prefix) + ".png").stat().st_size > 10_000
    # resumable: a rerun with the same prefix reuses the finished runs instead of training again
    proc = run_script("bench_learning.py", tmp_path, "--out", str(prefix), timeout=120)
    assert "resuming: 2 finished runs" in proc.stdout and " start " not in proc.stdout


def test_bench_learning_quick_refuses_results_dir(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_learning.py"), "--quick", "--out",
                           str(BENCH / "results" / "learning-quick-test")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "never writes to bench/results" in proc.stderr
    assert not list((BENCH / "results").glob("learning-quick-test*"))


def test_bench_train_quick(tmp_path):
    prefix = tmp_path / "out" / "train"
    run_script("bench_train.py", tmp_path, "--out", str(prefix), timeout=300)
    rows = jsonl_rows(str(prefix) + ".jsonl")
    by = {r["algo"]: r for r in rows if r["kind"] == "algo"}
    assert set(by) == {"sppo", "sppo_critic", "ppo", "grpo8"}
    for r in by.values():
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["prompts_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_gib"] is None  # CPU: no memory figure claimed
    assert by["sppo"]["value_params"] < by["ppo"]["value_params"] / 100
    assert by["grpo8"]["value_params"] == 0 and by["grpo8"]["samples_per_step"] == by["sppo"]["samples_per_step"]
    assert "CPU smoke test" in Path(str(prefix) + ".md").read_text()


def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "kernels.jsonl"
    run_script("bench_kernels.py", tmp_path, "--out", str(out), timeout=300)
    assert out.is_file() and jsonl_rows(out)
