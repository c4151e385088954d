"""`sppo_fast.integrations.verl` against verl's fused-kernel semantics, written out here (CPU, a few seconds).

verl itself is not installed in CI (it pins transformers < 5.11 and pulls Ray); when it is importable, its own
torch reference `FusedLinearForPPOFunction` is compared too. The patch mechanics are tested on stand-in modules.
"""
import importlib.util
import sys
import types

import pytest
import torch

from sppo_fast.integrations import verl as integration

torch.set_num_threads(1)


def reference(hidden, weight, labels, temperature):
    """verl's math: logits = hidden @ W.T / T; log_softmax gathered at the label; entropy of the softmax."""
    logits = (hidden.double() @ weight.double().T) / temperature
    logprobs = torch.log_softmax(logits, -1)
    logp = logprobs.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def leaves(shape_h, vocab=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape_h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, shape_h[-1], generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape_h[:-1], generator=g)
    return hidden, weight, labels


def grads_of(fn, hidden, weight, seed=1):
    """Gradients of a random linear functional of (logp, entropy), so both outputs' backward paths are used."""
    logp, entropy = fn()
    g = torch.Generator().manual_seed(seed)
    loss = (logp * torch.randn(logp.shape, generator=g, dtype=logp.dtype)).sum() \
        + (entropy * torch.randn(entropy.shape, generator=g, dtype=entropy.dtype)).sum()
    return torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize("shape", [(13, 16), (2, 7, 16)])
def test_linear_cross_entropy_none(shape):
    hidden, weight, labels = leaves(shape)
    logp, entropy = integration.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    n = labels.numel()
    assert logp.shape == (n,) and entropy.shape == (n,)  # flattened, like verl's kernel
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    ref_logp, ref_entropy = reference(hidden.reshape(n, -1), weight, labels.reshape(-1), 0.7)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)

    got = grads_of(lambda: integration.linear_cross_entropy(hidden, weight, labels, 0.7), hidden, weight)
    want = grads_of(lambda: tuple(x.float() for x in reference(hidden.reshape(n, -1), weight, labels.reshape(-1),
                                                                0.7)), hidden, weight)
    for a, b, name in zip(got, want, ("d_hidden", "d_weight")):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_cross_entropy_reductions(reduction):
    hidden, weight, labels = leaves((11, 8))
    logp, entropy = integration.linear_cross_entropy(hidden, weight, labels, 1.0, reduction)
    ref_logp, ref_entropy = reference(hidden, weight, labels, 1.0)
    assert logp.dim() == 0 and entropy.shape == (11,)
    expected = ref_logp.sum() if reduction == "sum" else ref_logp.mean()
    torch.testing.assert_close(logp.double(), expected, atol=1e-5, rtol=1e-5)
    (d_hidden,) = torch.autograd.grad(logp, hidden)
    (want,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(d_hidden, want.float(), atol=1e-5, rtol=1e-4)


def test_fused_linear_for_ppo_shapes_dtypes_grads():
    hidden, weight, labels = leaves((3, 5, 16), seed=2)
    log_probs, entropy = integration.fused_linear_for_ppo(hidden, weight, labels, 1.3)
    assert log_probs.shape == labels.shape and entropy.shape == labels.shape  # [B, T], like FusedLinearForPPO
    ref_logp, ref_entropy = reference(hidden, weight, labels, 1.3)
    torch.testing.assert_close(log_probs.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)
    got = grads_of(lambda: integration.fused_linear_for_ppo(hidden, weight, labels, 1.3), hidden, weight)
    want = grads_of(lambda: tuple(x.float() for x in reference(hidden, weight, labels, 1.3)), hidden, weight)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # bf16 activations with an fp32 master weight: computed in fp32 (promoted), entropy in the hidden dtype
    h16 = hidden.detach().bfloat16().requires_grad_()
    log_probs, entropy = integration.fused_linear_for_ppo(h16, weight, labels, 1.3)
    assert log_probs.dtype == torch.float32 and entropy.dtype == torch.bfloat16
    ref_logp, _ = reference(h16.float(), weight, labels, 1.3)
    torch.testing.assert_close(log_probs.double(), ref_logp, atol=1e-5, rtol=1e-5)
    log_probs.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32


def test_ignore_index_and_checks():
    hidden, weight, labels = leaves((6, 8))
    labels[2] = -100
    logp, entropy = integration.linear_cross_entropy(hidden, weight, labels)
    assert logp[2] == 0 and entropy[2] == 0
    with pytest.raises(ValueError, match="reduction"):
        integration.linear_cross_entropy(hidden, weight, labels, 1.0, "avg")
    with pytest.raises(ValueError, match="one id per hidden row"):
        integration.linear_cross_entropy(hidden, weight, labels[:5])


@pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed")
def test_against_verls_torch_reference():
    from verl.utils.experimental.torch_functional import FusedLinearForPPOFunction

    hidden, weight, labels = leaves((2, 9, 16), seed=3)
    ref = FusedLinearForPPOFunction.apply(hidden, weight, labels, 0.8, 512)
    ours = integration.fused_linear_for_ppo(hidden, weight, labels, 0.8)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    got = grads_of(lambda: integration.fused_linear_for_ppo(hidden, weight, labels, 0.8), hidden, weight)
    want = grads_of(lambda: FusedLinearForPPOFunction.apply(hidden, weight, labels, 0.8, 512), hidden, weight)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.fixture
def fake_verl(monkeypatch):
    """Stand-in modules at verl's import paths, holding sentinels where the real functions would be."""
    def sentinel(*args, **kwargs):
        raise AssertionError("verl's own kernel was called")

    class FusedLinearForPPO(torch.nn.Module):
        def __init__(self, chunk_size=512, impl_backend="torch"):
            super().__init__()

        forward = sentinel

    modules = {name: types.ModuleType(name) for name in
               ("verl", "verl.utils", "verl.utils.kernel", "verl.utils.kernel.linear_cross_entropy",
                "verl.utils.experimental", "verl.utils.experimental.torch_functional",
                "verl.models", "verl.models.mcore", "verl.models.mcore.model_forward_fused")}
    modules["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy = sentinel
    modules["verl.utils.experimental.torch_functional"].FusedLinearForPPO = FusedLinearForPPO
    modules["verl.models.mcore.model_forward_fused"].linear_cross_entropy = sentinel  # bound at import time
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def test_patch_verl_routes_both_backends(fake_verl, monkeypatch):
    monkeypatch.setenv("SPPO_FAST_PATCH_VERL", "torch")
    integration._patch_from_env()  # what an import in a Ray worker does
    hidden, weight, labels = leaves((2, 4, 8), seed=4)
    ref_logp, ref_entropy = reference(hidden, weight, labels, 0.9)

    for name in ("verl.utils.kernel.linear_cross_entropy", "verl.models.mcore.model_forward_fused"):
        logp, entropy = fake_verl[name].linear_cross_entropy(hidden, weight, labels, 0.9, "none")
        torch.testing.assert_close(logp.double(), ref_logp.reshape(-1), atol=1e-5, rtol=1e-5)
    module = fake_verl["verl.utils.experimental.torch_functional"].FusedLinearForPPO(impl_backend="torch")
    log_probs, entropy = module.forward(hidden_states=hidden, vocab_weights=weight, input_ids=labels,
                                        temperature=0.9)
    torch.testing.assert_close(log_probs.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)


def test_no_patch_without_env(fake_verl, monkeypatch):
    monkeypatch.delenv("SPPO_FAST_PATCH_VERL", raising=False)
    before = fake_verl["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy
    integration._patch_from_env()
    assert fake_verl["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy is before
