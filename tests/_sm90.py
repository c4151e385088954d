"""GPU readiness without a GPU: the Triton launches our CUDA launchers make, recorded on meta tensors, and compiled
ahead of time for an H100 (sm_90) the way Triton's own launcher would compile them.

- `Recorder` stands in for a `@triton.jit` kernel: `rec[grid](*args, **kwargs)` records the launch (and runs an
  optional check on it) and writes nothing, so a launcher runs unchanged on meta tensors.
- `record_launches()` drives every launcher in kernels/ over the option space its callers can reach (dtypes, flags,
  real hidden and vocabulary sizes), with the launchers' CUDA configurations selected.
- `specialize()` turns a launch into what `JITFunction.run` would compile on the GPU: Triton's own binder
  (`create_function_from_signature`, which runs Triton's specialization: ints on divisibility by 16 and == 1,
  pointers on 16-byte alignment) and `_pack_args`, for the target GPUTarget("cuda", 90, 32).
- `compile_variants()` compiles each distinct variant with `triton.compile` (ptxas bundled with Triton) in a small
  process pool and reads registers, spills and stack from ptxas's own report, shared memory from the metadata.

Run as a script it prints one JSON report; tests/test_gpu_readiness.py runs it in a subprocess without
TRITON_INTERPRET, because under the interpreter `@triton.jit` returns InterpretedFunction objects, which Triton
cannot compile (and the compile knobs set here stay out of the test process).
"""
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

TARGET_ARCH = 90  # H100 / H200
SHARED_MEM_LIMIT = 232448  # bytes: 227 KiB, the most shared memory one block may use on sm_90
REAL_H = (1536, 2048, 3584, 4096, 5120)  # Qwen2.5-1.5B, Gemma-2B/Qwen-1.8B, Qwen2.5-7B, Llama-3-8B, Qwen2.5-14B
# Qwen2.5 (151936) and Llama-3 (128256) are divisible by 16; GPT-2 (50257) is not. Vocabulary sizes reach the
# kernels as V and through V as the combine kernel's split count, which Triton specializes like any int.
REAL_V = (151936, 128256, 50257)
KERNEL_MODULES = ("chunked", "logprobs", "seq_sum")  # kernels/*.py that define @triton.jit kernels


def kernel_module(name):
    return importlib.import_module(f"sppo_fast.kernels.{name}")


# ------------------------------------------------------------------------------------------------------------------
# recording launches
@dataclasses.dataclass
class Launch:
    module: str
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict
    context: str = ""


class Recorder:
    """Stands in for the kernel `module.name`: records `self[grid](*args, **kwargs)`, writes nothing."""

    def __init__(self, module, name, sink, check=None):
        self.module, self.name, self.sink, self.check = module, name, sink, check
        self.context = ""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            rec = Launch(self.module, self.name, tuple(grid), args, dict(kwargs), self.context)
            if self.check is not None:
                self.check(rec)
            self.sink.append(rec)

        return launch


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def recorders(sink, checks=None):
    """Every module-level kernel (a @triton.jit named *_kernel) of kernels/ replaced by a Recorder."""
    checks = checks or {}
    recs = {}
    with contextlib.ExitStack() as stack:
        for mod_name in KERNEL_MODULES:
            mod = kernel_module(mod_name)
            for name in kernel_names(mod):
                rec = Recorder(mod_name, name, sink, checks.get(name))
                recs[name] = rec
                stack.enter_context(patched(mod, name, rec))
        yield recs


def kernel_names(mod):
    """Names of the @triton.jit kernels a module defines (helpers such as _tanh are not launched on their own)."""
    from triton.runtime.jit import JITFunction

    return sorted(n for n, v in vars(mod).items()
                  if isinstance(v, JITFunction) and n.endswith("_kernel") and v.fn.__module__ == mod.__name__)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


