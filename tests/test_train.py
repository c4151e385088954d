"""End-to-end tests of the trainer on the embedded tiny model (CPU, a few seconds each)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sppo_fast import checkpoint
from sppo_fast.cli import build_args
from sppo_fast.cli import main as cli_main
from sppo_fast.hf import lm_head_params
from sppo_fast.metrics import MetricsLogger, correlations, pearson
from sppo_fast.model import hidden_states, load_critic, load_policy, load_tokenizer
from sppo_fast.rollout import Sample, pack
from sppo_fast.tiny import default_model_path
from sppo_fast.train import Args, ConfigError, Stepper, gae_advantages, main, value_loss_fn
from sppo_fast.value_head import ValueHead

FAST = ["--steps", "2", "--batch-size", "8", "--eval-size", "8", "--eval-k", "1", "--eval-every", "0",
        "--max-new-tokens", "24", "--no-progress", "--threads", "1"]


def run(tmp_path, *flags, name="run"):
    args = build_args([*FAST, "--out-dir", str(tmp_path), "--run-name", name, *flags])
    return main(args), Path(tmp_path) / name


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_few_steps_write_checkpoint_metrics_and_config(tmp_path):
    result, run_dir = run(tmp_path, "--save-every", "1", "--keep-last", "1")
    rows = read_metrics(run_dir)
    steps = [r for r in rows if "losses/policy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["losses/policy"]) and math.isfinite(r["losses/value"])
        # one minibatch: old log-probs are the current ones detached, so the ratio is exactly 1
        assert r["stats/ratio_max"] == 1.0 and r["stats/ratio_min"] == 1.0 and r["stats/clipfrac"] == 0.0
    assert "eval/pass@1" in rows[0] and "eval/pass@1" in rows[-1]
    ckpts = checkpoint.list_checkpoints(run_dir)
    assert [c.name for c in ckpts] == ["step_000002"]  # keep_last=1 pruned step 1
    ckpt = ckpts[0]
    assert (ckpt / "policy" / "model.safetensors").is_file() and (ckpt / "value_head.safetensors").is_file()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert "batch_size: 8" in (run_dir / "config.yaml").read_text()
    assert list((run_dir / "tb").glob("events.*"))
    png = cli_main(["plot", str(run_dir)])
    assert png == 0 and (run_dir / "curves.png").stat().st_size > 1000


def test_resume_reproduces_next_step(tmp_path):
    _, full = run(tmp_path, "--steps", "3", "--save-every", "0", name="full")
    _, part = run(tmp_path, "--steps", "2", "--save-every", "0", name="part")
    main(build_args([*FAST, "--steps", "3", "--resume", str(part)]))
    step3 = lambda d: next(r for r in read_metrics(d) if r["step"] == 3 and "losses/policy" in r)
    a, b = step3(full), step3(part)
    for key in ("losses/policy", "losses/value", "reward/mean", "stats/logp", "rollout/response_len"):
        assert a[key] == b[key], (key, a[key], b[key])


def test_grpo_runs(tmp_path):
    result, run_dir = run(tmp_path, "--algo", "grpo", "--group-size", "4", "--batch-size", "4")
    steps = [r for r in read_metrics(run_dir) if "losses/policy" in r]
    assert len(steps) == 2 and "losses/value" not in steps[0]
    assert not (checkpoint.list_checkpoints(run_dir)[-1] / "value_head.safetensors").exists()


def test_minibatches_score_old_logprobs_with_the_fused_kernel(tmp_path):
    # two optimizer steps per batch: the second minibatch's ratio moves away from 1 after the first update
    _, run_dir = run(tmp_path, "--num-minibatches", "2", "--micro-batch-tokens", "64")
    steps = [r for r in read_metrics(run_dir) if "losses/policy" in r]
    assert all(math.isfinite(r["losses/policy"]) for r in steps)
    assert any(r["stats/ratio_max"] != 1.0 or r["stats/ratio_min"] != 1.0 for r in steps)


def test_losses_match_a_hand_computation():
    """Advantage, value loss and policy loss of one update on a fixed batch, recomputed with full logits."""
    torch.manual_seed(0)
    args = Args(temperature=0.7, lr=0.0, value_lr=0.0, max_grad_norm=0.0, micro_batch_tokens=7)  # 2+ micro-batches
    tok = load_tokenizer(default_model_path())
    policy = load_policy(default_model_path(), device=torch.device("cpu"), attn_implementation="sdpa")
    head = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, std=0.3)  # make V differ between prompts
    opt = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": 0.0},
                             {"params": list(head.parameters()), "lr": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stepper = Stepper(args, policy, head, opt, sched, tok, torch.device("cpu"))
    enc = lambda s: tok(s, add_special_tokens=True)["input_ids"]
    samples = [Sample(enc("12+3="), enc("12+3=15;15")[:-1] + [tok.eos_token_id], "", True, 0),
               Sample(enc("7+8+1="), enc("7+8=14,1"), "", False, 1),
               Sample(enc("3+4="), enc("3+4=7;7"), "", True, 2)]
    R = torch.tensor([1.0, 0.0, 1.0])
    totals, values = stepper.update(samples, R, None, check_values=True)

    # by hand: per sample, full logits of the response tokens; V from the last prompt token
    pg_terms, n_tok, vs = [], 0, []
    weight, _, _ = lm_head_params(policy)
    with torch.no_grad():
        for s, r in zip(samples, R):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            h = policy.get_decoder()(input_ids=ids).last_hidden_state[0]
            p = len(s.prompt_ids)
            v = head(h[p - 1:p])[0]
            vs.append(v)
            logits = (h[p - 1:-1] @ weight.T) / args.temperature
            logp = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(s.response_ids)[:, None])
            A = r - torch.sigmoid(v)
            pg_terms.append((-A * torch.ones_like(logp)).sum())  # ratio == 1 on the first minibatch
            n_tok += len(s.response_ids)
    vs = torch.stack(vs)
    pg = (sum(pg_terms) / n_tok).item()
    bce = F.binary_cross_entropy_with_logits(vs, R).item()
    torch.testing.assert_close(values, torch.sigmoid(vs), rtol=1e-5, atol=1e-6)
    assert totals["losses/policy"].item() == pytest.approx(pg, rel=1e-5, abs=1e-6)
    assert totals["losses/value"].item() == pytest.approx(bce, rel=1e-5)
    assert value_loss_fn(vs, R, "bce").item() == pytest.approx(bce)
    # the advantage's correlation with R over response tokens, summed over the micro-batches (7 tokens each)
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    A_tok = (R - torch.sigmoid(vs)).repeat_interleave(lengths)
    logged = correlations({k: v.item() for k, v in totals.items()})
    assert logged["stats/advantage_reward_pearson"] == pytest.approx(pearson(A_tok, R.repeat_interleave(lengths)))
    assert "value/token_pearson" not in logged and not any(k.startswith("moments/") for k in logged)


def test_ppo_logs_its_token_values_calibration_and_gae_advantage_correlation():
    """PPO (lambda 0.9) on a fixed batch in several micro-batches: the logged Pearson of the critic's per-token
    values against R and of the GAE advantages against R, recomputed from a forward of the critic."""
    torch.manual_seed(0)
    args = Args(algo="ppo", gae_lambda=0.9, lr=0.0, value_lr=0.0, max_grad_norm=0.0, micro_batch_tokens=7,
                critic=default_model_path())
    tok = load_tokenizer(default_model_path())
    cpu = torch.device("cpu")
    policy = load_policy(default_model_path(), device=cpu, attn_implementation="sdpa")
    critic = load_critic(default_model_path(), device=cpu, attn_implementation="sdpa")
    head = ValueHead(critic.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, std=0.3)  # values that differ by token
    opt = torch.optim.SGD([{"params": list(policy.parameters()), "lr": 0.0},
                           {"params": [*critic.parameters(), *head.parameters()], "lr": 0.0}])
    stepper = Stepper(args, policy, head, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), tok, cpu,
                      critic=critic)
    enc = lambda s: tok(s, add_special_tokens=True)["input_ids"]
    samples = [Sample(enc("12+3="), enc("12+3=15;15"), "", True, 0),
               Sample(enc("7+8+1="), enc("7+8=14,1"), "", False, 1),
               Sample(enc("3+4="), enc("3+4=7;7"), "", True, 2), Sample(enc("9+9="), enc("18;17"), "", True, 3)]
    R = torch.tensor([1.0, 0.0, 1.0, 0.0])
    totals, _ = stepper.update(samples, R, None, check_values=True)

    lengths = [len(s.response_ids) for s in samples]
    with torch.no_grad():  # the critic's value before each response token, one sample at a time
        V = torch.cat([head(critic(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).last_hidden_state[0]
                            [len(s.prompt_ids) - 1:-1]) for s in samples])
    A = gae_advantages(V, R, lengths, 0.9)
    R_tok = R.repeat_interleave(torch.tensor(lengths))
    logged = correlations({k: v.item() for k, v in totals.items()})
    assert logged["value/token_pearson"] == pytest.approx(pearson(V, R_tok), abs=1e-5)
    assert logged["stats/advantage_reward_pearson"] == pytest.approx(pearson(A, R_tok), abs=1e-5)


def test_packed_and_padded_layouts_give_the_same_hidden_rows():
    tok = load_tokenizer(default_model_path())
    policy = load_policy(default_model_path(), device=torch.device("cpu"), attn_implementation="sdpa").eval()
    enc = lambda s: tok(s, add_special_tokens=True)["input_ids"]
    samples = [Sample(enc("12+3="), enc("15;15"), "", True, 0), Sample(enc("7+8+1="), enc("15,16;16"), "", True, 1)]
    padded = pack(samples, [0, 1], packed=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        h = hidden_states(policy, padded)
        for b, s in enumerate(samples):
            alone = policy.get_decoder()(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).last_hidden_state[0]
            start = padded.cu_seqlens[b].item()
            rows = padded.resp_rows[start:start + len(s.response_ids)]
            torch.testing.assert_close(h[rows], alone[len(s.prompt_ids) - 1:-1], rtol=1e-4, atol=1e-5)
    assert padded.targets.tolist() == samples[0].response_ids + samples[1].response_ids


# --- bad input -------------------------------------------------------------------------------------------------------
def test_missing_model_dir(tmp_path):
    with pytest.raises(ConfigError, match="--model: .*does not exist"):
        run(tmp_path, "--model", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        run(tmp_path, "--model", str(tmp_path / "empty"))


def test_tokenizer_without_pad_token_uses_eos(tmp_path):
    import shutil
    model_dir = tmp_path / "nopad"
    shutil.copytree(default_model_path(), model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="no pad token"):
        tok = load_tokenizer(model_dir)
    assert tok.pad_token_id == tok.eos_token_id


def test_dataset_row_missing_field_names_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2="}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl line 2.*answer"):
        run(tmp_path, "--data", str(data))


def test_long_prompts_are_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "1+2=", "answer": "3"}] * 12 + [{"prompt": "1+" * 40 + "1=", "answer": "41"}] * 3
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run(tmp_path, "--data", str(data), "--eval-size", "4", "--max-prompt-tokens", "16", "--steps", "1")
    assert "skipped" in capsys.readouterr().out


def test_reward_fn_raising_names_the_sample(tmp_path):
    plugin = tmp_path / "bad_reward.py"
    # fails on some samples only (odd answers), so the error must point at one of them; the first training row has an
    # even answer, so the one-row check before the model loads passes and the failure comes during training
    plugin.write_text("def fn(prompts, completions, answer, **kw):\n"
                      "    return [1 / 0 if int(a) % 2 else 0.0 for a in answer]\n"
                      "def always(prompts, completions, **kw):\n"
                      "    return [1 / 0 for c in completions]\n")
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": f"{a}+{a + 1}=", "answer": str(2 * a + 1 - (i == 0))})
                               for i, a in enumerate(range(10, 26))))
    with pytest.raises(RuntimeError, match=r"sample \d+"):
        run(tmp_path, "--reward", f"{plugin}:fn", "--data", str(train), "--eval-data", str(train))
    # failing on the first row is caught before the model loads, and no run directory is left behind
    with pytest.raises(ConfigError, match=r"--reward .* fails on the first training row: .*ZeroDivisionError"):
        run(tmp_path, "--reward", f"{plugin}:always", name="early")
    assert not (tmp_path / "early").exists()


def test_reward_outside_unit_interval_is_an_error_for_sppo(tmp_path):
    plugin = tmp_path / "big_reward.py"
    plugin.write_text("def fn(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    with pytest.raises(ConfigError, match=r"outside \[0, ?1\].*--value-loss mse"):
        run(tmp_path, "--reward", f"{plugin}:fn")
    run(tmp_path, "--reward", f"{plugin}:fn", "--value-loss", "mse", "--steps", "1", name="mse")


def test_nonfinite_loss_is_skipped_then_stops_without_checkpoint(tmp_path, monkeypatch):
    import sppo_fast.train as train_mod
    real = train_mod.hidden_states
    monkeypatch.setattr(train_mod, "hidden_states", lambda m, b: real(m, b) * float("nan"))
    with pytest.raises(FloatingPointError, match="consecutive steps"):
        run(tmp_path, "--steps", "5", "--max-nonfinite-steps", "2", "--save-every", "1")
    assert checkpoint.list_checkpoints(tmp_path / "run") == []


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "sppo_fast.cli", "train", *FAST, "--steps", "1000", "--out-dir", str(tmp_path),
           "--run-name", "sig"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "sig").glob("metrics.jsonl")):
        time.sleep(0.2)
    while time.time() < deadline and sum(1 for _ in open(tmp_path / "sig" / "metrics.jsonl")) < 2:
        time.sleep(0.2)  # wait for the first training step to be logged
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted: saved" in out
    assert checkpoint.list_checkpoints(tmp_path / "sig")


def test_bad_option_values(tmp_path):
    with pytest.raises(ValueError, match="--algo"):
        run(tmp_path, "--algo", "ppo2")
    with pytest.raises(ValueError, match="unknown option"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text("batch_sise: 3\n")
        build_args(["--config", str(cfg)])


def test_yaml_config_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 5\nlr: 0.5\n")
    args = build_args(["--config", str(cfg), "--lr", "0.25"])
    assert args.batch_size == 5 and args.lr == 0.25
    assert build_args([]).lr != Args().lr  # the embedded model's demo preset applies without --model


@pytest.mark.slow
def test_demo_learns_within_three_minutes(tmp_path):
    """The README's main job: `sppo-fast train` on 2 CPU cores, >= 20 points of held-out accuracy in <= 3 min."""
    t0 = time.perf_counter()
    result = main(build_args(["--out-dir", str(tmp_path), "--no-progress"]))
    seconds = time.perf_counter() - t0
    gain = result["end"]["eval/pass@1"] - result["start"]["eval/pass@1"]
    print(f"demo: {result['start']['eval/pass@1']:.3f} -> {result['end']['eval/pass@1']:.3f} in {seconds:.0f} s")
    assert gain >= 0.20
    assert seconds <= 180


