"""ppo_clip_loss against a plain-PyTorch PPO loss written here (full logits, log_softmax, explicit clip and dual
clip, Python loops over sequences), independent of kernels/reference.py and of the op's own code.

Tolerance rule (CCE): our error versus an fp64 truth on the same inputs must be <= the error of plain torch in the
inputs' dtype + a small slack. The log-ratios are placed away from the clip boundaries (see `_old_logp`) so that
rounding cannot flip a clip decision between the truth and the op, which would be a discontinuity, not an error.
Triton runs on CUDA, or on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) at tiny
sizes and in fp32/fp16 only: the interpreter's bf16 tl.dot is wrong.
"""
import math
import os

import pytest
import torch
from conftest import assert_error_within, emulate_cuda_16bit_gemms

from sppo_fast.kernels import ppo_clip_loss, token_logprobs
from sppo_fast.kernels.ppo_loss import ppo_clip_loss_from_logp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
_needs_triton = pytest.mark.skipif(not TRITON_OK, reason="no CUDA, no Triton interpreter")
IMPL_DTYPES = [
    pytest.param("triton", torch.float32, marks=_needs_triton, id="triton-fp32"),
    pytest.param("triton", torch.float16, marks=_needs_triton, id="triton-fp16"),
    pytest.param("torch", torch.float32, id="torch-fp32"),
    pytest.param("torch", torch.bfloat16, id="torch-bf16"),
    pytest.param("chunked", torch.float32, marks=_needs_triton, id="chunked-fp32"),
    # the chunked impl's GEMMs are torch's, its row pass elementwise: bf16 is exact in the interpreter too
    pytest.param("chunked", torch.bfloat16, marks=_needs_triton, id="chunked-bf16"),
]
if torch.cuda.is_available():
    IMPL_DTYPES.append(pytest.param("triton", torch.bfloat16, id="triton-bf16"))
LOSS_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}  # relative to the truth's max |value|

# packed batch: lengths 5, 0 (empty), 7, 3 (fully masked), 4, 5 -> N = 24; V odd, H small
CU = [0, 5, 5, 12, 15, 19, 24]
N, H, V = CU[-1], 16, 37
IGNORE = -100
# per-sequence advantages of both signs, so both clip sides and the dual clip (A < 0 only) can trigger
SEQ_ADV = [1.3, 0.4, -0.9, 0.7, -1.2, 0.8]
# log-ratios log(new/old) at least 0.08 from log(0.8) = -0.22, log(1.2) = 0.18 and log(3) = 1.10
LOG_RATIOS = [-0.7, -0.05, 0.08, 0.6, 1.6]
# for sequence ratios, one per sequence: clipped high (A > 0), -, dual clip (A < 0), masked, unclipped (A < 0),
# unclipped (A > 0, r < 0.8: the pessimistic unclipped term wins)
SEQ_LOG_RATIOS = [0.6, 0.0, 1.6, 0.08, -0.05, -0.7]