FLOAT_CASES = {  # name: (hidden dtype, weight dtype)
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "fp32": (torch.float32, torch.float32),
    "bf16+fp32w": (torch.bfloat16, torch.float32),  # an fp32 master weight with bf16 hidden states (chunked only)
    "fp16+fp32w": (torch.float16, torch.float32),
}


def _chunked_launches(recs, n=200, v=151936):
    """The row pass as the three chunk loops launch it on CUDA: every option their callers pass, with int64 targets;
    int32 targets with every feature on (bf16)."""
    chunked = kernel_module("chunked")
    rec = recs["_row_pass_kernel"]
    bools = (False, True)
    chunk_bytes = (n // 2) * v * 10  # one to three chunks (on meta tensors nothing is allocated)
    # the 16-bit GEMM branch; dW by the blocked fallback, whose meta kernels work on every torch we run (torch
    # 2.11's meta addmm with out_dtype raises), and the dW path does not change the row pass's launches
    with patched(chunked, "_native_16bit", lambda device, what: what == "mm"), \
            patched(chunked, "_no_autocast", lambda device: contextlib.nullcontext()):
        for case, tgt_dtype, softcap in itertools.product(FLOAT_CASES, (torch.int64, torch.int32), (None, 30.0)):
            every = tgt_dtype == torch.int64  # else only the all-features launches, for bf16 (the training dtype)
            if not every and (softcap is None or case != "bf16"):
                continue
            x_dtype, w_dtype = FLOAT_CASES[case]
            hidden, weight = _meta(n, 64, dtype=x_dtype), _meta(v, 64, dtype=w_dtype)
            vec = _meta(n)
            common = dict(hidden=hidden, weight=weight, targets=_meta(n, dtype=tgt_dtype), temperature=0.7,
                          softcap=softcap, ignore_index=-100, chunk_bytes=chunk_bytes, triton_rows=True)
            tag = f"{case} targets={tgt_dtype} softcap={softcap}"
            for ent in bools if every else (True,):
                rec.context = f"chunked.logprobs_fwd {tag} entropy={ent}"
                chunked.logprobs_fwd(return_entropy=ent, **common)
                for dx, dw in ((True, True), (True, False), (False, True)) if every else ((True, True),):
                    rec.context = f"chunked.logprobs_bwd {tag} entropy_grad={ent} dx={dx} dw={dw}"
                    chunked.logprobs_bwd(vec, vec if ent else None, lse=vec, mean_z=vec, compute_dx=dx,
                                         compute_dw=dw, **common)
            hp = _meta(3)
            options = itertools.product(bools, bools, bools, ((True, True), (True, False), (False, True),
                                                              (False, False)))
            for g_ent, on_policy, dual, (dx, dw) in options if every else ((True, False, True, (True, True)),):
                rec.context = (f"chunked.ppo_fwd_with_grads {tag} entropy_grad={g_ent} on_policy={on_policy} "
                               f"dual={dual} dx={dx} dw={dw}")
                chunked.ppo_fwd_with_grads(old_logp=None if on_policy else vec, adv=vec, w_tok=vec,
                                           g_ent=vec if g_ent else None, hp=hp, on_policy=on_policy,
                                           has_dual=dual, compute_dx=dx, compute_dw=dw, **common)


def _logprobs_launches(recs, n=4096):
    """The tile-fused forward, combine and backward kernels as their launchers call them on CUDA: every option at
    every real H (int64 targets, V = REAL_V[0]); every real H x V x targets dtype with every feature on (bf16)."""
    lp = kernel_module("logprobs")
    bools = (False, True)
    shapes = itertools.product(("bf16", "fp16", "fp32"), REAL_H, REAL_V, (torch.int64, torch.int32))
    # the launchers' own CUDA choice: `_tile_config` is where they pick the GPU table for CUDA tensors
    with patched(lp, "_tile_config", lambda table_gpu, table_cpu, tensor: table_gpu[tensor.element_size()]):
        for case, h, v, tgt_dtype in shapes:
            every = v == REAL_V[0] and tgt_dtype == torch.int64
            if not every and case != "bf16":
                continue
            dtype = FLOAT_CASES[case][0]
            hidden, weight, targets = _meta(n, h, dtype=dtype), _meta(v, h, dtype=dtype), _meta(n, dtype=tgt_dtype)
            vec = _meta(n)
            for softcap in (None, 30.0) if every else (30.0,):
                tag = f"{case} H={h} V={v} targets={tgt_dtype} softcap={softcap}"
                for ent in bools if every else (True,):
                    for name in ("_logprobs_fwd_kernel", "_logprobs_combine_kernel"):
                        recs[name].context = f"logprobs._token_logprobs_fwd_triton {tag} entropy={ent}"
                    lp._token_logprobs_fwd_triton(hidden, weight, targets, 0.7, softcap, -100, ent)
                    for dx, dw in ((True, True), (True, False), (False, True)) if every else ((True, True),):
                        recs["_logprobs_bwd_kernel"].context = (f"logprobs._token_logprobs_bwd_triton {tag} "
                                                                f"entropy_grad={ent} dx={dx} dw={dw}")
                        lp._token_logprobs_bwd_triton(vec, vec if ent else None, hidden, weight, targets, vec, vec,
                                                      0.7, softcap, -100, dx, dw)


def _seq_sum_launches(recs):
    """segment_sum's forward (any float values) and its backward / double backward (fp32 or fp64 sums)."""
    ss = kernel_module("seq_sum")
    for values_dtype, cu_dtype in itertools.product((torch.bfloat16, torch.float16, torch.float32, torch.float64),
                                                    (torch.int32, torch.int64)):
        cu = _meta(9, dtype=cu_dtype)
        recs["_segment_sum_kernel"].context = f"seq_sum._segment_sum_fwd values={values_dtype} cu={cu_dtype}"
        ss._segment_sum_fwd(_meta(1000, dtype=values_dtype), cu)
        recs["_segment_broadcast_kernel"].context = f"seq_sum._segment_sum_bwd sums={values_dtype} cu={cu_dtype}"
        ss._segment_sum_bwd(_meta(8, dtype=ss._acc_dtype(values_dtype)), cu, 1000)


def record_launches():
    """Every Triton launch the CUDA launchers of kernels/ make over their option space, as Launch records whose
    tensors are meta tensors. The chunk loops' row-pass launches carry the interpreter's BLOCK_V / num_warps
    (meta tensors are not CUDA tensors): `gpu_config` swaps in the CUDA ones."""
    sink = []
    with recorders(sink) as recs:
        _chunked_launches(recs)
        _logprobs_launches(recs)
        _seq_sum_launches(recs)
    return [gpu_config(launch) for launch in sink]


def gpu_config(launch):
    """The launch as `_launch_rows` makes it for a CUDA tensor: `z.is_cuda` picks the block and the warps there,
    and meta tensors take the other branch. The other launchers pick their CUDA config from the table
    (`_tile_config`, patched above) or use one value on every device."""
    if launch.kernel != "_row_pass_kernel":
        return launch
    chunked = kernel_module("chunked")
    kw = dict(launch.kwargs)
    assert kw["BLOCK_V"] == chunked._ROW_BLOCK_V_CPU and kw["num_warps"] == chunked._ROW_NUM_WARPS_CPU, kw
    kw.update(BLOCK_V=chunked._ROW_BLOCK_V_GPU, num_warps=chunked._ROW_NUM_WARPS_GPU)
    return dataclasses.replace(launch, kwargs=kw)


# ------------------------------------------------------------------------------------------------------------------
# specialization: what JITFunction.run would compile for this launch on an sm_90 GPU
def target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", TARGET_ARCH, 32)


def _mock(x):
    from triton.runtime.jit import MockTensor

    # MockTensor's data_ptr is 0: 16-byte aligned. Every pointer the launchers pass starts a buffer: their own
    # allocations (the caching allocator aligns to 512 bytes; chunk views start at row 0) or the caller's tensors.
    # A caller's view that starts mid-allocation would compile one more, unaligned, variant at run time.
    return MockTensor(x.dtype, list(x.shape)) if isinstance(x, torch.Tensor) else x


@dataclasses.dataclass
class Variant:
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    contexts: list = dataclasses.field(default_factory=list)

    def key(self):
        return repr((self.module, self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()), sorted(self.options.items())))

    def describe(self):
        """One line: kernel, pointer dtypes, constexprs, int specializations, warps/stages."""
        names = list(self.signature)
        consts = {names[k[0]]: v for k, v in self.constexprs.items()}
        ptrs = ",".join(f"{n}:{t[1:]}" for n, t in self.signature.items() if t.startswith("*"))
        ints = ",".join(f"{n}:{t}{'/16' if (i,) in self.attrs and self.attrs[(i,)] else ''}"
                        for i, (n, t) in enumerate(self.signature.items()) if t in ("i32", "i64"))
        return (f"{self.kernel}[{ptrs}] {consts} ints[{ints}] "
                f"warps={self.options['num_warps']} stages={self.options['num_stages']}")


