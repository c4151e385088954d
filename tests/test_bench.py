"""Smoke tests of the benchmark scripts: each `--quick` mode runs as a subprocess (cwd = a temp dir, outputs under
it) and must exit 0 and write its results; `gpu_check.py --dry-run` runs every GPU-check part (bench_kernels.py,
bench_memory.py, bench_rollout.py included) at tiny sizes. All on CPU."""
import json
import math
import os
import re
import subprocess
import sys
import time
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
    # per-prompt results of the final eval (issue 24): one 0/1 per greedy prompt, one 0..k count per prompt
    for r in runs:
        assert len(r["final_pass1_per_prompt"]) == r["eval_size"] == len(r["final_avgk_counts"])
        assert r["final_pass1_per_prompt"].count("1") / r["eval_size"] == pytest.approx(r["final_pass1"])
        assert sum(map(int, r["final_avgk_counts"])) / (r["eval_size"] * r["eval_k"]) == pytest.approx(r["final_avgk"])
    # resumable: a rerun with the same prefix reuses the finished runs instead of training again
    proc = run_script("bench_learning.py", tmp_path, "--out", str(prefix), timeout=120)
    assert "resuming: 2 finished runs" in proc.stdout and " start " not in proc.stdout
    # the per-horizon figure and table read finished JSONLs
    run_script("bench_learning.py", tmp_path, "--plot-horizons", str(prefix) + ".jsonl", "--out", str(tmp_path / "h"),
               timeout=120)
    table = (tmp_path / "h.md").read_text()
    assert "| 20 | " in table and "| SPPO (shared head) |" in table and "| GRPO G=4 |" in table
    assert (tmp_path / "h.png").stat().st_size > 10_000
    # the token statistics of the chosen configurations, from reruns that must reproduce the committed runs
    cal = tmp_path / "cal"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_value_calibration.py"), "--from", str(prefix),
                           "--algos", "sppo,grpo4", "--seed", "0", "--fresh-seeds", "0", "--out", str(cal)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reruns = jsonl_rows(str(cal) + ".jsonl")[1:]
    assert [r["algo"] for r in reruns] == ["sppo", "grpo4"] and all(r["reproduces"] for r in reruns)
    for r in reruns:  # a Pearson per step (None where R or A was constant in that step)
        assert len(r["train_advantage_reward_pearson"]) == r["steps"]
        assert all(x is None or -1 <= x <= 1 for x in r["train_advantage_reward_pearson"])
    assert "| 20 | SPPO (shared head) | yes |" in (cal.parent / "cal.md").read_text()


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


