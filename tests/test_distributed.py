"""torchrun + FSDP2 (`sppo_fast.distributed`) on CPU: 2 gloo processes against one process, on the tiny model.

One 2-rank job (torch.multiprocessing, spawned once for the module) runs every multi-rank part; the single-process
references run in the test process. "Equal" means within fp32 rounding: the ranks' partial sums add up in another
order than one process's. The micro-batch budget is small and the samples' lengths uneven, so the two ranks run
different numbers of micro-batches (the idle passes are exercised).
"""
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sppo_fast import checkpoint, distributed
from sppo_fast.cli import build_args
from sppo_fast.data import PromptSampler
from sppo_fast.model import load_policy, load_tokenizer
from sppo_fast.rollout import Sample
from sppo_fast.tiny import default_model_path
from sppo_fast.train import Args, Stepper, main
from sppo_fast.value_head import ValueHead

WORLD = 2
SMOKE = ["--steps", "2", "--batch-size", "6", "--eval-size", "4", "--eval-k", "1", "--eval-every", "1",
         "--max-new-tokens", "16", "--micro-batch-tokens", "24", "--no-progress", "--threads", "1", "--save-every", "1",
         "--no-tensorboard"]


# ---------------------------------------------------------------------------------------------------------------------
# the same setup on one rank and on two
def build(model_path, optimizer="adamw"):
    """Stepper on the tiny policy (sharded under a process group) with a value head whose V differs by prompt."""
    torch.manual_seed(0)
    tok = load_tokenizer(model_path)
    policy = load_policy(model_path, device=torch.device("cpu"), attn_implementation="sdpa")
    head = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, std=0.3)
    policy, _, head = distributed.shard(policy, None, head)
    groups = [{"params": list(policy.parameters()), "lr": 0.5 if optimizer == "sgd" else 1e-3},
              {"params": list(head.parameters()), "lr": 0.5 if optimizer == "sgd" else 1e-2, "weight_decay": 0.0}]
    # SGD: the update IS the gradient, so equal weights after it mean equal gradients (Adam's first step is ~sign(g))
    opt = torch.optim.SGD(groups) if optimizer == "sgd" else torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = Args(temperature=0.7, max_grad_norm=0.0 if optimizer == "sgd" else 1.0, micro_batch_tokens=24,
                kernel_impl="torch")
    return tok, Stepper(args, policy, head, opt, sched, tok, torch.device("cpu"))


def fixed_batch(tok, which: int):
    """8 samples of uneven lengths (rank 0's half is the longer one) with fixed rewards."""
    enc = lambda s: tok(s, add_special_tokens=True)["input_ids"]  # noqa: E731
    pairs = [[("45+6+7=", "45+6=51,51+7=58;58"), ("7+8+1=", "7+8=15,15+1=16;16"), ("12+3=", "12+3=15;15"),
              ("3+4+5=", "3+4=7,7+5=12;12"), ("1+1=", "2;3"), ("5+1=", "6;6"), ("9+9=", "18;18"), ("2+2=", "4;5")],
             [("60+9+9=", "60+9=69,69+9=78;78"), ("8+8=", "8+8=16;16"), ("1+2+3=", "1+2=3,3+3=6;6"),
              ("99+1=", "100;10"), ("4+4=", "8;8"), ("11+2=", "13;13"), ("6+7=", "13;12"), ("0+5=", "5;5")]][which]
    samples = [Sample(enc(p), enc(r)[1:] + [tok.eos_token_id], "", True, i) for i, (p, r) in enumerate(pairs)]
    R = torch.tensor([[1., 0., 1., 1., 0., 1., 1., 0.], [1., 1., 1., 0., 1., 1., 0., 1.]][which])
    return samples, R


def update(stepper, samples, R) -> dict:
    """One update on this rank's share of `samples`; the step's statistics reduced over ranks (host floats)."""
    share = distributed.local_slice(list(range(len(samples))))
    local = [Sample(samples[i].prompt_ids, samples[i].response_ids, "", True, j) for j, i in enumerate(share)]
    totals, _ = stepper.update(local, R[share], None, check_values=True)
    return {k: v.item() for k, v in distributed.reduce_totals(totals).items()}


