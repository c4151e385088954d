"""The qlora rung (issue 25) in the trainer, on the embedded tiny model: a frozen NF4 base under LoRA adapters, the
shared fp32 value head, and for PPO (and SPPO --critic) a critic with its own NF4 copy and adapters. CPU, 1-3 steps
per run; about 16 s in all on the shared 2-core machine."""
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("torchao")

from conftest import emulate_cuda_16bit_gemms  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sppo_fast import checkpoint, memory, quant  # noqa: E402
from sppo_fast.cli import build_args  # noqa: E402
from sppo_fast.config import Args, ConfigError, check_args  # noqa: E402
from sppo_fast.kernels import chunked  # noqa: E402
from sppo_fast.model import load_policy, load_tokenizer  # noqa: E402
from sppo_fast.prepare import build_models, build_optimizer, preflight  # noqa: E402
from sppo_fast.rollout import Sample  # noqa: E402
from sppo_fast.tiny import default_model_path  # noqa: E402
from sppo_fast.train import Stepper, main  # noqa: E402
from sppo_fast.value_head import ValueHead  # noqa: E402

CPU = torch.device("cpu")
FAST = ["--batch-size", "4", "--eval-size", "4", "--eval-k", "1", "--eval-every", "0", "--max-new-tokens", "16",
        "--no-progress", "--threads", "1", "--no-tensorboard", "--memory-plan", "qlora"]
ALGO_FLAGS = {"sppo": [], "grpo": ["--group-size", "2", "--batch-size", "2"], "ppo": [],
              "sppo-critic": ["--critic", "policy"]}  # SPPO with the paper's separate scalar critic


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the trainer's --threads 1 sets (the runs through main() set it themselves): on a loaded
    2-core CI machine, two OpenMP threads per tiny matmul made these tests several times slower and erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nf4_parts(tensor) -> list:
    """The plain tensors an NF4 weight is made of (codes, scales, ...), through the subclass flatten protocol."""
    names, _ = tensor.__tensor_flatten__()
    return [getattr(tensor, name).detach().clone() for name in names]


def _frozen_snapshot(model) -> dict:
    return {n: _nf4_parts(p) if type(p).__name__ == "NF4Tensor" else [p.detach().clone()]
            for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("run", list(ALGO_FLAGS))
def test_a_step_trains_only_the_adapters_and_value_heads_over_an_unchanged_nf4_base(tmp_path, run):
    torch.manual_seed(0)
    algo = run.split("-")[0]
    args = build_args([*FAST, "--algo", algo, *ALGO_FLAGS[run], "--lora-lr", "5e-4", "--out-dir", str(tmp_path)])
    pre = preflight(args, CPU)
    assert (pre.plan.level, pre.plan.quantize, pre.plan.lora_rank) == ("qlora", "nf4", memory.LORA_RANK_DEFAULT)
    assert pre.args.gradient_checkpointing
    policy, critic, value_head = build_models(pre, CPU)
    optimizer, scheduler = build_optimizer(pre.args, policy, critic, value_head, pre.plan, CPU)
    models = {"policy": policy, **({"critic": critic} if critic is not None else {})}
    assert (critic is not None) == (run in ("ppo", "sppo-critic")) and (value_head is not None) == (algo != "grpo")
    for name, model in models.items():
        assert quant.is_quantized(model), name
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), (name, trainable)
    heads = list(value_head.parameters()) if value_head is not None else []
    assert all(p.dtype == torch.float32 for p in heads)
    expected = {id(p) for m in models.values() for p in m.parameters() if p.requires_grad} | {id(p) for p in heads}
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == expected and len(in_optimizer) == len(expected)
    assert optimizer.param_groups[0]["lr"] == 5e-4  # --lora-lr, not --lr, for the policy's adapters
    frozen = {name: _frozen_snapshot(m) for name, m in models.items()}

    stepper = Stepper(pre.args, policy, value_head, optimizer, scheduler, pre.tokenizer, CPU, critic=critic)
    # rollout: generation runs through the NF4 weights (a quantized base layer sees every decode step)
    q_proj = policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    seen = []
    hook = q_proj.register_forward_pre_hook(lambda module, inputs: seen.append(type(module.weight).__name__))
    samples = stepper.generate(pre.train_texts[:pre.args.batch_size], num_samples=stepper.algo.samples_per_prompt,
                               temperature=pre.args.temperature)
    hook.remove()
    assert len(seen) >= max(len(s.response_ids) for s in samples) and set(seen) == {"NF4Tensor"}
    # both outcomes in the first GRPO group, and a mean reward off V = 0.5: every algorithm has nonzero gradients
    R = torch.tensor([float(i % 4 != 1) for i in range(len(samples))])

    grads = {}

    def record(*_):  # what the optimizer steps with: every parameter's grad at that moment
        for name, m in models.items():
            grads.update({(name, n): p.grad for n, p in m.named_parameters()})
        grads.update({("value_head", n): p.grad for n, p in (value_head.named_parameters() if heads else [])})

    # two updates: the value head starts at zero, so a critic's adapters first get a nonzero gradient in the second
    for check_values in (True, False):
        grads.clear()
        hook = optimizer.register_step_pre_hook(record)
        totals, _ = stepper.update(samples, R, stepper.algo.batch_rewards(R), check_values=check_values)
        hook.remove()
        assert "nonfinite" not in totals and grads
    # the second update's grads: lora_A's is B^T(...), zero until its B has moved (the policy's moved in the first
    # update; the critic's B first gets a gradient now, as its zero-initialised value head has moved)
    for (name, n), g in grads.items():
        if name == "value_head" or ".lora_" in n:
            assert g is not None and torch.isfinite(g).all(), (name, n)
            assert g.abs().sum() > 0 or (name == "critic" and ".lora_A." in n), (name, n)
        else:
            assert g is None, (name, n)
    for name, model in models.items():
        after = _frozen_snapshot(model)
        assert after.keys() == frozen[name].keys()
        for n, parts in frozen[name].items():
            assert all(torch.equal(a, b) for a, b in zip(parts, after[n])), (name, n)
        assert quant.is_quantized(model)
        assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n), name  # they moved


