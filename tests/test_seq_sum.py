"""segment_sum: both impls against the Python-loop reference, gradients, odd and empty sequences, int32/int64
offsets, torch.compile(fullgraph=True) without recompiles, and bad inputs.

Triton runs on CUDA, or on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
import os

import pytest
import torch

from sppo_fast.kernels import segment_sum
from sppo_fast.kernels.reference import segment_sum_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no CUDA, no interpreter"))]

# (name, cu_seqlens): odd lengths, empty sequences (repeated offsets), spans longer than one 1024-token block
CASES = [
    ("one-token", [0, 1]),
    ("odd", [0, 63, 64, 127, 200]),
    ("empty-seqs", [0, 0, 5, 5, 5, 12, 12]),
    ("all-empty", [0, 0, 0]),
    ("long", [0, 1, 2500, 2501]),
]


def _token_seq(cu):
    """sequence index of every token, by a Python loop (independent of the op's searchsorted)"""
    return torch.tensor([b for b in range(len(cu) - 1) for _ in range(cu[b], cu[b + 1])], dtype=torch.long)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("name,cu", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_and_grad(impl, dtype, cu_dtype, name, cu):
    torch.manual_seed(0)
    n = cu[-1]
    values = torch.randn(n, device=DEVICE).to(dtype).requires_grad_(True)
    cu_seqlens = torch.tensor(cu, dtype=cu_dtype, device=DEVICE)
    out = segment_sum(values, cu_seqlens, impl=impl)

    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc_dtype and out.shape == (len(cu) - 1,) and out.device == values.device
    truth = segment_sum_ref(values.detach().double(), cu_seqlens)
    # fp32 accumulation over <= 2500 unit-scale values: error ~ sqrt(n) * 6e-8 * |partial sums|
    atol = 1e-12 if dtype == torch.float64 else 1e-4
    err = (out.double() - truth).abs()
    assert err.max() <= atol, f"max error {err.max():.3g} at sequence {int(err.argmax())}"

    # the gradient of token i is the upstream gradient of its sequence, exactly, in values' dtype
    upstream = torch.randn(len(cu) - 1, device=DEVICE, dtype=acc_dtype)
    (grad,) = torch.autograd.grad(out, values, upstream)
    assert grad.dtype == dtype
    expected = upstream[_token_seq(cu).to(DEVICE)].to(dtype)
    assert torch.equal(grad, expected), f"grad mismatch at tokens {(grad != expected).nonzero().flatten()[:10]}"


@pytest.mark.parametrize("impl", IMPLS)
def test_impls_agree_and_double_backward(impl):
    torch.manual_seed(1)
    cu = torch.tensor([0, 3, 3, 10, 17], device=DEVICE)
    values = torch.randn(17, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(segment_sum(values, cu, impl=impl), segment_sum(values, cu, impl="torch"), atol=1e-12)
    # gradcheck covers the backward (a broadcast) and, through gradgradcheck, its own backward (a segment sum)
    fn = lambda v: segment_sum(v, cu, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values,))
    assert torch.autograd.gradgradcheck(fn, (values,))


@pytest.mark.parametrize("impl", IMPLS)
def test_compile_fullgraph_no_recompile(impl):
    """New pack lengths and sequence counts must not recompile: lengths are runtime values, never constexpr."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda v, cu: (segment_sum(v, cu, impl=impl) ** 2).sum(), backend=counter,
                             fullgraph=True, dynamic=True)
    for cu in ([0, 3, 3, 7], [0, 5, 11], [0, 1, 2, 3, 9, 20]):
        cu_seqlens = torch.tensor(cu, device=DEVICE)
        values = torch.randn(cu[-1], device=DEVICE, requires_grad=True)
        loss = compiled(values, cu_seqlens)
        loss.backward()
        eager = values.detach().clone().requires_grad_(True)
        (segment_sum(eager, cu_seqlens, impl=impl) ** 2).sum().backward()
        assert torch.allclose(loss, (segment_sum(eager.detach(), cu_seqlens, impl=impl) ** 2).sum())
        assert torch.allclose(values.grad, eager.grad)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


def test_bad_inputs():
    v = torch.randn(5)
    cu = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="values must be a 1-D"):
        segment_sum(v[None], cu)
    with pytest.raises(ValueError, match="floating point"):
        segment_sum(torch.arange(5), cu)
    with pytest.raises(ValueError, match="int32 or int64"):
        segment_sum(v, cu.float())
    with pytest.raises(ValueError, match="1-D"):
        segment_sum(v, cu[None])
    with pytest.raises(ValueError, match="one device"):
        segment_sum(v, cu.to("meta"))
    with pytest.raises(ValueError, match="impl must be one of"):
        segment_sum(v, cu, impl="cuda")
    bad = {"start at 0": [1, 2, 5], "non-decreasing": [0, 3, 2, 5], "end at the number of tokens": [0, 2, 4]}
    for message, offsets in bad.items():
        with pytest.raises(ValueError, match=message):  # eager, with the offending entry in the message
            segment_sum(v, torch.tensor(offsets), check_values=True)
        with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):  # queued torch._assert_async
            segment_sum(v, torch.tensor(offsets), impl="torch")
