"""The memory-constrained mode (sppo_fast/memory.py): estimates against hand computations, the plan's sizing and its
errors, the precision rule (lr ~ 1e-6 updates must reach bf16 weights), plain checkpoints of torchao optimizers, and
the trainer in the mode against the default (CPU, tiny model)."""
import json
import math
from pathlib import Path

import pytest
import torch

from sppo_fast import memory

GiB = memory.GiB
torchao = pytest.importorskip("torchao", reason="the memory mode's optimizers need torchao: pip install '.[memory]'")

# Qwen2-1.5B's shape (the anchor model): 28 layers, H 1536, 12 heads / 2 KV heads of 128, MLP 8960, V 151936, tied
QWEN15 = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
              intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def qwen_shape():
    from transformers import Qwen2Config
    return memory.model_shape(Qwen2Config(**QWEN15))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """The shipped tiny model when it is there, else a 20-step build of the same architecture (a few seconds)."""
    from sppo_fast.tiny import build, default_model_path
    if (Path(default_model_path()) / "config.json").is_file():
        return default_model_path()
    path = tmp_path_factory.mktemp("tiny")
    build(path, steps=2, batch_size=8, n_train=64, n_eval=8, do_eval=False, verbose=False)
    return str(path)


def test_parse_bytes():
    assert memory.parse_bytes("20GiB") == 20 * 2**30 == memory.parse_bytes("20G") == memory.parse_bytes("20 gib")
    assert memory.parse_bytes("24GB") == 24 * 10**9
    assert memory.parse_bytes("512MiB") == 512 * 2**20 and memory.parse_bytes("1.5TiB") == int(1.5 * 2**40)
    assert memory.parse_bytes(12345) == memory.parse_bytes("12345") == 12345
    with pytest.raises(ValueError, match="cannot read a memory size"):
        memory.parse_bytes("twenty gigs")


