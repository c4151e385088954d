"""The value head's options (norm, MLP, input layer) and the hook that reads an intermediate layer (CPU, fast)."""
import math

import pytest
import torch

from conftest import train_tiny
from sppo_fast.value_head import ValueHead, capture_layer, flat_states, pool_prompt_states


@pytest.mark.parametrize("norm,mlp", [("none", 0), ("layernorm", 0), ("none", 16), ("layernorm", 16)])
def test_initial_prediction_is_init_value_for_every_option(norm, mlp):
    torch.manual_seed(0)
    head = ValueHead(32, init_value=0.3, norm=norm, mlp_hidden=mlp)
    x = torch.randn(5, 32) * 7
    v = head(x)
    assert v.shape == (5,) and v.dtype == torch.float32
    assert torch.allclose(torch.sigmoid(v), torch.full((5,), 0.3), atol=1e-6)
    # trainable: one step of BCE moves predictions apart for different inputs
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    torch.nn.functional.binary_cross_entropy_with_logits(head(x), torch.tensor([1.0, 0, 1, 0, 1])).backward()
    opt.step()
    assert head(x).std() > 0


def test_default_head_is_a_single_linear_layer():
    head = ValueHead(16)
    assert [n for n, _ in head.named_parameters()] == ["linear.weight", "linear.bias"]  # checkpoint keys unchanged
    mlp = ValueHead(16, mlp_hidden=8)
    assert sum(p.numel() for p in mlp.parameters()) == 16 * 8 + 8 + 8 + 1


def test_layernorm_makes_the_head_scale_invariant():
    torch.manual_seed(0)
    head = ValueHead(32, norm="layernorm")
    torch.nn.init.normal_(head.linear.weight)
    x = torch.randn(4, 32)
    assert torch.allclose(head(x), head(100 * x), atol=1e-4)
    plain = ValueHead(32)
    torch.nn.init.normal_(plain.linear.weight)
    assert not torch.allclose(plain(x), plain(100 * x))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="norm"):
        ValueHead(8, norm="batchnorm")
    with pytest.raises(ValueError, match="mlp_hidden"):
        ValueHead(8, mlp_hidden=-1)
    with pytest.raises(ValueError, match="pooling"):
        pool_prompt_states(torch.zeros(3, 2), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), "max")


def test_pooling_last_and_mean():
    hidden = torch.arange(12.0).view(6, 2)  # rows 0-2: sequence 0 (prompt rows 0,1), rows 3-5: sequence 1 (prompt 3)
    prompt_rows, seq_ids, last = torch.tensor([0, 1, 3]), torch.tensor([0, 0, 1]), torch.tensor([1, 3])
    assert torch.equal(pool_prompt_states(hidden, prompt_rows, seq_ids, last, "last"), hidden[[1, 3]])
    mean = pool_prompt_states(hidden, prompt_rows, seq_ids, last, "mean")
    assert torch.allclose(mean, torch.stack([hidden[:2].mean(0), hidden[3]]))


def test_flat_states_matches_flat_index():
    h = torch.randn(2, 3, 4)
    assert torch.equal(flat_states(h, None), h.reshape(6, 4))
    idx = torch.tensor([1, 2, 3])
    assert torch.equal(flat_states(h, idx), h.reshape(6, 4)[idx])


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from sppo_fast import tiny

    tok = tiny.build_tokenizer()
    return tiny.build_model(tok, seed=0).eval(), tok


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_capture_layer_returns_that_layers_output(llama, layer):
    model, tok = llama
    enc = tok(["12+3=", "1+2+3="], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True).hidden_states  # [embeddings, layer 0, ..., final (normed)]
        n_hooks = len(model.model.layers[layer]._forward_hooks)
        with capture_layer(model, layer) as tap:
            out = model.get_decoder()(**enc).last_hidden_state
        assert len(model.model.layers[layer]._forward_hooks) == n_hooks  # the hook is removed afterwards
    n = len(model.model.layers)
    assert torch.allclose(tap["hidden"], ref[(layer % n) + 1], atol=1e-6)
    assert torch.allclose(out, ref[-1], atol=1e-6)
    assert not torch.allclose(tap["hidden"], ref[-1])