def test_lora_saves_adapter_beside_value_head_and_resumes(tmp_path):
    pytest.importorskip("peft")
    _, run_dir = run(tmp_path, "--lora-rank", "4", "--save-every", "1", "--steps", "1")
    ckpt = checkpoint.list_checkpoints(run_dir)[-1]
    assert (ckpt / "policy" / "adapter_config.json").is_file()
    assert (ckpt / "policy" / "adapter_model.safetensors").is_file()
    assert (ckpt / "value_head.safetensors").is_file()
    result = main(build_args([*FAST, "--steps", "2", "--lora-rank", "4", "--resume", str(run_dir)]))
    assert result["step"] == 2


def test_separate_critic_designs_run_and_checkpoint_the_critic(tmp_path):
    for algo, flags in (("ppo", []), ("sppo", ["--critic", default_model_path()])):
        _, run_dir = run(tmp_path, "--algo", algo, *flags, "--num-minibatches", "2", name=algo)
        ckpt = checkpoint.list_checkpoints(run_dir)[-1]
        assert (ckpt / "critic" / "model.safetensors").is_file()
        steps = [r for r in read_metrics(run_dir) if "losses/value" in r]
        assert len(steps) == 2 and all(math.isfinite(r["losses/value"]) for r in steps)


def test_gae_with_lambda_one_is_return_minus_value():
    from sppo_fast.train import gae_advantages
    values = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7])
    R = torch.tensor([1.0, 0.0])
    adv = gae_advantages(values, R, [3, 2], lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([0.9, 0.8, 0.7, -0.5, -0.7]))
    # lambda = 0: one-step TD errors, V after the last token is 0
    adv0 = gae_advantages(values, R, [3, 2], lam=0.0)
    torch.testing.assert_close(adv0, torch.tensor([0.1, 0.1, 0.7, 0.2, -0.7]))


