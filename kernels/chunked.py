"""Row-chunked linear + log-softmax: vendor GEMMs for every [C, V] product, one row pass over each chunk.

    for each chunk of C rows:     Z  = X_c W^T                  (GEMM 1: cuBLAS / MKL, fp32 accumulate + output)
                                  row pass over Z (in place):   lse, target logit, entropy, [PPO clip and
                                                                dL/dlogp], dZ = dL/dZ
                                  dX_c = dZ W                   (GEMM 2)
                                  dW  += dZ^T X_c               (GEMM 3, fp32 accumulator)

The same chunk loop runs on every device; only the row pass differs: a Triton kernel (one program per row, two
sweeps over V: online max/sum/entropy/target, then dZ) on CUDA and under TRITON_INTERPRET=1, and torch ops
elsewhere. fp32 math whatever autocast is active (the loops run with autocast disabled). Ignored rows
(target == ignore_index) have their hidden row replaced by zeros before the GEMMs, so whatever they hold (logits
of 100+, inf, NaN) they contribute exactly zero to logp, dX and dW.

Three entry points, used by logprobs.py and ppo_loss.py:
- `logprobs_fwd`: GEMM 1 + a stats sweep; keeps lse and E[z] per row (2 x N fp32) for a recompute backward.
- `logprobs_bwd`: the recompute backward given dL/dlogp (and dL/dentropy): GEMMs 1-3 again (4 with the forward).
- `ppo_fwd_with_grads`: the token-ratio PPO loss with its gradient in the forward: GEMMs 1-3, nothing afterwards.

Memory held (bytes; N rows, H hidden, V vocab, C chunk rows):
- the chunk: C * V * 4 for fp32 Z, plus C * V * 2 for a separate 16-bit dZ on CUDA when gradients are formed,
  plus C * V * 4 for the torch row pass's exp buffer (and C * V * 4 more with softcap). C = chunk_bytes // (those
  bytes per row).
- dW: a V x H fp32 accumulator when dW is wanted. For fp32 weights (including an fp32 master weight passed with
  16-bit hidden states) it is returned as the gradient itself; 16-bit weights get it cast once at the end.
- dX: N x H (fp32 in the fused PPO path, where it waits for the backward's scale; input dtype otherwise).
- no fp32 copy of a 16-bit weight: on CUDA the GEMMs take 16-bit operands with fp32 output
  (`torch.mm(..., out_dtype=torch.float32)`); on CPU 16-bit weights are converted in V-blocks of
  `_CPU_CONVERT_BYTES`. An fp32 master weight with 16-bit hidden states costs one 16-bit copy on CUDA (V x H x 2,
  what `weight.to(bf16)` under autocast makes anyway), for the duration of the op.
"""
import contextlib

import torch
import triton
import triton.language as tl

from ._utils import tanh as _tanh

# Default chunk budgets. CUDA: big enough that each GEMM keeps cuBLAS near peak (C ~ 640 rows of bf16 at V = 128k;
# not yet measured) and small next to the V x H fp32 dW accumulator. CPU: small chunks lose to the dW GEMM, which
# reads and writes the whole V x H accumulator once per chunk: on the shared 2-core machine, PPO fwd+bwd at N=2048,
# H=512, V=32000 took 26 / 13 / 8.6 / 8.2 s at 8 / 32 / 64 / 256 MiB (one loaded run, naive 7.8 s beside it).
DEFAULT_CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 128 << 20}
_CPU_CONVERT_BYTES = 16 << 20  # fp32 V-block of a 16-bit weight converted at a time on CPU
_ROW_BLOCK_V_GPU = 2048
_ROW_BLOCK_V_CPU = 128  # the interpreter runs tile ops in numpy: small blocks, and still several per row in tests
# 16 warps x 32 lanes stream a 2048-wide block as 4 elements per thread. At 8 warps, ptxas (triton 3.9, sm_90) spills
# 4 bytes in the forward-only row pass with softcap + entropy (the per-lane max/sum/entropy/target accumulators);
# 16 warps need <= 40 registers and spill nothing on triton 3.6 and 3.9 (tests/test_gpu_readiness.py). The pass is
# memory-bound, so fewer elements per thread costs no arithmetic; not yet timed on a GPU.
_ROW_NUM_WARPS_GPU = 16
_ROW_NUM_WARPS_CPU = 1  # the interpreter ignores warps


