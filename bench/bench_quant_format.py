"""Which 4-bit weight format for the qlora rung: torchao's NF4Tensor against bitsandbytes' 4-bit NF4, on CPU.

Both are QLoRA's NF4 (16 NormalFloat levels, absmax blocks of 64 weights, the block scales quantized again in blocks
of 256). Measured per library, in one process with the same torch so that only the format differs:
  - weight reconstruction error, relative Frobenius ||W - deq(q(W))|| / ||W||: Qwen2.5-1.5B-shaped weights drawn
    like its init (normal, std 0.02, bf16: the rung quantizes from bf16), and the shipped tiny model's 28 trained
    linear weights (sppo_fast/assets/tiny, fp32 as stored);
  - a linear layer's forward error against the fp32 layer (x ~ N(0, 1), 256 tokens), with bf16 compute (the rung's)
    and with fp32 compute (the format's error alone); a dense bf16 layer is the noise floor;
  - bytes per parameter of the stored form (codes + every scale and table it needs), and quantize time;
  - CPU forward + backward time of one layer (grad to the input only: the base is frozen), against dense bf16;
  - the wheel sizes (--wheels FILE...), and the 64 MiB the device tool carries (tree + wheels).

    python bench/bench_quant_format.py --wheels /tmp/bnb/*.whl /tmp/torchao-whl/*.whl --out results.jsonl

Needs torch, safetensors and either library; a library that is missing gets a row saying so. bitsandbytes belongs in
a throwaway venv (it is no dependency of this project): `python -m venv /tmp/venv-bnb && /tmp/venv-bnb/bin/pip install
torch==2.13.0 bitsandbytes transformers torchao`, then run this file with that venv's python, from the checkout.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import append_record, do_bench, environment, git  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "sppo_fast" / "assets" / "tiny" / "model.safetensors"
# Qwen2.5-1.5B: hidden 1536, intermediate 8960, 2 KV heads of 128 (k/v 256 x 1536); initializer_range 0.02
QWEN_SHAPES = {"q_proj": (1536, 1536), "k_proj": (256, 1536), "gate_proj": (8960, 1536)}
CARRY_MIB = 64


class TorchaoNF4:
    name = "torchao"

    def __init__(self):
        import torchao
        from torchao.quantization import to_nf4
        self.version, self.to_nf4 = torchao.__version__, to_nf4

    def quantize(self, w):
        return self.to_nf4(w.contiguous(), 64, 256)

    def dequantize(self, q):
        return q.get_original_weight()

    def nbytes(self, q):
        names, _ = q.__tensor_flatten__()  # codes, int8 scales, per-256 factors, their mean, the 16-level table
        return sum(getattr(q, n).nbytes for n in names)

    def linear(self, w, compute_dtype):
        q = self.quantize(w)
        return lambda x: F.linear(x.to(compute_dtype), q)  # dequantizes to x's dtype


class BitsandbytesNF4:
    name = "bitsandbytes"

    def __init__(self):
        import bitsandbytes
        import bitsandbytes.functional as bf
        self.version, self.bnb, self.bf = bitsandbytes.__version__, bitsandbytes, bf

    def quantize(self, w):
        return self.bf.quantize_4bit(w.contiguous(), quant_type="nf4", blocksize=64, compress_statistics=True)

    def dequantize(self, q):
        packed, state = q
        return self.bf.dequantize_4bit(packed, state)

    def nbytes(self, q):
        packed, state = q  # as serialized: packed codes, uint8 absmax, the nested state's absmax/code/offset
        return packed.nbytes + sum(v.nbytes for v in state.as_dict(packed=True).values() if torch.is_tensor(v))

    def linear(self, w, compute_dtype):
        layer = self.bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=compute_dtype,
                                       quant_type="nf4", compress_statistics=True)
        layer.weight = self.bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                                              compress_statistics=True)
        layer = layer.to("cpu")  # Params4bit quantizes on its first move to a device
        return lambda x: layer(x.to(compute_dtype))


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weights():
    """{set name: {layer: weight}}: Qwen-like normal draws in bf16, and the tiny model's trained linears."""
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    qwen = {k: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for k, s in QWEN_SHAPES.items()}
    tiny = {k: v for k, v in load_file(str(TINY)).items() if v.dim() == 2 and k.endswith("proj.weight")}
    return {"qwen1.5b-init-bf16": qwen, "tiny-trained-fp32": tiny}