def test_algorithm_registry_declares_what_each_algorithm_needs():
    """The loop asks the algorithm (sppo_fast/algos.py) instead of branching on --algo: check what each declares
    and computes on a hand-made micro-batch."""
    from sppo_fast import algos
    from sppo_fast.config import CHOICES, algorithm

    assert CHOICES["algo"] == tuple(algos.ALGOS) == ("sppo", "grpo", "ppo")
    declared = {name: algorithm(Args(algo=name, group_size=4)) for name in algos.ALGOS}
    assert {n: (a.samples_per_prompt, a.value, a.token_values) for n, a in declared.items()} == {
        "sppo": (1, "head", False), "grpo": (4, "none", False), "ppo": (1, "critic", True)}
    assert algorithm(Args(critic="policy")).value == "critic"  # SPPO with a separate critic LLM
    assert declared["sppo"].reward_range == (0.0, 1.0) and algorithm(Args(value_loss="mse")).reward_range is None
    R, v = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.3, -1.2, 2.0, 0.0])
    # SPPO: A = R - sigmoid(v), no std normalisation; BCE on the logits
    A, V = declared["sppo"].advantages(declared["sppo"].batch_rewards(R), v, [2, 1, 3, 1], None)
    assert torch.equal(A, R - torch.sigmoid(v)) and torch.equal(V, torch.sigmoid(v))
    assert torch.equal(declared["sppo"].value_loss(v, v, A, R), F.binary_cross_entropy_with_logits(v, R))
    # GRPO: the group baseline, from the rewards alone
    A, V = declared["grpo"].advantages(declared["grpo"].batch_rewards(R), None, [2, 1, 3, 1], None)
    assert torch.equal(A, R - 0.75) and V is None
    # PPO: token values -> GAE; V(prompt) is the value before the first response token
    tv = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7])
    A, V = algorithm(Args(algo="ppo", gae_lambda=1.0)).advantages(torch.tensor([1.0, 0.0]), tv, [3, 2],
                                                                  torch.tensor([0, 3]))
    torch.testing.assert_close(A, torch.tensor([0.9, 0.8, 0.7, -0.5, -0.7]))  # lambda = 1: return minus value
    assert torch.equal(V, torch.tensor([0.1, 0.5]))
    with pytest.raises(ValueError, match="unknown algorithm 'ppo2'"):
        algos.get_algo("ppo2")
    with pytest.raises(ValueError, match="registered twice"):
        algos.register_algo("sppo")(type("Again", (algos.Algorithm,), {}))