def test_capture_layer_final_and_out_of_range(llama):
    model, _ = llama
    with capture_layer(model, -1) as tap:
        pass
    assert tap == {}
    with pytest.raises(ValueError, match="out of range"):
        with capture_layer(model, 4):
            pass


@pytest.mark.parametrize("flags", [["--value-layer", "1", "--value-norm", "layernorm", "--value-mlp-hidden", "8"],
                                   ["--value-pooling", "mean", "--value-layer", "-2"]])
def test_trainer_runs_with_head_options(tmp_path, flags):
    from safetensors.torch import load_file

    from sppo_fast import checkpoint

    result, _ = train_tiny(tmp_path, "r", "--steps", "2", "--eval-k", "2", *flags)
    assert math.isfinite(result["end"]["eval/value_mean"])
    ckpt = checkpoint.list_checkpoints(tmp_path / "r")[-1]
    keys = set(load_file(str(ckpt / "value_head.safetensors")))
    assert ("hidden.0.weight" in keys) == ("--value-mlp-hidden" in flags)


def _run(tmp_path, name, *flags):
    """(run dir, the training steps' metric rows) of a tiny run."""
    from sppo_fast.metrics import read_metrics

    _, run_dir = train_tiny(tmp_path, name, *flags)
    return run_dir, [r for r in read_metrics(run_dir) if "losses/policy" in r]


def test_value_refit_moves_the_head_and_not_the_policy(tmp_path):
    from safetensors.torch import load_file

    from sppo_fast import checkpoint

    # one step: the refit comes after the joint step, so the policy must end bitwise the same as without it
    plain, _ = _run(tmp_path, "plain", "--steps", "1")
    refit, rows = _run(tmp_path, "refit", "--steps", "1", "--value-steps", "3")
    last = lambda d, f: load_file(str(checkpoint.list_checkpoints(d)[-1] / f))
    a, b = last(plain, "policy/model.safetensors"), last(refit, "policy/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = last(plain, "value_head.safetensors"), last(refit, "value_head.safetensors")
    assert not torch.equal(ha["linear.weight"], hb["linear.weight"])
    # the refit steps fit the batch the joint step saw: its loss is below the joint step's (V = 0.5 there)
    assert rows[0]["losses/value_refit"] < rows[0]["losses/value"]


def test_value_replay_buffer_resumes_exactly(tmp_path):
    flags = ["--value-steps", "2", "--value-replay", "2", "--save-every", "0"]
    _, full = _run(tmp_path, "full", "--steps", "3", *flags)
    part, _ = _run(tmp_path, "part", "--steps", "2", *flags)
    _, resumed = _run(tmp_path, "part", "--steps", "3", "--resume", str(part), *flags)
    a, b = full[-1], resumed[-1]
    assert a["step"] == b["step"] == 3
    # step 3's refit fits batches 1-3: equal only if the checkpoint carried batches 1-2's prompt states
    for key in ("losses/value", "losses/value_refit", "losses/policy", "reward/mean"):
        assert a[key] == b[key], (key, a[key], b[key])


@pytest.mark.parametrize("flags,match", [(["--algo", "grpo", "--value-steps", "2"], "--value-steps/--value-replay"),
                                         (["--critic", "policy", "--value-steps", "2"], "without --critic"),
                                         (["--value-replay", "2"], "give --value-steps 2 or more")])
def test_value_refit_flags_are_checked(flags, match):
    from sppo_fast.cli import build_args
    from sppo_fast.train import ConfigError, check_args

    with pytest.raises(ConfigError, match=match):
        check_args(build_args(flags))
