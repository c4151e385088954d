"""Tests for sppo_fast.kernels.token_logprobs: every impl against an fp64 truth (CCE's rule), Liger as a peer,
determinism, torch.compile, input checks, and the regressions (ignored rows with huge logits, autocast). Without a
GPU the Triton kernels run in the interpreter (conftest.py); the interpreter's tl.dot is wrong on bf16 operands, so
bf16 is covered by the torch impl here (and the chunked impl, whose GEMMs are torch's) and by the GPU tests.
"""
import pytest
import torch
from conftest import assert_error_within, emulate_cuda_16bit_gemms, max_error

from sppo_fast.kernels import logprobs as logprobs_module
from sppo_fast.kernels import token_logprobs
from sppo_fast.kernels.reference import token_logprobs_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
IGNORE = -100
# Added to the baseline error, scaled by max(1, |truth|): covers reordered fp32 sums (and, for 16-bit grads, the
# 16-bit rounding of dl before the dX/dW products, which the framework's matmul backward also does).
EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _masked_rows(device):
    """Enough leading rows to cover at least one whole row block of either Triton kernel, plus a few."""
    dev = torch.device(device)
    fwd = logprobs_module._tile_config(logprobs_module._FWD_GPU, logprobs_module._FWD_CPU,
                                       torch.empty(0, device=dev))
    bwd = logprobs_module._tile_config(logprobs_module._BWD_GPU, logprobs_module._BWD_CPU,
                                       torch.empty(0, device=dev))
    return max(fwd.block_n, bwd.block_n) + 3


def _make_inputs(n, h, v, dtype, device=DEVICE, seed=0, mask=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / h**0.5)  # logits with std ~2: peaked, not one-hot
    targets = torch.randint(0, v, (n,), generator=gen)
    grad_logp, grad_entropy = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    if mask:
        n_masked = min(n, _masked_rows(device))
        targets[:n_masked] = IGNORE  # a fully ignored row block, and a partly ignored one
        targets[n - 2] = IGNORE
        grad_logp[n - 4] = grad_entropy[n - 4] = 0.0  # a valid row with no upstream grad
    to = dict(device=device)
    return (hidden.to(dtype=dtype, **to), weight.to(dtype=dtype, **to), targets.to(**to),
            grad_logp.to(**to), grad_entropy.to(**to))


def _backprop(logp, entropy, grad_logp, grad_entropy, inputs):
    loss = (logp.float() * grad_logp).sum()
    if entropy is not None:
        loss = loss + (entropy.float() * grad_entropy).sum()
    needs = [x for x in inputs if x.requires_grad]
    grads = iter(torch.autograd.grad(loss, needs)) if needs else iter(())
    return [next(grads) if x.requires_grad else None for x in inputs]


