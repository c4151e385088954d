"""TRL integration: FusedGRPOTrainer matches GRPOTrainer, and SPPOTrainer trains a value head (CPU, offline).

Tiny random Llama (hidden 32, 2 layers), the repo's character tokenizer built in memory, an in-memory dataset.
"""
import copy
import functools
import os
import shutil

import pytest
import safetensors.torch
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from transformers import TrainerCallback  # noqa: E402

from sppo_fast.integrations.trl import (FusedGRPOTrainer, SPPOConfig, SPPOTrainer, load_value_head,  # noqa: E402
                                        _ValueHeadGradients)
from sppo_fast.tiny import build_tokenizer  # noqa: E402
from sppo_fast.value_head import ValueHead  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["1+2=", "33+4=", "5+61+7=", "8=", "9+9=", "2+71=", "4+4+4=", "60=",
           "7+1=", "12+3+4=", "5=", "80+8=", "3+3=", "41+2+9=", "6+50=", "77="]


def tiny_model(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peakier softmax than the 0.02-std init gives, so that gradients are not tiny
        model.get_output_embeddings().weight.mul_(3.0)
    return model.train()


def digit_reward(completions, **kwargs):
    """In [0, 1], deterministic, and different for most different completions (so GRPO's advantages are not 0)."""
    return [(sum(map(ord, text)) % 7) / 6 for text in completions]


def config(cls, tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_completion_length=5, max_steps=1,
              learning_rate=1e-2, temperature=0.7, report_to="none", save_strategy="no", logging_steps=1,
              use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    if cls is GRPOConfig:
        kw["num_generations"] = 2
    kw.update(overrides)
    return cls(**kw)


def make(trainer_cls, cfg, model, tok, num_prompts=4, **kw):
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS[:num_prompts]})
    return trainer_cls(model=model, reward_funcs=digit_reward, args=cfg, train_dataset=dataset,
                       processing_class=tok, **kw)