# ---------------------------------------------------------------------------------------------------------------
# the independent plain-torch PPO loss
def torch_ppo(hidden, weight, targets, old_logp, advantages, *, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
              ratio_level="token", loss_agg="token-mean", temperature=1.0, softcap=None, entropy_coef=0.0,
              compute_dtype=torch.float64):
    """(loss, stats, logp) from full logits. compute_dtype=float64 is the truth; the inputs' own dtype gives the
    'plain torch in this dtype' baseline (matmul in that dtype, log_softmax in fp32)."""
    if compute_dtype == torch.float64:
        logits = hidden.double() @ weight.double().T
    else:
        logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != IGNORE
    logp = logprobs.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)

    seq_of = [b for b in range(len(CU) - 1) for _ in range(CU[b], CU[b + 1])]
    adv = advantages.to(logp.dtype)
    if adv.shape[0] != N:
        adv = torch.stack([adv[b] for b in seq_of])
    log_ratio = logp - old_logp.to(logp.dtype)
    if ratio_level == "sequence":
        seq_means = []
        for b in range(len(CU) - 1):
            idx = [i for i in range(CU[b], CU[b + 1]) if valid[i]]
            seq_means.append(log_ratio[idx].mean() if idx else log_ratio.new_zeros(()))
        log_ratio = torch.stack([seq_means[b] for b in seq_of])
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.max(unclipped, clipped)
    dual = torch.zeros_like(valid)
    if dual_clip is not None:
        dual = (adv < 0) & (-adv * dual_clip < pg)
        pg = torch.where(adv < 0, torch.min(pg, -adv * dual_clip), pg)

    def agg(x):
        if loss_agg == "token-mean":
            return x[valid].sum() / valid.sum()
        per_seq = []
        for b in range(len(CU) - 1):
            v = valid[CU[b]:CU[b + 1]]
            if v.any():
                total = x[CU[b]:CU[b + 1]][v].sum()
                per_seq.append(total / v.sum() if loss_agg == "seq-mean-token-mean" else total)
        return torch.stack(per_seq).mean()

    loss = agg(pg) - entropy_coef * agg(entropy)
    n = valid.sum()
    with torch.no_grad():
        lr_tok = (logp - old_logp.to(logp.dtype))[valid]
        stats = {
            "clipfrac": ((clipped > unclipped) & valid).sum() / n,
            "dual_clipfrac": (dual & valid).sum() / n,
            "approx_kl": (lr_tok.exp() - 1 - lr_tok).mean(),
            "ratio_mean": ratio[valid].mean(), "ratio_max": ratio[valid].max(), "ratio_min": ratio[valid].min(),
            "entropy": entropy[valid].mean(), "logp": logp[valid].mean(), "num_tokens": n.double(),
        }
    return loss, stats, logp