def test_estimate_matches_hand_computation(qwen_shape):
    H, L, I, V, KVD = 1536, 28, 8960, 151936, 2 * 128
    per_layer = (H * H + H) + 2 * (H * KVD + KVD) + H * H + 3 * H * I + 2 * H  # q (bias), k, v (bias), o, MLP, norms
    P = V * H + L * per_layer + H  # tied embedding, layers, final norm
    assert qwen_shape.params == P == 1_543_714_304
    kw = dict(micro_batch_tokens=16384, seq_len=2048, prompt_len=512, gen_batch_size=64)
    fp32 = memory.estimate(qwen_shape, "fp32", **kw)
    assert (fp32.weights, fp32.grads, fp32.optimizer_states) == (4 * P, 4 * P, 8 * P)  # the 16 B/param floor: 23 GiB
    assert abs((fp32.weights + fp32.grads + fp32.optimizer_states) / GiB - 23.0) < 0.1
    bf16 = memory.estimate(qwen_shape, "bf16", **kw)
    assert (bf16.weights, bf16.grads, bf16.optimizer_states) == (2 * P, 2 * P, 8 * P)
    # 8-bit: 1 byte per element and an fp32 scale per 256-block for each of the two states; the 1536-element norms
    # (under 4096 elements) keep fp32 states
    q8 = memory.estimate(qwen_shape, "8bit", **kw)
    small = (2 * L + 1) * H + L * (H + 2 * KVD)  # norms and q/k/v biases
    big = P - small
    assert q8.optimizer_states == 2 * (big + 4 * big // 256) + 8 * small
    off = memory.estimate(qwen_shape, "offload", **kw)
    assert off.optimizer_states == 8 * small and off.optimizer_host == 12 * big
    # KV cache bytes per token = 2 (K and V) * layers * kv_heads * head_dim * dtype bytes: 28 KiB in bf16
    assert bf16.kv_bytes_per_token == 2 * L * 2 * 128 * 2 == 28672 and fp32.kv_bytes_per_token == 2 * 28672
    assert bf16.kv_cache == math.ceil(64 * 2048 * 28672 * (1 + 1 / L))
    # checkpointing keeps each layer's input: L * T * H * (residual bytes) plus one layer rebuilt in backward
    kept, layer = memory.activation_bytes_per_token(qwen_shape, weight_bytes=2, compute_bytes=2, autocast=True,
                                                    checkpointing=True)
    assert kept == L * H * 2 and layer > 0
    assert bf16.activations == 16384 * (kept + 2 * layer + 16 * H)
    # the anchor measured 28.9 GiB for fp32 + AdamW + checkpointing at 8 x 2048 tokens (H200, fused CCE log-probs)
    ckpt = memory.estimate(qwen_shape, "ckpt", **kw)
    assert 26 < ckpt.update_peak / GiB < 33


def test_lora_and_critic_counts(qwen_shape):
    from transformers import Qwen2Config
    lora = memory.model_shape(Qwen2Config(**QWEN15), lora_rank=16)
    H, L, I, KVD = 1536, 28, 8960, 256
    per_layer = 16 * ((H + H) + 2 * (H + KVD) + (H + H) + 2 * (H + I) + (I + H))
    assert sum(lora.numels) == L * per_layer and sum(lora.frozen_numels) == qwen_shape.params
    e = memory.estimate(lora, "bf16", micro_batch_tokens=2048, seq_len=2048, gen_batch_size=1)
    assert e.grads == 4 * L * per_layer and e.weights == 2 * qwen_shape.params + 4 * L * per_layer
    critic = memory.model_shape(Qwen2Config(**QWEN15), critic=True)
    assert sum(critic.critic_numels) == qwen_shape.params  # tied: the decoder holds the embedding


def test_gen_batch_size_from_budget(qwen_shape):
    plan = memory.make_plan(qwen_shape, budget="40GiB", level="bf16", seq_len=2048, prompt_len=512,
                            micro_batch_tokens=16384, batch_sequences=512)
    usable = int(40 * GiB * (1 - memory.RESERVE_FRACTION))
    static = 2 * qwen_shape.params + 8 * qwen_shape.params  # bf16 weights + fp32 states (grads freed in rollout)
    per_seq = math.ceil(2048 * 28672 * (1 + 1 / 28)) + 4 * 151936 * 4 + 512 * (4 * 1536 + 3 * 8960) * 2
    assert abs(plan.gen_batch_size - (usable - static) // per_seq) <= 1
    assert plan.estimate["rollout_peak"] <= usable
    # a batch smaller than what fits is generated whole; the user's smaller gen_batch_size is kept
    small = memory.make_plan(qwen_shape, budget="40GiB", level="bf16", seq_len=2048, prompt_len=512,
                             micro_batch_tokens=16384, batch_sequences=8)
    assert small.gen_batch_size == 8
    mine = memory.make_plan(qwen_shape, budget="40GiB", level="bf16", seq_len=2048, prompt_len=512,
                            micro_batch_tokens=16384, batch_sequences=512, gen_batch_size=4)
    assert mine.gen_batch_size == 4
    # the update's micro-batch shrinks to what fits, never below one full-length sequence
    tight = memory.make_plan(qwen_shape, budget="20GiB", level="8bit", seq_len=2048, prompt_len=512,
                             micro_batch_tokens=10**6, batch_sequences=64)
    assert 2048 <= tight.micro_batch_tokens < 10**6 and tight.estimate["update_peak"] <= tight.usable


def test_auto_plan_takes_the_first_rung_that_fits(qwen_shape):
    kw = dict(seq_len=2048, prompt_len=512, micro_batch_tokens=16384, batch_sequences=64)
    assert memory.make_plan(qwen_shape, budget=None, **kw).level == "fp32"  # no budget: today's default
    assert memory.make_plan(qwen_shape, budget=None, gradient_checkpointing=True, **kw).level == "ckpt"
    # 12 GiB is offload's since the chunked kernel's 512 MiB [C, V] scratch is counted; 13 GiB still holds 8bit
    levels = {b: memory.make_plan(qwen_shape, budget=b, **kw).level
              for b in ("80GiB", "26GiB", "20GiB", "13GiB", "12GiB")}
    assert levels == {"80GiB": "fp32", "26GiB": "bf16", "20GiB": "8bit", "13GiB": "8bit", "12GiB": "offload"}
    assert memory.make_plan(qwen_shape, budget="10GiB", **kw).level == "offload"
    # no offload without CUDA: past 8bit the CPU ladder goes straight to qlora (NF4 runs on CPU)
    cpu = memory.make_plan(qwen_shape, budget="10GiB", cuda=False, **kw)
    assert [r["level"] for r in cpu.ladder] == ["fp32", "ckpt", "bf16", "8bit", "qlora"]
    assert cpu.level == "qlora" and [r["fits"] for r in cpu.ladder] == [False] * 4 + [True]


def test_too_small_budget_is_a_clear_error(qwen_shape):
    kw = dict(seq_len=2048, prompt_len=512, micro_batch_tokens=16384, batch_sequences=64)
    with pytest.raises(MemoryError, match=r"cannot hold even one sequence of 2048 tokens.*offload.*weights 2\.8"
                                          r".*--memory-plan qlora"):
        memory.make_plan(qwen_shape, budget="6GiB", level="offload", **kw)
    # the weights fit, but one sequence's KV cache does not (a million-token response)
    with pytest.raises(MemoryError, match="KV cache"):
        memory.make_plan(qwen_shape, budget="20GiB", level="8bit", seq_len=10**6, prompt_len=512,
                         micro_batch_tokens=16384, batch_sequences=64)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        memory.make_plan(qwen_shape, level="offload", cuda=False, **kw)
    with pytest.raises(ValueError, match="--memory-plan must be"):
        memory.make_plan(qwen_shape, level="fp8", **kw)


# ---------------------------------------------------------------------------------------------------------------------
# The precision rule: lr = 1e-6 on bf16 weights of magnitude ~1 (bf16 spacing 2^-8 below 1.0, 4000x the step)
def _run_tiny_lr(name, steps=20, n=256 * 256, lr=1e-6):
    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.full((n,), 0.75))  # 0.75: bf16 spacing 2^-8 on both sides, so rounding is fair
    w = torch.nn.Parameter(ref.detach().bfloat16())
    opt = memory.build_optimizer([{"params": [w], "lr": lr, "weight_decay": 0.0}], name, torch.device("cpu"))
    ref_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        g = 1.0 + 0.5 * torch.randn(n)  # mostly positive: every step pushes the weights down by ~lr
        w.grad, ref.grad = g.bfloat16(), g.clone()
        opt.step()
        ref_opt.step()
    return (w.detach().float() - 0.75), (ref.detach() - 0.75)


@pytest.mark.parametrize("name", ["adamw-sr", "adamw8bit-sr"])
def test_stochastic_rounding_applies_lr_1e6_updates_to_bf16_weights(name):
    delta, ref = _run_tiny_lr(name)
    # each element moves by ~20 lr in expectation; stochastic rounding makes it 0 or -2^-8 with the right odds, so
    # the mean matches the fp32 reference within the rounding noise: std = sqrt(spacing * |delta| / n)
    noise = math.sqrt(2**-8 * ref.abs().mean().item() / delta.numel())
    assert ref.mean().item() < -1e-5
    assert abs(delta.mean().item() - ref.mean().item()) < 5 * noise, (delta.mean().item(), ref.mean().item(), noise)
    assert (delta != 0).any()


def test_plain_bf16_adamw_drops_lr_1e6_updates():
    """Why the mode insists on stochastic rounding: the same steps through torch AdamW on bf16 weights (round to
    nearest) change nothing at all. (bitsandbytes 0.50.2's AdamW8bit on CPU, measured the same way: also 0.)"""
    delta, ref = _run_tiny_lr("adamw")
    assert ref.mean().item() < -1e-5 and (delta == 0).all()


@pytest.mark.parametrize("name", ["adamw-sr", "adamw8bit-sr"])
def test_torchao_state_dict_is_plain_and_reloads(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 256).bfloat16())
    norm = torch.nn.Parameter(torch.ones(100).bfloat16())  # small: unquantized states, kept fp32
    make = lambda: memory.build_optimizer([{"params": [w, norm], "lr": 1e-3, "weight_decay": 0.0}], name,
                                          torch.device("cpu"))
    opt = make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    for _ in range(3):
        w.grad, norm.grad = torch.randn_like(w), torch.randn_like(norm)
        opt.step()
        sched.step()
    assert opt.state[norm]["exp_avg_sq"].dtype == torch.float32  # not the param's bf16
    sd = opt.state_dict()
    assert isinstance(sd["param_groups"][0]["lr"], float) and sd["param_groups"][0]["lr"] == 5e-4
    assert isinstance(sched.state_dict()["base_lrs"][0], float)
    for st in sd["state"].values():
        for k, v in st.items():  # plain tensors: fp32 states, or a quantized state's uint8 codes and fp32 scales
            assert type(v) is torch.Tensor and (k == "step" or v.dtype in (torch.float32, torch.uint8)), (k, v.dtype)
    assert ("exp_avg.codes" in sd["state"][0]) == (name == "adamw8bit-sr")
    # through the checkpoint's own format: tensors in safetensors, the rest as JSON
    from safetensors.torch import load as st_load, save as st_save
    from sppo_fast import checkpoint
    tensors, meta = checkpoint._flatten_optimizer(sd)
    restored = checkpoint._unflatten_optimizer(st_load(st_save(tensors)), json.loads(json.dumps(meta)))
    opt2 = make()
    opt2.load_state_dict(restored)
    for p in (w, norm):
        for k in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][k], opt2.state[p][k]
            assert type(a) is type(b)
            deq = lambda t: t.dequantize() if type(t) is not torch.Tensor else t
            assert torch.equal(deq(a).float(), deq(b).float()), (p.shape, k)
    assert isinstance(opt2.param_groups[0]["lr"], float)
    opt2.step()  # still steps after a reload (lr back to a tensor inside step)


