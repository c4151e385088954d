"""Peak memory and step time of one SPPO update under each memory setting (issue 7), against the estimate.

    python bench/bench_memory.py                      # CUDA: Qwen2-1.5B-shaped random init, 8 x (512 + 1536) tokens
    python bench/bench_memory.py --rollout            # + generation peaks (KV cache) for fp32 and bf16 weights
    python bench/bench_memory.py --settings baseline,bf16 --steps 5
    python bench/bench_memory.py --settings qlora --rollout-tokens 128                     # both phases, 1.5B
    python bench/bench_memory.py --settings qlora --arch qwen2.5-7b --rollout-tokens 64    # the 7B shape
    python bench/bench_memory.py --quick              # CPU smoke test (< 60 s): a tiny Qwen2 shape, same code path

Settings are cumulative rungs of sppo_fast.memory's ladder:
  baseline  fp32 weights + torch AdamW, bf16 autocast, no checkpointing        (level fp32)
  ckpt      + gradient checkpointing                                            (level ckpt)
  bf16      + bf16 weights, torchao AdamW fp32 states + stochastic rounding     (level bf16)
  8bit      + torchao AdamW8bit states                                          (level 8bit)
  offload   bf16 weights, fp32 states in host RAM (torchao CPUOffloadOptimizer) (level offload, CUDA only)
  qlora     frozen NF4 base (torchao), fp32 LoRA adapters (peft) at the planner's rank, torch AdamW    (level qlora)

Settings run in the order given; one that fails (out of memory, torchao missing) is recorded with its error and the next
one runs. Each setting runs the trainer's own update (`train.Stepper.update`: packing, micro-batches by token budget,
fused log-prob kernel, value head, clipping, optimizer step) on random tokens with random 0/1 rewards. The model is a
random init built in its plan's dtype on the device; qlora's is then quantized and wrapped by the trainer's own
functions (`quant.quantize_linears`, one weight at a time, and `model.wrap_lora`), so the dense 16-bit weights are freed
before anything is measured. Peak = the largest torch.cuda.max_memory_allocated over the steps (the first step allocates
the optimizer states); time = the median of the steps after the first. Estimates: `memory.make_plan` at the setting's
level for the same sizes, without a budget (for qlora it also gives the LoRA rank the model is built with).
With --rollout-tokens N each step starts, as the trainer's does, with a rollout (`Stepper.generate`: the hf backend,
batch prompts of --prompt tokens, exactly N new tokens each) whose peak and time are recorded as their own phase
beside its estimate (`rollout_peak`: weights + optimizer states + KV cache + sampling/prefill transients).
--stop-at stops the run at a wall-clock time (what gpu_check.py passes): no step starts that the last one says would
end after it, and a setting still running then is cut, its row keeping the phases it measured.
Results: bench/results/memory-<gpu>-<date>.{jsonl,md} (memory-<arch>-<gpu>-<date> for another --arch; GPU name,
versions, git SHA per row). --quick writes to a temporary directory unless --out is given: CPU timings are not results.
"""
import argparse
import datetime
import gc
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utils import append_record, environment, markdown_table  # noqa: E402

from sppo_fast import memory  # noqa: E402
from sppo_fast.model import apply_liger, enable_checkpointing, wrap_lora  # noqa: E402
from sppo_fast.rollout import Sample  # noqa: E402
from sppo_fast.tiny import CHARS, build_tokenizer  # noqa: E402
from sppo_fast.train import Args, Stepper  # noqa: E402
from sppo_fast.value_head import ValueHead  # noqa: E402

SETTINGS = {"baseline": "fp32", "ckpt": "ckpt", "bf16": "bf16", "8bit": "8bit", "offload": "offload",
            "qlora": "qlora"}
QWEN2_15B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)
# Qwen2.5-7B (its config.json): 7.62 B parameters, an untied 152064 x 3584 lm_head beside the embeddings
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768)
# every linear holds a multiple of 64 x 256 values (NF4's block x scaler block), so the qlora rung quantizes all of them
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=256,
            vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=256)
ARCHS = {"qwen2-1.5b": QWEN2_15B, "qwen2.5-7b": QWEN25_7B}


class OutOfTime(BaseException):
    """--stop-at reached inside a setting (SIGALRM). A BaseException, so that no `except Exception` on the way up
    (transformers', ours) can swallow it."""


_alarm = {"armed": False, "fired": False}


def _on_alarm(signum, frame):
    _alarm["fired"] = True
    if _alarm["armed"]:  # outside a setting (writing a row) the run just stops before the next one
        raise OutOfTime