def test_frozen_16bit_head_gets_no_dw_and_no_fp32_copy_on_the_cuda_branch(monkeypatch):
    """The fused PPO loss on the rung's frozen bf16 head (tied to the embedding here), through the CUDA branch of the
    chunk loop (emulated with CUDA's dtype rules): no dW is formed, nothing [V, H]-sized is made in fp32 outside the
    vendor GEMMs themselves, and the adapters still get their gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    emulate_cuda_16bit_gemms(monkeypatch)
    policy = load_policy(default_model_path(), device=CPU, attn_implementation="sdpa", dtype=torch.bfloat16,
                         quantize="nf4", lora_rank=memory.LORA_RANK_DEFAULT, gradient_checkpointing=True)
    tok = load_tokenizer(default_model_path())
    weight = policy.get_output_embeddings().weight
    V, H = weight.shape
    assert weight.dtype == torch.bfloat16 and not weight.requires_grad
    enc = lambda s: tok(s, add_special_tokens=True)["input_ids"]  # noqa: E731
    samples = [Sample(enc("12+3="), enc("12+3=15;15")[:-1] + [tok.eos_token_id], "", True, 0),
               Sample(enc("7+8+1="), enc("7+8=15,15+1=16;16"), "", False, 1),
               Sample(enc("3+4="), enc("3+4=7;7"), "", True, 2)]
    n_rows = sum(len(s.response_ids) for s in samples)
    assert n_rows not in (V, H)  # so no [N, H] dX or [N, V] chunk can pass for a [V, H] / [H, V] weight copy
    head = ValueHead(H)
    args = Args(algo="sppo", kernel_impl="torch", lr=0.0, value_lr=0.0)
    opt = torch.optim.AdamW([{"params": [p for p in policy.parameters() if p.requires_grad]},
                             {"params": list(head.parameters())}])
    stepper = Stepper(args, policy, head, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), tok, CPU)
    assert chunked._Gemms(weight, torch.bfloat16).cuda16  # the branch under test is the one taken

    made, in_gemm = [], [False]

    class Fp32WeightCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if (not in_gemm[0] and isinstance(t, torch.Tensor) and t.dtype == torch.float32
                        and tuple(t.shape) in ((V, H), (H, V))):
                    made.append(str(func))
            return out

    def outside_the_count(fn):  # the emulated GEMM upcasts its operands; cuBLAS reads them as 16-bit
        def wrapped(*a, **kw):
            in_gemm[0] = True
            try:
                return fn(*a, **kw)
            finally:
                in_gemm[0] = False
        return wrapped

    monkeypatch.setattr(chunked, "_mm_f32", outside_the_count(chunked._mm_f32))
    monkeypatch.setattr(chunked, "_addmm_f32_", outside_the_count(chunked._addmm_f32_))
    monkeypatch.setattr(chunked._Gemms, "dw", lambda *a: made.append("dW += dZ^T X"))
    with Fp32WeightCopies():
        stepper.micro_batch(samples, [0, 1, 2], torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0]),
                            (None, None), (n_rows, 3), {}, torch.zeros(3), False)
    assert made == [] and weight.grad is None
    lora_b = [p.grad for n, p in policy.named_parameters() if ".lora_B." in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


def _checkpoint_tensors(ckpt: Path) -> dict:
    return {str(f.relative_to(ckpt)): load_file(f) for f in sorted(ckpt.rglob("*.safetensors"))}


def test_resume_is_exact(tmp_path, algo="ppo"):
    """Step 3 after resuming at step 2 equals the uninterrupted run's step 3: metrics, and every tensor of the
    step-3 checkpoint bit for bit. PPO holds every kind of state the rung saves: policy and critic adapters over
    their own NF4 bases, the value head, and the optimizer's states of all of them."""
    run = lambda steps, name, *extra: main(build_args(  # noqa: E731
        [*FAST, "--algo", algo, "--steps", str(steps), "--save-every", "0", "--out-dir", str(tmp_path),
         "--run-name", name, *extra]))
    run(3, "full")
    run(2, "part")
    ckpt = checkpoint.list_checkpoints(tmp_path / "part")[-1]
    assert quant.load_description(ckpt / "policy")["format"] == "nf4"
    assert (ckpt / "policy" / "adapter_model.safetensors").is_file()
    if algo == "ppo":
        assert quant.load_description(ckpt / "critic")["format"] == "nf4"
        assert (ckpt / "critic" / "adapter_model.safetensors").is_file()
    main(build_args([*FAST, "--algo", algo, "--steps", "3", "--resume", str(tmp_path / "part")]))

    def step3(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["step"] == 3 and "losses/policy" in r)

    a, b = step3(tmp_path / "full"), step3(tmp_path / "part")
    for key in ("losses/policy", "losses/value", "reward/mean", "stats/logp", "rollout/response_len"):
        assert a[key] == b[key], (key, a[key], b[key])
    full, resumed = (_checkpoint_tensors(checkpoint.list_checkpoints(tmp_path / d)[-1]) for d in ("full", "part"))
    assert full.keys() == resumed.keys() and any("adapter_model" in k for k in full)
    for file in full:
        assert full[file].keys() == resumed[file].keys(), file
        for key in full[file]:
            assert torch.equal(full[file][key], resumed[file][key]), (file, key)


