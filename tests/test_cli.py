"""The command line as a new user meets it: mistakes fail early, in one line, with exit status 2 and no run directory;
runs never mix; a resume cuts the metrics back and skips a damaged checkpoint; output is quiet; presets load.

One test per reproduction class of issue 13 (and the presets / separate clipping of issue 12). Most tests stop in
`train.preflight`, before any model loads; the few that train run 1-3 steps of the embedded tiny model."""
import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from sppo_fast import checkpoint
from sppo_fast.cli import build_args, coerce, train_parser
from sppo_fast.cli import main as cli_main
from sppo_fast.metrics import panel_keys, read_metrics
from sppo_fast.train import Args, ConfigError, check_args, clip_grad_norms, main, pearson, preflight

FAST = ["--steps", "2", "--batch-size", "8", "--eval-size", "8", "--eval-k", "1", "--eval-every", "0",
        "--max-new-tokens", "24", "--no-progress", "--threads", "1"]
CPU = torch.device("cpu")


def train_cli(tmp_path, *flags, capsys=None):
    """`sppo-fast train FLAGS` in-process: (exit status, stderr)."""
    rc = cli_main(["train", *FAST, "--out-dir", str(tmp_path), "--run-name", "run", *flags])
    return rc, capsys.readouterr().err if capsys else ""


def check(tmp_path, *flags):
    """preflight only: every check that runs before a model loads."""
    return preflight(build_args([*FAST, "--out-dir", str(tmp_path), "--run-name", "run", *flags]), CPU)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# --- 1. one typed config: YAML values are typed like flags -----------------------------------------------------------
def test_yaml_values_are_typed_like_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-5\nvalue_lr: 2e-3\nstop_strings: ',;'\nsteps: '7'\n")  # YAML 1.1: 1e-5 is a string
    args = build_args(["--config", str(cfg)])
    assert args.lr == 1e-5 and isinstance(args.lr, float) and args.value_lr == 2e-3
    assert args.stop_strings == [",;"]  # one stop string, not its two characters
    assert args.steps == 7
    cfg.write_text("steps: two\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: steps \(--steps\) must be an integer, got 'two'"):
        build_args(["--config", str(cfg)])
    cfg.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"lr \(--lr\) must be a number, got 'fast'"):
        build_args(["--config", str(cfg)])
    cfg.write_text("chat_template: 'yes please'\n")
    with pytest.raises(ConfigError, match="chat_template .* must be true or false"):
        build_args(["--config", str(cfg)])
    assert coerce("stop_strings", ["</a>", "###"], list, "x") == ["</a>", "###"]
    with pytest.raises(ConfigError, match="must be an integer"):
        coerce("steps", True, int, "x")  # a YAML `yes` is not a step count


def test_args_built_in_code_are_type_checked():
    with pytest.raises(ConfigError, match="--steps must be an integer, got 'two'"):
        check_args(Args(steps="two"))
    with pytest.raises(ConfigError, match="--stop-strings must be a list of strings"):
        check_args(Args(stop_strings=",;"))


