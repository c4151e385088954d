"""Peak memory and step time of one SPPO update under each memory setting (issue 7), against the estimate.

    python bench/bench_memory.py                      # CUDA: Qwen2-1.5B-shaped random init, 8 x (512 + 1536) tokens
    python bench/bench_memory.py --rollout            # + generation peaks (KV cache) for fp32 and bf16 weights
    python bench/bench_memory.py --settings baseline,bf16 --steps 5
    python bench/bench_memory.py --quick              # CPU smoke test (< 60 s): a tiny Qwen2 shape, same code path

Settings are cumulative rungs of sppo_fast.memory's ladder:
  baseline  fp32 weights + torch AdamW, bf16 autocast, no checkpointing        (level fp32)
  ckpt      + gradient checkpointing                                            (level ckpt)
  bf16      + bf16 weights, torchao AdamW fp32 states + stochastic rounding     (level bf16)
  8bit      + torchao AdamW8bit states                                          (level 8bit)
  offload   bf16 weights, fp32 states in host RAM (torchao CPUOffloadOptimizer) (level offload, CUDA only)

Settings run in the order given; one that fails (out of memory, torchao missing) is recorded with its error and the
next one runs. Each setting runs the trainer's own update (`train.Stepper.update`: packing, micro-batches by token budget, fused
log-prob kernel, value head, clipping, optimizer step) on random tokens with random 0/1 rewards. Peak = the
largest torch.cuda.max_memory_allocated over the steps (the first step allocates the optimizer states); time = the
median of the steps after the first. Results: bench/results/memory-<gpu>-<date>.{jsonl,md} (GPU name, versions,
git SHA per row). --quick writes to a temporary directory unless --out is given: CPU timings are not results.
"""
import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import append_record, environment, markdown_table  # noqa: E402

from sppo_fast import memory  # noqa: E402
from sppo_fast.model import apply_liger, enable_checkpointing  # noqa: E402
from sppo_fast.rollout import Sample  # noqa: E402
from sppo_fast.train import Args, Stepper  # noqa: E402
from sppo_fast.value_head import ValueHead  # noqa: E402

SETTINGS = {"baseline": "fp32", "ckpt": "ckpt", "bf16": "bf16", "8bit": "8bit", "offload": "offload"}
QWEN2_15B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=256)


def make_model(cfg, level, device, liger):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = memory.OPTIMIZERS[level][1]
    torch.manual_seed(0)
    config = Qwen2Config(**cfg, attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    if liger and device.type == "cuda":
        apply_liger(model)
    if level != "fp32":
        enable_checkpointing(model)
        model.config.use_cache = False
    model.train()
    return model


def samples_for(batch, prompt, response, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt + response), generator=g)
    return [Sample(row[:prompt].tolist(), row[prompt:].tolist(), "", True, i) for i, row in enumerate(ids)], \
        (torch.rand(batch, generator=g) > 0.5).float()


def bench_update(setting, cfg, batch, prompt, response, steps, device, liger, kernel_impl):
    level = SETTINGS[setting]
    model = make_model(cfg, level, device, liger)
    head = ValueHead(cfg["hidden_size"]).to(device)
    groups = [{"params": list(model.parameters()), "lr": 1e-6, "weight_decay": 0.0},
              {"params": list(head.parameters()), "lr": 1e-4, "weight_decay": 0.0}]
    optimizer = memory.build_optimizer(groups, memory.OPTIMIZERS[level][0], device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    tokens = batch * (prompt + response)
    args = Args(micro_batch_tokens=tokens, kernel_impl=kernel_impl, check_inputs_steps=0, max_new_tokens=response)
    stepper = Stepper(args, model, head, optimizer, scheduler, types.SimpleNamespace(pad_token_id=0), device)
    samples, R = samples_for(batch, prompt, response, cfg["vocab_size"])
    from transformers import Qwen2Config
    shape = memory.model_shape(Qwen2Config(**cfg))
    est = memory.estimate(shape, level, micro_batch_tokens=tokens, seq_len=prompt + response, prompt_len=prompt,
                          gen_batch_size=batch, cuda=device.type == "cuda", kernel_impl=kernel_impl)
    cuda = device.type == "cuda"
    times, peak = [], 0.0
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        totals, _ = stepper.update(samples, R, None, check_values=False)
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() / memory.GiB)
        times.append(time.perf_counter() - t0)
        assert "nonfinite" not in totals, "non-finite loss or gradient"
    return {"setting": setting, "level": level, "optimizer": memory.OPTIMIZERS[level][0],
            "tokens": tokens, "batch": batch, "prompt": prompt, "response": response,
            "peak_update_gib": round(peak, 3) if cuda else None,
            "estimate_update_gib": round(est.update_peak / memory.GiB, 3),
            "estimate_host_gib": round(est.optimizer_host / memory.GiB, 3),
            "step_s": round(statistics.median(times[1:] if len(times) > 1 else times), 4),
            "first_step_s": round(times[0], 4), "steps": steps,
            "policy_loss": round(float(totals["losses/policy"]), 6), "grad_norm": round(float(totals["stats/grad_norm"]), 4)}