def default_chunk_bytes(device: torch.device) -> int:
    return DEFAULT_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]


def chunk_rows(n: int, v: int, dz_dtype: torch.dtype | None, chunk_bytes: int, triton_rows: bool,
               softcap: bool) -> int:
    """Rows per chunk from the byte budget: what one row of the chunk costs in scratch memory. dz_dtype: the dtype
    the GEMMs take dZ in, or None when no gradient is computed (forward only)."""
    per_row = 4 * v  # fp32 Z (the fp32 dZ, when there is one, overwrites it or the exp buffer in place)
    if dz_dtype is not None and dz_dtype != torch.float32:
        per_row += 2 * v  # a separate 16-bit dZ (see _Loop)
    if not triton_rows:
        per_row += 4 * v * (2 if softcap else 1)  # torch row pass: exp buffer (+ tanh buffer)
    rows = max(1, chunk_bytes // per_row)
    if rows >= 128:
        rows -= rows % 64  # GEMM-friendly row counts
    return max(1, min(rows, n))


# ------------------------------------------------------------------------------------------------------------------
# GEMMs
_PROBES = {}


def _cuda_supports(device, what) -> bool:
    """Whether this torch build does, on this GPU, what the 16-bit chunk GEMMs need:
    "mm": torch.mm(bf16, bf16, out_dtype=fp32) (fp32 logits without an fp32 weight copy);
    "addmm": torch.addmm(fp32 acc, bf16, bf16, out_dtype=fp32, out=acc) (dW accumulated in place).
    Probed once per device and kind on a tiny problem (one sync per process, never in the hot loop); without
    them the loop falls back to converting V-blocks of the weight (still no full fp32 copy)."""
    key = (str(device), what)
    if key not in _PROBES:
        ok = False
        try:
            a = torch.randn(8, 16, device=device).bfloat16()
            b = torch.randn(16, 8, device=device).bfloat16()
            want = a.float() @ b.float()
            if what == "mm":
                got = torch.mm(a, b, out_dtype=torch.float32)
            else:
                got = torch.ones(8, 8, device=device)
                torch.addmm(got, a, b, out_dtype=torch.float32, out=got)
                want = want + 1
            ok = got.dtype == torch.float32 and bool(torch.allclose(got, want, atol=1e-3, rtol=1e-3))
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _PROBES[key] = ok
    return _PROBES[key]


def _native_16bit(device, what) -> bool:
    return device.type == "cuda" and _cuda_supports(device, what)


def _mm_f32(a, b, out):
    """out (fp32) = a @ b for 16-bit a, b: fp32 accumulation and output in one vendor GEMM."""
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_f32_(acc, a, b):
    """acc (fp32) += a @ b for 16-bit a, b, in place."""
    return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


class _Gemms:
    """The three chunk GEMMs for one weight: fp32 outputs from the weight's dtype without a full fp32 copy."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        """compute_dtype: the hidden states' dtype. An fp32 (master) weight with 16-bit hidden states is rounded to
        16 bits for the products, as autocast would, while dW is accumulated in fp32 for the fp32 weight itself."""
        self.compute = compute_dtype
        half = compute_dtype != torch.float32
        # cuda16: 16-bit operands straight into the vendor GEMM with fp32 output (tensor cores, no conversion).
        # cpu16 (also CUDA builds without out_dtype): fp32 GEMMs on V-blocks of the weight converted on the fly.
        self.cuda16 = half and _native_16bit(weight.device, "mm")
        self.cpu16 = half and not self.cuda16
        # the one 16-bit copy of an fp32 master weight that tensor cores need (what `weight.to(bf16)` would make)
        self.w = weight.to(compute_dtype) if self.cuda16 else weight
        self.dz_dtype = compute_dtype if self.cuda16 else torch.float32
        if self.cpu16:
            self.block_v = max(1, _CPU_CONVERT_BYTES // (4 * weight.shape[1]))
        self.addmm_f32 = self.cuda16 and _native_16bit(weight.device, "addmm")

    def x_operand(self, x):
        """The hidden chunk as the GEMMs take it (fp32 on CPU for 16-bit inputs, else as is)."""
        return x.float() if self.cpu16 else x

    def _w_blocks(self):
        v = self.w.shape[0]
        for start in range(0, v, self.block_v):
            cols = slice(start, min(start + self.block_v, v))
            yield cols, self.w[cols].to(self.compute).float()  # (rounds an fp32 master weight like autocast)

    def logits(self, x, out):
        """out [c, V] fp32 = x W^T."""
        if self.cpu16:
            for cols, w32 in self._w_blocks():
                out[:, cols] = x @ w32.T
        elif self.cuda16:
            _mm_f32(x, self.w.T, out)
        else:
            torch.mm(x, self.w.T, out=out)

    def dx(self, dz, out):
        """out [c, H] (fp32 or the input dtype) = dz W, fp32 accumulation."""
        if self.cpu16:
            acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            for cols, w32 in self._w_blocks():
                acc.addmm_(dz[:, cols], w32)
            out.copy_(acc)
        elif self.cuda16 and out.dtype == torch.float32:
            _mm_f32(dz, self.w, out)
        else:
            torch.mm(dz, self.w, out=out)

    def dw(self, acc, dz, x):
        """acc [V, H] fp32 += dz^T x."""
        if self.cpu16:
            for start in range(0, acc.shape[0], self.block_v):
                cols = slice(start, min(start + self.block_v, acc.shape[0]))
                acc[cols].addmm_(dz[:, cols].T, x)
        elif self.cuda16:
            if self.addmm_f32:
                _addmm_f32_(acc, dz.T, x)
            else:
                # this torch cannot accumulate 16-bit products into fp32 in place: V-blocks bound the temporary
                block = max(1, (64 << 20) // (4 * acc.shape[1]))
                for start in range(0, acc.shape[0], block):
                    cols = slice(start, min(start + block, acc.shape[0]))
                    acc[cols].add_(_mm_f32(dz[:, cols].T, x, None))
        else:
            acc.addmm_(dz.T, x)


# ------------------------------------------------------------------------------------------------------------------
# Triton row pass
@triton.jit(do_not_specialize=["row_start", "V", "ignore_index"])
def _row_pass_kernel(
    Z, DZ, TARGETS, OLD, ADV, WEIGHT_TOK, G_ENT, HP, G_LOGP, LSE, MEAN_Z, LOGP, ENTROPY,
    row_start, V, inv_temperature, softcap, ignore_index,
    MODE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, ENT_GRAD: tl.constexpr,
    ON_POLICY: tl.constexpr, HAS_DUAL: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row of the chunk. Z holds the raw fp32 logits X_c W^T of the chunk ([C, V] row-major).

    MODE 0 (stats): sweep 1 only; writes logp, entropy, lse, E[z] of the row.
    MODE 1 (grad):  reads lse, E[z] and dL/dlogp (G_LOGP), dL/dentropy (G_ENT); sweep 2 writes dZ.
    MODE 2 (ppo):   sweep 1, then the token-ratio PPO clip / dual clip on (logp, old, A) gives dL/dlogp
                    = w * d pg / d logp (w: the token's weight in the aggregate), then sweep 2 writes dZ.
    dZ goes to DZ (Z itself for fp32, in place: each program reads a block before it writes it). Rows with
    target == ignore_index read nothing and write zeros.
    """
    r = tl.program_id(0).to(tl.int64)
    i = row_start + r  # row in the [N] vectors
    tgt = tl.load(TARGETS + i).to(tl.int64)
    valid = tgt != ignore_index
    z_row = Z + r * V
    v_stop = tl.where(valid, V, 0)

    if MODE == 1:
        lse = tl.load(LSE + i)
        mean_z = tl.load(MEAN_Z + i)
        g = tl.where(valid, tl.load(G_LOGP + i), 0.0)
    else:
        m = tl.full([BLOCK_V], -1.0e30, dtype=tl.float32)  # per-lane running max / sums: one reduction at the end
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        a = tl.zeros([BLOCK_V], dtype=tl.float32)
        zt = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, v_stop, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z = tl.load(z_row + cols, mask=col_mask, other=0.0)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = z * inv_temperature
            m_new = tl.where(col_mask, tl.maximum(m, z), m)
            alpha = tl.exp(m - m_new)
            shifted = tl.where(col_mask, z - m_new, 0.0)
            e = tl.where(col_mask, tl.exp(shifted), 0.0)
            if HAS_ENTROPY:
                # a = sum e * (z - m), kept relative to the lane's max: rescaled when the max moves
                a = alpha * (a + (m - m_new) * s) + e * shifted
            s = s * alpha + e
            m = m_new
            zt += tl.where(cols == tgt, z, 0.0)
        # merge the lanes
        m_row = tl.max(m, axis=0)
        scale = tl.exp(m - m_row)
        s_row = tl.sum(s * scale, axis=0)
        s_row = tl.where(valid, s_row, 1.0)  # ignored rows did no work: keep their math finite
        log_s = tl.log(s_row)
        lse = tl.where(valid, m_row + log_s, 0.0)
        logp = tl.where(valid, tl.sum(zt, axis=0) - lse, 0.0)
        mean_shifted = 0.0
        if HAS_ENTROPY:
            a_row = tl.sum(scale * (a + (m - m_row) * s), axis=0)
            mean_shifted = a_row / s_row
        mean_z = tl.where(valid, m_row + mean_shifted, 0.0)
        tl.store(LOGP + i, logp)
        if HAS_ENTROPY:
            tl.store(ENTROPY + i, tl.where(valid, log_s - mean_shifted, 0.0))
        if MODE == 0:
            tl.store(LSE + i, lse)
            if HAS_ENTROPY:
                tl.store(MEAN_Z + i, mean_z)
        g = 0.0
        if MODE == 2:
            adv = tl.load(ADV + i)
            w = tl.load(WEIGHT_TOK + i)
            if ON_POLICY:
                ratio = 1.0  # the old policy is this one: r == 1 exactly, whatever the rounding of logp
            else:
                ratio = tl.exp(logp - tl.load(OLD + i))
            lo = tl.load(HP)
            hi = tl.load(HP + 1)
            pg_unclipped = -adv * ratio
            pg_clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
            clip_active = pg_clipped > pg_unclipped
            pg = tl.where(clip_active, pg_clipped, pg_unclipped)
            dpg = tl.where(clip_active, 0.0, -adv * ratio)
            if HAS_DUAL:
                dual = tl.load(HP + 2)
                dpg = tl.where((adv < 0) & (-adv * dual < pg), 0.0, dpg)
            g = tl.where(valid, w * dpg, 0.0)

    if WRITE_GRAD:
        g_ent = 0.0
        if ENT_GRAD:
            g_ent = tl.where(valid, tl.load(G_ENT + i), 0.0)
        active = valid & ((g != 0.0) | (g_ent != 0.0))
        # scaled by 1/T once here instead of per element
        g_t = g * inv_temperature
        ge_t = g_ent * inv_temperature
        dz_row = DZ + r * V
        v_read = tl.where(active, V, 0)  # an inactive row reads nothing and writes zeros
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            l = tl.load(z_row + cols, mask=cols < v_read, other=0.0)
            if HAS_SOFTCAP:
                th = _tanh(l / softcap)
                z = softcap * th * inv_temperature
            else:
                z = l * inv_temperature
            p = tl.exp(z - lse)
            dz = g_t * (tl.where(cols == tgt, 1.0, 0.0) - p)
            if ENT_GRAD:
                dz -= ge_t * p * (z - mean_z)
            if HAS_SOFTCAP:
                dz = dz * (1.0 - th * th)
            dz = tl.where(active, dz, 0.0)
            tl.store(dz_row + cols, dz.to(DZ.dtype.element_ty), mask=col_mask)


def _launch_rows(z, dz, row_start, targets, ignore_index, inv_t, softcap, *, mode, has_entropy=False,
                 ent_grad=False, on_policy=False, has_dual=False, write_grad=False, old=None, adv=None, w=None,
                 g_ent=None, hp=None, g_logp=None, lse=None, mean_z=None, logp=None, entropy=None):
    c, v = z.shape
    dummy = targets  # any pointer for arguments a mode does not read (never dereferenced)
    block_v = _ROW_BLOCK_V_GPU if z.is_cuda else _ROW_BLOCK_V_CPU
    ctx = torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()
    with ctx:
        _row_pass_kernel[(c,)](
            z, dz, targets,
            dummy if old is None else old, dummy if adv is None else adv, dummy if w is None else w,
            dummy if g_ent is None else g_ent, dummy if hp is None else hp, dummy if g_logp is None else g_logp,
            dummy if lse is None else lse, dummy if mean_z is None else mean_z,
            dummy if logp is None else logp, dummy if entropy is None else entropy,
            row_start, v, inv_t, 1.0 if softcap is None else softcap, ignore_index,
            MODE=mode, HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=has_entropy, ENT_GRAD=ent_grad,
            ON_POLICY=on_policy, HAS_DUAL=has_dual, WRITE_GRAD=write_grad, BLOCK_V=block_v,
            num_warps=_ROW_NUM_WARPS_GPU if z.is_cuda else _ROW_NUM_WARPS_CPU,
        )


# ------------------------------------------------------------------------------------------------------------------
# torch row pass (same math; several vectorised sweeps over the chunk instead of two)
class _TorchRows:
    """Intermediates of one chunk: zs = z - rowmax (in the Z buffer), e = exp(zs), s = sum e, th = tanh (softcap)."""

    def __init__(self, z, e_buf, th_buf, inv_t, softcap):
        self.th = None
        if softcap is not None:
            self.th = torch.div(z, softcap, out=th_buf).tanh_()
            torch.mul(self.th, softcap * inv_t, out=z)
        elif inv_t != 1.0:
            z.mul_(inv_t)
        self.m = z.amax(dim=1)
        self.zs = z.sub_(self.m[:, None])
        self.e = torch.exp(self.zs, out=e_buf)
        self.s = self.e.sum(dim=1)
        self.log_s = self.s.log()

    def stats(self, tgt_safe, valid, need_entropy):
        zt = self.zs.gather(1, tgt_safe[:, None]).squeeze(1)
        logp = torch.where(valid, zt - self.log_s, 0.0)
        lse = self.m + self.log_s
        entropy = mean_z = None
        if need_entropy:
            # sum_j e_j * zs_j as a batched dot: no [C, V] temporary
            a = torch.bmm(self.e[:, None, :], self.zs[:, :, None]).view(-1)
            self.mean_shifted = a / self.s
            entropy = torch.where(valid, self.log_s - self.mean_shifted, 0.0)
            mean_z = self.m + self.mean_shifted
        return logp, entropy, lse, mean_z

    def grad(self, tgt_safe, g, g_ent, inv_t):
        """dZ (raw-logit gradient) into the e buffer, from per-row g = dL/dlogp and g_ent = dL/dentropy (masked):
        dz_j = g (1[j = t] - p_j) - g_ent p_j (z_j - E z), p = e / s; times 1/T, times 1 - tanh^2 with softcap."""
        g_t = g * inv_t
        coef = -g_t / self.s
        if g_ent is not None:
            ge_t = g_ent * inv_t
            coef = coef + ge_t * self.mean_shifted / self.s
            self.zs.mul_(self.e).mul_((-ge_t / self.s)[:, None])  # zs <- -g_ent/s * e * zs
            dz = self.e.mul_(coef[:, None]).add_(self.zs)
        else:
            dz = self.e.mul_(coef[:, None])
        dz.scatter_add_(1, tgt_safe[:, None], g_t[:, None])
        if self.th is not None:
            dz.mul_(self.th.mul_(self.th).neg_().add_(1.0))
        return dz


def _torch_grad_recompute(z, e_buf, th_buf, tgt_safe, g, g_ent, lse, mean_z, inv_t, softcap):
    """The recompute backward's row pass: p from the forward's lse, no max/sum sweeps."""
    th = None
    if softcap is not None:
        th = torch.div(z, softcap, out=th_buf).tanh_()
        torch.mul(th, softcap * inv_t, out=z)
    elif inv_t != 1.0:
        z.mul_(inv_t)
    zl = z.sub_(lse[:, None])  # z - lse; lse is finite for every row (ignored rows have zero hidden rows)
    g_t = g * inv_t
    if g_ent is not None:
        p = torch.exp(zl, out=e_buf)
        ge_t = g_ent * inv_t
        # dz = p * (-g - g_ent (lse - E z)) - g_ent p (z - lse) + g 1[t]
        coef = -g_t - ge_t * (lse - mean_z)
        zl.mul_(p).mul_(-ge_t[:, None])
        dz = p.mul_(coef[:, None]).add_(zl)
    else:
        dz = zl.exp_().mul_(-g_t[:, None])
    dz.scatter_add_(1, tgt_safe[:, None], g_t[:, None])
    if th is not None:
        dz.mul_(th.mul_(th).neg_().add_(1.0))
    return dz


def torch_token_pg_grad(logp, old, adv, w, hp, on_policy, has_dual):
    """dL/dlogp of sum_i w_i pg_i per token (token ratio): the torch row pass's copy of the Triton kernel's math."""
    ratio = torch.ones_like(logp) if on_policy else torch.exp(logp - old)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.minimum(torch.maximum(ratio, hp[0]), hp[1])
    clip_active = pg_clipped > pg_unclipped
    pg = torch.where(clip_active, pg_clipped, pg_unclipped)
    dpg = torch.where(clip_active, 0.0, -adv * ratio)
    if has_dual:
        dpg = torch.where((adv < 0) & (-adv * hp[2] < pg), 0.0, dpg)
    return w * dpg


# ------------------------------------------------------------------------------------------------------------------
# chunk loops
class _Loop:
    """Buffers and the per-chunk GEMM 1 shared by the three entry points. write_grad: whether dZ is formed (and
    GEMMs 2-3 run); the forward-only pass allocates no dZ buffer."""

    def __init__(self, hidden, weight, targets, ignore_index, softcap, chunk_bytes, triton_rows, write_grad):
        self.hidden, self.weight, self.targets, self.ignore_index = hidden, weight, targets, ignore_index
        self.n, self.v = hidden.shape[0], weight.shape[0]
        self.triton_rows = triton_rows
        self.gemm = _Gemms(weight, hidden.dtype)
        dz_dtype = self.gemm.dz_dtype if write_grad else None
        self.rows = chunk_rows(self.n, self.v, dz_dtype, chunk_bytes, triton_rows, softcap is not None)
        f32 = dict(device=hidden.device, dtype=torch.float32)
        c = min(self.rows, max(self.n, 1))
        self.z = torch.empty((c, self.v), **f32)
        # The GEMMs' dZ operand must have the weight's GEMM dtype: with 16-bit operands (CUDA tensor cores, which
        # take no mixed fp32 x 16-bit product) dZ is 16-bit, in its own buffer. The Triton row pass writes it there
        # directly (writing 16-bit dZ over the fp32 Z in place would race between rows: a 16-bit row i lands on
        # fp32 row i / 2); the torch row pass forms dZ in fp32 in its exp buffer and rounds it into this one, as the
        # Triton store does. With fp32 operands dZ overwrites Z (Triton) or the exp buffer (torch) in place.
        self.dz = None if dz_dtype in (None, torch.float32) else \
            torch.empty((c, self.v), device=hidden.device, dtype=dz_dtype)
        self.e = None if triton_rows else torch.empty((c, self.v), **f32)
        self.th = None if triton_rows or softcap is None else torch.empty((c, self.v), **f32)

    def chunks(self):
        """Yields (rows, targets, valid, x operand, z): z = X_c W^T in fp32, ignored rows' X_c zeroed."""
        for start in range(0, self.n, self.rows):
            rows = slice(start, min(start + self.rows, self.n))
            c = rows.stop - rows.start
            tgt = self.targets[rows]
            valid = tgt != self.ignore_index
            # whatever an ignored row holds (padding garbage, NaN), it becomes exact zeros in every product
            x = self.gemm.x_operand(torch.where(valid[:, None], self.hidden[rows], 0))
            z = self.z[:c]
            self.gemm.logits(x, z)
            yield rows, tgt, valid, x, z

    def bufs(self, z):
        """(exp buffer, tanh buffer, where the Triton row pass writes dZ: z itself unless dZ is 16-bit) for chunk z."""
        c = z.shape[0]
        return (None if self.e is None else self.e[:c]), (None if self.th is None else self.th[:c]), \
            (z if self.dz is None else self.dz[:c])

    def backprop(self, dz, x, dx_rows, dw):
        """GEMMs 2 and 3 of a chunk: dX_c = dZ W into dx_rows, dW += dZ^T X_c (each skipped when given None)."""
        if dz.dtype != self.gemm.dz_dtype:  # the torch row pass's fp32 dZ, for 16-bit GEMM operands
            dz = self.dz[:dz.shape[0]].copy_(dz)
        if dx_rows is not None:
            self.gemm.dx(dz, dx_rows)
        if dw is not None:
            self.gemm.dw(dw, dz, x)


def _no_autocast(device):
    # autocast would run the chunk GEMMs in 16-bit: the ops promise fp32 math, so it is off inside them
    return torch.autocast(device.type, enabled=False)


def logprobs_fwd(hidden, weight, targets, temperature, softcap, ignore_index, return_entropy, chunk_bytes,
                 triton_rows, want_stats=True):
    """(logp, entropy or [0], lse, mean_z or [0]), fp32 [N]; one GEMM per chunk."""
    n = hidden.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    entropy = torch.empty(n if return_entropy else 0, **f32)
    mean_z = torch.empty(n if return_entropy else 0, **f32)
    inv_t = 1.0 / temperature
    with _no_autocast(hidden.device):
        loop = _Loop(hidden, weight, targets, ignore_index, softcap, chunk_bytes, triton_rows, write_grad=False)
        for rows, tgt, valid, _, z in loop.chunks():
            if triton_rows:
                _launch_rows(z, z, rows.start, targets, ignore_index, inv_t, softcap, mode=0,
                             has_entropy=return_entropy, lse=lse, mean_z=mean_z if return_entropy else lse,
                             logp=logp, entropy=entropy if return_entropy else logp)
            else:
                e, th, _ = loop.bufs(z)
                pass_ = _TorchRows(z, e, th, inv_t, softcap)
                lp, ent, ls, mz = pass_.stats(torch.where(valid, tgt, 0).long(), valid, return_entropy)
                logp[rows], lse[rows] = lp, ls
                if return_entropy:
                    entropy[rows], mean_z[rows] = ent, mz
    return logp, entropy, lse, mean_z


def logprobs_bwd(grad_logp, grad_entropy, hidden, weight, targets, lse, mean_z, temperature, softcap,
                 ignore_index, compute_dx, compute_dw, chunk_bytes, triton_rows):
    """(dX in hidden's dtype or [0], dW in weight's dtype or [0]): GEMMs 1-3 per chunk."""
    n, h = hidden.shape
    dx = torch.empty((n, h), device=hidden.device, dtype=hidden.dtype) if compute_dx else hidden.new_empty(0)
    dw32 = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if compute_dw else None
    if not (compute_dx or compute_dw):
        return dx, weight.new_empty(0)
    inv_t = 1.0 / temperature
    with _no_autocast(hidden.device):
        loop = _Loop(hidden, weight, targets, ignore_index, softcap, chunk_bytes, triton_rows, write_grad=True)
        for rows, tgt, valid, x, z in loop.chunks():
            e, th, dz = loop.bufs(z)
            if triton_rows:
                _launch_rows(z, dz, rows.start, targets, ignore_index, inv_t, softcap, mode=1,
                             ent_grad=grad_entropy is not None, write_grad=True, g_logp=grad_logp,
                             g_ent=grad_entropy, lse=lse, mean_z=mean_z if grad_entropy is not None else lse)
            else:
                g = torch.where(valid, grad_logp[rows], 0.0)
                g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy[rows], 0.0)
                dz = _torch_grad_recompute(z, e, th, torch.where(valid, tgt, 0).long(), g, g_ent, lse[rows],
                                           None if g_ent is None else mean_z[rows], inv_t, softcap)
            loop.backprop(dz, x, dx[rows] if compute_dx else None, dw32)
    if not compute_dw:
        return dx, weight.new_empty(0)
    return dx, (dw32 if weight.dtype == torch.float32 else dw32.to(weight.dtype))