def fixed_batch(tok):
    """A TRL-shaped batch: left-padded prompts [4, 6], right-padded completions [4, 5], advantages [4]."""
    g = torch.Generator().manual_seed(0)
    p_len, c_len = torch.tensor([6, 3, 5, 1]), torch.tensor([5, 2, 4, 1])
    prompt_ids = torch.full((4, 6), tok.pad_token_id)
    completion_ids = torch.full((4, 5), tok.pad_token_id)
    for b in range(4):
        prompt_ids[b, 6 - p_len[b]:] = torch.randint(4, 40, (p_len[b],), generator=g)
        completion_ids[b, :c_len[b]] = torch.randint(4, 40, (c_len[b],), generator=g)
    prompt_mask = (torch.arange(6) >= 6 - p_len[:, None]).long()
    completion_mask = (torch.arange(5) < c_len[:, None]).long()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.25, -2.0]),
            "num_items_in_batch": completion_mask.sum()}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls into sppo_fast's head from the patched forward (proves TRL's own head was replaced)."""
    import sppo_fast.integrations.trl as integration

    calls = []
    real = integration.lm_head_logprobs

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])  # the number of rows sent to the kernel
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "lm_head_logprobs", counting)
    return calls


def loss_and_grads(trainer, inputs):
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_fused_grpo_matches_trl_on_a_fixed_batch(tmp_path, loss_type, kernel_calls):
    tok = build_tokenizer()
    model = tiny_model(tok)
    reference = make(GRPOTrainer, config(GRPOConfig, tmp_path, loss_type=loss_type, entropy_coef=0.01), model, tok)
    fused = make(FusedGRPOTrainer, config(GRPOConfig, tmp_path, loss_type=loss_type, entropy_coef=0.01),
                 copy.deepcopy(model), tok)
    inputs = fixed_batch(tok)

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    ref_lp, ref_ent, _ = reference._get_per_token_logps_and_entropies(reference.model, ids, am, 5,
                                                                        compute_entropy=True)
    assert kernel_calls == []
    lp, ent, _ = fused._get_per_token_logps_and_entropies(fused.model, ids, am, 5, compute_entropy=True)
    assert kernel_calls == [int(inputs["completion_mask"].sum())]  # only the completion tokens reach the kernel
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert (lp[inputs["completion_mask"] == 0] == 0).all()

    ref_loss, ref_grads = loss_and_grads(reference, inputs)
    loss, grads = loss_and_grads(fused, inputs)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert fused._metrics["train"]["entropy"] == pytest.approx(reference._metrics["train"]["entropy"], rel=1e-5)


def test_fused_grpo_one_training_step_matches_trl(tmp_path, kernel_calls):
    """One full step (generate, reward, loss, SGD) with the same seed: same loss, same updated weights.

    SGD rather than Adam: Adam's first step is lr * sign(g) for every element, so rounding-level noise on an
    element whose gradient is ~0 would flip a full-size step; SGD keeps the update proportional to the gradient."""
    tok = build_tokenizer()
    model = tiny_model(tok)
    initial = copy.deepcopy(model)
    step = dict(temperature=1.0, optim="sgd")
    reference = make(GRPOTrainer, config(GRPOConfig, tmp_path / "a", **step), model, tok)
    reference.train()
    assert kernel_calls == []
    fused = make(FusedGRPOTrainer, config(GRPOConfig, tmp_path / "b", **step), copy.deepcopy(initial), tok)
    fused.train()
    assert len(kernel_calls) > 0
    ref_log, log = reference.state.log_history[0], fused.state.log_history[0]
    assert log["reward"] == ref_log["reward"]  # same completions were sampled
    assert log["loss"] == pytest.approx(ref_log["loss"], rel=1e-4, abs=1e-7)
    assert log["entropy"] == pytest.approx(ref_log["entropy"], rel=1e-4)
    for (name, p), q in zip(reference.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-4, msg=name)
    assert not torch.equal(initial.lm_head.weight, fused.model.lm_head.weight)  # the step did move the weights


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_sppo_one_step(tmp_path, num_iterations):
    """One SPPO step: finite loss, value head and policy both move; num_iterations=2 takes the frozen-V path."""
    tok = build_tokenizer()
    model = tiny_model(tok)
    cfg = config(SPPOConfig, tmp_path, num_iterations=num_iterations, value_learning_rate=0.1)
    assert cfg.num_generations == 1
    trainer = make(SPPOTrainer, cfg, model, tok)
    head_before = [p.detach().clone() for p in trainer.value_head.parameters()]
    policy_before = model.lm_head.weight.detach().clone()
    trainer.train()
    log = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(log["loss"]))
    assert {"sppo/value_loss", "sppo/value_mean", "clip_ratio/region_mean"} <= log.keys()
    assert log["sppo/value_mean"] == pytest.approx(0.5, abs=1e-6)  # the untrained head predicts value_init
    # the value head is in the optimizer with its own learning rate, and it moved
    groups = trainer.optimizer.param_groups
    assert any(g["lr"] == pytest.approx(0.1) or g.get("initial_lr") == pytest.approx(0.1) for g in groups)
    assert any(not torch.equal(b, p) for b, p in zip(head_before, trainer.value_head.parameters()))
    assert not torch.equal(policy_before, model.lm_head.weight)
    trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "value_head.pt").exists()
    saved = safetensors.torch.load_file(tmp_path / "saved" / "value_head.safetensors")  # no pickle
    assert saved.keys() == trainer.value_head.state_dict().keys()
    torch.testing.assert_close(saved["linear.weight"], trainer.value_head.linear.weight, atol=0, rtol=0)
    reloaded = load_value_head(ValueHead(32), str(tmp_path / "saved"))
    torch.testing.assert_close(reloaded.linear.bias, trainer.value_head.linear.bias, atol=0, rtol=0)


def test_sppo_loss_by_hand(tmp_path):
    """SPPOTrainer's loss on a fixed batch equals PPO-clip (ratio 1) with A = R - sigmoid(v) plus BCE(v, R)."""
    tok = build_tokenizer()
    model = tiny_model(tok)
    trainer = make(SPPOTrainer, config(SPPOConfig, tmp_path, value_coef=0.5), model, tok)
    with torch.no_grad():
        trainer.value_head.linear.weight.normal_(0, 0.5)
    inputs = fixed_batch(tok)
    inputs["sppo_rewards"] = torch.tensor([1.0, 0.0, float("nan"), 0.5])  # row 2: unscorable
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, dict(inputs))

    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        hidden = model.model(input_ids=ids, attention_mask=am).last_hidden_state
        v = trainer.value_head(hidden[:, 5])
        R = inputs["sppo_rewards"]
        A = torch.where(torch.isnan(R), 0.0, R - torch.sigmoid(v))
        mask = inputs["completion_mask"].bool()
        # ratio = 1 on the first step, so the clipped loss is -A per token, token-mean over the batch
        pg = (-A[:, None] * mask).sum() / mask.sum()
        ok = ~torch.isnan(R)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(v[ok], R[ok])
    torch.testing.assert_close(loss.detach(), pg + 0.5 * bce, atol=1e-6, rtol=1e-5)


