"""GPU readiness, proven on CPU (issue 21, item 4): the first GPU run must not be spent on our own bugs.

1. Every Triton kernel in kernels/ compiles ahead of time for sm_90 (H100/H200) with Triton's bundled ptxas, at the
   launch configurations the CUDA launchers use: the launches are recorded from the launchers themselves (on meta
   tensors, kernels replaced by stand-ins, see tests/_sm90.py), over bf16/fp16/fp32, every flag their callers can
   pass and the real hidden sizes; Triton's own binder specializes them as its launcher would. Every variant must
   compile with zero register spills and fit an H100's 227 KiB of shared memory.
2. The chunked CUDA branch (16-bit operands into cuBLAS with fp32 outputs) traced on meta tensors, with the real
   `torch.mm(..., out_dtype=...)` / `torch.addmm` calls under CUDA's dtype rules and the Triton row pass replaced by
   a stand-in that checks its arguments. Meta tensors have no data: a trace that completes made no host sync.
"""
import ast
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import _sm90
from sppo_fast.kernels import chunked
from sppo_fast.kernels import logprobs as logprobs_module

ROOT = Path(__file__).resolve().parent.parent
COMPILE_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------------------------------
# 1. ahead-of-time sm_90 compilation
@pytest.fixture(scope="module")
def sm90():
    """tests/_sm90.py's report, run once in a subprocess without TRITON_INTERPRET (see its docstring)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = max(1, min(2, os.cpu_count() or 1))
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_sm90.py"), str(workers)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, f"tests/_sm90.py failed:\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout)
    if "skip" in report:
        pytest.skip(report["skip"])
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)  # the subprocess and its pool, load-independent
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["cpu_seconds"] = round(cpu_end.ru_utime + cpu_end.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime, 1)
    _print_summary(report)
    return report


def _print_summary(report):
    rows = [v for v in report["variants"] if "error" not in v]
    print(f"\nsm_{report['arch']} AOT compile (triton {report['triton']}, {report['ptxas']}): "
          f"{len(report['variants'])} variants from {report['launches']} launches, {report['wall_seconds']} s wall, "
          f"{report['cpu_seconds']} CPU-s ({report['workers']} workers)")
    for kernel in sorted({v["kernel"] for v in rows}):
        mine = [v for v in rows if v["kernel"] == kernel]
        print(f"  {kernel}: {len(mine)} variants, max registers {max(v['registers'] for v in mine)}, "
              f"max shared {max(v['shared_bytes'] for v in mine)} B, "
              f"spilled bytes {sum(v['spill_store_bytes'] + v['spill_load_bytes'] for v in mine)}")


def _kernels_in_source():
    """(module, name) of every @triton.jit function in kernels/*.py that is launched (`name[grid](...)`) or named
    *_kernel, read from the source: a kernel in a new file, or one the recorder does not see, fails the tests."""
    found = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        launched = {n.value.id for n in ast.walk(tree)
                    if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name)}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list) \
                    and (node.name in launched or node.name.endswith("_kernel")):
                found.add((path.stem, node.name))
    return found


def _variant_table(variants):
    return "\n".join(f"  {v['describe']}\n    registers {v.get('registers')}, stack {v.get('stack_bytes')} B, "
                     f"spill stores/loads {v.get('spill_store_bytes')}/{v.get('spill_load_bytes')} B, shared "
                     f"{v.get('shared_bytes')} B; {v['launches']} launches, e.g. {v['example']}"
                     + (f"\n    error: {v['error']}" if "error" in v else "") for v in variants)


def test_sm90_every_kernel_is_compiled(sm90):
    in_source = _kernels_in_source()
    assert {(m, n) for m, n in (k.split(".") for k in sm90["kernels"])} == in_source
    compiled = {(v["module"], v["kernel"]) for v in sm90["variants"]}
    assert compiled == in_source, f"kernels never launched by the recorded launchers: {in_source - compiled}"


def test_sm90_every_variant_compiles(sm90):
    failed = [v for v in sm90["variants"] if "error" in v]
    assert not failed, f"{len(failed)} of {len(sm90['variants'])} variants do not compile for sm_90:\n" \
                       + _variant_table(failed)


def test_sm90_no_register_spills(sm90):
    spilled = [v for v in sm90["variants"] if "error" not in v and (v["spill_store_bytes"] or v["spill_load_bytes"])]
    assert not spilled, f"{len(spilled)} of {len(sm90['variants'])} variants spill registers on sm_90:\n" \
                        + _variant_table(spilled)


def test_sm90_shared_memory_fits_h100(sm90):
    over = [v for v in sm90["variants"] if "error" not in v and v["shared_bytes"] > sm90["shared_limit"]]
    assert not over, f"variants over {sm90['shared_limit']} B of shared memory:\n" + _variant_table(over)


def test_sm90_launch_configs_are_the_launchers(sm90):
    """The recorded launches carry the launchers' CUDA constants (the recorder took the CUDA branch everywhere)."""
    import triton.backends.nvidia.compiler as nv

    seen = set()
    for v in sm90["variants"]:
        if v["kernel"] == "_row_pass_kernel":
            want = dict(BLOCK_V=chunked._ROW_BLOCK_V_GPU, num_warps=chunked._ROW_NUM_WARPS_GPU,
                        num_stages=nv.CUDAOptions.num_stages)
        elif v["kernel"] in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"):
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[v["pointers"]["X"]]
            table = logprobs_module._FWD_GPU if v["kernel"] == "_logprobs_fwd_kernel" else logprobs_module._BWD_GPU
            cfg = table[dtype.itemsize]
            want = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, DOT_PRECISION=logprobs_module._dot_precision(dtype))
        elif v["kernel"] == "_logprobs_combine_kernel":  # launched without warps/stages: Triton's defaults
            want = dict(BLOCK_N=logprobs_module._COMBINE_BLOCK_N, num_warps=nv.CUDAOptions.num_warps,
                        num_stages=nv.CUDAOptions.num_stages)
        else:
            want = dict(BLOCK=_sm90.kernel_module("seq_sum").BLOCK_TOKENS, num_warps=nv.CUDAOptions.num_warps)
        got = {**v["constexprs"], **v["options"]}
        assert {k: got[k] for k in want} == want, v["describe"]
        seen.add(v["kernel"])
    assert seen == {n for _, n in _kernels_in_source()}


def test_sm90_flags_and_dtypes_covered(sm90):
    """Each kernel was compiled for every input dtype and both values of every boolean flag, and the row pass for
    each of its modes and dZ dtypes (a regression guard on the recorder: a launcher path it stops reaching shows)."""
    by_kernel = {}
    for v in sm90["variants"]:
        by_kernel.setdefault(v["kernel"], []).append(v)
    for kernel, variants in by_kernel.items():
        flags = {k for v in variants for k, x in v["constexprs"].items() if isinstance(x, bool)}
        for flag in flags:
            assert {v["constexprs"][flag] for v in variants} == {False, True}, (kernel, flag)
    for kernel in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"):
        assert {v["pointers"]["X"] for v in by_kernel[kernel]} == {"bf16", "fp16", "fp32"}
    rows = by_kernel["_row_pass_kernel"]
    assert {v["constexprs"]["MODE"] for v in rows} == {0, 1, 2}
    assert {v["pointers"]["DZ"] for v in rows if v["constexprs"]["WRITE_GRAD"]} == {"bf16", "fp16", "fp32"}
    assert {v["pointers"]["VALUES"] for v in by_kernel["_segment_sum_kernel"]} == {"bf16", "fp16", "fp32", "fp64"}
    for kernel in ("_row_pass_kernel", "_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_logprobs_combine_kernel"):
        assert {v["pointers"]["TARGETS"] for v in by_kernel[kernel]} == {"i32", "i64"}, kernel


def test_sm90_specializations_reach_the_compiler(sm90):
    """Every int argument that Triton's binder specialized as divisible by 16 (and only those) carries
    tt.divisibility = 16 in the compiled TTIR: the attrs were handed to triton.compile in the format this Triton
    reads, so the binaries are the ones its launcher would build."""
    for v in sm90["variants"]:
        if "error" in v:
            continue
        marked = {n for n, (_, divisible) in v["int_args"].items() if divisible}
        in_ttir = set(v["ttir_divisibility"]) & set(v["int_args"])
        assert marked == in_ttir, (v["describe"], marked, in_ttir)
    assert any(v["int_args"].get("V") == ["i32", False] for v in sm90["variants"]
               if v["kernel"] == "_logprobs_fwd_kernel"), "no variant for a vocabulary size not divisible by 16"


def test_sm90_real_hidden_sizes(sm90):
    """H is a runtime argument that Triton specializes on divisibility by 16 (and == 1). Every real hidden size was
    launched, Triton's binder specialized each, and every variant compiled with the H attribute it was given: the
    TTIR marks H tt.divisibility = 16 exactly where the specialization said so (the attrs reached the compiler in
    this Triton's format). The distinct specializations are printed."""
    variants = sm90["variants"]
    by_h = {}
    for row in sm90["hidden_sizes"]:
        v = variants[row["variant"]]
        divisible = v["int_args"]["H"][1]
        assert ("H" in v.get("ttir_divisibility", [])) == divisible, (row, v["describe"])
        by_h.setdefault(row["kernel"], {}).setdefault(row["H"], set()).add(divisible)
    assert set(by_h) == {"_logprobs_fwd_kernel", "_logprobs_bwd_kernel"}
    for kernel, sizes in by_h.items():
        assert set(sizes) == set(_sm90.REAL_H), kernel
        classes = {}
        for h, spec in sizes.items():
            assert len(spec) == 1, (kernel, h, spec)  # one specialization per H, whatever the flags
            classes.setdefault("i32, divisible by 16" if spec.pop() else "i32", []).append(h)
        print(f"{kernel}: H specializations {classes}")


# ------------------------------------------------------------------------------------------------------------------
# 2. meta-tensor trace of the chunked CUDA branch
class HostSync(RuntimeError):
    pass


_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "addmm_", "baddbmm_"}
_SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero"}  # .item(), bool(t), .nonzero(), torch.equal


class CudaGemmRules(TorchDispatchMode):
    """CUDA's dtype rules for the GEMMs (aten/src/ATen/native/cuda/Blas.cpp), which meta kernels only partly apply:
    they check the output dtype but let a 16-bit operand meet an fp32 one (torch 2.13), which cuBLAS's path
    rejects ("expected mat1 and mat2 to have the same dtype", "input dtypes must be the same"). Also fails any op
    that reads a tensor's value on the host, and records every GEMM as (op, operand dtypes, out_dtype) and every
    allocation as (dtype, shape)."""

    def __init__(self):
        super().__init__()
        self.gemms, self.allocs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[1]
        if name in _SYNCS:
            raise HostSync(f"host sync: {func}")
        if name in _GEMMS:
            bound = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
            self._check(func, name, bound)
        out = func(*args, **kwargs)
        if name.startswith(("empty", "zeros", "ones", "full", "new_")) and isinstance(out, torch.Tensor):
            self.allocs.append((out.dtype, tuple(out.shape)))
        return out

    def _check(self, func, name, a):
        m1 = a.get("mat1", a.get("batch1", a["self"] if name in ("mm", "bmm") else None))
        m2 = a.get("mat2", a.get("batch2"))
        acc = None if name in ("mm", "bmm") else a["self"]
        out_dtype, out = a.get("out_dtype"), a.get("out")
        self.gemms.append((str(func), m1.dtype, m2.dtype, out_dtype))
        if m1.dtype != m2.dtype:
            raise RuntimeError(f"{func}: input dtypes must be the same, got {m1.dtype} and {m2.dtype}")
        if out_dtype is None:
            if acc is not None and acc.dtype != m1.dtype:
                raise RuntimeError(f"{func}: self and mat2 must have the same dtype, got {acc.dtype}, {m1.dtype}")
            if out is not None and out.dtype != m1.dtype:
                raise RuntimeError(f"{func}: expected out tensor of dtype {m1.dtype}, got {out.dtype}")
            return
        if not (out_dtype == m1.dtype or (out_dtype == torch.float32 and m1.dtype in (torch.float16,
                                                                                      torch.bfloat16))):
            raise RuntimeError(f"{func}: out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs")
        if out is not None and out.dtype != out_dtype:
            raise RuntimeError(f"{func}: out_dtype must be the same as the dtype of the provided out tensor")
        if acc is not None and acc.dtype not in (out_dtype, m1.dtype):
            raise RuntimeError(f"{func}: self dtype must match either out_dtype or mat1 dtype")


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def _meta_addmm_out_dtype():
    """Whether this torch's meta kernel runs torch.addmm(..., out_dtype=fp32, out=acc): torch 2.13's does; 2.11's
    decomposition takes out_dtype for beta and raises a TypeError (measured), so the in-place dW path of the CUDA
    branch cannot be traced there."""
    acc, half = _meta(2, 2), _meta(2, 2, dtype=torch.bfloat16)
    try:
        torch.addmm(acc, half, half, out_dtype=torch.float32, out=acc)
    except TypeError:
        return False
    return True


META_ADDMM_OUT_DTYPE = _meta_addmm_out_dtype()


def test_meta_gemm_rules():
    """What the trace relies on: meta kernels enforce the output dtype rules; CudaGemmRules adds the operand rules
    and accepts exactly the calls kernels/chunked.py makes on CUDA; meta tensors refuse every host sync."""
    bf, f32 = _meta(8, 16, dtype=torch.bfloat16), _meta(16, 8)
    bf_t = _meta(16, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="out"):
        torch.mm(bf, bf_t, out_dtype=torch.float32, out=_meta(8, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out"):
        torch.mm(bf, bf_t, out=_meta(8, 8))
    with CudaGemmRules() as rules:
        torch.mm(bf, bf_t, out_dtype=torch.float32, out=_meta(8, 8))  # chunked._mm_f32
        acc = _meta(16, 16)
        if META_ADDMM_OUT_DTYPE:
            torch.addmm(acc, bf_t, bf, out_dtype=torch.float32, out=acc)  # chunked._addmm_f32_
        torch.mm(bf, bf_t, out=_meta(8, 8, dtype=torch.bfloat16))
        _meta(8, 16).mm(f32)
        for call in (lambda: torch.mm(bf, f32), lambda: torch.mm(bf, f32, out_dtype=torch.float32),
                     lambda: torch.mm(_meta(8, 16), f32, out_dtype=torch.bfloat16),
                     lambda: torch.addmm(acc, f32, bf, out_dtype=torch.float32, out=acc),
                     lambda: acc.addmm_(bf_t, bf)):
            with pytest.raises(RuntimeError, match="dtype"):
                call()
    assert len(rules.gemms) == 8 + META_ADDMM_OUT_DTYPE
    for sync in (lambda t: t.sum().item(), lambda t: bool(t.sum() > 0), lambda t: t.nonzero(),
                 lambda t: t.tolist()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            sync(_meta(4))
        with CudaGemmRules(), pytest.raises((HostSync, RuntimeError, NotImplementedError)):
            sync(_meta(4))


def _check_row_pass(dz_dtype, n):
    """The row pass's argument contract (kernels/chunked.py, _row_pass_kernel): Z fp32 [C, V] row-major, dZ Z itself
    or a [C, V] buffer of the GEMMs' dtype, one program per row, fp32 [N] vectors where the flags read or write
    them, targets of any int dtype."""

    names = chunked._row_pass_kernel.arg_names  # read before the kernel is replaced by the recorder

    def check(launch):
        a = dict(zip(names, launch.args), **launch.kwargs)
        z, dz = a["Z"], a["DZ"]
        c, v = z.shape
        assert z.dtype == torch.float32 and z.is_contiguous() and a["V"] == v and launch.grid == (c,)
        assert a["row_start"] + c <= n and not a["TARGETS"].is_floating_point() and a["TARGETS"].shape == (n,)
        if a["WRITE_GRAD"]:
            assert dz.shape == (c, v) and dz.is_contiguous() and dz.dtype == dz_dtype, (dz.dtype, dz_dtype)
        mode = a["MODE"]
        vectors = {0: ["LOGP", "LSE"], 1: ["LSE", "G_LOGP"], 2: ["LOGP", "ADV", "WEIGHT_TOK"]}[mode]
        if a["HAS_ENTROPY"] and mode != 1:
            vectors += ["ENTROPY"] + (["MEAN_Z"] if mode == 0 else [])
        if a["ENT_GRAD"]:
            vectors += ["G_ENT"] + (["MEAN_Z"] if mode == 1 else [])
        if mode == 2 and not a["ON_POLICY"]:
            vectors.append("OLD")
        for name in vectors:
            assert a[name].dtype == torch.float32 and a[name].shape == (n,), (name, a[name])
        if mode == 2:
            assert a["HP"].dtype == torch.float32 and a["HP"].shape == (3,)
        assert mode != 1 or a["WRITE_GRAD"]
        assert isinstance(a["inv_temperature"], float) and isinstance(a["softcap"], float)

    return check


TRACE_CASES = {  # hidden dtype, weight dtype
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "fp32": (torch.float32, torch.float32),
    "bf16 states + fp32 master weight": (torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("impl", ["chunked", "torch"])
@pytest.mark.parametrize("case", list(TRACE_CASES))
def test_meta_trace_chunked_cuda_branch(case, impl, monkeypatch):
    """logprobs_fwd / logprobs_bwd / ppo_fwd_with_grads on meta tensors down the CUDA branch, for the Triton row pass
    ("chunked") and the torch one ("torch") alike: the real GEMM calls under CUDA's dtype rules, the row pass's
    launches checked, both dW paths (in-place addmm with out_dtype, or the blocked fallback), with and without
    softcap, entropy, dX/dW. Outputs have the promised dtypes and shapes; nothing syncs with the host."""
    x_dtype, w_dtype = TRACE_CASES[case]
    half = x_dtype != torch.float32
    n, h, v = 64, 32, 1000
    launches = []
    monkeypatch.setattr(chunked, "_no_autocast", lambda device: contextlib.nullcontext())  # no autocast on meta
    monkeypatch.setattr(chunked, "_row_pass_kernel", _sm90.Recorder(
        "chunked", "_row_pass_kernel", launches, _check_row_pass(x_dtype if half else torch.float32, n)))
    vec, hp = _meta(n), _meta(3)
    hidden, weight = _meta(n, h, dtype=x_dtype), _meta(v, h, dtype=w_dtype)
    triton_rows = impl == "chunked"
    chunk_bytes = (n // 2) * v * (6 if triton_rows else 14)  # 2-3 chunks: meta ops cost ~0.2 ms each
    # the in-place dW GEMM where torch has it (addmm with out_dtype), the blocked fallback where it has not
    variants = ((META_ADDMM_OUT_DTYPE or not half, torch.int64), (not half, torch.int32))
    for softcap, (addmm_in_place, tgt_dtype) in itertools.product((None, 30.0), variants):
        monkeypatch.setattr(chunked, "_native_16bit", lambda device, what: what == "mm" or addmm_in_place)
        common = dict(hidden=hidden, weight=weight, targets=_meta(n, dtype=tgt_dtype), temperature=0.7,
                      softcap=softcap, ignore_index=-100, chunk_bytes=chunk_bytes, triton_rows=triton_rows)
        with CudaGemmRules() as forward_only:
            for ent in (False, True):
                logp, entropy, lse, mean_z = chunked.logprobs_fwd(return_entropy=ent, **common)
                assert [(t.dtype, tuple(t.shape)) for t in (logp, lse)] == [(torch.float32, (n,))] * 2
                assert entropy.shape == mean_z.shape == ((n,) if ent else (0,))
            logp, entropy, dx, dw = chunked.ppo_fwd_with_grads(old_logp=vec, adv=vec, w_tok=vec, g_ent=vec, hp=hp,
                                                               on_policy=False, has_dual=True, compute_dx=False,
                                                               compute_dw=False, **common)
            assert dx.shape == dw.shape == (0,)
        # no pass without a gradient holds a 16-bit dZ buffer [C, V]
        unused = [a for a in forward_only.allocs if a[0] != torch.float32 and a[1][-1:] == (v,)]
        assert not unused, f"a pass without gradients allocated 16-bit [C, V] buffers {unused}"
        with CudaGemmRules() as rules:
            for ent in (False, True):
                for dx_on, dw_on in ((True, True), (True, False), (False, True)):
                    dx, dw = chunked.logprobs_bwd(vec, vec if ent else None, lse=vec, mean_z=vec, compute_dx=dx_on,
                                                  compute_dw=dw_on, **common)
                    assert (dx.dtype, tuple(dx.shape)) == (x_dtype, (n, h) if dx_on else (0,))
                    assert (dw.dtype, tuple(dw.shape)) == (w_dtype, (v, h) if dw_on else (0,))
            ppo_options = [(g_ent, on_policy, True, True) for g_ent in (False, True) for on_policy in (False, True)]
            ppo_options += [(True, False, True, False), (True, False, False, True)]
            for g_ent, on_policy, dx_on, dw_on in ppo_options:
                out = chunked.ppo_fwd_with_grads(old_logp=None if on_policy else vec, adv=vec, w_tok=vec,
                                                 g_ent=vec if g_ent else None, hp=hp, on_policy=on_policy,
                                                 has_dual=True, compute_dx=dx_on, compute_dw=dw_on, **common)
                logp, entropy, dx, dw = out
                assert [(t.dtype, tuple(t.shape)) for t in out] == [
                    (torch.float32, (n,)), (torch.float32, (n,)), (torch.float32, (n, h) if dx_on else (0,)),
                    (torch.float32, (v, h) if dw_on else (0,))]
        # the CUDA 16-bit branch really ran: every GEMM of a 16-bit case takes 16-bit operands (cuBLAS, fp32 out)
        gemms = forward_only.gemms + rules.gemms
        operand_dtypes = {g[1] for g in gemms if "bmm" not in g[0]}
        assert operand_dtypes == {x_dtype}, rules.gemms
        if half:
            assert any(g[3] == torch.float32 for g in gemms)
    if triton_rows:
        assert {launch.kwargs["MODE"] for launch in launches} == {0, 1, 2}
    else:
        assert not launches