def full_weights(stepper) -> dict | None:
    """Policy and value-head weights as full tensors (rank 0; None on the others)."""
    out = {}
    for name, module in (("policy", stepper.policy), ("head", stepper.value_head)):
        state = distributed._full_model_state(module)
        out.update({f"{name}.{k}": v.clone() for k, v in (state or {}).items()})
    return out if distributed.is_main() else None


def save(stepper, run_dir, step):
    return checkpoint.save(run_dir, step, policy=stepper.policy, tokenizer=stepper.tokenizer,
                           value_head=stepper.value_head, optimizer=stepper.optimizer, scheduler=stepper.scheduler,
                           sampler_state=PromptSampler(8, 4).state_dict(), extra={}, keep_last=2)


def resume(ckpt):
    """What main() does on --resume: the policy from ckpt/policy, then sharding, then the trainer state."""
    tok, stepper = build(str(ckpt / "policy"))
    checkpoint.restore(ckpt, value_head=stepper.value_head, optimizer=stepper.optimizer, scheduler=stepper.scheduler)
    return stepper


# ---------------------------------------------------------------------------------------------------------------------
# the 2-rank job
def _worker(rank, port, model_path, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    out_dir, res = Path(out_dir), {}
    assert distributed.enabled() and distributed.world_size() == WORLD
    # gradients: one update with SGD
    tok, stepper = build(model_path, "sgd")
    res["sgd_totals"], res["sgd_weights"] = update(stepper, *fixed_batch(tok, 0)), full_weights(stepper)
    # AdamW: batch 0, checkpoint, batch 1
    tok, stepper = build(model_path)
    update(stepper, *fixed_batch(tok, 0))
    save(stepper, out_dir / "dist_run", 1)
    res["next_totals"] = update(stepper, *fixed_batch(tok, 1))
    # a 1-process checkpoint resumed on 2 ranks
    stepper = resume(checkpoint.resolve(out_dir / "single_run"))
    res["resumed_totals"] = update(stepper, *fixed_batch(tok, 1))
    # the CLI's loop end to end: rollouts, eval, metrics, checkpoints (SPPO with 2 minibatches: the scoring pass)
    res["main"] = main(build_args([*SMOKE, "--model", model_path, "--num-minibatches", "2", "--log-eval-samples",
                                   "--out-dir", str(out_dir), "--run-name", "main2"]))
    if distributed.is_main():
        torch.save(res, out_dir / "rank0.pt")
    distributed.barrier()
    distributed.teardown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = default_model_path()
    if not Path(path, "config.json").is_file():  # the shipped model is missing: a quickly warmed-up stand-in
        from sppo_fast import tiny
        path = str(tmp_path_factory.mktemp("tiny") / "tiny")
        tiny.build(path, steps=20, do_eval=False, verbose=False)
    return path


@pytest.fixture(scope="module")
def single(model_path, tmp_path_factory):
    """The one-process references, and the checkpoint that the 2-rank job resumes."""
    out = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    tok, stepper = build(model_path, "sgd")
    res = {"init_weights": full_weights(stepper)}
    res.update(sgd_totals=update(stepper, *fixed_batch(tok, 0)), sgd_weights=full_weights(stepper))
    tok, stepper = build(model_path)
    update(stepper, *fixed_batch(tok, 0))
    res["ckpt"] = save(stepper, out / "single_run", 1)
    res["next_totals"] = update(stepper, *fixed_batch(tok, 1))
    res["out"] = out
    return res


@pytest.fixture(scope="module")
def two_ranks(model_path, single):
    out = single["out"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, model_path, str(out)), nprocs=WORLD, start_method="spawn", join=True)
    return torch.load(out / "rank0.pt", weights_only=False)


def assert_totals_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-6), key