def plan_for(cfg, level, *, tokens, seq_len, prompt_len, gen_batch, cuda, kernel_impl):
    """The planner's plan at `level` for these sizes, no budget (so the sizes are kept as given), asked as the
    trainer's preflight asks it with --lora-rank 0: its estimate is what the measurement is held against, and on the
    qlora rung its LoRA rank (the rung's default) is the one the model is built with."""
    shape = memory.model_shape(_qwen2_config(cfg))
    return memory.make_plan(shape, level=level, seq_len=seq_len, micro_batch_tokens=tokens, gen_batch_size=gen_batch,
                            batch_sequences=gen_batch, prompt_len=prompt_len, cuda=cuda, kernel_impl=kernel_impl,
                            gradient_checkpointing=level != "fp32")


def make_model(cfg, level, device, liger, lora_rank=0, quantize=""):
    """A random-init Qwen2 model set up as `model.load_policy` sets up a loaded one, with the trainer's functions in
    its order: quantize (one weight at a time on the device), Liger, checkpointing, LoRA."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    dtype = memory.OPTIMIZERS[level][1]
    torch.manual_seed(0)
    config = Qwen2Config(**cfg, attn_implementation="sdpa")
    # built in its own dtype on its device: a 7B model built in fp32 first would hold 30 GB for a moment
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    # rollouts end only at their length (min_new_tokens): the EOS is a row no prompt character maps to
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=cfg["vocab_size"] - 1, pad_token_id=0)
    if quantize:
        from sppo_fast import quant

        quant.quantize_linears(model, device=device)  # the trainer's NF4 base, one weight at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the dense 16-bit weights' blocks: not this rung's memory
    if liger and device.type == "cuda":
        apply_liger(model)
    if level != "fp32":
        enable_checkpointing(model)
        model.config.use_cache = False
    if lora_rank > 0:
        model = wrap_lora(model, lora_rank, 16, "all-linear")
    model.train()
    return model


def samples_for(batch, prompt, response, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt + response), generator=g)
    return [Sample(row[:prompt].tolist(), row[prompt:].tolist(), "", True, i) for i, row in enumerate(ids)], \
        (torch.rand(batch, generator=g) > 0.5).float()


def prompts_for(batch, prompt, seed=0):
    """Random texts of the character tokenizer: `prompt` tokens each with its BOS."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(CHARS), (batch, max(0, prompt - 1)), generator=g)
    return ["".join(CHARS[i] for i in row) for row in idx.tolist()]


def _gib(nbytes):
    return round(nbytes / memory.GiB, 3)


def _ratio(measured, estimate):
    return None if measured is None or not estimate else round(measured / estimate, 3)