def test_sppo_config_checks(tmp_path):
    with pytest.raises(ValueError, match="num_generations must be 1"):
        config(SPPOConfig, tmp_path, num_generations=2)
    with pytest.raises(ValueError, match="sppo_loss_agg"):
        config(SPPOConfig, tmp_path, sppo_loss_agg="mean")
    tok = build_tokenizer()
    with pytest.raises(NotImplementedError, match="beta"):
        make(SPPOTrainer, config(SPPOConfig, tmp_path, beta=0.1), tiny_model(tok), tok)


def test_fused_grpo_with_lora_matches_trl(tmp_path):
    """peft: TRL patches the base model under the LoRA wrapper; so do we. Same loss and adapter gradients."""
    peft = pytest.importorskip("peft")
    tok = build_tokenizer()
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    inputs = fixed_batch(tok)
    results = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        torch.manual_seed(1)  # same LoRA init in both
        trainer = make(cls, config(GRPOConfig, tmp_path), tiny_model(tok), tok, peft_config=peft.LoraConfig(**lora))
        results.append(loss_and_grads(trainer, inputs))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and all("lora_" in name for name in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


class HeadGradientRecorder(TrainerCallback):
    """Per optimizer step: the value head's gradient the optimizer applies (`.grad` just before `optimizer.step`,
    and the SGD update it makes) next to that step's own gradient, the sum of the gradients that the backward passes
    of this step's micro-batches produced (tensor hooks see each backward's contribution before accumulation)."""

    def __init__(self, head):
        self.head, self.own, self.applied, self.updates, self._before = head, [], [], [], None
        self._pending = [torch.zeros_like(p) for p in head.parameters()]
        for i, p in enumerate(head.parameters()):
            p.register_hook(functools.partial(self._add, i))

    def _add(self, i, grad):
        self._pending[i] += grad

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.applied.append([p.grad.clone() for p in self.head.parameters()])
        self.own.append(self._pending)
        self._pending = [torch.zeros_like(p) for p in self.head.parameters()]
        self._before = [p.detach().clone() for p in self.head.parameters()]

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.updates.append([p.detach() - b for p, b in zip(self.head.parameters(), self._before)])


@pytest.mark.parametrize("schedule", [{}, {"gradient_accumulation_steps": 2}, {"num_iterations": 2},
                                      {"steps_per_generation": 2}], ids=["plain", "grad_accum2", "iters2", "spg2"])
def test_value_head_applies_each_steps_own_gradient(tmp_path, schedule):
    """Over 4 optimizer steps the head's applied gradient is that step's own (the Trainer zeroes only the model's
    gradients: without clearing the head's, step k applied the sum of steps 1..k), SGD moves it by -lr x that
    gradient, and `sppo/value_grad_norm` logs its norm."""
    tok = build_tokenizer()
    value_lr = 0.1
    cfg = config(SPPOConfig, tmp_path, max_steps=4, optim="sgd", lr_scheduler_type="constant",
                 value_learning_rate=value_lr, **schedule)
    trainer = make(SPPOTrainer, cfg, tiny_model(tok), tok, num_prompts=8)
    recorder = HeadGradientRecorder(trainer.value_head)
    trainer.add_callback(recorder)
    trainer.train()

    assert len(recorder.applied) == 4
    norms = [log["sppo/value_grad_norm"] for log in trainer.state.log_history if "sppo/value_grad_norm" in log]
    assert len(norms) == 4
    for step, (own, applied, update) in enumerate(zip(recorder.own, recorder.applied, recorder.updates), 1):
        assert any(g.abs().sum() > 0 for g in own), f"step {step}: no value gradient at all"
        for g_own, g_applied, delta in zip(own, applied, update):
            torch.testing.assert_close(g_applied, g_own, atol=1e-7, rtol=1e-6, msg=f"step {step}")
            torch.testing.assert_close(delta, -value_lr * g_own, atol=1e-7, rtol=1e-5, msg=f"step {step}")
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in applied])).item()
        assert norms[step - 1] == pytest.approx(norm, rel=1e-5)
    assert all(p.grad is None for p in trainer.value_head.parameters())  # cleared after the last step too