def test_offload_state_dict_merge_split_roundtrip():
    a, b, c = (torch.nn.Parameter(torch.randn(5)) for _ in range(3))
    opts = [torch.optim.AdamW([a], lr=1.0), torch.optim.AdamW([{"params": [b], "lr": 2.0}, {"params": [c]}], lr=3.0)]
    for p in (a, b, c):
        p.grad = torch.randn(5)
    for o in opts:
        o.step()
    sds = [o.state_dict() for o in opts]
    merged = memory.merge_state_dicts(sds)
    assert [g["params"] for g in merged["param_groups"]] == [[0], [1], [2]] and sorted(merged["state"]) == [0, 1, 2]
    back = memory.split_state_dict(merged, [1, 2])
    for orig, got in zip(sds, back):
        assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in orig["param_groups"]]
        for pid, st in orig["state"].items():
            assert all(torch.equal(st[k], got["state"][pid][k]) for k in st)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: offload and the caching allocator")
def test_offload_and_cache_release_on_cuda():
    dev = torch.device("cuda")
    lin = torch.nn.Linear(256, 256, bias=True).to(dev, torch.bfloat16)
    opt = memory.build_optimizer([{"params": list(lin.parameters()), "lr": 1e-6, "weight_decay": 0.0}],
                                 "offload-adamw-sr", dev)
    before = lin.weight.detach().float().clone()
    for _ in range(3):
        lin(torch.ones(8, 256, device=dev, dtype=torch.bfloat16)).float().sum().backward()
        params = memory.params_for_clipping(opt)
        torch.nn.utils.clip_grad_norm_(params, 1e30)
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, lin.weight.detach().float())
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    opt.load_state_dict(sd)
    x = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    del x
    memory.release_cached(dev)
    assert torch.cuda.memory_reserved(dev) < (256 << 20)
    memory.phase_peak_gib(dev)
    assert memory.phase_peak_gib(dev) < 0.25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: allocator statistics")