# ---------------------------------------------------------------------------------------------------------------------
def test_no_process_group_without_torchrun():
    assert "WORLD_SIZE" not in os.environ and not distributed.enabled()
    assert distributed.init(torch.device("cpu")) == torch.device("cpu") and not torch.distributed.is_initialized()
    items = list(range(5))
    assert distributed.local_slice(items) is items and distributed.sum_counts(3, 4) == (3, 4)
    assert distributed.even_micro_batches([[0], [1]]) == [[0], [1]]
    with distributed.full_params(torch.nn.Linear(2, 2)):
        pass


def test_two_ranks_match_one_rank_loss_metrics_and_gradients(single, two_ranks):
    """Loss, every reduced statistic (ratio max/min, grad norm) and the SGD-updated weights: the gradients of every
    parameter, lm_head/embeddings (read by the fused kernel outside FSDP's hooks) and value head included."""
    assert_totals_equal(two_ranks["sgd_totals"], single["sgd_totals"])
    want, got = single["sgd_weights"], two_ranks["sgd_weights"]
    assert got.keys() == want.keys()
    moved = max((want[k] - single["init_weights"][k]).abs().max().item() for k in want)
    assert moved > 1e-2  # the update did something
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_checkpoint_is_the_single_process_layout(single, two_ranks):
    """The 2-rank checkpoint (gathered to rank 0) holds the same files, keys and values as the 1-rank one."""
    one, two = single["ckpt"], checkpoint.resolve(single["out"] / "dist_run")
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for name in ("policy/model.safetensors", "value_head.safetensors", "trainer.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert set(b) == set(a) | ({"rng.torch.rank1"} if name == "trainer.safetensors" else set()), name
        for key in a:
            if not key.startswith("rng."):
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    assert not list(two.parent.glob("*.tmp"))


def test_resume_across_world_sizes_gives_the_same_next_loss(single, two_ranks):
    """2-rank run, checkpoint, next update == 1-rank run, checkpoint, next update; and each checkpoint resumed on
    the other world size (1 -> 2 in the job, 2 -> 1 here) continues with the same next-step statistics."""
    assert_totals_equal(two_ranks["next_totals"], single["next_totals"])
    assert_totals_equal(two_ranks["resumed_totals"], single["next_totals"])
    torch.set_num_threads(1)
    stepper = resume(checkpoint.resolve(single["out"] / "dist_run"))
    tok = stepper.tokenizer
    assert_totals_equal(update(stepper, *fixed_batch(tok, 1)), single["next_totals"])


def test_main_under_two_ranks_logs_once_and_resumes_on_one(single, two_ranks, model_path, capsys):
    run_dir = single["out"] / "main2"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "losses/policy" in r]
    assert [r["step"] for r in train_rows] == [1, 2]  # rank 0 alone logs: no duplicates
    assert all(r["rollout/response_len"] > 0 and 0 <= r["reward/mean"] <= 1 for r in train_rows)
    # counters are over the whole batch: the sampled tokens of both ranks
    assert train_rows[0]["rollout/sampled_tokens"] == pytest.approx(6 * train_rows[0]["rollout/response_len"])
    assert two_ranks["main"]["step"] == 2 and "eval/pass@1" in two_ranks["main"]["end"]
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step_000001", "step_000002"]
    # the 2-rank run resumed by one process (no process group): continues at step 3
    result = main(build_args([*SMOKE, "--model", model_path, "--steps", "3", "--resume", str(run_dir),
                              "--log-eval-samples"]))
    assert result["step"] == 3 and not torch.distributed.is_initialized()
    assert "resumed from" in capsys.readouterr().out
    # per-prompt eval rows: both ranks' halves, gathered in eval-set order (the one-process step 3 has the same
    # prompts in the same order), once per evaluation, their mean the logged pass@1
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    by_step = {s: [r for r in samples if r["step"] == s] for s in (0, 1, 2, 3)}
    assert all([r["index"] for r in rows_] == [0, 1, 2, 3] for rows_ in by_step.values())
    assert len({tuple(r["prompt"] for r in rows_) for rows_ in by_step.values()}) == 1
    evals = {r["step"]: r["eval/pass@1"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval/pass@1" in r}
    assert all(sum(r["reward"] for r in by_step[s]) / 4 == pytest.approx(evals[s]) for s in by_step)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