def measure(lib, sets, tokens: int) -> list:
    rows = []
    for set_name, ws in sets.items():
        num = den = 0.0
        worst, stored, numel, seconds = 0.0, 0, 0, 0.0
        for w in ws.values():
            t0 = time.perf_counter()
            q = lib.quantize(w)
            seconds += time.perf_counter() - t0
            d = lib.dequantize(q).double()
            num += (d - w.double()).pow(2).sum().item()
            den += w.double().pow(2).sum().item()
            worst = max(worst, rel(d, w))
            stored, numel = stored + lib.nbytes(q), numel + w.numel()
        rows.append({"kind": "weights", "lib": lib.name, "set": set_name, "layers": len(ws), "params": numel,
                     "rel_err_all": (num / den) ** 0.5, "rel_err_worst_layer": worst,
                     "bytes_per_param": stored / numel, "quantize_s": seconds})
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(1536, 1536, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(tokens, 1536, generator=g)
    truth = F.linear(x.double(), w.double())
    for compute in (torch.bfloat16, torch.float32):
        with torch.no_grad():
            y = lib.linear(w, compute)(x)
        rows.append({"kind": "forward", "lib": lib.name, "compute": str(compute).removeprefix("torch."),
                     "shape": [1536, 1536], "tokens": tokens, "rel_err_vs_fp32": rel(y, truth)})
    return rows


def time_layers(makers: dict, size: int, tokens: int, rounds: int, reps: int) -> list:
    """CPU forward + backward (grad to the input) of one SIZE x SIZE bf16 layer per library. The libraries take
    turns, `rounds` times `reps` calls each, so load from other processes on a shared machine falls on all alike;
    the row gives the median and spread of all calls."""
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(size, size, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(tokens, size, generator=g, dtype=torch.bfloat16).requires_grad_(True)
    dy = torch.randn(tokens, size, generator=g, dtype=torch.bfloat16)
    layers = {name: make(w, torch.bfloat16) for name, make in makers.items()}
    times = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            r = do_bench(lambda: layer(x).backward(dy), warmup=1, rep=reps,
                         setup=lambda: setattr(x, "grad", None), device="cpu")
            times[name].append(r["median_ms"])
    rows = []
    for name, t in times.items():
        t = sorted(t)
        rows.append({"kind": "time", "lib": name, "shape": [size, size], "tokens": tokens,
                     "threads": torch.get_num_threads(), "rounds": rounds, "reps": reps,
                     "fwd_bwd_median_ms": t[len(t) // 2], "min_round_ms": t[0], "max_round_ms": t[-1]})
    return rows


def dense_forward_row(tokens) -> dict:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(1536, 1536, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(tokens, 1536, generator=g)
    truth = F.linear(x.double(), w.double())
    y = F.linear(x.to(torch.bfloat16), w)
    return {"kind": "forward", "lib": "dense", "compute": "bfloat16", "shape": [1536, 1536], "tokens": tokens,
            "rel_err_vs_fp32": rel(y, truth)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wheels", nargs="*", default=[], help="wheel files whose sizes to record")
    p.add_argument("--tokens", type=int, default=256, help="tokens in the forward-error input")
    p.add_argument("--time-size", type=int, default=1024, help="the timed layer is SIZE x SIZE")
    p.add_argument("--time-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (the libraries take turns)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per library per round")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)

    env = {"kind": "env", **environment("cpu"), "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    rows = [env]
    sets = weights()
    rows.append(dense_forward_row(args.tokens))
    makers = {"dense": lambda w, dt: (lambda x: F.linear(x, w))}
    for cls in (TorchaoNF4, BitsandbytesNF4):
        try:
            lib = cls()
        except ImportError as e:
            rows.append({"kind": "missing", "lib": cls.name, "error": str(e)})
            continue
        rows.append({"kind": "version", "lib": lib.name, "version": lib.version})
        try:
            rows += measure(lib, sets, args.tokens)
            makers[lib.name] = lib.linear
        except Exception as e:  # a library that cannot run this on CPU: that is the finding, recorded
            rows.append({"kind": "failed", "lib": lib.name, "error": f"{type(e).__name__}: {e}"})
    rows += time_layers(makers, args.time_size, args.time_tokens, args.rounds, args.reps)
    tree = sum(os.path.getsize(Path(__file__).resolve().parents[1] / f)
               for f in (git("ls-files") or "").splitlines() if f)
    rows.append({"kind": "carry", "tracked_tree_mib": tree / 2**20, "limit_mib": CARRY_MIB,
                 "wheels": {Path(w).name: os.path.getsize(w) / 2**20 for w in args.wheels}})
    rows[0]["loadavg_end"] = os.getloadavg()
    for row in rows:
        print(json.dumps(row))
        if args.out:
            append_record(args.out, row)


if __name__ == "__main__":
    main()