def test_generate_releases_its_kv_cache_on_cuda(tiny_path):
    from sppo_fast.model import load_policy, load_tokenizer
    from sppo_fast.rollout import generate

    dev = torch.device("cuda")
    policy = load_policy(tiny_path, device=dev, attn_implementation="sdpa", dtype=torch.bfloat16)
    tok = load_tokenizer(tiny_path)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(dev)
    memory.phase_peak_gib(dev)
    samples = generate(policy, tok, ["12+3="] * 64, max_new_tokens=32, temperature=0.6)
    peak = memory.phase_peak_gib(dev)
    assert len(samples) == 64 and peak * GiB > before  # the cache existed during generation...
    assert torch.cuda.memory_allocated(dev) - before < (1 << 20)  # ...and nothing of it outlives generate()
    memory.release_cached(dev)
    assert torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev) < (64 << 20)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer in the mode (CPU, the tiny model)
def _update_delta(tiny_path, optimizer, dtype, lr, samples, R):
    from sppo_fast.model import load_policy, load_tokenizer
    from sppo_fast.train import Args, Stepper
    from sppo_fast.value_head import ValueHead

    torch.manual_seed(0)
    dev = torch.device("cpu")
    args = Args(lr=lr, value_lr=1e-2, micro_batch_tokens=10**6, kernel_impl="torch", check_inputs_steps=0)
    policy = load_policy(tiny_path, device=dev, attn_implementation="sdpa", dtype=dtype)
    policy.train()
    head = ValueHead(policy.config.hidden_size)
    before = [p.detach().float().clone() for p in policy.parameters()]
    groups = [{"params": list(policy.parameters()), "lr": lr, "weight_decay": 0.0},
              {"params": list(head.parameters()), "lr": 1e-2, "weight_decay": 0.0}]
    opt = memory.build_optimizer(groups, optimizer, dev)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stepper = Stepper(args, policy, head, opt, sched, load_tokenizer(tiny_path), dev)
    totals, _ = stepper.update(samples, R, None, check_values=False)
    assert all(p.grad is None for p in policy.parameters())  # freed after the step, before the next rollout
    return torch.cat([(p.detach().float() - b).flatten() for p, b in zip(policy.parameters(), before)]), totals