def specialize(launch, backend=None):
    """Variant that Triton's launcher would compile for `launch` on the target: its binder specializes the
    arguments (the same native code as at run time), `_pack_args` turns that into signature, constexprs, attrs
    and options. The knobs added to kwargs are those JITFunction.run adds (runtime/jit.py, Triton 3.6 and 3.9)."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = backend or make_backend(target())
    fn = getattr(kernel_module(launch.module), launch.kernel)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # 3.9 adds both, 3.6 the first
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    args = [_mock(a) for a in launch.args]
    kwargs = {k: _mock(v) for k, v in kwargs.items()}
    bound, specialization, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    return Variant(launch.module, launch.kernel, dict(signature), dict(constexprs), dict(attrs),
                   dict(options.__dict__))


def distinct_variants(launches):
    """The distinct variants of the launches, and for each launch the index of its variant."""
    from triton.compiler import make_backend

    backend = make_backend(target())
    variants, position, index = [], {}, []
    for launch in launches:
        var = specialize(launch, backend)
        if var.key() not in position:
            position[var.key()] = len(variants)
            variants.append(var)
        index.append(position[var.key()])
        variants[index[-1]].contexts.append(launch.context)
    return variants, index


# ------------------------------------------------------------------------------------------------------------------
# compilation
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_path():
    """The ptxas Triton itself runs for the target (bundled with the wheel); RuntimeError if it is absent."""
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(TARGET_ARCH)
    except TypeError:  # Triton releases before per-arch ptxas: get_ptxas()
        tool = nv.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]  # a knobs.NvidiaTool, or (path, version) in older ones


def _worker_init(cache_dir):
    from triton import knobs

    # a private cache: a cache hit skips ptxas, and ptxas's report is where the spill counts come from
    knobs.cache.dir = cache_dir
    knobs.nvidia.dump_ptxas_log = True


def compile_variant(var):
    """Compile one variant for the target; returns its resource report (or the error)."""
    import triton
    from triton.compiler import ASTSource

    fn = getattr(kernel_module(var.module), var.kernel)
    out = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):  # Triton prints ptxas's -v report here (knobs.nvidia.dump_ptxas_log)
            kernel = triton.compile(ASTSource(fn, var.signature, var.constexprs, var.attrs), target=target(),
                                    options=var.options)
    except Exception as e:  # reported per variant: one failing variant must not hide the others
        return dict(error=f"{type(e).__name__}: {e}"[:4000])
    log = out.getvalue()
    props, regs = _PTXAS_PROPS.search(log), _PTXAS_REGS.search(log)
    if props is None or regs is None:
        return dict(error=f"no ptxas resource report in the compile output:\n{log[-2000:]}")
    ttir = kernel.asm["ttir"]
    return dict(seconds=round(time.perf_counter() - start, 2), registers=int(regs.group(1)),
                stack_bytes=int(props.group(1)), spill_store_bytes=int(props.group(2)),
                spill_load_bytes=int(props.group(3)), shared_bytes=int(kernel.metadata.shared),
                num_warps=int(kernel.metadata.num_warps), name=kernel.metadata.name,
                ttir_divisibility=_ttir_divisible_args(ttir, kernel.metadata.name))


def _ttir_divisible_args(ttir, name):
    """Arguments that the compiled TTIR marks tt.divisibility = 16: proof that the specialization reached the
    compiler in the form this Triton expects."""
    header = next(line for line in ttir.splitlines() if f"tt.func public @{name}(" in line)
    return [arg for arg, attrs in re.findall(r"%(\w+): [^%{]*(\{[^}]*\})?", header) if "tt.divisibility = 16" in attrs]


def compile_variants(variants, workers=2):
    with tempfile.TemporaryDirectory() as cache_dir:
        if workers <= 1:
            _worker_init(cache_dir)
            return [compile_variant(v) for v in variants]
        import multiprocessing

        # spawn, not fork: the parent holds MLIR/LLVM state after its imports, which a forked child must not share
        # longest first (the GEMM kernels, fp32 ones slowest), so that neither worker is left with a long tail
        order = sorted(range(len(variants)), key=lambda i: _cost(variants[i]), reverse=True)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(cache_dir,)) as pool:
            done = dict(zip(order, pool.map(compile_variant, [variants[i] for i in order])))
        return [done[i] for i in range(len(variants))]


def _cost(var):
    heavy = {"_logprobs_bwd_kernel": 3, "_logprobs_fwd_kernel": 2}.get(var.kernel, 1)
    return heavy * (2 if "*fp32" in (var.signature.get("X"),) else 1)


# ------------------------------------------------------------------------------------------------------------------
def report(workers=2):
    start = time.perf_counter()
    try:
        ptxas = ptxas_path()
    except (ImportError, RuntimeError) as e:
        return dict(skip=f"Triton's NVIDIA backend or its bundled ptxas is absent: {e}")
    import triton

    launches = record_launches()
    variants, variant_of = distinct_variants(launches)
    t_record = time.perf_counter() - start
    results = compile_variants(variants, workers)
    rows = []
    for var, res in zip(variants, results):
        names = list(var.signature)
        rows.append(dict(
            module=var.module, kernel=var.kernel, describe=var.describe(), launches=len(var.contexts),
            example=var.contexts[0],
            int_args={n: [t, bool(var.attrs.get((i,)))] for i, (n, t) in enumerate(var.signature.items())
                      if t in ("i32", "i64")},
            constexprs={names[k[0]]: v for k, v in var.constexprs.items()},
            pointers={n: t[1:] for n, t in var.signature.items() if t.startswith("*")},
            options={k: var.options[k] for k in ("num_warps", "num_stages")},
            runtime_args=[n for n, t in var.signature.items() if t != "constexpr"],
            **res))
    all_kernels = {f"{m}.{n}" for m in KERNEL_MODULES for n in kernel_names(kernel_module(m))}
    # the hidden size each launch passed, and the variant it compiled to (kernels with a runtime H argument)
    hidden_sizes = []
    for launch, i in zip(launches, variant_of):
        fn = getattr(kernel_module(launch.module), launch.kernel)
        if "H" in fn.arg_names:
            h = launch.args[fn.arg_names.index("H")]
            hidden_sizes.append(dict(kernel=launch.kernel, H=h, variant=i))
    return dict(triton=triton.__version__, torch=torch.__version__, ptxas=ptxas, arch=TARGET_ARCH,
                shared_limit=SHARED_MEM_LIMIT, workers=workers, launches=len(launches), kernels=sorted(all_kernels),
                record_seconds=round(t_record, 2), total_seconds=round(time.perf_counter() - start, 2),
                variants=rows, hidden_sizes=hidden_sizes)


if __name__ == "__main__":
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    json.dump(report(workers), sys.stdout)