# --- 1. ranges: nonsense is refused before anything loads, naming the flag and the valid range ----------------------
@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], r"--lr must be in \[0, inf\), got -1.0"),
    (["--value-lr", "-5"], r"--value-lr must be in \[0, inf\)"),
    (["--eval-every", "-1"], r"--eval-every must be in \[0, inf\)"),
    (["--save-every", "-1"], r"--save-every must be in \[0, inf\)"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    (["--top-p", "2"], r"--top-p must be in \(0, 1\], got 2.0"),
    (["--eval-k", "0"], r"--eval-k must be in \[1, inf\), got 0"),
    (["--temperature", "0"], r"--temperature must be in \(0, inf\)"),
    (["--dual-clip", "0.5"], r"--dual-clip must be 0 \(off\) or > 1"),
    (["--device", "gpu"], r"--device must be auto, cpu, cuda or cuda:N"),
    (["--memory-budget", "lots"], r"--memory-budget: cannot read a memory size"),
    (["--grad-clip", "both"], r"--grad-clip must be one of separate, joint"),
])
def test_bad_values_exit_2_with_one_line_and_no_run_dir(tmp_path, capsys, flags, message):
    rc, err = train_cli(tmp_path, *flags, capsys=capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppo-fast train: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--lr"):
        cli_main(["train", "--lr", "-1", "--debug", "--out-dir", str(tmp_path)])
    monkeypatch.setenv("SPPO_FAST_DEBUG", "1")
    with pytest.raises(ConfigError, match="--lr"):
        cli_main(["train", "--lr", "-1", "--out-dir", str(tmp_path)])
    monkeypatch.delenv("SPPO_FAST_DEBUG")
    import sppo_fast.train as train_mod
    monkeypatch.setattr(train_mod, "preflight", lambda *a: 1 / 0)  # a bug, not a user error
    with pytest.raises(ZeroDivisionError):
        cli_main(["train", *FAST, "--out-dir", str(tmp_path)])


def test_user_error_exits_2_in_a_real_process(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sppo_fast.cli", "train", "--eval-k", "0", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["sppo-fast train: error: --eval-k must be in [1, inf), got 0"]


# --- 1. data and reward are checked before the model loads ------------------------------------------------------------
def test_data_errors_name_the_flag(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(40)])
    with pytest.raises(ConfigError, match=r"--eval-size 256 leaves no training rows: .*small\.jsonl has 40 rows"):
        check(tmp_path, "--data", str(small), "--eval-size", "256")
    pre = check(tmp_path, "--data", str(small), "--eval-size", "5")
    assert (len(pre.train_rows), len(pre.eval_rows)) == (35, 5)
    other = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}] * 10)
    with pytest.raises(ConfigError, match=r"missing field 'prompt' .*--prompt-field names the column"):
        check(tmp_path, "--data", str(other), "--eval-size", "2")
    assert check(tmp_path, "--data", str(other), "--eval-size", "2", "--prompt-field", "question").train_rows
    with pytest.raises(ConfigError, match=r"--data dataset file not found"):
        check(tmp_path, "--data", str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"--reward: unknown reward 'exactly'"):
        check(tmp_path, "--reward", "exactly")
    with pytest.raises(ConfigError, match=r"--reward: reward plugin file not found"):
        check(tmp_path, "--reward", "missing.py:fn")
    assert not (tmp_path / "run").exists()


def test_code_reward_needs_tests_not_answers(tmp_path):
    rows = [{"prompt": f"Write f() returning {i}.", "tests": [f"assert f() == {i}"]} for i in range(6)]
    code = write_jsonl(tmp_path / "code.jsonl", rows)
    pre = check(tmp_path, "--data", str(code), "--reward", "code", "--eval-size", "2")
    assert len(pre.train_rows) == 4 and pre.train_rows[0]["answer"] is None
    no_tests = write_jsonl(tmp_path / "nt.jsonl", [{"prompt": "p", "answer": "1"}] * 6)
    with pytest.raises(ConfigError, match=r"missing field 'tests' .*--reward code reads the column 'tests'"):
        check(tmp_path, "--data", str(no_tests), "--reward", "code", "--eval-size", "2")