def test_trainer_update_in_bf16_mode_matches_fp32_at_lr_1e6(tiny_path):
    """One real Stepper.update (packing, fused-kernel loss, clipping, optimizer) at the paper's lr = 1e-6. The
    weight change projected on the fp32 run's change: ~1 with stochastic rounding, ~0 with plain bf16 AdamW."""
    from sppo_fast.rollout import Sample

    g = torch.Generator().manual_seed(0)
    rand_ids = lambda lo, hi: torch.randint(4, 64, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                            generator=g).tolist()
    samples = [Sample(rand_ids(4, 12), rand_ids(4, 20), "", True, i) for i in range(16)]
    R = (torch.rand(16, generator=g) > 0.5).float()
    d32, t32 = _update_delta(tiny_path, "adamw", torch.float32, 1e-6, samples, R)
    dsr, tsr = _update_delta(tiny_path, "adamw-sr", torch.bfloat16, 1e-6, samples, R)
    d0, _ = _update_delta(tiny_path, "adamw", torch.bfloat16, 1e-6, samples, R)
    proj = lambda d: (d @ d32 / (d32 @ d32)).item()
    assert 0.8 < proj(dsr) < 1.2, proj(dsr)  # measured 1.008
    assert abs(proj(d0)) < 0.2, proj(d0)  # measured 0.026: 98% of the elements did not move at all
    for key in ("losses/policy", "losses/value"):
        assert abs(tsr[key].item() - t32[key].item()) < 1e-3 * max(1.0, abs(t32[key].item()))
    assert abs(tsr["stats/logp"].item() - t32["stats/logp"].item()) < 0.05  # bf16 forward vs fp32 forward


FAST = ["--steps", "3", "--batch-size", "16", "--eval-size", "8", "--eval-k", "1", "--eval-every", "0",
        "--max-new-tokens", "24", "--max-prompt-tokens", "40", "--no-progress", "--threads", "1", "--save-every", "0",
        "--lr", "1e-3", "--value-lr", "1e-2", "--no-tensorboard"]


def test_short_sppo_run_in_memory_mode_matches_default(tiny_path, tmp_path, capsys):
    """3 steps each, same seed. The longer comparison, run by hand on the shipped tiny model (demo preset, lr 3e-5,
    50 steps, seed 0, CPU): held-out greedy pass@1 26.2% -> 46.5% (default, fp32 + AdamW), 27.0% -> 50.4% (bf16 plan),
    27.0% -> 49.6% (8bit plan); sampled avg@4 at the end 41.3% / 40.1% / 40.9%; mean training reward over steps 41-50
    0.414 / 0.423 / 0.411. On 256 prompts one binomial std is ~3 points: the three agree within noise.
    (`sppo-fast train --steps 50 --eval-every 25 [--memory-plan bf16|8bit]`, ~160 s each on 2 cores.)"""
    from sppo_fast.cli import build_args
    from sppo_fast.train import main

    def run(name, *flags):
        main(build_args(["--model", tiny_path, *FAST, "--out-dir", str(tmp_path), "--run-name", name, *flags]))
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "losses/policy" in r], tmp_path / name

    base, _ = run("default")
    mem, run_dir = run("memory", "--memory-budget", "1GiB", "--memory-plan", "bf16")
    out = capsys.readouterr().out
    assert "memory plan: bf16" in out and "stochastic rounding" in out
    report = json.loads((run_dir / "memory_report.json").read_text())
    assert report["level"] == "bf16" and report["weights_dtype"] == "bfloat16" and report["gradient_checkpointing"]
    assert (run_dir / "memory_report.txt").read_text().startswith("memory plan: bf16")
    assert "gradient_checkpointing: true" in (run_dir / "config.yaml").read_text()
    assert not any(k.startswith("memory/") for r in mem for k in r)  # peaks are measured on CUDA only
    # step 1 samples from the same initial weights with the same seed (bf16 vs fp32 logits may flip a rare token):
    # its reward and losses agree closely; later steps follow their own samples, so compare them loosely
    assert abs(mem[0]["reward/mean"] - base[0]["reward/mean"]) <= 0.125
    assert abs(mem[0]["losses/value"] - base[0]["losses/value"]) < 0.05
    for b, m in zip(base, mem):
        assert math.isfinite(m["losses/policy"]) and math.isfinite(m["stats/grad_norm"])
        assert abs(m["losses/value"] - b["losses/value"]) < 0.25
    # the policy learned: checkpointed bf16 weights differ from the initial ones
    from safetensors.torch import load_file
    final = load_file(str(run_dir / "checkpoints" / "step_000003" / "policy" / "model.safetensors"))
    init = load_file(str(Path(tiny_path) / "model.safetensors"))
    assert next(iter(final.values())).dtype == torch.bfloat16
    assert any(not torch.equal(final[k].float(), init[k].bfloat16().float()) for k in final)