# ---------------------------------------------------------------------------------------------------------------
# inputs
def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))).to(DEVICE, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[[1, 8]] = IGNORE  # masked rows inside sequences
    targets[12:15] = IGNORE  # a fully masked sequence
    return hidden, weight, targets


def _old_logp(hidden, weight, targets, ratio_level, seed=0):
    """old = truth logp - chosen log-ratio: random per token for token ratios, SEQ_LOG_RATIOS for sequence ratios
    (so the sequence mean is the chosen value too), all away from the clip boundaries."""
    _, _, logp = torch_ppo(hidden, weight, targets, torch.zeros(N, device=DEVICE), torch.zeros(N, device=DEVICE))
    g = torch.Generator().manual_seed(seed + 1)
    if ratio_level == "sequence":
        shifts = torch.cat([torch.tensor(SEQ_LOG_RATIOS[b]).expand(CU[b + 1] - CU[b]) for b in range(len(CU) - 1)])
    else:
        shifts = torch.tensor(LOG_RATIOS)[torch.randint(0, len(LOG_RATIOS), (N,), generator=g)]
    return (logp - shifts.to(DEVICE, torch.float64)).float()


def _advantages(per_sequence, seed=0):
    seq_adv = torch.tensor(SEQ_ADV, device=DEVICE)
    if per_sequence:
        return seq_adv
    # per token: the sequence's sign, with token-to-token variation
    g = torch.Generator().manual_seed(seed + 2)
    scale = 0.5 + torch.rand(N, generator=g).to(DEVICE)
    return torch.cat([seq_adv[b].expand(CU[b + 1] - CU[b]) for b in range(len(CU) - 1)]) * scale


def _small_chunks(impl, rows=5):
    """`rows` rows per chunk for the chunked impls (N = 24): chunk boundaries fall inside sequences. Bytes per row:
    fp32 logits (4 V), plus the torch row pass's exp buffer (4 V); fewer rows with softcap on the torch impl."""
    return None if impl == "triton" else rows * (4 if impl == "chunked" else 8) * V


def _assert_within(name, ours, truth, baseline, dtype):
    """CCE rule via conftest: |ours - truth| <= |plain torch in this dtype - truth| + slack * max |truth|."""
    eps = SLACK[dtype] * max(truth.detach().abs().max().item(), 1.0)
    assert_error_within(name, ours.detach(), baseline.detach(), truth.detach(), eps)


def _run_both(impl, dtype, per_sequence, **kw):
    """ours, fp64 truth and same-dtype torch; returns a dict of (ours, truth, baseline) and the stats."""
    hidden, weight, targets = _inputs(dtype)
    old = _old_logp(hidden, weight, targets, kw.get("ratio_level", "token"))
    adv = _advantages(per_sequence)
    cu = torch.tensor(CU, device=DEVICE, dtype=torch.int32)

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = ppo_clip_loss(h, w, targets, old, adv, cu_seqlens=cu, ignore_index=IGNORE, impl=impl,
                                chunk_bytes=_small_chunks(impl), **kw)
    loss.backward()
    results = {"loss": [loss], "d_hidden": [h.grad], "d_weight": [w.grad]}
    for compute_dtype in (torch.float64, dtype):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        ref_loss, ref_stats, _ = torch_ppo(h, w, targets, old, adv, compute_dtype=compute_dtype, **kw)
        ref_loss.backward()
        results["loss"].append(ref_loss)
        results["d_hidden"].append(h.grad)
        results["d_weight"].append(w.grad)
        if compute_dtype == torch.float64:
            truth_stats = ref_stats
    return results, stats, truth_stats


# ---------------------------------------------------------------------------------------------------------------
# tests
@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("per_sequence", [True, False], ids=["adv-seq", "adv-token"])
def test_loss_and_grads_match_torch(impl, dtype, loss_agg, ratio_level, per_sequence):
    results, stats, truth_stats = _run_both(impl, dtype, per_sequence, loss_agg=loss_agg, ratio_level=ratio_level)
    for name, (ours, truth, baseline) in results.items():
        _assert_within(name, ours, truth, baseline, dtype)
    # the perturbation must exercise both clips, else this test would not test them
    assert stats["clipfrac"] > 0 and stats["dual_clipfrac"] > 0, stats
    # clip decisions are discrete and the log-ratios sit away from the boundaries: the fractions match exactly
    for key in ("clipfrac", "dual_clipfrac", "num_tokens"):
        assert stats[key].item() == pytest.approx(truth_stats[key].item(), abs=1e-6), key


FP32_IMPLS = [p for p in IMPL_DTYPES if p.values[1] == torch.float32]


@pytest.mark.parametrize("impl,dtype", FP32_IMPLS)
def test_options_and_entropy_grad(impl, dtype):
    """temperature, softcap, asymmetric clip, no dual clip, and the entropy bonus's gradient."""
    kw = dict(loss_agg="seq-mean-token-mean", clip_low=0.1, clip_high=0.28, dual_clip=None, temperature=0.7,
              softcap=5.0, entropy_coef=0.05)
    results, stats, truth_stats = _run_both(impl, dtype, True, **kw)
    for name, (ours, truth, baseline) in results.items():
        _assert_within(name, ours, truth, baseline, dtype)
    assert stats["dual_clipfrac"] == 0
    # the entropy term changes the gradient (else entropy_coef would be silently ignored)
    no_bonus, _, _ = _run_both(impl, dtype, True, **{**kw, "entropy_coef": 0.0})
    assert not torch.allclose(results["d_hidden"][0], no_bonus["d_hidden"][0])
    _assert_within("d_hidden (no entropy bonus)", *no_bonus["d_hidden"], dtype)


@pytest.mark.parametrize("impl,dtype", FP32_IMPLS)
def test_stats(impl, dtype):
    results, stats, truth = _run_both(impl, dtype, False, ratio_level="token")
    expected_keys = {"pg_loss", "clipfrac", "dual_clipfrac", "approx_kl", "ratio_mean", "ratio_max", "ratio_min",
                     "entropy", "logp", "num_tokens"}
    assert set(stats) == expected_keys
    for key, value in stats.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and value.device.type == DEVICE, key
        assert not value.requires_grad, key
    for key in expected_keys - {"pg_loss"}:
        assert stats[key].item() == pytest.approx(truth[key].item(), rel=1e-4, abs=1e-5), key
    assert stats["num_tokens"].item() == N - 2 - 3
    assert stats["pg_loss"].item() == pytest.approx(results["loss"][1].item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("impl,dtype", FP32_IMPLS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_ratio_is_exactly_one_on_own_logp(impl, dtype, ratio_level):
    """old_logp from token_logprobs itself (the first-minibatch case): r == 1 bit for bit, nothing clipped, and the
    loss reduces to -agg(A) with gradient -agg(A * grad logp). on_policy=True gives the same without old_logp."""
    hidden, weight, targets = _inputs(dtype)
    cu = torch.tensor(CU, device=DEVICE)
    with torch.no_grad():
        old = token_logprobs(hidden, weight, targets, ignore_index=IGNORE, impl=impl)
    results = []
    for old_logp, on_policy in ((old, False), (None, True)):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, stats = ppo_clip_loss(h, w, targets, old_logp, _advantages(True), cu_seqlens=cu, ignore_index=IGNORE,
                                    ratio_level=ratio_level, impl=impl, on_policy=on_policy, entropy_coef=0.01)
        assert stats["ratio_max"].item() == 1.0 and stats["ratio_min"].item() == 1.0
        assert stats["clipfrac"].item() == 0.0 and stats["dual_clipfrac"].item() == 0.0
        assert stats["approx_kl"].item() == 0.0
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_on_policy_argument_checks():
    hidden, weight, targets = _inputs(torch.float32)
    adv = _advantages(True)
    cu = torch.tensor(CU)
    with pytest.raises(ValueError, match="pass old_logp=None"):
        ppo_clip_loss(hidden, weight, targets, torch.zeros(N), adv, cu_seqlens=cu, on_policy=True)
    with pytest.raises(ValueError, match="old_logp is None"):
        ppo_clip_loss(hidden, weight, targets, None, adv, cu_seqlens=cu)


class _GemmCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matrix products of an [*, V] operand with an [*, H] one (the 2 N H V-flop work)."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab, self.hidden, self.count = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "sppo_fast":  # our custom ops: run their Python body under this mode, to count inside
            from torch._library.custom_ops import _maybe_get_opdef

            with self:
                return _maybe_get_opdef(func)._init_fn(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                   torch.ops.aten.bmm, torch.ops.aten.matmul):
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            if any(self.vocab in m.shape[-2:] for m in mats) and any(self.hidden in m.shape[-2:] for m in mats):
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["torch", pytest.param("chunked", marks=_needs_triton)])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_grads_in_forward_do_three_gemms_per_chunk_and_match_recompute(impl, loss_agg):
    """Token ratio: 3 V-sized GEMMs per chunk in all (forward + backward), against 4 for the recompute route
    (token_logprobs + ppo_clip_loss_from_logp); forward-only 1, frozen weight 2. Both routes agree."""
    hidden, weight, targets = _inputs(torch.float32)
    old = _old_logp(hidden, weight, targets, "token")
    adv, cu = _advantages(True), torch.tensor(CU, device=DEVICE)
    from sppo_fast.kernels.chunked import chunk_rows

    chunk_bytes = _small_chunks(impl)
    rows = chunk_rows(N, V, torch.float32, chunk_bytes, impl == "chunked", False)
    chunks = math.ceil(N / rows)
    assert chunks >= 3
    kw = dict(cu_seqlens=cu, ignore_index=IGNORE, loss_agg=loss_agg, impl=impl, chunk_bytes=chunk_bytes,
              entropy_coef=0.02, temperature=0.8)

    def run(fused, grad_weight=True, grad=True):
        h, w = hidden.clone().requires_grad_(grad), weight.clone().requires_grad_(grad and grad_weight)
        counter = _GemmCounter(V, H)
        with counter:
            if fused:
                loss, _ = ppo_clip_loss(h, w, targets, old, adv, **kw)
            else:
                logp, entropy = token_logprobs(h, w, targets, ignore_index=IGNORE, temperature=0.8, impl=impl,
                                               chunk_bytes=kw["chunk_bytes"], return_entropy=True)
                loss, _ = ppo_clip_loss_from_logp(logp, old, adv, targets != IGNORE, cu, entropy=entropy,
                                                  loss_agg=loss_agg, entropy_coef=0.02, impl="torch")
            if grad:
                loss.backward()
        return counter.count, loss.detach(), h.grad, w.grad

    n_fused, loss_f, dh_f, dw_f = run(True)
    n_recompute, loss_r, dh_r, dw_r = run(False)
    assert n_fused == 3 * chunks, n_fused
    assert n_recompute == 4 * chunks, n_recompute
    assert run(True, grad=False)[0] == chunks
    assert run(True, grad_weight=False)[0] == 2 * chunks
    torch.testing.assert_close(loss_f, loss_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dh_f, dh_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw_f, dw_r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", pytest.param("chunked", marks=_needs_triton)])
def test_fused_loss_under_autocast_and_with_huge_ignored_logits(impl):
    """The two regressions, on the fused route: autocast changes nothing; ignored rows with logits of 1e3 (and NaN
    hidden states) give the same loss and grads as clean ones."""
    hidden, weight, targets = _inputs(torch.float32)
    old = _old_logp(hidden, weight, targets, "token")
    adv, cu = _advantages(True), torch.tensor(CU, device=DEVICE)
    dirty = hidden.clone()
    dirty[targets == IGNORE] = 1e3 * weight[0]
    dirty[1] = float("nan")
    results = []
    for x, autocast in ((hidden, False), (hidden, True), (dirty, False)):
        h, w = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = ppo_clip_loss(h, w, targets, old, adv, cu_seqlens=cu, ignore_index=IGNORE, impl=impl,
                                    temperature=0.6, entropy_coef=0.01)
            loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_from_logp_masks_garbage_and_no_cu_seqlens():
    """Invalid tokens may hold NaN in old_logp/advantages (e.g. prompt positions): no NaN in the loss or grad.
    cu_seqlens=None is one sequence."""
    torch.manual_seed(0)
    logp = (-torch.rand(10, dtype=torch.float64) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(10, dtype=torch.float64)
    adv = torch.randn(10, dtype=torch.float64)
    mask = torch.ones(10, dtype=torch.bool)
    mask[[0, 1, 7]] = False
    old[~mask], adv[~mask] = float("nan"), float("nan")
    for agg in LOSS_AGGS:
        for ratio_level in ("token", "sequence"):
            loss, stats = ppo_clip_loss_from_logp(logp, old, adv, mask, None, loss_agg=agg, ratio_level=ratio_level)
            one_seq, _ = ppo_clip_loss_from_logp(logp, old, adv, mask, torch.tensor([0, 10]), loss_agg=agg,
                                                 ratio_level=ratio_level, impl="torch")
            (grad,) = torch.autograd.grad(loss, logp)
            assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
            assert torch.allclose(loss, one_seq, atol=1e-12)
            assert all(torch.isfinite(v) for v in stats.values())
    # nothing valid: loss 0, means 0, ratio extremes 1 (no update happened), still no NaN
    loss, stats = ppo_clip_loss_from_logp(logp, old, adv, torch.zeros(10, dtype=torch.bool), torch.tensor([0, 4, 10]),
                                          loss_agg="seq-mean-token-mean")
    assert loss.item() == 0.0 and stats["ratio_max"].item() == 1.0 and stats["num_tokens"].item() == 0.0


def test_tensor_hyperparameters():
    """0-dim tensor hyperparameters (for torch.compile(dynamic=False) with a schedule) equal Python floats."""
    torch.manual_seed(0)
    logp = (-torch.rand(12) * 3).requires_grad_(True)
    old, adv, cu = logp.detach() + 0.4 * torch.randn(12), torch.randn(12), torch.tensor([0, 5, 12])
    entropy = torch.rand(12, requires_grad=True)
    hp = dict(clip_low=0.15, clip_high=0.25, dual_clip=2.5, entropy_coef=0.02)
    as_float, _ = ppo_clip_loss_from_logp(logp, old, adv, None, cu, entropy=entropy, **hp)
    as_tensor, _ = ppo_clip_loss_from_logp(logp, old, adv, None, cu, entropy=entropy,
                                           **{k: torch.tensor(v) for k, v in hp.items()})
    grads = [torch.autograd.grad(x, (logp, entropy)) for x in (as_float, as_tensor)]
    torch.testing.assert_close(as_float, as_tensor)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss_agg,ratio_level", [("token-mean", "token"), ("seq-mean-token-mean", "sequence"),
                                                   ("seq-mean-token-sum", "token")])
def test_compile_fullgraph_torch_impl_no_recompile(loss_agg, ratio_level):
    """The torch impl traces whole (token_logprobs and segment_sum are custom ops or plain torch), and new shapes
    or new hyperparameter values (a clip schedule) reuse the graph. aot_eager: the tracing is what is under test;
    inductor's CPU codegen would only add minutes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(hidden, weight, targets, old, adv, cu, clip_low, clip_high, dual_clip, entropy_coef):
        return ppo_clip_loss(hidden, weight, targets, old, adv, cu_seqlens=cu, clip_low=clip_low,
                             clip_high=clip_high, dual_clip=dual_clip, entropy_coef=entropy_coef,
                             ratio_level=ratio_level, loss_agg=loss_agg, impl="torch")

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for i, (n, cu) in enumerate([(24, CU), (17, [0, 9, 9, 17]), (30, [0, 4, 11, 25, 30])]):
        g = torch.Generator().manual_seed(i)
        hidden = torch.randn(n, H, generator=g).requires_grad_(True)
        weight = torch.randn(V, H, generator=g).requires_grad_(True)
        targets = torch.randint(0, V, (n,), generator=g)
        targets[0] = IGNORE
        old = -torch.rand(n, generator=g) * 4
        adv = torch.randn(len(cu) - 1, generator=g)
        args = (targets, old, adv, torch.tensor(cu), 0.2 - 0.05 * i, 0.2 + 0.05 * i, 3.0 + i, 0.01 * (i + 1))
        loss, stats = compiled(hidden, weight, *args)
        loss.backward()
        h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
        eager_loss, eager_stats = step(h2, w2, *args)
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(hidden.grad, h2.grad)
        torch.testing.assert_close(weight.grad, w2.grad)
        for key in stats:
            torch.testing.assert_close(stats[key], eager_stats[key])
        # the first compile may count twice (dynamo restarts its analysis once to turn float args into inputs)
        first_frames = counter.frame_count if i == 0 else first_frames
    assert counter.frame_count == first_frames, f"recompiled: {counter.frame_count - first_frames} times"


def test_bad_inputs():
    hidden, weight, targets = _inputs(torch.float32)
    old, adv, cu = torch.zeros(N), torch.zeros(N), torch.tensor(CU)
    call = lambda **kw: ppo_clip_loss(**{**dict(hidden=hidden, weight=weight, targets=targets, old_logp=old,  # noqa
                                                advantages=adv, cu_seqlens=cu, impl="torch"), **kw})
    cases = [
        (dict(hidden=hidden[0]), "hidden must be a 2-D"),
        (dict(weight=weight[:, :-1]), r"weight must be \[V, H\]"),
        (dict(targets=targets[:-1]), r"targets must have shape \[24\]"),
        (dict(old_logp=old[:-1]), r"old_logp must have shape \[24\]"),
        (dict(old_logp=old.long()), "old_logp must be floating point"),
        (dict(advantages=torch.zeros(7)), r"\[N\] = \[24\] \(per token\) or \[B\] = \[6\]"),
        (dict(advantages=torch.zeros(6), cu_seqlens=None), "need cu_seqlens"),
        (dict(loss_agg="mean"), "loss_agg must be one of"),
        (dict(ratio_level="seq"), "ratio_level must be one of"),
        (dict(clip_low=-0.1), "clip_low must be in"),
        (dict(clip_high=-0.1), "clip_high must be >= 0"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(cu_seqlens=cu.float()), "int32 or int64"),
        (dict(impl="cuda"), "impl must be one of"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 24]), check_values=True), "non-decreasing"),
        (dict(advantages=adv.to("meta")), "one device"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**kwargs)
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):  # the default, queued device-side check
        call(cu_seqlens=torch.tensor([0, 5, 3, 24]))


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_readable_reference_matches_the_op(loss_agg, ratio_level):
    """kernels/reference.py's loop-based PPO loss is what the docs point readers to: keep it equal to the op."""
    from sppo_fast.kernels.reference import ppo_clip_loss_from_logp_ref

    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 5, 5, 12, 20])  # an empty sequence included
    n = int(cu[-1])
    old = torch.randn(n, generator=g, dtype=torch.float64)
    logp = (old + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.2
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, ratio_level=ratio_level, loss_agg=loss_agg)
    ours, _ = ppo_clip_loss_from_logp(logp, old, adv, mask, cu, impl="torch", **kw)
    ref = ppo_clip_loss_from_logp_ref(logp, old, adv, mask, cu, **kw)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-10, atol=1e-12)
    g_ours, = torch.autograd.grad(ours, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", pytest.param("chunked", marks=_needs_triton),
                                  pytest.param("triton", marks=_needs_triton)])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_matches_liger_grpo_loss(impl, ratio_level):
    """Liger-Kernel's fused-linear GRPO loss as a peer (its own torch code on CPU, not compiled): loss_type "dapo"
    is our token-mean over all valid tokens; beta=0 (no KL) and no dual clip, which Liger does not have."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, t = 3, 8
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(b * t, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))
    targets = torch.randint(0, V, (b * t,), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    targets[mask.flatten() == 0] = IGNORE
    advantages = torch.tensor([0.7, -1.1, 0.4])
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, targets, temperature=0.7, ignore_index=IGNORE, impl="torch")
    old = (logp + 0.3 * torch.randn(b * t, generator=g)).detach()
    cu = torch.arange(0, b * t + 1, t)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours, _ = ppo_clip_loss(h1, w1, targets, old, advantages, cu_seqlens=cu, ignore_index=IGNORE, dual_clip=None,
                            ratio_level=ratio_level, temperature=0.7, impl=impl)
    ours.backward()
    liger = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="dapo",
                                     importance_sampling_level=ratio_level, temperature=0.7, chunk_size=1)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = liger(h2.view(b, t, H), w2, targets.clamp(min=0).view(b, t), mask, advantages,
                old_per_token_logps=old.view(b, t))
    theirs = out[0] if isinstance(out, tuple) else out
    theirs.backward()
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-4)


@_needs_triton
def test_compile_fullgraph_chunked_on_policy():
    """The chunked impl's fused op (Triton row pass inside a custom op) and the on-policy mode trace without graph
    breaks, and a new N reuses the graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(hidden, weight, targets, adv, cu):
        return ppo_clip_loss(hidden, weight, targets, None, adv, cu_seqlens=cu, on_policy=True, entropy_coef=0.01,
                             impl="chunked")

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for i, cu in enumerate([CU, [0, 9, 9, 17]]):
        g = torch.Generator().manual_seed(i)
        n = cu[-1]
        hidden = torch.randn(n, H, generator=g).requires_grad_(True)
        weight = torch.randn(V, H, generator=g).requires_grad_(True)
        targets = torch.randint(0, V, (n,), generator=g)
        targets[0] = IGNORE
        adv = torch.randn(len(cu) - 1, generator=g)
        loss, stats = compiled(hidden, weight, targets, adv, torch.tensor(cu))
        loss.backward()
        h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
        eager_loss, _ = step(h2, w2, targets, adv, torch.tensor(cu))
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(hidden.grad, h2.grad)
        torch.testing.assert_close(weight.grad, w2.grad)
        assert stats["ratio_max"].item() == 1.0
        first_frames = counter.frame_count if i == 0 else first_frames
    assert counter.frame_count == first_frames