def ppo_fwd_with_grads(hidden, weight, targets, old_logp, adv, w_tok, g_ent, hp, temperature, softcap,
                       ignore_index, on_policy, has_dual, compute_dx, compute_dw, chunk_bytes, triton_rows):
    """Token-ratio PPO: (logp [N], entropy [N], dX [N, H] fp32 or [0], dW [V, H] fp32 or [0]) where dX, dW are the
    gradients of sum_i w_i pg_i - sum_i g_ent_i-weighted entropy (g_ent = dL/dentropy per row, or None)."""
    n, h = hidden.shape
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, entropy = torch.empty(n, **f32), torch.empty(n, **f32)
    dx = torch.empty((n, h), **f32) if compute_dx else torch.empty(0, **f32)
    dw = torch.zeros(weight.shape, **f32) if compute_dw else torch.empty(0, **f32)
    write_grad = compute_dx or compute_dw
    inv_t = 1.0 / temperature
    with _no_autocast(hidden.device):
        loop = _Loop(hidden, weight, targets, ignore_index, softcap, chunk_bytes, triton_rows, write_grad)
        for rows, tgt, valid, x, z in loop.chunks():
            e, th, dz = loop.bufs(z)
            if triton_rows:
                _launch_rows(z, dz, rows.start, targets, ignore_index, inv_t, softcap, mode=2, has_entropy=True,
                             ent_grad=g_ent is not None, on_policy=on_policy, has_dual=has_dual,
                             write_grad=write_grad, old=old_logp, adv=adv, w=w_tok, g_ent=g_ent, hp=hp,
                             logp=logp, entropy=entropy)
            else:
                pass_ = _TorchRows(z, e, th, inv_t, softcap)
                tgt_safe = torch.where(valid, tgt, 0).long()
                lp, ent, _, _ = pass_.stats(tgt_safe, valid, True)
                logp[rows], entropy[rows] = lp, ent
                if write_grad:
                    g = torch.where(valid, torch_token_pg_grad(lp, None if on_policy else old_logp[rows],
                                                               adv[rows], w_tok[rows], hp, on_policy, has_dual),
                                    0.0)
                    ge = None if g_ent is None else torch.where(valid, g_ent[rows], 0.0)
                    dz = pass_.grad(tgt_safe, g, ge, inv_t)
            if write_grad:
                loop.backprop(dz, x, dx[rows] if compute_dx else None, dw if compute_dw else None)
    return logp, entropy, dx, dw