def test_plugin_reward_columns_come_from_its_signature(tmp_path):
    plugin = tmp_path / "r.py"
    plugin.write_text("def fn(prompts, completions, difficulty, **kw):\n    return [0.0] * len(completions)\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "1"}] * 6)
    with pytest.raises(ConfigError, match=r"missing field 'difficulty' .*reads the column 'difficulty'"):
        check(tmp_path, "--data", str(data), "--reward", f"{plugin}:fn", "--eval-size", "2")


def test_prompts_longer_than_the_context_are_filtered_or_refused(tmp_path):
    # the tiny model's context is 64 positions; with 24 new tokens a prompt may hold 40
    rows = [{"prompt": "1+2=", "answer": "3"}] * 10 + [{"prompt": "1+" * 25 + "1=", "answer": "26"}] * 4
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    pre = check(tmp_path, "--data", str(data), "--eval-data", str(data))
    assert len(pre.train_rows) == 10
    assert any("skipped 4 train and 4 eval prompts longer than 40 tokens (the model's context 64 minus "
               "--max-new-tokens 24)" in n for n in pre.notes), pre.notes
    long_only = write_jsonl(tmp_path / "long.jsonl", rows[10:] * 3)
    with pytest.raises(ConfigError, match=r"train data: all 10 prompts are longer than 40 tokens .*the limit is the model's context 64"):
        check(tmp_path, "--data", str(long_only), "--eval-size", "2")
    with pytest.raises(ConfigError, match=r"--max-new-tokens 64 leaves no room for a prompt .*context of 64"):
        check(tmp_path, "--max-new-tokens", "64")


def test_reward_of_two_suggests_mse_before_the_model_loads(tmp_path):
    plugin = tmp_path / "big.py"
    plugin.write_text("def fn(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    with pytest.raises(ConfigError, match=r"gave 2 for sample 0, outside \[0, 1\].*--value-loss mse"):
        check(tmp_path, "--reward", f"{plugin}:fn")
    check(tmp_path, "--reward", f"{plugin}:fn", "--value-loss", "mse")


# --- 3. runs never mix -----------------------------------------------------------------------------------------------
def test_runs_never_mix_and_resume_skips_a_damaged_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli(tmp_path, "--save-every", "1", "--keep-last", "5")[0] == 0
    first = read_metrics(run_dir)
    # the same --run-name again is refused, and the first run is untouched
    rc, err = train_cli(tmp_path, capsys=capsys)
    assert rc == 2 and "already exists: continue it with --resume" in err and "--overwrite" in err
    assert read_metrics(run_dir) == first

    # a crash after step 2's checkpoint: rows of steps past it, a half-written last line, an interrupted save,
    # and the newest checkpoint damaged (its weights file cut short)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "losses/policy": 0.5}) + "\n" + '{"step": 4, "losses/po')
    assert cli_main(["plot", str(run_dir)]) == 0  # the torn last line does not stop the plot
    (run_dir / "checkpoints" / "step_000003.tmp").mkdir()
    weights = run_dir / "checkpoints" / "step_000002" / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert cli_main(["train", *FAST, "--steps", "3", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "--resume: skipped" in out and "step_000002" in out and "model.safetensors" in out
    assert "resumed from" in out and "step_000001 at step 1" in out
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    rows = read_metrics(run_dir)
    train_steps = [r["step"] for r in rows if "losses/policy" in r]
    assert train_steps == [1, 2, 3]  # step 1 from the first run, 2 and 3 retrained: every step once
    assert rows[:2] == first[:2]
    # TensorBoard, read as TensorBoard reads it: the first run's events after step 1 are purged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("losses/policy")] == [1, 2, 3]

    # --overwrite starts again from nothing
    assert train_cli(tmp_path, "--steps", "1", "--overwrite")[0] == 0
    assert [r["step"] for r in read_metrics(run_dir) if "losses/policy" in r] == [1]
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step_000001"


def test_checkpoint_verification(tmp_path):
    result = main(build_args([*FAST, "--steps", "1", "--out-dir", str(tmp_path), "--run-name", "r"]))
    ckpt = checkpoint.list_checkpoints(result["run_dir"])[-1]
    assert checkpoint.verify(ckpt) is None
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert "trainer.safetensors" in manifest and "value_head.safetensors" in manifest
    (ckpt / "value_head.safetensors").write_bytes(b"\0" * 3)
    assert "value_head.safetensors has 3 bytes" in checkpoint.verify(ckpt)
    with pytest.raises(ValueError, match="checkpoint .* is damaged: value_head.safetensors"):
        checkpoint.newest_valid(ckpt)
    with pytest.raises(ValueError, match="no checkpoint in .* verifies"):
        checkpoint.newest_valid(result["run_dir"])


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume continues a run and --overwrite deletes it"):
        check_args(Args(resume=str(tmp_path), overwrite=True))


# --- 5. quiet, meaningful output -------------------------------------------------------------------------------------
def test_no_third_party_import_noise():
    # transformers imports torchao whenever it is installed; importing it alone makes the same noise, faster
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed")
    code = "from sppo_fast.cli import quiet_third_party; quiet_third_party()\nimport torchao\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Failed to load" not in out.stderr and "_pytree" not in out.stderr, out.stderr


def test_undefined_metrics_are_omitted_not_nan(tmp_path):
    assert pearson(torch.ones(5), torch.arange(5.0)) is None
    assert pearson(torch.arange(5.0), torch.arange(5.0)) == pytest.approx(1.0)
    plugin = tmp_path / "zero.py"  # every reward 0: Pearson(V, R) is undefined at every step and evaluation
    plugin.write_text("def fn(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    result = main(build_args([*FAST, "--steps", "1", "--out-dir", str(tmp_path), "--run-name", "z",
                              "--reward", f"{plugin}:fn"]))
    rows = read_metrics(result["run_dir"])
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert not any("pearson" in k for r in rows for k in r)
    assert "value_pearson" not in result["start"]


def test_help_is_grouped_and_shows_the_demo_values():
    text = train_parser().format_help()
    headings = ["run:", "model and data:", "algorithm:", "evaluation:", "engineering:", "logging and checkpoints:"]
    positions = [text.index("\n" + h + "\n") for h in headings]
    assert positions == sorted(positions)
    flat = " ".join(text.split())  # argparse wraps lines
    assert "(default: 200; demo: 100)" in flat  # --steps
    assert "sppo_fast/presets/tiny.yaml" in flat
    for name in ("--steps", "--grad-clip", "--value-max-grad-norm", "--overwrite", "--preset"):
        assert re.search(rf"\n  {name}[ ,\n]", text), name
    assert len(text.splitlines()[0]) < 100  # a one-line usage, not every flag


def test_plot_errors_are_user_errors(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 1, "a"\n{"step": 2, "a": 3}\n')
    assert cli_main(["plot", str(tmp_path)]) == 2  # a damaged line in the middle is not a torn last line
    assert "metrics.jsonl line 2: not valid JSON" in capsys.readouterr().err


def test_plot_leads_with_learning_curves_and_skips_flat_series():
    rows = [{"step": s, "perf/rollout_s": 1.0 + s, "stats/clipfrac": 0.0, "losses/policy": 0.1 * s,
             "reward/mean": 0.2 * s, "eval/pass@1": 0.3 + 0.1 * s, "value/pearson": 0.1 * s,
             "lr/policy": 1e-6} for s in range(4)]
    keys = panel_keys(rows)
    assert keys == ["eval/pass@1", "reward/mean", "value/pearson", "losses/policy", "perf/rollout_s"]


# --- issue 12: presets of the official runs, separate clipping -------------------------------------------------------
@pytest.mark.parametrize("preset, expect", [
    ("deepscaler-1.5b", dict(batch_size=256, num_minibatches=2, lr=1e-6, value_lr=5e-6, weight_decay=0.01,
                             value_weight_decay=0.01, max_new_tokens=8192, max_prompt_tokens=1024, steps=2000)),
    ("dapo-7b", dict(batch_size=512, num_minibatches=16, lr=1e-6, value_lr=1e-5, weight_decay=0.1,
                     value_weight_decay=0.01, max_new_tokens=8192, max_prompt_tokens=2048, steps=200)),
])
def test_official_presets_load_and_flags_override_them(tmp_path, preset, expect):
    args = build_args(["--preset", preset, "--model", "/models/x"])
    check_args(args)
    for key, value in expect.items():
        assert getattr(args, key) == value, key
    assert (args.critic, args.loss_agg, args.temperature, args.grad_clip) == ("policy", "seq-mean-token-mean", 0.6,
                                                                             "separate")
    assert (args.clip_low, args.clip_high, args.dual_clip, args.max_grad_norm, args.value_max_grad_norm) == (
        0.2, 0.2, 3.0, 1.0, 1.0)
    assert build_args(["--preset", preset, "--model", "/m", "--lr", "2e-6"]).lr == 2e-6
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 32\n")
    assert build_args(["--preset", preset, "--model", "/m", "--config", str(cfg)]).batch_size == 32
    with pytest.raises(ConfigError, match=f"--preset {preset} .* --model"):
        build_args(["--preset", preset])
    with pytest.raises(ConfigError, match="no such preset; available: dapo-7b, deepscaler-1.5b, tiny"):
        build_args(["--preset", "llama-70b", "--model", "/m"])


def _two_group_optimizer(policy_grad: float, value_grad: float):
    policy, value = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(1))
    policy.grad, value.grad = torch.full((4,), policy_grad / 2), torch.tensor([value_grad])  # norms as given
    opt = torch.optim.SGD([{"params": [policy]}, {"params": [value]}], lr=1.0)
    return opt, policy, value


def test_policy_and_value_gradients_are_clipped_apart():
    opt, policy, value = _two_group_optimizer(3.0, 0.5)
    gn, vgn = clip_grad_norms(opt, Args(max_grad_norm=1.0, value_max_grad_norm=1.0))
    assert (gn.item(), vgn.item()) == pytest.approx((3.0, 0.5))
    assert policy.grad.norm().item() == pytest.approx(1.0) and value.grad.item() == pytest.approx(0.5)
    opt, policy, value = _two_group_optimizer(3.0, 4.0)
    clip_grad_norms(opt, Args(max_grad_norm=0.0, value_max_grad_norm=2.0))  # 0 = no clipping of the policy
    assert policy.grad.norm().item() == pytest.approx(3.0) and value.grad.item() == pytest.approx(2.0)
    opt, policy, value = _two_group_optimizer(3.0, 4.0)
    gn, vgn = clip_grad_norms(opt, Args(grad_clip="joint", max_grad_norm=1.0))  # one norm of 5 over both
    assert gn.item() == pytest.approx(5.0) and vgn is None
    assert value.grad.item() == pytest.approx(0.8) and policy.grad.norm().item() == pytest.approx(0.6)


def test_training_logs_both_gradient_norms(tmp_path, capsys):
    result = main(build_args([*FAST, "--steps", "1", "--out-dir", str(tmp_path), "--run-name", "g",
                              "--grad-clip", "separate"]))
    step = next(r for r in read_metrics(result["run_dir"]) if "losses/policy" in r)
    assert step["stats/grad_norm"] > 0 and step["stats/value_grad_norm"] > 0
    assert "the clip never acts" in capsys.readouterr().out  # one minibatch: the ratio is 1 by construction