def test_resume_in_8bit_mode_is_exact(tiny_path, tmp_path):
    """The 8-bit states go through the checkpoint as uint8 codes + fp32 scales, the RNG (stochastic rounding draws
    from it) as usual: step 3 after resuming at step 2 equals the uninterrupted run's step 3."""
    from sppo_fast.cli import build_args
    from sppo_fast.train import main

    flags = ["--model", tiny_path, *FAST, "--batch-size", "8", "--memory-plan", "8bit", "--out-dir", str(tmp_path)]
    main(build_args([*flags, "--run-name", "full"]))
    main(build_args([*flags, "--steps", "2", "--run-name", "part"]))
    main(build_args([*flags, "--resume", str(tmp_path / "part")]))
    step3 = lambda name: next(json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                              if json.loads(line)["step"] == 3 and "losses/policy" in line)
    a, b = step3("full"), step3("part")
    for key in ("losses/policy", "losses/value", "reward/mean", "stats/logp", "stats/grad_norm"):
        assert a[key] == b[key], (key, a[key], b[key])


def test_bench_memory_quick(tmp_path):
    """bench/bench_memory.py --quick: the same update path on a tiny Qwen2 shape on CPU, results where it is told."""
    import subprocess
    import sys
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--settings", "baseline,bf16", "--out",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for f in tmp_path.glob("memory-cpu-*.jsonl") for line in f.read_text().splitlines()]
    assert [r["setting"] for r in rows] == ["baseline", "bf16"]
    for r in rows:
        assert r["peak_update_gib"] is None and r["device"] == "cpu" and "git_sha" in r and r["torchao"]
        assert math.isfinite(r["policy_loss"]) and r["step_s"] > 0
    assert list(tmp_path.glob("memory-cpu-*.md"))


# ---------------------------------------------------------------------------------------------------------------------
# The qlora rung: a frozen NF4 base, fp32 LoRA adapters and value head (issue 25)
QWEN7 = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
             intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)  # Qwen2.5-7B's config.json
ONE_STEP = dict(seq_len=512 + 1024, prompt_len=512, micro_batch_tokens=16384, batch_sequences=64)


@pytest.mark.parametrize("shape", [(256, 1536), (1024, 2048)])  # Qwen2-1.5B's k_proj; a 2-scaler-block weight
def test_nf4_bytes_match_torchao_inner_tensors(shape):
    """The planner's NF4 byte count is the sum of a real NF4Tensor's inner tensors (by hand at 4096 x 4096:
    8,652,834 bytes both ways, 0.5157 B/param)."""
    from torchao.quantization import to_nf4
    w = to_nf4(torch.randn(*shape, dtype=torch.bfloat16))
    names, _ = w.__tensor_flatten__()
    inner = sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names)
    assert memory.nf4_bytes(shape[0] * shape[1]) == inner
    assert 0.5156 < inner / w.numel() < 0.52


def test_nf4_dequantization_working_set(tmp_path):
    """F.linear on an NF4 weight rebuilds the dense bf16 weight: its peak allocation per element, read from the
    profiler's CPU allocator events, is the NF4_DEQUANT_BYTES the estimate charges (measured 14.03)."""
    from torch.profiler import ProfilerActivity, profile
    from torchao.quantization import to_nf4
    w = to_nf4(torch.randn(1024, 1024, dtype=torch.bfloat16))
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.nn.functional.linear(x, w)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    # the allocator's events in order, each with the bytes it allocated (+) or freed (-) and the running total
    mem = [e["args"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
           if e.get("name") == "[memory]"]
    peak = max(m["Total Allocated"] for m in mem) - (mem[0]["Total Allocated"] - mem[0]["Bytes"])
    assert memory.NF4_DEQUANT_BYTES - 0.5 < peak / w.numel() < memory.NF4_DEQUANT_BYTES + 0.5, peak / w.numel()


def _tiny_qwen(**kw):
    from transformers import Qwen2Config
    return Qwen2Config(**(dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=1024, vocab_size=512, tie_word_embeddings=False) | kw))