def _same_dtype_torch(hidden, weight, targets, temperature, softcap):
    """The plain framework computation a user would write: logits in the input dtype, softmax in fp32."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != IGNORE
    logp = logprobs.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def _run_all(fn, leaf_dtype, hidden, weight, grad_logp, grad_entropy, entropy_on, grad_hidden, grad_weight):
    """[logp, entropy, d_hidden, d_weight] of fn(hidden, weight) with hidden and weight cast to leaf_dtype."""
    hidden = hidden.detach().to(leaf_dtype).requires_grad_(grad_hidden)
    weight = weight.detach().to(leaf_dtype).requires_grad_(grad_weight)
    logp, entropy = fn(hidden, weight)
    grads = _backprop(logp, entropy if entropy_on else None, grad_logp, grad_entropy, [hidden, weight])
    return [logp, entropy] + grads


def _small_chunks(impl, v, rows=8):
    """A chunk budget of ~`rows` rows for the chunked impls, so that tests cross chunk boundaries."""
    return None if impl == "triton" else rows * 8 * v


def _check_against_truth(impl, n, h, v, dtype, temperature=1.0, softcap=None, entropy_on=True,
                         grad_hidden=True, grad_weight=True, device=DEVICE, chunk_bytes="small"):
    hidden, weight, targets, grad_logp, grad_entropy = _make_inputs(n, h, v, dtype, device)
    args = (hidden, weight, grad_logp, grad_entropy, entropy_on, grad_hidden, grad_weight)

    if chunk_bytes == "small":
        chunk_bytes = _small_chunks(impl, v)

    def ours(x, w):
        out = token_logprobs(x, w, targets, temperature=temperature, softcap=softcap, ignore_index=IGNORE,
                             return_entropy=entropy_on, impl=impl, chunk_bytes=chunk_bytes)
        return out if entropy_on else (out, None)

    def plain_torch(x, w):
        return _same_dtype_torch(x, w, targets, temperature, softcap)

    truth = _run_all(lambda x, w: token_logprobs_ref(x, w, targets, temperature, softcap, IGNORE),
                     torch.float64, *args)
    actual = _run_all(ours, dtype, *args)
    # Grads come out in the input dtype, so they are held to the same-dtype framework computation. The outputs
    # are fp32 from fp32-accumulated logits, so they are held to the framework's fp32 computation on the same
    # (already rounded) inputs: stricter than CCE's rule for 16-bit inputs.
    baseline = _run_all(plain_torch, dtype, *args)[2:]
    baseline = _run_all(plain_torch, torch.float32, *args)[:2] + baseline
    for name, a, b, t in zip(["logp", "entropy", "d_hidden", "d_weight"], actual, baseline, truth):
        if name == "entropy" and not entropy_on:
            assert a is None
            continue
        if t is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        if name.startswith("d_"):
            assert a.dtype == dtype, f"{name}: dtype {a.dtype} != {dtype}"
            eps = EPS[dtype] * max(1.0, t.abs().max().item())
        else:
            assert a.dtype == torch.float32
            eps = EPS[torch.float32] * max(1.0, t.abs().max().item())
        assert_error_within(f"{impl}/{dtype}/{name}", a, b, t, eps)
    assert (actual[0][targets == IGNORE] == 0).all()


CASES = [  # (N, H, V, temperature, softcap, entropy_on)
    pytest.param(37, 24, 517, 1.0, None, True, id="N37-H24-V517"),
    pytest.param(37, 24, 517, 0.7, 5.0, True, id="N37-H24-V517-T0.7-cap5"),
    pytest.param(37, 24, 517, 1.3, None, False, id="N37-H24-V517-T1.3-noent"),
    pytest.param(29, 40, 97, 0.6, 3.0, True, id="N29-H40-V97-T0.6-cap3"),  # one V split, partial V and H tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, h, v, temperature, softcap, entropy_on", CASES)
def test_torch_impl_matches_truth(n, h, v, temperature, softcap, entropy_on, dtype):
    _check_against_truth("torch", n, h, v, dtype, temperature, softcap, entropy_on)


# bf16 is left out on CPU only because the interpreter's tl.dot mishandles bf16 operands.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
IMPLS = ["chunked", "torch", "triton"]
# The CUDA 16-bit GEMM branch on CPU, for both row passes. chunked: fp16 only, since the interpreter's fp32 -> bf16
# cast truncates (measured: half of random values differ from round-to-nearest-even), where compiled Triton rounds to
# nearest; that bias, not the kernel, fails bf16 there. torch: both 16-bit dtypes (regression: its fp32 dZ met the
# 16-bit weight in the dX/dW GEMMs, which CUDA rejects, and only a looser emulation let the tests pass).
CUDA_BRANCH_CASES = [("chunked", torch.float16), ("torch", torch.float16), ("torch", torch.bfloat16)]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("n, h, v, temperature, softcap, entropy_on", CASES)
def test_triton_impl_matches_truth(n, h, v, temperature, softcap, entropy_on, dtype):
    _check_against_truth("triton", n, h, v, dtype, temperature, softcap, entropy_on)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, h, v, temperature, softcap, entropy_on", CASES)
def test_chunked_impl_matches_truth(n, h, v, temperature, softcap, entropy_on, dtype):
    # the Triton row pass is elementwise fp32 (no tl.dot), so bf16 runs in the interpreter too
    _check_against_truth("chunked", n, h, v, dtype, temperature, softcap, entropy_on)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad_hidden, grad_weight", [(True, False), (False, True)], ids=["frozen-W", "const-X"])
def test_partial_grads(impl, grad_hidden, grad_weight):
    _check_against_truth(impl, 37, 24, 517, torch.float32, 0.8, None, True, grad_hidden, grad_weight)


@pytest.mark.parametrize("impl, rows", [("torch", 1), ("torch", 5), ("torch", 64), ("chunked", 5), ("chunked", 64)])
def test_chunk_size_does_not_matter(impl, rows):
    """One row per chunk, a chunk that does not divide N, one chunk for everything: same numbers."""
    _check_against_truth(impl, 37, 24, 517, torch.float32, 0.7, 5.0, True, chunk_bytes=rows * 12 * 517)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ignored_rows_with_huge_logits_give_exact_finite_grads(impl, dtype):
    """Regression (found by Liger's FLCE suite): an ignored row whose largest logit exceeds ~88.7 got lse = 0 stored
    and exp(z - 0) = inf in the backward, 0 * inf = NaN, which spread into dW. The issue's exact repro, plus a
    temperature of 0.6 (z = logit / 0.6) and logits of 1000."""
    if impl == "triton" and dtype == torch.bfloat16 and not CUDA:
        pytest.skip("the interpreter's tl.dot is wrong on bf16")
    for scale, temperature in ((1.0, 1.0), (1.0, 0.6), (10.0, 1.0)):
        hidden = torch.tensor([[1.0, 0.0], [0.0, 100.0 * scale]], dtype=torch.float64)
        weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
        targets = torch.tensor([0, IGNORE])
        grads = []
        for d, fn in ((torch.float64, None), (dtype, impl)):
            x = hidden.detach().to(d).clone().requires_grad_()
            w = weight.detach().to(d).clone().requires_grad_()
            if fn is None:
                logp, _ = token_logprobs_ref(x, w, targets, temperature, None, IGNORE)
            else:
                logp = token_logprobs(x, w, targets, temperature=temperature, impl=fn)
            logp.sum().backward()
            grads.append((logp.detach().double(), x.grad.double(), w.grad.double()))
        for name, ours, truth in zip(["logp", "d_hidden", "d_weight"], grads[1], grads[0]):
            assert torch.isfinite(ours).all(), f"{impl}/{dtype}/{name}: {ours}"
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert (ours - truth).abs().max().item() <= tol, f"{impl}/{dtype}/{name}: {ours} vs {truth}"
        assert grads[1][1][1].abs().max().item() == 0.0  # the ignored row's hidden gets exactly no gradient


NAN_CASES = [(impl, dtype, False) for impl in IMPLS for dtype in (torch.float32, torch.float16, torch.bfloat16)
             if CUDA or impl == "torch" or dtype != torch.bfloat16]  # the interpreter's tl.dot is wrong on bf16
NAN_CASES += [] if CUDA else [(impl, dtype, True) for impl, dtype in CUDA_BRANCH_CASES]


@pytest.mark.parametrize("impl,dtype,cuda_branch", NAN_CASES)
def test_ignored_rows_holding_nan_contribute_nothing(monkeypatch, impl, dtype, cuda_branch):
    """Padding rows may hold anything (uninitialised states, NaN, inf): every impl and dtype gives bit for bit the
    outputs and grads of the same batch with those rows zeroed, and exact zeros in their dX rows."""
    if cuda_branch:
        emulate_cuda_16bit_gemms(monkeypatch)
    hidden, weight, targets, grad_logp, grad_entropy = _make_inputs(37, 24, 517, dtype)
    ignored = targets == IGNORE
    clean = torch.where(ignored[:, None], 0, hidden)
    garbage = hidden.clone()
    garbage[ignored] = float("nan")
    garbage[0, 0], garbage[1, :3], garbage[2, 5] = float("inf"), float("-inf"), 6e4 if dtype == torch.float16 else 1e30
    outs = []
    for x in (clean, garbage):
        x = x.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp, entropy = token_logprobs(x, w, targets, return_entropy=True, impl=impl, softcap=5.0,
                                       chunk_bytes=None if impl == "triton" else 8 * 12 * 517)
        grads = _backprop(logp, entropy, grad_logp, grad_entropy, [x, w])
        outs.append([logp, entropy] + grads)
    for name, a, b in zip(["logp", "entropy", "d_hidden", "d_weight"], *outs):
        assert torch.isfinite(b).all(), f"{name}: {int((~torch.isfinite(b)).sum())} non-finite"
        assert torch.equal(a, b), f"{name}: max diff {(a.double() - b.double()).abs().max().item():.3e}"
    assert (outs[1][2][ignored] == 0).all() and (outs[1][0][ignored] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_does_not_change_the_math(impl):
    """Regression: under an active autocast the torch path's matmul silently ran in bf16 (logp error 4.8e-2 vs
    fp64). The ops promise fp32 math: with autocast on, the result is the fp32 one."""
    hidden, weight, targets, grad_logp, grad_entropy = _make_inputs(37, 64, 517, torch.float32)
    truth = token_logprobs_ref(hidden.double(), weight.double(), targets, 0.7, None, IGNORE)
    results = []
    for enabled in (False, True):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=enabled):
            logp, entropy = token_logprobs(x, w, targets, temperature=0.7, return_entropy=True, impl=impl)
            grads = _backprop(logp, entropy, grad_logp, grad_entropy, [x, w])
        results.append([logp, entropy] + grads)
    for name, off, on in zip(["logp", "entropy", "d_hidden", "d_weight"], *results):
        assert on.dtype == off.dtype
        torch.testing.assert_close(on, off, atol=1e-6, rtol=1e-6, msg=name)
    for name, ours, t in zip(["logp", "entropy"], results[1][:2], truth):
        assert (ours.double() - t).abs().max().item() < 1e-5, name


def test_default_impl_is_chunked_on_cuda_and_torch_elsewhere():
    from sppo_fast.kernels._utils import resolve_impl

    cpu = torch.zeros(1)
    assert resolve_impl("auto", cpu) == "torch"
    if CUDA:
        assert resolve_impl("auto", cpu.cuda()) == "chunked"


def test_matches_liger_fused_linear_cross_entropy():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    hidden, weight, targets, grad, _ = _make_inputs(37, 24, 517, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    nll = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")(weight, hidden, targets)
    liger_grads = torch.autograd.grad(nll, [hidden, weight], grad)
    for impl in IMPLS:
        logp = token_logprobs(hidden, weight, targets, ignore_index=IGNORE, impl=impl,
                              chunk_bytes=_small_chunks(impl, 517))
        our_grads = torch.autograd.grad(logp, [hidden, weight], -grad)
        torch.testing.assert_close(-logp, nll.float(), atol=1e-5, rtol=1e-5)
        for ours, theirs in zip(our_grads, liger_grads):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_is_deterministic_and_ratio_is_one(impl):
    hidden, weight, targets, _, _ = _make_inputs(37, 24, 517, torch.float32)
    with torch.no_grad():  # old-policy log-probs, as the trainer takes them
        old_logp, old_entropy = token_logprobs(hidden, weight, targets, temperature=0.6, return_entropy=True,
                                               impl=impl)
    weight.requires_grad_()
    logp, entropy = token_logprobs(hidden, weight, targets, temperature=0.6, return_entropy=True, impl=impl)
    assert torch.equal(logp, old_logp) and torch.equal(entropy, old_entropy)
    ratio = torch.exp(logp - old_logp)
    assert torch.equal(ratio, torch.ones_like(ratio))


def _fwd_block_n(device):
    return logprobs_module._tile_config(logprobs_module._FWD_GPU, logprobs_module._FWD_CPU,
                                        torch.empty(0, device=device)).block_n


def test_triton_rows_do_not_depend_on_batch_size():
    # V splits depend on V only and the combine runs in a fixed order, so a block-aligned sub-batch gets the same
    # bits as the full batch: old log-probs may be taken with another batch size than the update. (Within a
    # tile, a row's position may change its rounding: the interpreter's numpy matmul does.)
    hidden, weight, targets, _, _ = _make_inputs(37, 24, 517, torch.float32, mask=False)
    offset = _fwd_block_n(DEVICE)
    full = token_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
    part = token_logprobs(hidden[offset:], weight, targets[offset:], return_entropy=True, impl="triton")
    for a, b in zip(full, part):
        assert torch.equal(a[offset:], b)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    hidden = torch.zeros(0, 24, device=DEVICE, requires_grad=True)
    weight = torch.randn(517, 24, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logp, entropy = token_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
    assert logp.shape == entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == (0, 24) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_non_contiguous_inputs_and_int32_targets():
    hidden, weight, targets, _, _ = _make_inputs(37, 24, 517, torch.float32)
    expected = token_logprobs(hidden, weight, targets, impl="torch")
    got = token_logprobs(hidden.T.contiguous().T, weight.T.contiguous().T, targets.int(), impl="torch")
    assert not hidden.T.contiguous().T.is_contiguous()
    assert torch.equal(got, expected)


def test_compile_fullgraph_dynamic_n_matches_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def step(hidden, weight, targets, grad_logp, grad_entropy):
        logp, entropy = token_logprobs(hidden, weight, targets, temperature=0.7, softcap=5.0, return_entropy=True,
                                       impl="torch")
        return (logp * grad_logp).sum() + (entropy * grad_entropy).sum()

    # fullgraph=True raises on any graph break; aot_eager traces the custom ops' fake and autograd registrations
    # like inductor does, without minutes of C++ compilation on a CPU runner.
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (37, 53):
        hidden, weight, targets, grad_logp, grad_entropy = _make_inputs(n, 24, 517, torch.float32)
        hidden.requires_grad_()
        weight.requires_grad_()
        loss = compiled(hidden, weight, targets, grad_logp, grad_entropy)
        grads = torch.autograd.grad(loss, [hidden, weight])
        loss_eager = step(hidden, weight, targets, grad_logp, grad_entropy)
        grads_eager = torch.autograd.grad(loss_eager, [hidden, weight])
        torch.testing.assert_close(loss, loss_eager, atol=1e-5, rtol=1e-6)
        for got, expected in zip(grads, grads_eager):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, "a new N recompiled"

    # The default device-side target check also fires inside the compiled graph.
    targets[3] = 517
    with pytest.raises(RuntimeError, match="targets must be in"):
        compiled(hidden, weight, targets, grad_logp, grad_entropy)


def _bad_call(hidden=None, weight=None, targets=None, **kwargs):
    good_hidden, good_weight, good_targets, _, _ = _make_inputs(8, 16, 33, torch.float32, mask=False)
    return lambda: token_logprobs(good_hidden if hidden is None else hidden,
                                  good_weight if weight is None else weight,
                                  good_targets if targets is None else targets, **kwargs)


@pytest.mark.parametrize("call, match", [
    (_bad_call(hidden=torch.randn(2, 4, 16)), "hidden must be 2-D"),
    (_bad_call(weight=torch.randn(33, 15)), "weight must be 2-D"),
    (_bad_call(weight=torch.randn(0, 16)), "weight must have at least one row"),
    (_bad_call(targets=torch.zeros(7, dtype=torch.long)), "targets must be 1-D"),
    (_bad_call(targets=torch.zeros(8)), "targets must be int32 or int64"),
    (_bad_call(hidden=torch.randn(8, 16, dtype=torch.float64)), "hidden dtype"),
    (_bad_call(weight=torch.randn(33, 16, dtype=torch.float16)), "weight dtype"),
    (_bad_call(weight=torch.randn(33, 16, device="meta")), "weight"),
    (_bad_call(temperature=0.0), "temperature must be > 0"),
    (_bad_call(softcap=-1.0), "softcap must be None or > 0"),
    (_bad_call(impl="cuda"), "impl must be one of"),
    (_bad_call(chunk_bytes=0), "chunk_bytes must be None or a positive int"),
], ids=["hidden-3d", "weight-H", "weight-empty", "targets-len", "targets-dtype", "hidden-fp64", "weight-dtype",
        "device", "temperature", "softcap", "impl", "chunk-bytes"])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_out_of_range_targets_raise():
    hidden, weight, targets, _, _ = _make_inputs(8, 16, 33, torch.float32, mask=False)
    targets[3], targets[5] = 33, IGNORE
    with pytest.raises(ValueError, match=r"targets\[3\] = 33"):
        token_logprobs(hidden, weight, targets, check_values=True, impl="torch")
    if not CUDA:  # the device-side assert fails at once on CPU (on CUDA, at the next sync point)
        with pytest.raises(RuntimeError, match="targets must be in"):
            token_logprobs(hidden, weight, targets, impl="torch")
    targets[3] = -1
    with pytest.raises(ValueError, match=r"targets\[3\] = -1"):
        token_logprobs(hidden, weight, targets, check_values=True, impl="torch")


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("temperature, softcap, entropy_on", [(1.0, None, False), (0.7, 30.0, True)],
                         ids=["plain", "T0.7-cap30-ent"])
def test_realistic_size_on_gpu(impl, dtype, temperature, softcap, entropy_on):
    # chunk_bytes: 64 MiB, several chunks at this size (the default budget would take all rows in one)
    _check_against_truth(impl, 4096, 1024, 32000, dtype, temperature, softcap, entropy_on, device="cuda",
                         chunk_bytes=None if impl == "triton" else 64 << 20)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_triton_deterministic_on_gpu():
    hidden, weight, targets, _, _ = _make_inputs(4096, 1024, 32000, torch.bfloat16, device="cuda")
    first = token_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
    second = token_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
    offset = 3 * _fwd_block_n("cuda")
    part = token_logprobs(hidden[offset:], weight, targets[offset:], return_entropy=True, impl="triton")
    for a, b, c in zip(first, second, part):
        assert torch.equal(a, b) and torch.equal(a[offset:], c)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_triton_does_not_recompile_per_n_or_hyperparameter():
    kernel = logprobs_module._logprobs_fwd_kernel
    if not hasattr(kernel, "device_caches"):  # Triton-internal; the layout this reads is Triton 3.x's
        pytest.skip("this Triton keeps no device_caches")

    def n_compiled():
        return sum(len(cache[0]) for cache in kernel.device_caches.values())

    hidden, weight, targets, _, _ = _make_inputs(1000, 256, 5000, torch.bfloat16, device="cuda")
    token_logprobs(hidden, weight, targets, temperature=0.7, softcap=30.0, impl="triton")
    before = n_compiled()
    for n, temperature, softcap in [(999, 1.3, 20.0), (517, 0.6, 50.0)]:
        token_logprobs(hidden[:n], weight, targets[:n], temperature=temperature, softcap=softcap, impl="triton")
    assert n_compiled() == before


@pytest.mark.skipif(CUDA, reason="emulates the CUDA branch on CPU")
@pytest.mark.parametrize("impl,dtype", CUDA_BRANCH_CASES)
@pytest.mark.parametrize("addmm_in_place", [True, False], ids=["addmm-f32", "blocked-dW"])
def test_cuda_16bit_branch_emulated(monkeypatch, impl, dtype, addmm_in_place):
    emulate_cuda_16bit_gemms(monkeypatch, addmm_in_place)
    from sppo_fast.kernels import chunked

    assert chunked._Gemms(torch.zeros(3, 2, dtype=dtype), dtype).dz_dtype == dtype  # the branch under test is taken
    _check_against_truth(impl, 37, 24, 517, dtype, 0.7, 5.0, True)


@pytest.mark.skipif(CUDA, reason="emulates the CUDA branch on CPU")
def test_cuda_16bit_branch_emulation_applies_cuda_dtype_rules(monkeypatch):
    """The emulation is only worth its name if it rejects what CUDA rejects."""
    emulate_cuda_16bit_gemms(monkeypatch)
    from sppo_fast.kernels import chunked

    a, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, 3, dtype=torch.bfloat16)
    torch.testing.assert_close(chunked._mm_f32(a, b, None), a.float() @ b.float())
    with pytest.raises(RuntimeError, match="input dtypes must be the same"):
        chunked._mm_f32(a.float(), b, None)
    with pytest.raises(RuntimeError, match="input dtypes must be the same"):
        chunked._addmm_f32_(torch.zeros(4, 3), a, b.half())
    with pytest.raises(RuntimeError, match="Expected out tensor to have dtype float"):
        chunked._mm_f32(a, b, torch.empty(4, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="fp16/bf16 inputs"):
        chunked._mm_f32(a.float(), b.float(), None)


@pytest.mark.parametrize("impl", ["chunked", "torch"])
def test_forward_only_allocates_no_dz_buffer(monkeypatch, impl):
    """A 16-bit dZ buffer exists only when a gradient is formed: the no-grad scoring pass (old log-probs) neither
    allocates one nor shrinks its chunks for it."""
    if impl == "chunked" and CUDA:
        pytest.skip("emulates the CUDA branch on CPU")
    if not CUDA:
        emulate_cuda_16bit_gemms(monkeypatch)
    from sppo_fast.kernels import chunked

    loops = []
    real = chunked._Loop.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        loops.append(self)

    monkeypatch.setattr(chunked._Loop, "__init__", spy)
    hidden, weight, targets, grad_logp, grad_entropy = _make_inputs(37, 24, 517, torch.float16)
    kw = dict(impl=impl, chunk_bytes=8 * 10 * 517)  # fwd: 20 (chunked) / 10 (torch) rows; bwd: 13 / 8
    with torch.no_grad():
        token_logprobs(hidden, weight, targets, **kw)
    (fwd,) = loops
    assert fwd.dz is None
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = token_logprobs(x, w, targets, **kw)
    _backprop(logp, None, grad_logp, None, [x, w])
    bwd = loops[-1]
    assert bwd.dz is not None and bwd.dz.dtype == torch.float16
    assert fwd.rows > bwd.rows


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_master_weight_with_16bit_hidden(impl, dtype):
    """An fp32 weight with 16-bit hidden states (autocast training): the same numbers as passing the weight
    rounded to 16 bits, except that dW comes back in fp32 (no 16-bit rounding), at least as close to the truth."""
    hidden, weight, targets, grad_logp, grad_entropy = _make_inputs(37, 24, 517, dtype)
    master = (weight.float() + 1e-3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    rounded = master.to(dtype)
    truth = _run_all(lambda x, w: token_logprobs_ref(x, w, targets, 0.7, None, IGNORE), torch.float64, hidden,
                     rounded, grad_logp, grad_entropy, True, True, True)
    kw = dict(temperature=0.7, ignore_index=IGNORE, return_entropy=True, impl=impl,
              chunk_bytes=_small_chunks(impl, 517))
    outs = []
    for w in (master, rounded):
        x, w = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        logp, entropy = token_logprobs(x, w, targets, **kw)
        outs.append([logp, entropy] + _backprop(logp, entropy, grad_logp, grad_entropy, [x, w]))
    mixed, same = outs
    assert mixed[3].dtype == torch.float32 and same[3].dtype == dtype and mixed[2].dtype == dtype
    for a, b in zip(mixed[:3], same[:3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    err_mixed = max_error(mixed[3], truth[3])
    assert err_mixed <= max_error(same[3], truth[3]) + 1e-6
    assert err_mixed <= 1e-5 * max(1.0, truth[3].abs().max().item())  # fp32 accuracy: no 16-bit rounding of dW
    with pytest.raises(ValueError, match="one dtype"):
        token_logprobs(hidden, master, targets, impl="triton")


@pytest.mark.skipif(CUDA, reason="the interpreter runs on CPU tensors only")
def test_interpreter_that_cannot_work_is_named_up_front(monkeypatch):
    """triton < 3.7's interpreter with numpy >= 2.4 fails inside every kernel loop (the GPU machine's triton 3.6 with
    the newest numpy): the ops say so before launching, with the fix."""
    import numpy
    import triton

    from sppo_fast.kernels import _utils, segment_sum

    hidden, weight, targets, _, _ = _make_inputs(5, 8, 33, torch.float32)
    for triton_version, numpy_version, bad in (("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False),
                                               ("3.7.0", "2.4.1", False)):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        _utils._interpreter_problem.cache_clear()
        for call in (lambda: token_logprobs(hidden, weight, targets, impl="triton"),
                     lambda: token_logprobs(hidden, weight, targets, impl="chunked"),
                     lambda: segment_sum(torch.ones(4), torch.tensor([0, 4]), impl="triton")):
            if bad:
                with pytest.raises(RuntimeError, match=r"install 'numpy<2.4' or triton >= 3.7"):
                    call()
            else:
                call()
        token_logprobs(hidden, weight, targets, impl="torch")  # never concerned
    _utils._interpreter_problem.cache_clear()
