"""The 4-bit NF4 base (sppo_fast/quant.py), LoRA on it, its adapters' save/reload and the merged export, on the
shipped tiny model (fp32 on CPU unless a test says otherwise)."""
import copy
import json
import sys

import pytest
import torch

pytest.importorskip("torchao")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from sppo_fast import quant  # noqa: E402
from sppo_fast.model import load_critic, load_policy, load_tokenizer  # noqa: E402
from sppo_fast.tiny import default_model_path  # noqa: E402

CPU = torch.device("cpu")
# NF4's 16 levels (QLoRA's NormalFloat); the widest gap, between -1 and -0.6962, bounds the rounding of a weight
NF4_MAX_HALF_GAP = (1.0 - 0.6962) / 2


def _load(**kwargs):
    return load_policy(default_model_path(), device=CPU, attn_implementation="sdpa", liger=False, **kwargs)


def _ids(seed=0, shape=(3, 24)):
    return torch.randint(3, 64, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense_and_nf4():
    dense = _load()
    nf4 = copy.deepcopy(dense)
    count = quant.quantize_linears(nf4)
    return dense, nf4, count


def test_quantizes_decoder_linears_only(dense_and_nf4):
    dense, nf4, count = dense_and_nf4
    config = dense.config
    assert count == config.num_hidden_layers * 7  # q, k, v, o, gate, up, down
    assert quant.is_quantized(nf4) and not quant.is_quantized(dense)
    assert not quant.is_quantized(nf4.lm_head) and not quant.is_quantized(nf4.get_input_embeddings())
    assert nf4.lm_head.weight is nf4.get_input_embeddings().weight  # the tie survives (the head is the embedding)
    assert all(not p.requires_grad for p in nf4.parameters() if type(p).__name__ == "NF4Tensor")
    assert quant.describe(nf4) == {"format": "nf4", "library": "torchao", "block_size": 64,
                                   "scaler_block_size": 256, "dtype": "float32", "quantized_linears": count}
    assert quant.describe(dense) is None


def test_forward_equals_dequantized_reference(dense_and_nf4):
    """The NF4 model computes exactly what a dense model holding its dequantized weights computes: F.linear on an
    NF4 weight dequantizes to the input's dtype and runs the same matmul."""
    _, nf4, _ = dense_and_nf4
    reference = quant.dequantize_linears(copy.deepcopy(nf4), torch.float32)
    assert not quant.is_quantized(reference)
    ids = _ids()
    with torch.no_grad():
        got, want = nf4(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-6


def test_weights_within_the_format_bound(dense_and_nf4):
    """Every weight is within NF4's rounding of its block: |w - q| <= s * 0.1519 + d/128 (+ fp32 slop), where s is
    its 64-block's absmax (levels are absmax-scaled; half the widest gap between levels is 0.1519) and d the largest
    |s_i - mean(s)| of its 256-block of scales (scales are int8 after subtracting their mean: a step of 2d/256,
    and +d rounds to 128, clamped to 127: one whole step off)."""
    dense, nf4, _ = dense_and_nf4
    checked = 0
    for (name, d_mod), (_, q_mod) in zip(dense.named_modules(), nf4.named_modules()):
        if not (isinstance(q_mod, torch.nn.Linear) and type(q_mod.weight).__name__ == "NF4Tensor"):
            continue
        w = d_mod.weight.detach().flatten()
        err = (w - q_mod.weight.get_original_weight().flatten()).abs().view(-1, 64)
        scales = w.view(-1, 64).abs().amax(1)
        dev = (scales - scales.mean()).view(-1, 256).abs().amax(1, keepdim=True)
        bound = scales.view(-1, 256) * NF4_MAX_HALF_GAP + dev / 128 + 1e-6
        over = err.amax(1).view(-1, 256) > bound
        assert not over.any(), f"{name}: {int(over.sum())} blocks past the NF4 bound"
        rel = (err.norm() / w.norm()).item()
        assert 0.01 < rel < 0.15, f"{name}: relative error {rel:.3f} (NF4 on trained weights: ~0.09)"
        checked += 1
    assert checked == 28


def test_forward_within_the_format_error_of_fp32(dense_and_nf4):
    """Against the original fp32 model: the logits' relative (Frobenius) error stays below 0.10, the largest
    relative error of any one quantized weight (0.09, test above) plus a margin. Why that bound: each linear output
    carries about its weight's relative error, and the residual stream and RMSNorms of this 4-layer model do not
    amplify it (measured: 0.057). It is a model-level measurement, not a theorem; the lower bound shows the
    quantization changed the logits at all."""
    dense, nf4, _ = dense_and_nf4
    ids = _ids(1)
    with torch.no_grad():
        want, got = dense(input_ids=ids).logits, nf4(input_ids=ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-3 < rel < 0.10, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.8


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A policy on an NF4 base with LoRA rank 4, after one SGD step (so lora_B is not zero and the adapters change
    the logits), saved the way checkpoint.save writes policy/: adapter, quantization.json, tokenizer."""
    policy = _load(quantize="nf4", lora_rank=4, lora_alpha=8)
    ids = _ids(2)
    policy(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p -= 50.0 * p.grad  # a large step: the adapters must move the logits visibly for the tests below
    policy.zero_grad(set_to_none=True)
    out = tmp_path_factory.mktemp("adapter") / "policy"
    policy.save_pretrained(out, safe_serialization=True)
    quant.save_description(policy, out)
    load_tokenizer(default_model_path()).save_pretrained(out)
    return policy, grads, out


def test_lora_on_nf4_grads_reach_only_adapters(trained_adapter):
    policy, grads, _ = trained_adapter
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)[:5]
    assert set(grads) == trainable  # a grad for every adapter weight and for nothing else (base, embedding, head)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert any(g.abs().max() > 0 for n, g in grads.items() if ".lora_B." in n)
    frozen = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert sum(type(p).__name__ == "NF4Tensor" for p in frozen) == 28 and not any(p.requires_grad for p in frozen)


def test_adapter_reload_is_bit_exact(trained_adapter):
    policy, _, out = trained_adapter
    assert json.loads((out / "quantization.json").read_text())["format"] == "nf4"
    assert not any(out.glob("model*.safetensors"))  # only the adapter is saved, never the 4-bit base
    reloaded = load_policy(out, device=CPU, attn_implementation="sdpa", liger=False)  # no quantize flag needed
    assert quant.is_quantized(reloaded)
    ids = _ids(3)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, policy(input_ids=ids).logits)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == \
        {n for n, p in policy.named_parameters() if p.requires_grad}


def _fake_checkpoint(run_dir, adapter_dir):
    """RUN_DIR/checkpoints/step_000001 with the adapter as policy/ and a trainer.safetensors, the layout that
    checkpoint.newest_valid accepts (what the CLI resolves a run directory to)."""
    import shutil
    ckpt = run_dir / "checkpoints" / "step_000001"
    shutil.copytree(adapter_dir, ckpt / "policy")
    save_file({"rng.torch": torch.get_rng_state()}, ckpt / "trainer.safetensors", metadata={"json": "{}"})
    return ckpt


def test_export_merged_matches_adapter_model(trained_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from sppo_fast.cli import main

    policy, _, adapter_dir = trained_adapter
    _fake_checkpoint(tmp_path / "run", adapter_dir)
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--dtype", "float32"]) == 0
    assert not (out / "adapter_config.json").exists() and not (out / "quantization.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert not quant.is_quantized(merged) and not hasattr(merged, "peft_config")
    ids = _ids(4)
    with torch.no_grad():
        want, got = policy(input_ids=ids).logits, merged(input_ids=ids).logits
        with policy.disable_adapter():
            unadapted = policy(input_ids=ids).logits
    assert (want - unadapted).abs().max().item() > 0.05  # the adapters matter, so the match below means something
    # fp32: W + BA merged versus W x + B(A x) summed: only the summation order differs
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_lora_critic_adapter_reloads(tmp_path):
    """A LoRA critic on an NF4 base (peft's feature-extraction task: AutoModel has no head), saved as checkpoint.save
    writes critic/, comes back through load_critic on resume with the same hidden states."""
    path = default_model_path()
    critic = load_critic(path, device=CPU, attn_implementation="sdpa", quantize="nf4", lora_rank=4)
    with torch.no_grad():
        for name, p in critic.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    assert not hasattr(critic.get_base_model(), "lm_head")
    critic.save_pretrained(tmp_path / "critic", safe_serialization=True)
    quant.save_description(critic, tmp_path / "critic")
    again = load_critic(tmp_path / "critic", device=CPU, attn_implementation="sdpa")
    assert quant.is_quantized(again) and type(again).__name__ == type(critic).__name__
    ids = _ids(5)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).last_hidden_state, critic(input_ids=ids).last_hidden_state)
    assert all("lora_" in n for n, p in again.named_parameters() if p.requires_grad)


def test_base_is_rebuilt_from_its_recorded_dtype(trained_adapter, tmp_path):
    """The rung quantizes from bf16; a reload asked for another dtype still quantizes from the dtype that
    quantization.json records, so the NF4 codes and scales are the trained-on ones."""
    import shutil

    from torchao.quantization import to_nf4

    _, _, adapter_dir = trained_adapter
    shutil.copytree(adapter_dir, tmp_path / "p")
    described = json.loads((tmp_path / "p" / "quantization.json").read_text())
    (tmp_path / "p" / "quantization.json").write_text(json.dumps({**described, "dtype": "bfloat16"}))
    again = load_policy(tmp_path / "p", device=CPU, attn_implementation="sdpa", liger=False, dtype=torch.float32)
    got = again.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
    dense = _load().model.layers[0].mlp.down_proj.weight.detach()
    want = to_nf4(dense.to(torch.bfloat16), 64, 256)
    assert got.dtype == torch.bfloat16 and quant.describe(again)["dtype"] == "bfloat16"
    assert torch.equal(got.get_original_weight(), want.get_original_weight())


# ---------------------------------------------------------------------------------------------------------------------
# Errors
def test_bad_shape_names_the_layer_and_changes_nothing():
    model = torch.nn.ModuleDict({"fine_proj": torch.nn.Linear(128, 128), "odd_proj": torch.nn.Linear(100, 7)})
    with pytest.raises(ValueError, match=r"odd_proj.*\(7, 100\).*700 values.*64 \* 256 = 16384"):
        quant.quantize_linears(model)
    assert not quant.is_quantized(model)  # checked before any weight changed
    with pytest.raises(ValueError, match="even"):
        quant.check_shapes(model, block_size=63)


def test_missing_torchao_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # `from torchao.quantization import` fails
    with pytest.raises(ImportError, match=r"pip install 'torchao>=0.18'.*\.\[memory\]"):
        quant.quantize_linears(torch.nn.Linear(128, 128))


def test_bad_arguments():
    with pytest.raises(ValueError, match="lora_rank > 0"):
        _load(quantize="nf4")
    with pytest.raises(ValueError, match="formats are nf4"):
        _load(quantize="int4", lora_rank=4)


def test_bad_description(tmp_path):
    assert quant.load_description(tmp_path) is None
    (tmp_path / "quantization.json").write_text(json.dumps({"format": "int3", "block_size": 64}))
    with pytest.raises(ValueError, match="unknown quantization format 'int3'"):
        quant.load_description(tmp_path)
    (tmp_path / "quantization.json").write_text(json.dumps({"format": "nf4", "block_size": 0,
                                                            "scaler_block_size": 256}))
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        quant.load_description(tmp_path)
    quant.save_description(torch.nn.Linear(2, 2), tmp_path)  # not quantized: the stale description goes
    assert not (tmp_path / "quantization.json").exists()


def test_export_errors(tmp_path, capsys):
    from sppo_fast.cli import main

    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "full")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_export_full_parameter_checkpoint_as_is(tmp_path):
    """A full-parameter checkpoint's policy/ is a whole model: exported in --dtype, weights unchanged."""
    from transformers import AutoModelForCausalLM

    from sppo_fast.export import export

    _fake_checkpoint(tmp_path / "run", default_model_path())
    out, skipped = export(tmp_path / "run" / "checkpoints" / "step_000001", tmp_path / "out", dtype="float32")
    assert skipped == [] and not (out / "quantization.json").exists()
    got, want = AutoModelForCausalLM.from_pretrained(str(out)).state_dict(), _load().state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