def test_second_backward_through_fused_loss_raises():
    """The fused route scales its stored fp32 grads in place (no second V x H buffer): a retained graph cannot be
    backpropagated twice, and autograd says so instead of scaling twice."""
    hidden, weight, targets = _inputs(torch.float32)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = ppo_clip_loss(h, w, targets, None, _advantages(True), cu_seqlens=torch.tensor(CU),
                            ignore_index=IGNORE, on_policy=True, impl="torch")
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
def test_fused_cuda_16bit_branch_emulated(monkeypatch, loss_agg):
    """The fused PPO loop's CUDA 16-bit branch (16-bit GEMM operands, fp32 outputs, a separate 16-bit dZ written by
    the Triton row pass, fp32 dX) run on CPU with the GEMMs emulated in fp32 on the 16-bit values. fp16: the
    interpreter's bf16 cast truncates (see tests/test_logprobs.py)."""
    emulate_cuda_16bit_gemms(monkeypatch)
    results, stats, truth_stats = _run_both("chunked", torch.float16, True, loss_agg=loss_agg)
    for name, (ours, truth, baseline) in results.items():
        _assert_within(name, ours, truth, baseline, torch.float16)
    assert stats["clipfrac"] > 0 and stats["dual_clipfrac"] > 0


@pytest.mark.parametrize("emulate_cuda", [False, True], ids=["cpu-branch", "cuda-branch-emulated"])
def test_fused_fp32_master_weight_with_16bit_hidden(monkeypatch, emulate_cuda):
    """The trainer's autocast case: an fp32 master weight, 16-bit hidden states. The loss and dX equal those with the
    16-bit-rounded weight; dW is the fp32 accumulator itself (returned as the fp32 gradient, no 16-bit detour)."""
    if emulate_cuda:
        if torch.cuda.is_available() or not TRITON_OK:
            pytest.skip("emulates the CUDA branch on CPU")
        emulate_cuda_16bit_gemms(monkeypatch)
    impl, dtype = ("chunked", torch.float16) if emulate_cuda else ("torch", torch.bfloat16)
    hidden, weight, targets = _inputs(dtype)
    master = weight.float() + 1e-3 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    old = _old_logp(hidden, weight, targets, "token")
    adv, cu = _advantages(True), torch.tensor(CU, device=DEVICE)
    outs = []
    for w in (master, master.to(dtype)):
        h, w = hidden.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = ppo_clip_loss(h, w, targets, old, adv, cu_seqlens=cu, ignore_index=IGNORE, impl=impl,
                                chunk_bytes=_small_chunks(impl), entropy_coef=0.01)
        loss.backward()
        outs.append((loss, h.grad, w.grad))
    (loss_m, dh_m, dw_m), (loss_r, dh_r, dw_r) = outs
    assert dw_m.dtype == torch.float32 and dw_r.dtype == dtype
    torch.testing.assert_close(loss_m, loss_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dh_m, dh_r, atol=0, rtol=0)
    torch.testing.assert_close(dw_m.to(dtype), dw_r, atol=0, rtol=0)  # the same fp32 sums, rounded once