def test_adapter_count_matches_peft():
    """peft's all-linear LoRA on the policy (causal LM) and on a critic (AutoModel, feature extraction) trains exactly
    the adapters the planner counts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM
    cfg = _tiny_qwen()
    shape = memory.model_shape(cfg, critic=True)
    for model, task, critic in ((AutoModelForCausalLM.from_config(cfg), "CAUSAL_LM", False),
                                (AutoModel.from_config(cfg), "FEATURE_EXTRACTION", True)):
        lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                                task_type=task))
        trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        assert trained == shape.adapter_params(8, critic=critic) > 0
    assert sum(memory.model_shape(cfg, lora_rank=8).numels) == shape.adapter_params(8)


def test_qlora_layer_activations_against_saved_tensors():
    """The qlora per-layer activation term against what autograd really saves for one NF4 + peft layer under bf16
    autocast (saved-tensor hooks, two lengths, per token): the model is conservative by at most ~25%."""
    from peft import LoraConfig, get_peft_model
    from torchao.quantization import to_nf4
    from transformers import AutoModelForCausalLM
    cfg = _tiny_qwen(num_hidden_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)
    head = model.get_output_embeddings()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            m.weight = torch.nn.Parameter(to_nf4(m.weight.detach()), requires_grad=False)
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))

    def saved(T):
        seen = {}

        def pack(t):
            if type(t) is torch.Tensor and not t.is_leaf:  # activations, not weights or their casts' sources
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model.base_model.model.model(input_ids=torch.randint(0, 512, (1, T)), use_cache=False)
        return sum(seen.values())
    measured = (saved(256) - saved(128)) / 128
    shape = memory.model_shape(cfg)
    _, layer = memory.activation_bytes_per_token(shape, weight_bytes=2, compute_bytes=2, autocast=True,
                                                 checkpointing=True, lora_rank=16)
    assert measured <= layer <= 1.25 * measured, (layer, measured)


def test_qlora_estimate_by_hand(qwen_shape):
    H, L, I, V, KVD, r = 1536, 28, 8960, 151936, 256, 16
    linears = [(H, H), (H, KVD), (H, KVD), (H, H), (H, I), (H, I), (I, H)] * L
    assert sorted(qwen_shape.linears) == sorted(linears)
    linear_params = sum(i * o for i, o in linears)
    adapters = r * sum(i + o for i, o in linears)
    nf4 = sum(memory.nf4_bytes(i * o) for i, o in linears)
    kw = dict(micro_batch_tokens=16384, seq_len=2048, prompt_len=512, gen_batch_size=64)
    e = memory.estimate(qwen_shape, "qlora", **kw)
    trainable = adapters + H + 1  # + the value head
    assert (e.nf4_weights, e.adapter_params, e.lora_rank) == (nf4, adapters, r)
    assert e.weights == nf4 + 2 * (qwen_shape.params - linear_params) + 4 * trainable
    assert (e.grads, e.optimizer_states, e.optimizer_host) == (4 * trainable, 8 * trainable, 0)
    assert abs(nf4 / linear_params - 0.5157) < 1e-3
    # a frozen bf16 head: no fp32 dW, only the chunked impl's [C, V] scratch; the triton impl has none
    assert e.head_workspace == memory.DEFAULT_CHUNK_BYTES["cuda"]
    assert memory.estimate(qwen_shape, "qlora", kernel_impl="triton", **kw).head_workspace == 0
    assert e.dequant_transient == memory.NF4_DEQUANT_BYTES * H * I
    assert e.kv_bytes_per_token == 2 * L * KVD * 2  # bf16 cache
    kept, layer = memory.activation_bytes_per_token(qwen_shape, weight_bytes=2, compute_bytes=2, autocast=True,
                                                    checkpointing=True, lora_rank=r)
    assert e.activations == 16384 * (kept + 2 * layer + 16 * H)
    assert e.update_peak == e.weights + e.grads + e.optimizer_states + e.activations + e.head_workspace + \
        e.dequant_transient
    # --lora-rank 8 halves the adapters; a rank that disagrees with the shape's is refused
    assert memory.estimate(qwen_shape, "qlora", lora_rank=8, **kw).adapter_params == adapters // 2
    from transformers import Qwen2Config
    with pytest.raises(ValueError, match="differs from the rank"):
        memory.make_plan(memory.model_shape(Qwen2Config(**QWEN15), lora_rank=8), lora_rank=4, **ONE_STEP)
    # PPO's critic on the rung: its own NF4 decoder (tied: the embedding is its only bf16 matrix) and adapters
    critic = memory.model_shape(Qwen2Config(**QWEN15), critic=True)
    c = memory.estimate(critic, "qlora", **kw)
    assert c.nf4_weights == 2 * nf4 and c.adapter_params == 2 * adapters
    assert c.weights - e.weights == nf4 + 2 * (sum(critic.critic_numels) - linear_params) + 4 * adapters
    assert c.optimizer_states == 8 * (2 * adapters + H + 1)


def test_qlora_plan_report_and_error(qwen_shape, tmp_path):
    plan = memory.make_plan(qwen_shape, budget="4GiB", **ONE_STEP)
    assert (plan.level, plan.quantize, plan.lora_rank, plan.optimizer) == ("qlora", "nf4", 16, "adamw")
    assert plan.gradient_checkpointing and plan.dtype == torch.bfloat16
    assert [r["level"] for r in plan.ladder] == list(memory.LEVELS)  # every full-parameter rung tried first
    assert plan.estimate["update_peak"] <= plan.usable and plan.estimate["rollout_peak"] <= plan.usable
    text = memory.report(plan, qwen_shape)
    assert "memory plan: qlora" in text and "196 decoder linears in NF4" in text and "LoRA rank 16" in text
    assert f"{plan.estimate['adapter_params'] / 1e6:.2f}M fp32 adapter params" in text
    assert "NF4 dequantization of the largest linear" in text
    memory.save_report(plan, qwen_shape, tmp_path)
    saved = json.loads((tmp_path / "memory_report.json").read_text())
    assert (saved["quantize"], saved["lora_rank"], saved["params"]) == ("nf4", 16, qwen_shape.params)
    assert saved["trainable"] == plan.estimate["adapter_params"] + 1536 + 1
    assert memory.make_plan(qwen_shape, budget="4GiB", lora_rank=8, **ONE_STEP).lora_rank == 8
    full = memory.make_plan(qwen_shape, budget="80GiB", **ONE_STEP)
    assert (full.quantize, full.lora_rank) == ("", 0)
    with pytest.raises(MemoryError) as err:
        memory.make_plan(qwen_shape, budget="1.5GiB", **ONE_STEP)
    msg = str(err.value)
    for needed in ("lightest plan tried (qlora)", "the update needs", "NF4 base", "the rollout", "KV cache",
                   "already lowered automatically", "--memory-budget to ~", "--max-new-tokens",
                   "lower --lora-rank (now 16)", "smaller model"):
        assert needed in msg, (needed, msg)


def test_issue25_planner_targets(qwen_shape):
    """Issue 25's targets, from the same functions as bench/bench_planner.py. One step: 64 prompts x (512 + 1024)
    tokens, the trainer's default sizes asked (16384 tokens per micro-batch, the whole batch generated at once) and
    make_plan at a 24 GiB budget, which holds them unchanged on the qlora rung; PPO with a critic LLM is estimated at
    exactly those sizes. Estimates, not measurements (7B: SPPO 18.41 GiB, PPO 33.54 GiB, ratio 0.55; 1.5B: 7.06)."""
    from transformers import Qwen2Config
    peak = lambda e: max(e["update_peak"], e["rollout_peak"])
    s7 = memory.model_shape(Qwen2Config(**QWEN7))
    plan = memory.make_plan(s7, budget="24GiB", **ONE_STEP)
    assert plan.level == "qlora" and (plan.micro_batch_tokens, plan.gen_batch_size) == (16384, 64)
    assert peak(plan.estimate) <= 22 * GiB
    ppo = memory.estimate(memory.model_shape(Qwen2Config(**QWEN7), critic=True), "qlora", micro_batch_tokens=16384,
                          gen_batch_size=64, seq_len=1536, prompt_len=512)
    assert peak(plan.estimate) <= 0.6 * max(ppo.update_peak, ppo.rollout_peak)
    small = memory.make_plan(qwen_shape, budget="24GiB", level="qlora", **ONE_STEP)
    assert (small.micro_batch_tokens, small.gen_batch_size) == (16384, 64) and peak(small.estimate) <= 8 * GiB


def test_micro_batch_sizing_past_the_head_scratch_cap(qwen_shape):
    """The chunked head's [C, V] scratch stops growing at its chunk budget: the micro-batch the budget holds is
    solved past that cap (it was once extrapolated as if the scratch grew forever), and still fits."""
    plan = memory.make_plan(qwen_shape, budget="24GiB", level="qlora", seq_len=1536, prompt_len=512,
                            micro_batch_tokens=10**7, batch_sequences=64)
    e = plan.estimate
    assert e["update_peak"] <= plan.usable
    per_token = (memory.estimate(qwen_shape, "qlora", micro_batch_tokens=2, seq_len=1536, gen_batch_size=1).activations
                 - memory.estimate(qwen_shape, "qlora", micro_batch_tokens=1, seq_len=1536,
                                   gen_batch_size=1).activations)
    assert plan.usable - e["update_peak"] < per_token  # one more token would not fit