def test_qlora_config_errors_name_the_fix(monkeypatch):
    import importlib.util

    check_args(Args(memory_plan="qlora"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun"):
        check_args(Args(memory_plan="qlora"))
    monkeypatch.delenv("WORLD_SIZE")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"needs torchao .*pip install 'torchao>=0.18'"):
        check_args(Args(memory_plan="qlora"))


def _wide_model(directory: Path) -> Path:
    """The tiny model's tokenizer on a wider random-init Llama (hidden 256, MLP 4096, 2 layers): its weights, not its
    activations, dominate one sequence's memory, so a budget exists that the 8bit rung misses and qlora meets."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    src = Path(default_model_path())
    shutil.copytree(src, directory, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = LlamaConfig.from_pretrained(src)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.head_dim = 256, 4096, 2, 64
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_a_budget_that_only_qlora_meets_chooses_it_and_checks_its_packages(tmp_path, monkeypatch):
    import importlib.util

    model = _wide_model(tmp_path / "wide")
    shape = memory.model_shape(model)
    plans = {lv: memory._fits(shape, lv, 1 << 50, 64, 48, False, "auto")[0]
             for lv in ("fp32", "ckpt", "bf16", "8bit", "qlora")}
    need = {lv: max(plan.update_peak, plan.rollout_peak) for lv, plan in plans.items()}
    budget = math.ceil(need["qlora"] * 1.05 / (1 - memory.RESERVE_FRACTION))
    assert budget * (1 - memory.RESERVE_FRACTION) < min(need[lv] for lv in ("fp32", "ckpt", "bf16", "8bit"))
    flags = ["--model", str(model), "--memory-budget", str(budget), "--max-prompt-tokens", "48",
             "--max-new-tokens", "16", "--batch-size", "4", "--eval-size", "4", "--no-progress", "--no-tensorboard",
             "--out-dir", str(tmp_path / "runs")]
    pre = preflight(build_args(flags), CPU)
    assert (pre.plan.level, pre.plan.quantize, pre.args.lora_rank) == ("qlora", "nf4", memory.LORA_RANK_DEFAULT)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"--memory-budget \d+ \(it chose the qlora rung\) needs peft"):
        preflight(build_args(flags), CPU)