def _wheel(directory, name, version):
    """A minimal pure-Python wheel (one module, dist-info without hashes), as pip installs it."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for key, text in files.items():
            z.writestr(key, text)


def test_gpu_check_dry_run(tmp_path):
    """Every part of the one-call GPU check runs at tiny sizes on CPU, after the wheels and the probe; a bad wheel
    and a second version of one project are reported and the run goes on; the three outputs hold what the device
    run will bring back, the probe and the plan first."""
    out = tmp_path / "gpu_check"
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "gcdemo", "1.0")
    _wheel(wheels, "gcdemo", "2.0")
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out), "--wheels",
                           str(wheels)], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.startswith("Plan (") and "| kernels_qwen | a |" in proc.stdout  # the plan, printed first
    assert sorted(p.name for p in out.iterdir()) == ["logs.txt", "results.jsonl", "summary.md"]
    rows = jsonl_rows(out / "results.jsonl")
    assert [(r["wheel"], r["status"].split(" ")[0]) for r in rows if r["kind"] == "wheel"] == [
        ("gcdemo-1.0-py3-none-any.whl", "skipped:"), ("broken-1.0-py3-none-any.whl", "failed"),
        ("gcdemo-2.0-py3-none-any.whl", "installed")]
    env_row = next(r for r in rows if r["kind"] == "env")
    assert env_row["dry_run"] and env_row["torch"] and "git_sha" in env_row and env_row["sppo_fast_kernels"] == "ok"
    assert env_row["triton_launch"] == "skipped: no CUDA" and env_row["probe_rc"] == 0 and env_row["cc"]
    parts = {r["part"]: r for r in rows if r["kind"] == "part"}
    assert list(parts) == ["kernels_qwen", "kernels_llama", "memory", "train", "rollout_hf", "pytest", "qlora",
                           "rollout_more", "train_more", "cli", "kernels_more", "memory_more"]
    assert parts["pytest"]["status"] == "skipped: no CUDA"
    dry_skipped = {"kernels_llama", "train_more", "memory_more"}  # the same scripts as earlier parts: CI time
    assert all(parts[name]["status"].startswith("skipped: dry run") for name in dry_skipped)
    assert all(p["status"] == "ok" and p["rows"] > 0 for name, p in parts.items()
               if name not in dry_skipped | {"pytest"}), parts
    by = lambda part: [r for r in rows if r["kind"] == "row" and r["part"] == part]
    cli = by("cli")[0]
    assert cli["steps"] == 2 and cli["finite_losses"] and cli["median_tokens_per_s"] > 0
    methods = [r["method"] for r in by("kernels_qwen")]
    assert methods[0] == "floor_3gemm" and methods[-1] == "torch_compile_naive"  # ours and the floor first
    assert any(r.get("median_ms") for r in by("kernels_qwen")) and any(r.get("median_ms") for r in by("kernels_more"))
    assert {r["backend"] for r in by("rollout_hf") if r["row_kind"] == "backend" and r["tok_per_s"] > 0} == {"hf"}
    assert {r["backend"] for r in by("rollout_more") if r["row_kind"] == "backend" and r["tok_per_s"] > 0} == \
        {"hf-static", "paged"}
    assert all(r["x_hf"] > 0 for r in by("rollout_more") if r["row_kind"] == "backend")  # against rollout_hf's hf
    assert [(r["setting"], r["step_s"] > 0) for r in by("memory")] == [("8bit", True)]
    (q,) = by("qlora")  # issue 25's rung, both phases, through the trainer's own functions (tiny shape, CPU)
    assert (q["setting"], q["arch"], q["quantize"], q["lora_rank"], q["steps"]) == ("qlora", "tiny", "nf4", 16, 2)
    assert q["step_s"] > 0 and q["rollout_s"] > 0 and q["rollout_tokens"] == 8 and "error" not in q
    assert q["estimate_update_gib"] > 0 and q["estimate_rollout_gib"] > 0 and q["peak_update_gib"] is None
    t = _bench_module("bench_memory").TINY  # trainable: rank-16 adapters on the 7 linears (q, k, v, o: h x h here)
    h, i = t["hidden_size"], t["intermediate_size"]
    assert q["trainable_params"] == t["num_hidden_layers"] * 16 * (4 * 2 * h + 3 * (h + i)) + h + 1 < q["params"] / 4
    train = [r for r in by("train") if r["row_kind"] == "algo"]
    assert [r["algo"] for r in train] == ["sppo"] and train[0]["memory_plan_flag"] == "8bit"
    assert train[0]["value_fn_states"] == "measured"
    summary = (out / "summary.md").read_text()
    assert summary.index("## Probe") < summary.index("## Parts") < summary.index("## Targets")
    assert "Dry run" in summary and "| rollout_hf | c |" in summary and "Wheels: 1 of 3 installed" in summary
    assert "- broken-1.0-py3-none-any.whl: failed" in summary
    assert "| SPPO peak <= 0.55x PPO's at the same 8bit plan | train | not measured |" in summary
    assert "per phase (1.5B; 7B if the budget allows) | qlora | not measured |" in summary  # no GPU peak on CPU
    logs = (out / "logs.txt").read_text()
    assert logs.startswith("===== probe (rc 0)") and all(f"===== {name}:" in logs for name in parts
                                                          if not parts[name]["status"].startswith("skipped"))


def test_gpu_check_part_budget_kills_a_hang_and_keeps_going(tmp_path):
    """A part past its budget is killed with its whole process group (bench scripts start workers of their own);
    a crashing part is reported as failed; neither stops the caller."""
    gpu_check = _gpu_check()
    log = tmp_path / "part.log"
    hang = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print('child', c.pid, flush=True); time.sleep(60)")
    t0 = time.monotonic()
    assert gpu_check.run_commands([[sys.executable, "-c", hang]], 3, log, dict(os.environ)) == ("timeout", None)
    assert time.monotonic() - t0 < 30
    child = int(log.read_text().split("child ")[1].split()[0])
    time.sleep(0.5)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z", "the part's child outlived it"
    status = gpu_check.run_commands([[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", "1"]], 30,
                                    log, dict(os.environ))
    assert status == ("failed", 3)
    assert "killed after its 3 s budget" in log.read_text()


def _gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_plan_puts_the_headline_in_the_first_300_s():
    """The wheels and the probe run before every part; then the kernel headline (a), the memory headline (b) and
    the rollout headline (c), in that order, ending within 300 s by the parts' stated estimates; the rest after
    them. The whole command stays under the device's 10-minute limit, and `--plan` prints the plan without running
    anything."""
    gc = _gpu_check()
    rows = gc.plan()
    assert [r["name"] for r in rows[:2]] == ["wheels", "probe"]
    tiers = [r["tier"] for r in rows[2:]]
    assert tiers == sorted(tiers, key=["a", "b", "c", "rest"].index)
    assert tiers[:5] == ["a", "a", "b", "b", "c"]
    head_end = max(r["start_s"] + r["estimate_s"] for r in rows if r["tier"] in ("-", "a", "b", "c"))
    assert head_end <= 300, head_end
    # even if every earlier step runs to its budget, tiers a-c get their whole budgets within the time limit
    assert max(r["worst_start_s"] + r["budget_s"] for r in rows if r["tier"] in ("-", "a", "b", "c")) <= \
        gc.TIME_LIMIT
    assert all(r["budget_s"] >= r["estimate_s"] and r["basis"] for r in rows)
    assert all(p.covers for p in gc.PARTS)
    assert gc.TIME_LIMIT <= 600 - 60 and f"<= {gc.TIME_LIMIT} s" in gc.__doc__
    # each kernel shape has its own part; ours come first and torch.compile last in the headline selection
    head = gc.KERNEL_HEADLINE.split(",")
    assert head[0].startswith("ours_") and head[-1] == "torch_compile_naive"
    assert {"liger_flce", "cce_exact", "cce_filtered", "torch_linear_ce"} <= set(head)
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--plan"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and f"end at {head_end} s by the estimates" in proc.stdout
    assert all(f"| {p.name} | {p.tier} |" in proc.stdout for p in gc.PARTS)


def test_gpu_check_memory_headline_is_the_rungs_estimated_within_20_gib():
    """The memory part's rungs are exactly those whose estimate for bench_memory.py's default update is <= 20 GiB,
    and its budget's basis (9 compiled torchao step signatures for the 1.5B model + value head) holds."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sppo_fast import memory

    gc = _gpu_check()
    bm = _bench_module("bench_memory")
    cfg = Qwen2Config(**bm.QWEN2_15B)
    shape = memory.model_shape(cfg)
    fits = {level for level in memory.LEVELS if level != "qlora"  # LoRA, not full-parameter: the qlora part's
            and memory.estimate(shape, level, micro_batch_tokens=8 * 2048, seq_len=2048, prompt_len=512,
                               gen_batch_size=8, cuda=True).update_peak <= gc.TARGET_GIB * memory.GiB}
    assert fits == set(gc.MEMORY_HEADLINE) and not fits & set(gc.MEMORY_REST)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    # torchao compiles its step per (shape, quantized or not); the value head Linear(H, 1) adds its weight and bias
    signatures = {(tuple(p.shape), p.numel() >= memory.QUANT_MIN_SIZE and p.numel() % memory.QUANT_BLOCK == 0)
                  for p in model.parameters()} | {((1, cfg.hidden_size), False), ((1,), False)}
    assert len(signatures) == 9 and "9 here" in gc.PART_BY_NAME["memory"].basis