def test_other_architecture_from_a_directory_with_jsonl_and_math_reward(tmp_path):
    """`--model DIR --data file.jsonl --reward math` on a random-init Qwen2-style model (the GPU path, at CPU size)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_path())
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "qwen2-random"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"{a}+{a}=", "solution": f"\\boxed{{{2 * a}}}"})
                              for a in range(24)))
    result, run_dir = run(tmp_path, "--model", str(model_dir), "--data", str(data), "--prompt-field", "problem",
                          "--answer-field", "solution", "--reward", "math", "--eval-size", "4", "--lr", "1e-5",
                          "--max-prompt-tokens", "16", "--max-new-tokens", "12")
    steps = [r for r in read_metrics(run_dir) if "losses/policy" in r]
    assert len(steps) == 2 and all(math.isfinite(r["losses/policy"]) for r in steps)
    assert (checkpoint.list_checkpoints(run_dir)[-1] / "policy" / "config.json").is_file()


def test_log_eval_samples_writes_each_evaluations_per_prompt_results(tmp_path):
    _, run_dir = run(tmp_path, "--log-eval-samples", "--eval-every", "1", "--eval-k", "2", "--steps", "2")
    rows = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    evals = [r for r in read_metrics(run_dir) if "eval/pass@1" in r]
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:  # one row per eval prompt, in eval-set order, whose means are the logged metrics
        mine = [r for r in rows if r["step"] == e["step"]]
        assert [r["index"] for r in mine] == list(range(8))
        assert all(len(r["sampled_rewards"]) == 2 and r["prompt"] and isinstance(r["greedy"], str) for r in mine)
        assert sum(r["reward"] for r in mine) / 8 == pytest.approx(e["eval/pass@1"])
        assert sum(sum(r["sampled_rewards"]) for r in mine) / 16 == pytest.approx(e["eval/avg@2"])
        assert sum(r["value"] for r in mine) / 8 == pytest.approx(e["eval/value_mean"], rel=1e-5)
    # resuming from step 1 drops what a run logged after it, as it does in metrics.jsonl
    MetricsLogger(run_dir, tensorboard=False, resume_step=1).close()
    kept = [json.loads(line)["step"] for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert sorted(set(kept)) == [0, 1] and len(kept) == 16
    _, quiet = run(tmp_path, name="quiet")
    assert not (quiet / "eval_samples.jsonl").exists()


def test_correlations_from_summed_moments():
    """Moment sums added over parts (micro-batches, ranks) give the Pearson of the whole; a constant side gives no
    key (as `pearson` returns None), and the sums never reach the log."""
    from sppo_fast.metrics import MOMENTS, pair_moments

    torch.manual_seed(0)
    x, y = torch.randn(50), (torch.rand(50) > 0.5).float()
    sums = {}
    for part in (slice(0, 13), slice(13, 50)):
        for stat, v in pair_moments(x[part], y[part]).items():
            sums[f"{MOMENTS}a/{stat}"] = sums.get(f"{MOMENTS}a/{stat}", 0.0) + v.item()
        for stat, v in pair_moments(x[part], torch.ones(part.stop - part.start)).items():
            sums[f"{MOMENTS}b/{stat}"] = sums.get(f"{MOMENTS}b/{stat}", 0.0) + v.item()
    assert correlations({**sums, "other": 1.0}) == {"a": pytest.approx(pearson(x, y), abs=1e-12), "other": 1.0}