def test_value_head_gradient_check_fails_without_clearing(tmp_path):
    """The recorder above does catch stale gradients: without the clearing callback, step 2 applies steps 1 + 2."""
    tok = build_tokenizer()
    cfg = config(SPPOConfig, tmp_path, max_steps=2, optim="sgd", lr_scheduler_type="constant")
    trainer = make(SPPOTrainer, cfg, tiny_model(tok), tok)
    trainer.remove_callback(_ValueHeadGradients)
    recorder = HeadGradientRecorder(trainer.value_head)
    trainer.add_callback(recorder)
    trainer.train()
    stale = [a + b for a, b in zip(recorder.own[0], recorder.own[1])]
    for g_applied, g_stale in zip(recorder.applied[1], stale):
        torch.testing.assert_close(g_applied, g_stale)
    assert not torch.allclose(recorder.applied[1][1], recorder.own[1][1])  # the bias's gradient


def _resume_config(path, **overrides):
    return config(SPPOConfig, path, max_steps=4, save_strategy="steps", save_steps=2, value_learning_rate=0.05,
                  **overrides)


def _final_state(trainer):
    state = {f"model.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    state.update({f"head.{n}": p.detach().clone() for n, p in trainer.value_head.named_parameters()})
    return state


def _logs_after(trainer, step):
    keep = ("loss", "reward", "sppo/value_loss", "sppo/value_mean", "sppo/value_grad_norm", "grad_norm")
    # (with num_iterations=2 the steps that reuse a rollout log no reward)
    return [{k: log.get(k) for k in keep} for log in trainer.state.log_history if "loss" in log and log["step"] > step]


@pytest.mark.parametrize("schedule", [{}, {"num_iterations": 2}], ids=["plain", "iters2"])
def test_sppo_resume_is_bit_exact_and_the_head_is_safetensors(tmp_path, schedule):
    """Resume at step 2 reproduces the uninterrupted run's steps 3 and 4 exactly (logged metrics, policy and head);
    the checkpoint's head is value_head.safetensors (no pickle); a legacy value_head.pt resumes the same, with a
    FutureWarning; no head file is an error unless value_head_on_resume='fresh'."""
    tok = build_tokenizer()
    model = tiny_model(tok)
    # 16 prompts, 4 per step: the run stays in its first epoch. (TRL's RepeatSampler keeps its shuffling generator
    # out of the checkpoint, so a resume in a later epoch reshuffles from the seed: TRL's limit, not the head's.)
    full = make(SPPOTrainer, _resume_config(tmp_path / "full", **schedule), copy.deepcopy(model), tok, 16)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "value_head.safetensors").is_file()
    assert not any("value" in f and not f.endswith(".safetensors") for f in os.listdir(ckpt)), os.listdir(ckpt)
    with safetensors.safe_open(str(ckpt / "value_head.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"linear.weight", "linear.bias"}
    expected_logs, expected = _logs_after(full, 2), _final_state(full)
    assert len(expected_logs) == 2

    def resume(name, checkpoint, **overrides):
        trainer = make(SPPOTrainer, _resume_config(tmp_path / name, **schedule, **overrides), copy.deepcopy(model),
                       tok, 16)
        trainer.train(resume_from_checkpoint=str(checkpoint))
        return trainer

    resumed = resume("resumed", ckpt)
    assert _logs_after(resumed, 2) == expected_logs  # bit for bit
    got = _final_state(resumed)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name

    legacy = tmp_path / "legacy"
    shutil.copytree(ckpt, legacy)
    head = safetensors.torch.load_file(legacy / "value_head.safetensors")
    os.remove(legacy / "value_head.safetensors")
    torch.save(head, legacy / "value_head.pt")
    with pytest.warns(FutureWarning, match="weights_only=True"):
        from_legacy = resume("from_legacy", legacy)
    assert torch.equal(_final_state(from_legacy)["head.linear.weight"], expected["head.linear.weight"])

    os.remove(legacy / "value_head.pt")
    with pytest.raises(FileNotFoundError, match="value_head_on_resume='fresh'"):
        resume("headless", legacy)
    fresh = resume("fresh", legacy, value_head_on_resume="fresh")
    step3 = next(log for log in fresh.state.log_history if log.get("step") == 3)
    assert step3["sppo/value_mean"] == pytest.approx(0.5, abs=1e-6)  # value_init: the saved head was not used
    # ...nor the saved head's Adam moments: its optimizer state counts the 2 resumed steps, the policy's all 4
    assert fresh.optimizer.state[fresh.value_head.linear.bias]["step"] == 2
    assert fresh.optimizer.state[fresh.model.lm_head.weight]["step"] == 4


def test_sppo_resume_from_a_grpo_checkpoint_says_what_to_do(tmp_path):
    tok = build_tokenizer()
    model = tiny_model(tok)
    grpo = make(FusedGRPOTrainer, config(GRPOConfig, tmp_path / "grpo", save_strategy="steps", save_steps=1),
                copy.deepcopy(model), tok)
    grpo.train()
    sppo = make(SPPOTrainer, _resume_config(tmp_path / "sppo", value_head_on_resume="fresh"), model, tok)
    with pytest.raises(ValueError, match="not an SPPOTrainer checkpoint"):
        sppo.train(resume_from_checkpoint=str(tmp_path / "grpo" / "checkpoint-1"))


@pytest.mark.parametrize("trainer_cls", [FusedGRPOTrainer, SPPOTrainer])
def test_lm_head_with_bias_is_refused_at_construction(tmp_path, trainer_cls):
    tok = build_tokenizer()
    model = tiny_model(tok)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(32, 64, bias=True)
    cfg = config(GRPOConfig if trainer_cls is FusedGRPOTrainer else SPPOConfig, tmp_path)
    with pytest.raises(ValueError, match=r"lm_head has a bias.*trl\.GRPOTrainer"):
        make(trainer_cls, cfg, model, tok)


def _two_rank_worker(rank, port, out_dir):
    """One rank of a 2-process gloo run (accelerate's MULTI_CPU): 3 SGD steps of SPPOTrainer, 2 prompts per rank."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tok = build_tokenizer()
    cfg = config(SPPOConfig, os.path.join(out_dir, "run"), per_device_train_batch_size=2, max_steps=3, optim="sgd",
                 lr_scheduler_type="constant", value_learning_rate=0.1)
    trainer = make(SPPOTrainer, cfg, tiny_model(tok), tok, num_prompts=8)
    recorder = HeadGradientRecorder(trainer.value_head)
    trainer.add_callback(recorder)
    trainer.train()
    tensors = {}
    for step, (own, applied) in enumerate(zip(recorder.own, recorder.applied)):
        for i, (g_own, g_applied) in enumerate(zip(own, applied)):
            tensors[f"own.{step}.{i}"], tensors[f"applied.{step}.{i}"] = g_own, g_applied
    for name, p in trainer.value_head.named_parameters():
        tensors[f"head.{name}"] = p.detach()
    tensors["policy.lm_head"] = trainer.model.lm_head.weight.detach()
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                os.path.join(out_dir, f"rank{rank}.safetensors"))
    # Shut gloo down before the interpreter does: exiting with the group alive can abort a rank in teardown
    # ("terminate called without an active exception", SIGABRT), seen once in CI after a passing run.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes that each import TRL: ~30 s of CPU
def test_value_head_gradients_are_averaged_over_processes(tmp_path):
    """DDP averages the policy's gradients; the head is not in the DDP module, so SPPOTrainer averages its gradients
    itself: every step applies the mean of the two ranks' own gradients, and the two heads stay identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (safetensors.torch.load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert torch.equal(r0["policy.lm_head"], r1["policy.lm_head"])  # DDP, as a sanity check of the setup
    for step in range(3):
        for i in range(2):
            own0, own1 = r0[f"own.{step}.{i}"], r1[f"own.{step}.{i}"]
            assert not torch.equal(own0, own1)  # the ranks saw different prompts
            for r in (r0, r1):
                torch.testing.assert_close(r[f"applied.{step}.{i}"], (own0 + own1) / 2, atol=1e-7, rtol=1e-6)
    for name in ("head.linear.weight", "head.linear.bias"):
        assert torch.equal(r0[name], r1[name]), name


def test_load_best_model_at_end_restores_the_best_checkpoints_head(tmp_path):
    tok = build_tokenizer()
    cfg = config(SPPOConfig, tmp_path, max_steps=3, save_strategy="steps", save_steps=1, eval_strategy="steps",
                 eval_steps=1, load_best_model_at_end=True, metric_for_best_model="sppo/value_loss",
                 greater_is_better=False, value_learning_rate=0.1, per_device_eval_batch_size=4)
    trainer = make(SPPOTrainer, cfg, tiny_model(tok), tok, num_prompts=8,
                   eval_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS[8:12]}))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = safetensors.torch.load_file(os.path.join(best, "value_head.safetensors"))
    last = safetensors.torch.load_file(tmp_path / "checkpoint-3" / "value_head.safetensors")
    assert not torch.equal(saved["linear.bias"], last["linear.bias"])  # (else this test could not tell)
    for name, p in trainer.value_head.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