@pytest.mark.parametrize("impl,dtype", IMPL_DTYPES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_ignored_rows_holding_nan_contribute_nothing(impl, dtype, ratio_level):
    """Ignored rows (prompt tokens, padding) may hold anything in hidden, old_logp and per-token advantages (NaN,
    inf): the loss, stats and grads are bit for bit those of the same batch with those entries zeroed, all finite."""
    hidden, weight, targets = _inputs(dtype)
    ignored = targets == IGNORE
    old = _old_logp(hidden, weight, targets, ratio_level)
    adv, cu = _advantages(False), torch.tensor(CU, device=DEVICE)
    clean = (torch.where(ignored[:, None], 0, hidden), torch.where(ignored, 0.0, old), torch.where(ignored, 0.0, adv))
    bad_hidden, bad_old, bad_adv = (t.clone() for t in clean)
    bad_hidden[ignored] = float("nan")
    bad_hidden[1, 0] = float("inf")
    bad_old[ignored], bad_adv[ignored] = float("nan"), float("inf")
    outs = []
    for h, o, a in (clean, (bad_hidden, bad_old, bad_adv)):
        h, w = h.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss, stats = ppo_clip_loss(h, w, targets, o, a, cu_seqlens=cu, ignore_index=IGNORE, impl=impl,
                                    ratio_level=ratio_level, chunk_bytes=_small_chunks(impl), entropy_coef=0.01)
        loss.backward()
        outs.append([loss, h.grad, w.grad] + [stats[k] for k in sorted(stats)])
    names = ["loss", "d_hidden", "d_weight"] + sorted(stats)
    for name, a, b in zip(names, *outs):
        assert torch.isfinite(b).all(), f"{name}: non-finite with garbage in ignored rows"
        assert torch.equal(a, b), f"{name}: {a} vs {b}"
    assert (outs[1][1][ignored] == 0).all()