def rollout_phase(stepper, prompts, new_tokens, device, record, times):
    """One rollout through the trainer's `Stepper.generate`: its peak and time into `record`. A failure is recorded
    as `rollout_error` (the update phase still runs and is measured); cut by --stop-at, OutOfTime passes through."""
    memory.phase_peak_gib(device)  # resets the CUDA peak counter
    t = time.perf_counter()
    try:
        out = stepper.generate(prompts, temperature=0.6)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert all(len(s.response_ids) == new_tokens for s in out), "a rollout ended before its length"
    except Exception as err:  # noqa: BLE001 - a failed rollout is its phase's result
        record["rollout_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(f"rollout FAILED:\n{traceback.format_exc()[-3000:]}", file=sys.stderr, flush=True)
        cleanup(device)
        return
    times.append(time.perf_counter() - t)
    peak = memory.phase_peak_gib(device)
    median = statistics.median(times[1:] or times)
    record.update(rollout_prompt_tokens=len(out[0].prompt_ids), rollout_s=round(median, 3),
                  rollout_tok_per_s=round(len(out) * new_tokens / median, 1),
                  peak_rollout_gib=None if peak is None else round(max(peak, record.get("peak_rollout_gib") or 0), 3))
    memory.release_cached(device)  # as the trainer does between the phases


def bench_setting(setting, cfg, a, device, record, stop_at=None):
    """One setting: build, then `a.steps` steps of (rollout if a.rollout_tokens, update). Fills `record` as it goes
    (so a run cut at --stop-at keeps the phases it measured)."""
    level = SETTINGS[setting]
    cuda = device.type == "cuda"
    tokens = a.batch * (a.prompt + a.response)
    kw = dict(cuda=cuda, kernel_impl=a.kernel_impl)
    plan = plan_for(cfg, level, tokens=tokens, seq_len=a.prompt + a.response, prompt_len=a.prompt,
                    gen_batch=a.batch, **kw)
    est = plan.estimate
    record.update(level=level, optimizer=plan.optimizer, quantize=plan.quantize, lora_rank=plan.lora_rank,
                  tokens=tokens, batch=a.batch, prompt=a.prompt, response=a.response,
                  estimate_update_gib=_gib(est["update_peak"]), estimate_host_gib=_gib(est["optimizer_host"]),
                  estimate_weights_gib=_gib(est["weights"]))
    if a.rollout_tokens:
        roll = plan_for(cfg, level, tokens=tokens, seq_len=a.prompt + a.rollout_tokens, prompt_len=a.prompt,
                        gen_batch=a.batch, **kw).estimate
        record.update(rollout_tokens=a.rollout_tokens, estimate_rollout_gib=_gib(roll["rollout_peak"]),
                      estimate_kv_gib=_gib(roll["kv_cache"]))
    t0 = time.perf_counter()
    model = make_model(cfg, level, device, not a.no_liger, plan.lora_rank, plan.quantize)
    head = ValueHead(cfg["hidden_size"]).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # a frozen base: the adapters alone
    record.update(build_s=round(time.perf_counter() - t0, 2),
                  trainable_params=sum(p.numel() for p in trainable) + sum(p.numel() for p in head.parameters()),
                  weights_gib=_gib(torch.cuda.memory_allocated()) if cuda else None)
    groups = [{"params": trainable, "lr": 1e-6, "weight_decay": 0.0},
              {"params": list(head.parameters()), "lr": 1e-4, "weight_decay": 0.0}]
    optimizer = memory.build_optimizer(groups, plan.optimizer, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    args = Args(micro_batch_tokens=tokens, kernel_impl=a.kernel_impl, check_inputs_steps=0,
                max_new_tokens=a.rollout_tokens or a.response, min_new_tokens=a.rollout_tokens,
                rollout_backend="hf", gen_batch_size=a.batch)
    tokenizer = build_tokenizer(model_max_length=cfg["max_position_embeddings"])
    stepper = Stepper(args, model, head, optimizer, scheduler, tokenizer, device)
    samples, R = samples_for(a.batch, a.prompt, a.response, cfg["vocab_size"])
    prompts = prompts_for(a.batch, a.prompt)
    times, roll_times, last_step = [], [], 0.0
    for step in range(a.steps):
        if stop_at is not None and step and time.time() + last_step > stop_at:
            record["stopped"] = f"--stop-at: {step} of {a.steps} steps (each ~{last_step:.1f} s)"
            break
        t_step = time.perf_counter()
        if a.rollout_tokens and "rollout_error" not in record:  # the trainer's phase order: rollout, then update
            rollout_phase(stepper, prompts, a.rollout_tokens, device, record, roll_times)
        memory.phase_peak_gib(device)
        t = time.perf_counter()
        totals, _ = stepper.update(samples, R, None, check_values=False)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peak = memory.phase_peak_gib(device)
        assert "nonfinite" not in totals, "non-finite loss or gradient"
        memory.release_cached(device)
        last_step = time.perf_counter() - t_step
        record.update(steps=len(times), step_s=round(statistics.median(times[1:] or times), 4),
                      first_step_s=round(times[0], 4),
                      peak_update_gib=None if peak is None else round(max(peak, record.get("peak_update_gib") or 0.0),
                                                                      3),
                      policy_loss=round(float(totals["losses/policy"]), 6),
                      grad_norm=round(float(totals["stats/grad_norm"]), 4))
    return record


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
    ap.add_argument("--arch", default="qwen2-1.5b", choices=list(ARCHS), help="the random-init model's shape")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--response", type=int, default=1536)
    ap.add_argument("--rollout-tokens", type=int, default=0,
                    help="each step starts with a rollout of --batch prompts x this many new tokens, measured as its "
                         "own phase (0: updates only)")
    ap.add_argument("--rollout", action="store_true", help="also measure generation peaks (fp32 and bf16 weights)")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--kernel-impl", default="auto")
    ap.add_argument("--stop-at", type=float, default=None,
                    help="Unix time to stop at: no step starts that would end after it, a setting running then is "
                         "cut and keeps what it measured (gpu_check.py passes its part's end)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results; --quick: a temp dir)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.batch < 1 or a.prompt < 1 or a.response < 1 or a.rollout_tokens < 0:
        ap.error("--steps, --batch, --prompt and --response must be >= 1, --rollout-tokens >= 0")
    device = torch.device("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    cfg = TINY if a.quick else ARCHS[a.arch]
    if a.quick:
        a.batch, a.prompt, a.response, a.steps = 2, 16, 48, 2
        a.rollout_tokens = min(a.rollout_tokens, 8)
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
    for name in ("transformers", "peft"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    arch = "tiny" if a.quick else a.arch
    out_dir = a.out or (tempfile.mkdtemp(prefix="bench_memory_") if a.quick else
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    tag = "" if arch in ("tiny", "qwen2-1.5b") else f"{arch}-"
    stem = os.path.join(out_dir, f"memory-{tag}{slug}-{datetime.date.today().isoformat()}")
    rows, params = [], memory.model_shape(_qwen2_config(cfg)).params
    print(f"{env['device']}  torch {env['torch']}  torchao {env['torchao']}  git {env['git_sha']}  -> {stem}.*")
    _alarm.update(armed=False, fired=False)
    if a.stop_at is not None:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, a.stop_at - time.time()))
    for s in settings:
        if _alarm["fired"]:
            break
        row = {"setting": s, "level": SETTINGS[s], "arch": arch, "params": params}
        _alarm["armed"] = True
        try:
            bench_setting(s, cfg, a, device, row, a.stop_at)
        except OutOfTime:
            row["error"] = (f"cut at --stop-at after {row.get('steps', 0)} of {a.steps} steps"
                            + ("" if "build_s" in row else ", during the build"))
        except torch.OutOfMemoryError as err:
            row["error"] = f"OOM: {str(err).splitlines()[0][:160]}"
        except Exception as err:  # noqa: BLE001 - one rung's failure (torchao missing or broken) is its row's result
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(f"{s} FAILED:\n{traceback.format_exc()[-3000:]}", file=sys.stderr, flush=True)
        finally:
            _alarm["armed"] = False
        for phase in ("update", "rollout"):  # a setting cut at --stop-at too: what it measured against its estimate
            row[f"ratio_{phase}"] = _ratio(row.get(f"peak_{phase}_gib"), row.get(f"estimate_{phase}_gib"))
        cleanup(device)
        row.update(env, liger=not a.no_liger and device.type == "cuda")
        rows.append(row)
        append_record(stem + ".jsonl", row)
        print(json.dumps({k: row.get(k) for k in ("setting", "arch", "peak_rollout_gib", "estimate_rollout_gib",
                                                  "peak_update_gib", "estimate_update_gib", "step_s", "error")}),
              flush=True)
    if a.stop_at is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if a.rollout and not _alarm["fired"]:
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
            ".2f"), ("estimate GiB", "estimate_update_gib", ".2f"), ("x est.", "ratio_update", ".3f"),
            ("host GiB (est.)", "estimate_host_gib", ".2f"), ("step s (median)", "step_s", ".3f"),
            ("first step s", "first_step_s", ".2f"), ("error", "error", None)]
    update_rows = [r for r in rows if not r["setting"].startswith("rollout")]
    text = [f"# Memory settings, one SPPO update step: {env['device']}", "",
            f"{a.batch} x ({a.prompt} + {a.response}) tokens, {arch} shape (random init), {a.steps} steps; torch "
            f"{env['torch']}, torchao {env['torchao']}, transformers {env.get('transformers')}, peft {env['peft']}, "
            f"git {env['git_sha']}, {env['timestamp']}", "",
            markdown_table(update_rows, cols)]
    phased = [r for r in update_rows if r.get("rollout_tokens")]
    if phased:
        text += ["", f"Both phases of each step (rollout: {a.batch} prompts of {a.prompt} tokens x "
                     f"{a.rollout_tokens} new tokens, hf backend; measured/estimate in 'x est.'):", "",
                 markdown_table(phased, [("setting", "setting", None), ("LoRA rank", "lora_rank", None),
                                         ("weights GiB", "weights_gib", ".2f"),
                                         ("est. weights GiB", "estimate_weights_gib", ".2f"),
                                         ("rollout peak GiB", "peak_rollout_gib", ".2f"),
                                         ("est. GiB", "estimate_rollout_gib", ".2f"),
                                         ("x est.", "ratio_rollout", ".3f"),
                                         ("update peak GiB", "peak_update_gib", ".2f"),
                                         ("est. GiB ", "estimate_update_gib", ".2f"),
                                         ("x est. ", "ratio_update", ".3f"), ("rollout s", "rollout_s", ".2f"),
                                         ("rollout tok/s", "rollout_tok_per_s", ".0f"), ("update s", "step_s", ".2f"),
                                         ("build s", "build_s", ".1f"), ("steps", "steps", None),
                                         ("stopped", "stopped", None), ("rollout error", "rollout_error", None),
                                         ("error", "error", None)])]
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


def _qwen2_config(cfg):
    from transformers import Qwen2Config

    return Qwen2Config(**cfg)


if __name__ == "__main__":
    main()