def test_gpu_check_qlora_shapes_quantize_and_the_planner_sizes_them():
    """The qlora part's two shapes: the 1.5B and Qwen2.5-7B's (7.62 B parameters, untied head) build on the meta
    device, every decoder linear is one NF4 can hold (the trainer's check), and the planner's estimate for the
    part's sizes, at the rung's default rank, is one a 24 GB card holds in both phases."""
    import torch
    from transformers import Qwen2ForCausalLM

    from sppo_fast import memory, quant

    gc = _gpu_check()
    bm = _bench_module("bench_memory")
    assert [arch for arch, _ in gc.QLORA_RUNS] == ["qwen2-1.5b", "qwen2.5-7b"] and set(bm.ARCHS) >= {"qwen2.5-7b"}
    for arch, new_tokens in gc.QLORA_RUNS:
        config = bm._qwen2_config(bm.ARCHS[arch])
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        quant.check_shapes(model)
        n = sum(p.numel() for p in model.parameters())
        assert n == {"qwen2-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}[arch]
        plan = bm.plan_for(bm.ARCHS[arch], "qlora", tokens=8 * 2048, seq_len=2048, prompt_len=512, gen_batch=8,
                           cuda=True, kernel_impl="auto")
        roll = bm.plan_for(bm.ARCHS[arch], "qlora", tokens=8 * 2048, seq_len=512 + new_tokens, prompt_len=512,
                           gen_batch=8, cuda=True, kernel_impl="auto")
        assert (plan.quantize, plan.lora_rank, plan.gradient_checkpointing) == ("nf4", memory.LORA_RANK_DEFAULT, True)
        assert plan.estimate["weights"] < 0.45 * 2 * n  # NF4 linears: well under the bf16 weights
        assert 0 < roll.estimate["rollout_peak"] < plan.estimate["update_peak"] < 22 * memory.GiB


def test_bench_memory_qlora_model_is_the_trainers(tmp_path):
    """bench_memory's qlora model is set up as `load_policy(..., quantize="nf4")` sets up a loaded one: the same
    parameters (names, NF4 or dense, dtype, shape, trainable or frozen), checkpointing on, no KV cache in training."""
    import torch
    from transformers import Qwen2ForCausalLM

    from sppo_fast.model import load_policy, unwrap

    bm = _bench_module("bench_memory")
    config = bm._qwen2_config(bm.TINY)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    ref = load_policy(tmp_path / "m", device=torch.device("cpu"), attn_implementation="sdpa",
                      gradient_checkpointing=True, liger=False, lora_rank=16, dtype=torch.bfloat16, quantize="nf4")
    got = bm.make_model(bm.TINY, "qlora", torch.device("cpu"), False, lora_rank=16, quantize="nf4")
    layout = lambda m: [(n, type(p).__name__, p.dtype, tuple(p.shape), p.requires_grad) for n, p in
                        m.named_parameters()]
    assert layout(got) == layout(ref) and any(t == "NF4Tensor" for _, t, *_ in layout(got))
    for m in (unwrap(ref), unwrap(got)):  # transformers >= 5.2 renamed the flag (as model.enable_checkpointing)
        assert (getattr(m, "is_activation_checkpointing", None) if hasattr(type(m), "is_activation_checkpointing")
                else m.is_gradient_checkpointing) and not m.config.use_cache


def test_bench_memory_stop_at_keeps_the_measured_steps(tmp_path, monkeypatch):
    """--stop-at cuts a setting in the middle of a step (SIGALRM) and the row keeps what the finished step measured;
    main returns normally, so gpu_check's part ends `ok`. Here the second update outlasts the alarm on purpose (set
    after the first update: every code path, imports included, has run once before it can fire). A rollout that
    fails is its phase's error and the update still runs."""
    import signal

    bm = _bench_module("bench_memory")
    original, calls, generate = bm.Stepper.update, [], bm.Stepper.generate

    def failing_second_generate(self, *args, **kwargs):
        if calls:
            raise RuntimeError("rollout broke")
        return generate(self, *args, **kwargs)

    def update(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(60)  # cut by the alarm
        out = original(self, *args, **kwargs)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        return out

    monkeypatch.setattr(bm.Stepper, "update", update)
    monkeypatch.setattr(bm.Stepper, "generate", failing_second_generate)
    before = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    (row,) = bm.main(["--quick", "--settings", "baseline", "--rollout-tokens", "2", "--stop-at",
                      str(time.time() + 600), "--out", str(tmp_path)])
    assert time.monotonic() - t0 < 60 and signal.getsignal(signal.SIGALRM) is before  # the handler is put back
    assert row["error"] == "cut at --stop-at after 1 of 2 steps" and row["steps"] == 1 and len(calls) == 2
    assert row["rollout_error"] == "RuntimeError: rollout broke"  # step 2's; step 1's rollout was measured
    assert row["step_s"] > 0 and row["rollout_s"] > 0 and row["estimate_update_gib"] > 0
    assert [json.loads(line)["error"] for line in next(tmp_path.glob("memory-cpu-*.jsonl")).read_text().splitlines()] \
        == [row["error"]]


def test_gpu_check_gates_parts_on_what_the_probe_found(tmp_path):
    """On CUDA a part is skipped with the probe's reason (no Triton launch, no torchao, no pytest) instead of failing
    slowly; the kernel parts fall back to the torch-only methods; the cli part drops --liger without Liger."""
    gc = _gpu_check()
    ok = {"triton_launch": "ok", "torchao": "0.18.0", "pytest": "9.2.0", "liger_kernel": "0.8.5", "peft": "0.17.0"}
    ctx = lambda **probe: {"cuda": True, "dry": False, "work": tmp_path, "part": "kernels_qwen", "budget": 100,
                           "probe": {**ok, **probe}, "rows": {}}
    part = gc.PART_BY_NAME
    assert all(gc.gate(p, ctx()) is None for p in gc.PARTS)
    no_triton = ctx(triton_launch="RuntimeError: Failed to find C compiler")
    assert gc.gate(part["memory"], no_triton) == \
        "skipped: Triton cannot launch (RuntimeError: Failed to find C compiler)"
    assert gc.gate(part["kernels_qwen"], no_triton) is None and gc.gate(part["rollout_hf"], no_triton) is None
    (argv,) = part["kernels_qwen"].build(no_triton)
    assert argv[argv.index("--methods") + 1] == gc.KERNEL_TORCH_ONLY and "torch_compile" not in gc.KERNEL_TORCH_ONLY
    (argv,) = part["kernels_llama"].build(ctx())
    assert argv[argv.index("--methods") + 1] == gc.KERNEL_HEADLINE and argv[argv.index("--shapes") + 1] == "llama3-8b"
    assert gc.gate(part["train"], ctx(torchao=None)).startswith("skipped: torchao not installed")
    assert gc.gate(part["qlora"], ctx(torchao=None)).startswith("skipped: torchao not installed")
    assert gc.gate(part["qlora"], ctx(peft=None)) == \
        "skipped: peft not installed (the qlora rung's LoRA adapters come from it)"
    assert gc.gate(part["qlora"], no_triton).startswith("skipped: Triton cannot launch")
    # the 1.5B run first, then the 7B, both stopping themselves 10 s before the part's budget ends
    before = time.time()
    runs = part["qlora"].build(ctx(peft="0.17.0"))
    assert [(argv[argv.index("--arch") + 1], argv[argv.index("--settings") + 1]) for argv in runs] == \
        [("qwen2-1.5b", "qlora"), ("qwen2.5-7b", "qlora")]
    assert all(0 <= float(argv[argv.index("--stop-at") + 1]) - before <= 100 - 10 + 1 for argv in runs)
    assert gc.gate(part["pytest"], ctx(pytest=None)) == \
        "skipped: pytest not installed (bench/gpu_wheels.sh puts its wheel in .whl/)"
    assert "--liger" in part["cli"].build(ctx())[1] and "--liger" not in part["cli"].build(ctx(liger_kernel=None))[1]
    assert gc.gate(part["memory"], {**ctx(triton_launch="x"), "cuda": False}) is None  # CPU dry run: CPU paths


def test_gpu_check_targets_read_across_parts():
    """The targets table joins rows of several parts (SPPO from `train`, GRPO from `train_more`, hf from
    `rollout_hf`) and draws a verdict only from GPU figures."""
    gc = _gpu_check()
    results = {"train": [{"kind": "algo", "algo": "sppo", "peak_gib": 9.0, "prompts_per_s": 4.2},
                         {"kind": "algo", "algo": "ppo", "peak_gib": 18.0, "prompts_per_s": 2.0}],
               "train_more": [{"kind": "algo", "algo": "grpo8", "peak_gib": 12.0, "prompts_per_s": 1.4}],
               "memory": [{"setting": "offload", "peak_update_gib": 12.5},
                          {"setting": "8bit", "peak_update_gib": 21.0}],
               "kernels_qwen": [{"shape": "qwen2.5-1.5b", "method": "ours_ppo_loss_chunked", "mode": "fwd+bwd",
                                 "median_ms": 40.0, "x_floor": 1.2, "peak_extra_gib": 0.3},
                                {"shape": "qwen2.5-1.5b", "method": "cce_filtered", "mode": "fwd+bwd",
                                 "median_ms": 43.6, "x_floor": 1.31, "peak_extra_gib": 0.0}],
               "rollout_hf": [{"kind": "backend", "backend": "hf", "tok_per_s": 2000.0}],
               "rollout_more": [{"kind": "backend", "backend": "hf-static", "tok_per_s": 5000.0}],
               "qlora": [{"arch": "qwen2-1.5b", "peak_rollout_gib": 3.3, "estimate_rollout_gib": 3.0,
                          "ratio_rollout": 1.1, "peak_update_gib": 5.6, "estimate_update_gib": 5.0,
                          "ratio_update": 1.12},
                         {"arch": "qwen2.5-7b", "error": "cut at --stop-at after 0 of 2 steps, during the build"}]}
    got = {t[0]: t[2] for t in gc.targets(results)}
    assert got["SPPO peak <= 0.55x PPO's at the same 8bit plan"] == \
        "9.00 / 18.00 GiB = 0.500 -> met; SPPO <= 20 GiB: met"
    assert got["SPPO prompts/s >= 4x GRPO G=8's"] == "4.20 / 1.40 = 3.00x -> not met"
    assert got["1.5B full-parameter update <= 20 GiB"] == "offload 12.50 GiB -> met; 8bit 21.00 GiB -> not met"
    assert got["rollout tokens/s per backend (hf first); the fastest is `auto`'s CUDA pick"] == \
        "hf 2000, hf-static 5000; fastest hf-static"
    assert next(v for k, v in got.items() if k.startswith("qlora rung")) == \
        "qwen2-1.5b rollout 3.30 / 3.00 GiB = 1.100 -> met; qwen2-1.5b update 5.60 / 5.00 GiB = 1.120 -> not met"
    kernel = next(v for k, v in got.items() if "Qwen" in k)
    assert kernel.startswith("qwen2.5-1.5b: ours_ppo_loss_chunked 40.0 ms (1.20x floor")
    assert "fastest peer cce_filtered 43.6 ms" in kernel
    assert next(v for k, v in got.items() if "Llama" in k) == "not measured"
    dry = {t[0]: t[2] for t in gc.targets(results, dry=True)}
    assert "met" not in dry["SPPO prompts/s >= 4x GRPO G=8's"].replace("no verdict", "")


def test_gpu_wheels_script_pins_what_gpu_check_needs():
    """bench/gpu_wheels.sh carries pytest and its needs beside the peers and torchao, pins one version of each, and
    .whl/ (where it writes) is git-ignored so the wheels never enter a commit."""
    script = (BENCH / "gpu_wheels.sh").read_text()
    pins = dict(re.findall(r"([a-z-]+)==([0-9.]+)", script.split("WHEELS=(")[1].split(")")[0]))
    assert set(pins) == {"liger-kernel", "cut-cross-entropy", "torchao", "pytest", "pluggy", "iniconfig", "pygments"}
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=BENCH.parent)
    assert ignored.returncode == 0


def _bench_module(name):
    """Import a bench/ script as a module (its own `from utils import ...` needs bench/ on the path)."""
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("hidden", [0, 16])
def test_value_head_probe_recovers_a_known_success_rate(hidden):
    import torch

    from sppo_fast.train import pearson

    bvh = _bench_module("bench_value_head")
    torch.manual_seed(0)
    X = torch.randn(1200, 8, dtype=torch.float64) * torch.linspace(0.1, 10, 8, dtype=torch.float64)  # unscaled
    p = torch.sigmoid(X @ torch.linspace(-1, 1, 8, dtype=torch.float64) / X.std(0).mean())
    R = torch.bernoulli(p)
    f = bvh.fit_probe(X[200:], R[200:], 1e-4, hidden, X[:200], R[:200])
    assert pearson(f(X[:200]), p[:200]) > 0.95  # the success rate itself, from binary labels alone
    assert f(X).shape == (1200,) and not f(X).requires_grad


def test_value_head_ceiling_and_probe_run_on_a_trained_run(tmp_path):
    from conftest import train_tiny

    train_tiny(tmp_path, "r", "--steps", "1")
    bvh = _bench_module("bench_value_head")
    c = bvh.ceiling(tmp_path / "r", k=2)
    assert c["n_prompts"] == 8 and 0 <= c["mean_R"] <= 1
    rows = bvh.probe(tmp_path / "r", n_train=20, k_train=2, k_eval=2)
    # the run's own head, then per layer of the 4-layer tiny model: linear on 16 prompts (the 6,400-sample cut is
    # all of them here), MLP on 16
    assert [r["probe"] for r in rows[:3]] == ["the run's own head (trained online)", "logistic regression",
                                               "MLP 64 hidden"]
    assert len(rows) == 1 + 4 * 2 and [r["layer"] for r in rows[1::2]] == [0, 1, 2, -1]
    assert all(r["n_train_prompts"] == 16 for r in rows[1:])


def test_bench_learning_reports_how_far_a_missed_target_is(tmp_path):
    """Issue 14: a missed token target says by how much. SPPO's accuracy at 1/4 of GRPO G=8's tokens (or at its last
    eval when its run is shorter) minus G=8's final − margin, and SPPO's final minus PPO's, in the horizon table."""
    bl = _bench_module("bench_learning")

    def run(key, algo, points):
        evals = [{"step": i, "tokens": t, "train_s": t / 10, "pass1": p, "avgk": p - 0.05, "response_len": 150}
                 for i, (t, p) in enumerate(points)]
        return {"kind": "run", "key": key, "algo": algo, "evals": evals}

    sppo = run("s", "sppo", [(0, 0.40), (100, 0.60), (250, 0.70)])
    acc, gap = bl.quarter_gap([sppo], 800, 0.73, "pass1")  # 1/4 of 800 = 200: between the last two evals
    assert acc == pytest.approx(0.6 + 0.1 * 100 / 150) and gap == pytest.approx(acc - 0.73)
    acc, gap = bl.quarter_gap([sppo], 2000, 0.73, "pass1")  # SPPO's run ends before 1/4 of G=8's: its last eval
    assert acc == pytest.approx(0.70) and gap == pytest.approx(-0.03)

    g8 = run("g", "grpo8", [(0, 0.40), (1000, 0.75)])
    ppo = run("p", "ppo", [(0, 0.40), (250, 0.66)])

    def summ(r, algo, label, value_lr=0.0):
        return {"kind": "summary", "algo": algo, "label": label, "runs": [r["key"]], "lr": 3e-5, "value_lr": value_lr,
                "final_pass1": r["evals"][-1]["pass1"], "final_pass1_std": 0.0, "final_avgk": r["evals"][-1]["avgk"],
                "final_avgk_std": 0.0, "final_tokens": r["evals"][-1]["tokens"], "start_pass1": 0.40,
                "start_avgk": 0.35, "threshold_pass1": 0.73, "threshold_avgk": 0.68, "step_s": 1.0,
                "eval_value_pearson": 0.3, "train_value_pearson": 0.3}
    verdict = {"kind": "verdict", "margin": 0.02, "met_pass1": False, "met_avgk": False,
               "sppo_token_fraction_pass1": None, "sppo_token_fraction_avgk": None,
               "beats_ppo_pass1": True, "beats_ppo_avgk": True}
    rows = [{"kind": "env", "horizon": 150}, sppo, g8, ppo, summ(sppo, "sppo", "SPPO (shared head)"),
            summ(g8, "grpo8", "GRPO G=8"), summ(ppo, "ppo", "PPO (critic LLM, GAE λ=0.95)", 3e-5), verdict]
    f = tmp_path / "h150.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bl.horizon_table([str(f)], tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    # 1/4 of 1000 tokens = 250 = SPPO's last eval: 70.0 % against a 73.0 % threshold
    assert "pass@1 not met (never; at 1/4 of the tokens 70.0 % vs threshold 73.0 %, -3.0 points)" in text
    assert "avg@k not met (never; at 1/4 of the tokens 65.0 % vs threshold 68.0 %, -3.0 points)" in text
    assert "PPO (critic LLM, GAE λ=0.95): pass@1 won (+4.0), avg@k won (+4.0)" in text


def _learning_opts(bl, **kw):
    import argparse
    o = dict(steps=60, grpo8_step_mult=4, grpo8_eval_mult=2, eval_every=15, batch=64, max_new_tokens=40,
             eval_size=256, eval_k=4, model="", horizon=20, data_flags=[], seeds=[0, 1, 2], base_seeds=[0, 1, 2],
             lrs=[3e-5, 1e-4, 3e-4], extend_edges=1, extend_factor=3.0, critic_lr_mults=[1.0, 10.0], tie_rule="sd",
             algos=["sppo", "ppo"], margin=0.02)
    o.update(kw)
    return argparse.Namespace(**o)


def _learning_done(bl, opts, scores, finals):
    """Synthetic finished runs: scores[(algo, lr, critic mult)] for seed 0, finals[(algo, seed)] = final pass@1 of the
    chosen configuration's other seeds (avg@k = pass@1 - 0.05)."""
    pl = bl.Planner(opts, {"lr": 3e-5, "value_lr": 1e-2, "micro_batch_tokens": 4096}, "/m")
    done = {}

    def add(spec, p):
        evals = [{"step": 0, "tokens": 0, "train_s": 0, "pass1": 0.3, "avgk": 0.25},
                 {"step": 60, "tokens": 1000, "train_s": 60, "pass1": p, "avgk": p - 0.05}]
        done[spec["key"]] = {**spec, "kind": "run", "evals": evals, "final_pass1": p, "final_avgk": p - 0.05,
                             "score": p - 0.025, "final_tokens": 1000, "final_train_s": 60, "wall_s": 100.0,
                             "step_s_median": 1.0, "final_value_pearson": None, "train_value_pearson_last10": None}
    for (a, lr, c), sc in scores.items():
        add(pl.spec(a, lr, c, 0), sc + 0.025)
    for a in opts.algos:
        for _ in range(4):  # the plan unfolds: add each run it asks for
            needed, fin = pl.plan(a, done)
            for sp in needed:
                if sp["key"] not in done:
                    add(sp, finals[(a, sp["seed"])] if sp["seed"] else 0.0)
    return pl, done


def test_bench_learning_tie_rule_and_selection_free_seeds():
    """Issue 24: seed-0 scores within one binomial sd of the best are a tie, won by the lr nearest the preset's, then
    critic lr ×1; an exact tie is no longer broken by max() order; the selection-free numbers leave seed 0 out."""
    bl = _bench_module("bench_learning")
    assert bl.tie_margin(0.5, 256) == pytest.approx(1 / 32)
    item, tied, broken = bl.choose([1, 2, 3], {1: 0.60, 2: 0.62, 3: 0.50}.get, lambda i: i, 0.03)
    assert (item, tied, broken) == (1, [1, 2], True)  # 0.60 is within 0.03 of 0.62: the preferred item wins
    assert bl.choose([1, 2, 3], {1: 0.60, 2: 0.62, 3: 0.50}.get, lambda i: i, 0.0)[0] == 2  # the old rule
    o = _learning_opts(bl)
    # SPPO: 1e-4 beats the preset's 3e-5 by 0.5 points (a tie: 3e-5 wins); PPO: 3e-5 clear, critic x1 = x10 exactly
    scores = {("sppo", 3e-5, 1.0): 0.600, ("sppo", 1e-4, 1.0): 0.605, ("sppo", 3e-4, 1.0): 0.10,
              ("ppo", 3e-5, 1.0): 0.60, ("ppo", 1e-4, 1.0): 0.40, ("ppo", 3e-4, 1.0): 0.10,
              ("ppo", 1e-5, 1.0): 0.50, ("ppo", 3e-5, 10.0): 0.60}
    finals = {(a, s): v for a in ("sppo", "ppo") for s, v in ((1, 0.50), (2, 0.56))}
    pl, done = _learning_done(bl, o, scores, finals)
    assert pl.chosen == {"sppo": (3e-5, 1.0), "ppo": (3e-5, 1.0)}
    free, comps = bl.selection_free(o, pl, None, done)
    assert free["sppo"]["tie_broken"] and free["ppo"]["exact_tie"] and free["sppo"]["seeds"] == [1, 2]
    c = free["sppo"]["final_pass1"]
    assert c["n"] == 2 and c["mean"] == pytest.approx(0.53)  # seed 0's 0.625 is not in it
    half = bl.t_crit(1) * math.sqrt(0.03 ** 2 * 2 / 2 + 0.53 * 0.47 / 256)  # sd of (0.50, 0.56) = 0.0424
    assert c["hi"] - c["mean"] == pytest.approx(half, rel=1e-6)
    text = "\n".join(bl.free_markdown(o, free, comps, 20))
    assert "exact tie" in text and "rule picks 3e-05 (critic ×1)" in text and "(n=2)" in text
    # --fresh-seeds 3: only seed 3 of each chosen configuration is missing
    o3 = _learning_opts(bl, seeds=[0, 1, 2, 3])
    pl3 = bl.Planner(o3, pl.preset, "/m")
    assert [s["seed"] for a in o3.algos for s in pl3.plan(a, done)[0] if s["key"] not in done] == [3, 3]


def test_bench_learning_t_distribution_and_welch():
    bl = _bench_module("bench_learning")
    # Student t two-sided tails and 97.5 % quantiles (tables): t=2 at df 1, 5, 30; 12.706 (df 1), 4.303 (df 2)
    assert [round(bl.t_sf2(2.0, d), 4) for d in (1, 5, 30)] == [0.2952, 0.1019, 0.0546]
    assert bl.t_crit(1) == pytest.approx(12.706, abs=1e-3) and bl.t_crit(2) == pytest.approx(4.303, abs=1e-3)
    assert bl.t_crit(math.inf) == pytest.approx(1.95996, abs=1e-4)
    w = bl.welch([0.70, 0.72, 0.71], [0.60, 0.62, 0.61], 256)
    assert w["diff"] == pytest.approx(0.10) and w["p"] < 0.001 < w["p_eval"] and w["p_eval"] >= w["p"]
    assert bl.welch([0.5], [0.4, 0.41], 256) is None  # one seed: no test
    one = bl.cell_interval([0.5], 256)  # one seed: the eval set's binomial noise alone, normal
    assert one["hi"] - one["mean"] == pytest.approx(1.959964 * math.sqrt(0.25 / 256), rel=1e-5)


def test_bench_learning_fresh_seeds_finds_the_committed_runs(tmp_path, monkeypatch):
    """`--fresh-seeds` must reuse every committed run of the same protocol: the run keys are rebuilt from the preset,
    and a preset eval_size read as 256.0 (the trainer's --eval-size also takes fractions) once turned "e256x4" into
    "e256.0x4", so the documented command found none of them and refused to start."""
    bl = _bench_module("bench_learning")
    committed = BENCH / "results" / "learning-cpu-2026-11-29.jsonl"
    (tmp_path / committed.name).write_bytes(committed.read_bytes())
    seen = {}

    def stop(opts, planner, done, jsonl_path, work_dir):
        seen["done"] = done
        raise SystemExit(0)

    monkeypatch.setattr(bl, "run_all", stop)
    with pytest.raises(SystemExit):
        bl.main(["--fresh-seeds", "3", "--out", str(tmp_path / committed.stem), "--work-dir", str(tmp_path / "w")])
    runs = [json.loads(line) for line in committed.read_text().splitlines() if '"kind": "run"' in line]
    assert len(seen.get("done", {})) == len(runs) > 0