@torch.no_grad()
def bench_rollout(level, cfg, batch, prompt, response, device):
    """Generation peak (weights + KV cache + sampling) at full length: min_new_tokens forces every response to
    `response` tokens, so the KV cache reaches (prompt + response) tokens per sequence."""
    model = make_model(cfg, level, device, liger=False)
    model.eval()
    model.config.use_cache = True
    ids = torch.randint(3, cfg["vocab_size"], (batch, prompt), device=device)
    base = torch.cuda.memory_allocated() / memory.GiB if device.type == "cuda" else 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=response, min_new_tokens=response,
                   do_sample=True, temperature=0.6, top_k=0, pad_token_id=0, eos_token_id=None)
    seconds = time.perf_counter() - t0
    from transformers import Qwen2Config
    shape = memory.model_shape(Qwen2Config(**cfg))
    est = memory.estimate(shape, level, micro_batch_tokens=0, seq_len=prompt + response, prompt_len=prompt,
                          gen_batch_size=batch, cuda=device.type == "cuda")
    peak = torch.cuda.max_memory_allocated() / memory.GiB if device.type == "cuda" else None
    return {"setting": f"rollout-{memory.OPTIMIZERS[level][1]}".replace("torch.", ""), "level": level,
            "batch": batch, "prompt": prompt, "response": response,
            "peak_rollout_gib": None if peak is None else round(peak, 3),
            "weights_gib": round(base, 3),
            "estimate_rollout_gib": round((est.weights + est.kv_cache + est.rollout_transient) / memory.GiB, 3),
            "estimate_kv_gib": round(est.kv_cache / memory.GiB, 3), "seconds": round(seconds, 2)}


def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny shapes, < 60 s")
    ap.add_argument("--settings", default="baseline,ckpt,bf16,8bit,offload")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--response", type=int, default=1536)
    ap.add_argument("--rollout", action="store_true", help="also measure generation peaks (fp32 and bf16 weights)")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--kernel-impl", default="auto")
    ap.add_argument("--out", default=None, help="results directory (default bench/results; --quick: a temp dir)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    cfg = TINY if a.quick else QWEN2_15B
    if a.quick:
        a.batch, a.prompt, a.response, a.steps = 2, 16, 48, 2
        torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = [s for s in a.settings.split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; choose from {list(SETTINGS)}")
    if device.type != "cuda":
        settings = [s for s in settings if s != "offload"]  # CPUOffloadOptimizer needs CUDA
    env = environment(device)
    try:
        import torchao
        env["torchao"] = torchao.__version__
    except ImportError:
        env["torchao"] = None
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    out_dir = a.out or (tempfile.mkdtemp(prefix="bench_memory_") if a.quick else
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    stem = os.path.join(out_dir, f"memory-{slug}-{datetime.date.today().isoformat()}")
    rows = []
    print(f"{env['device']}  torch {env['torch']}  torchao {env['torchao']}  git {env['git_sha']}  -> {stem}.*")
    for s in settings:
        try:
            row = bench_update(s, cfg, a.batch, a.prompt, a.response, a.steps, device, not a.no_liger, a.kernel_impl)
        except torch.OutOfMemoryError as err:
            row = {"setting": s, "level": SETTINGS[s], "error": f"OOM: {str(err).splitlines()[0][:160]}"}
        except Exception as err:  # noqa: BLE001 - one rung's failure (torchao missing or broken) is its row's result
            row = {"setting": s, "level": SETTINGS[s], "error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"{s} FAILED:\n{traceback.format_exc()[-3000:]}", file=sys.stderr, flush=True)
        cleanup(device)
        row.update(env, liger=not a.no_liger and device.type == "cuda")
        rows.append(row)
        append_record(stem + ".jsonl", row)
        print(json.dumps({k: row.get(k) for k in ("setting", "peak_update_gib", "estimate_update_gib", "step_s",
                                                  "error")}))
    if a.rollout:
        for level in ("fp32", "bf16"):
            try:
                row = bench_rollout(level, cfg, a.batch, a.prompt, a.response, device)
            except torch.OutOfMemoryError as err:
                row = {"setting": f"rollout-{level}", "error": f"OOM: {str(err).splitlines()[0][:160]}"}
            cleanup(device)
            row.update(env)
            rows.append(row)
            append_record(stem + ".jsonl", row)
            print(json.dumps({k: row.get(k) for k in ("setting", "peak_rollout_gib", "estimate_rollout_gib",
                                                      "seconds", "error")}))
    cols = [("setting", "setting", None), ("optimizer", "optimizer", None), ("peak GiB (update)", "peak_update_gib",
            ".2f"), ("estimate GiB", "estimate_update_gib", ".2f"), ("host GiB (est.)", "estimate_host_gib", ".2f"),
            ("step s (median)", "step_s", ".3f"), ("first step s", "first_step_s", ".2f"), ("error", "error", None)]
    update_rows = [r for r in rows if not r["setting"].startswith("rollout")]
    text = [f"# Memory settings, one SPPO update step: {env['device']}", "",
            f"{a.batch} x ({a.prompt} + {a.response}) tokens, {'tiny Qwen2 shape' if a.quick else 'Qwen2-1.5B shape'}"
            f" (random init), {a.steps} steps; torch {env['torch']}, torchao {env['torchao']}, transformers "
            f"{env.get('transformers')}, git {env['git_sha']}, {env['timestamp']}", "",
            markdown_table(update_rows, cols)]
    roll = [r for r in rows if r["setting"].startswith("rollout")]
    if roll:
        text += ["", markdown_table(roll, [("rollout", "setting", None), ("peak GiB", "peak_rollout_gib", ".2f"),
                                           ("estimate GiB", "estimate_rollout_gib", ".2f"),
                                           ("KV est. GiB", "estimate_kv_gib", ".2f"), ("s", "seconds", ".1f"),
                                           ("error", "error", None)])]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))
    return rows


if __name__ == "__main__":
    main()
