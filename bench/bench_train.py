"""Training-step cost of SPPO against PPO and GRPO on one GPU: peak memory, value-function memory, seconds per step
(rollout / scoring / update), prompts/s and tokens/s, every algorithm on the same model and prompts.

    python bench/bench_train.py                                 # Qwen2-0.5B-style random-init model built in-script
    python bench/bench_train.py --model /models/Qwen2.5-0.5B    # a local HF model directory
    python bench/bench_train.py --arch qwen2-1.5b --batch-size 16 --grpo-prompts equal   # the 1.5B shape
    python bench/bench_train.py --batch-size 32 --max-new-tokens 1024 --steps 5
    python bench/bench_train.py --arch qwen2-1.5b --algos sppo,ppo --memory-plan 8bit   # <= 20 GiB settings, both
    python bench/bench_train.py --quick                         # CPU smoke test (< 90 s): tiny Qwen2, 1 step each

Algorithms (each in a fresh subprocess, so peak memory is per algorithm):
  sppo          SPPO, value head on the policy's own last-prompt-token state (Linear(H, 1))
  sppo_critic   SPPO with a separate scalar critic (the paper's design): a second decoder (a copy of the policy's
                initial weights) + Linear(H, 1) on its last prompt state
  ppo           PPO: a separate critic decoder with token values, GAE (gamma 1, lambda 0.95), value clipping
  grpo8         GRPO, G=8 responses per prompt, group-mean baseline, no value function
Equal samples per step by default: SPPO/PPO take --batch-size prompts x 1, GRPO --batch-size/8 prompts x 8
(`--grpo-prompts equal` gives GRPO --batch-size prompts x 8 instead).

The model: without --model, a random-init model with Qwen2-0.5B's architecture (hidden 896, 24 layers, 14 heads,
2 KV heads, MLP 4864, vocab 151936, tied embeddings) is written to a temp dir, bf16 safetensors, with the embedded
tiny model's character tokenizer (`sppo_fast.tiny.build_tokenizer`: 54 ids; the other 151882 embedding rows are
never fed in but are sampled from, so the lm_head does the full-vocab work). Random weights generate garbage, so the
response length is made fixed: the model's generation_config names an unused row (vocab_size - 1) as its only EOS,
which a near-uniform random model samples with probability ~1/151936 per token, so nearly every response runs to
--max-new-tokens (the measured mean length and finished fraction are reported). With --model, EOS is the model's
own: lengths vary, and the trainer has no --ignore-eos flag yet.

Measured per algorithm (steps after the first, which warms up Triton/CUDA, are the median):
  peak GiB            torch.cuda.max_memory_allocated over the whole training process (no eval: it is patched out)
  rollout/update peak the same, reset before each phase of every step
  value-fn memory     params + grads + optimizer states of the value function: params and grads from counts and
                      dtypes, states as the optimizer holds them after the run (8-bit states as codes + scales;
                      `value_fn_states` says "measured", or "assumed" = 2 states in the params' dtype where the
                      optimizer keeps them elsewhere, e.g. offload): SPPO = Linear(H, 1); SPPO critic / PPO = critic
                      decoder + head
  --memory-plan       passed to every algorithm (fp32 | ckpt | bf16 | 8bit | offload, sppo_fast/memory.py), so that
                      peaks compare at the same precision and optimizer; default: the trainer's (fp32 AdamW)
  extra peak vs SPPO  measured peak minus SPPO's: the separate critic's static memory plus its activations
  rollout/scoring/update s  from metrics.jsonl perf/*: scoring = reward + old-log-prob scoring (the latter only
                      with --num-minibatches > 1: the trainer's perf/score_s, timed without a device sync, so
                      on GPU the score/update split is approximate; their sum is exact)
  prompts/s, tokens/s prompts (response tokens) per second of rollout + scoring + update
Results: bench/results/train-<gpu>-<date>.{jsonl,md} (a temp dir with --quick; CPU timings there are no figures,
and CPU memory is never reported as GPU memory).
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/utils.py, when run as a script
from utils import git  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

ALGOS = {  # key: (label, trainer flags, group size)
    "sppo": ("SPPO (shared head)", ["--algo", "sppo"], 1),
    "sppo_critic": ("SPPO (separate critic)", ["--algo", "sppo"], 1),
    "ppo": ("PPO (critic, GAE)", ["--algo", "ppo"], 1),
    "grpo8": ("GRPO G=8", ["--algo", "grpo", "--group-size", "8"], 8),
}

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)
QWEN2_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)
ARCHS = {"qwen2-0.5b": QWEN2_05B, "qwen2-1.5b": QWEN2_15B}
QUICK_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rope_theta=10000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)


# ---------------------------------------------------------------------------------------------------------------------
def environment() -> dict:
    import torch
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    status = git("status", "--porcelain")
    return {"kind": "env", "device": torch.cuda.get_device_name() if cuda else "cpu",
            "gpu_mem_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "flash_attn": _has("flash_attn"), "liger_kernel": _has("liger_kernel"),
            "git_sha": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _has(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def build_random_model(out_dir: Path, config: dict, seed: int = 0) -> Path:
    """A random-init Qwen2 causal LM + the tiny model's char tokenizer, saved as a local HF model dir (bf16)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from sppo_fast.tiny import build_tokenizer

    tok = build_tokenizer(model_max_length=config["max_position_embeddings"])
    cfg = Qwen2Config(**config, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    # the only EOS is an embedding row no text maps to: a random model reaches it with probability ~1/vocab per token
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=config["vocab_size"] - 1,
                                               pad_token_id=tok.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"  # loads in transformers 4.x and 5.x alike (see sppo_fast.tiny)
    tc = json.loads(cfg_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tc, indent=2) + "\n")
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"built a random-init Qwen2 model ({n / 1e6:.1f}M params) in {out_dir}", flush=True)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# one algorithm, in a fresh subprocess
def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    import sppo_fast.checkpoint as checkpoint
    import sppo_fast.train as train
    from sppo_fast.cli import build_args
    from sppo_fast.metrics import read_metrics

    cuda = torch.cuda.is_available() and spec["device"] != "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    probe = {"rollout_peak": [], "update_peak": [], "before_train": None, "static": {}}

    # no evaluation, no checkpoint: the process measures training steps only
    train.evaluate = lambda *a, **k: ({}, None)  # (metrics, per-prompt rows)
    checkpoint.save = lambda *a, **k: None

    gen = train.generate

    def generate(*a, **k):
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
            if probe["before_train"] is None:
                probe["before_train"] = torch.cuda.memory_allocated()
        out = gen(*a, **k)
        if cuda:
            sync()
            probe["rollout_peak"].append(torch.cuda.max_memory_allocated())
        return out

    train.generate = generate
    Stepper = train.Stepper
    init, update = Stepper.__init__, Stepper.update

    def stepper_init(self, *a, **k):
        init(self, *a, **k)
        probe["stepper"] = self

    def stepper_update(self, *a, **k):
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        out = update(self, *a, **k)
        if cuda:
            sync()
            probe["update_peak"].append(torch.cuda.max_memory_allocated())
        return out

    Stepper.__init__, Stepper.update = stepper_init, stepper_update

    algo = ALGOS[spec["algo"]]
    G = algo[2]
    prompts = spec["batch_size"] // G if (G > 1 and spec["grpo_prompts"] == "samples") else spec["batch_size"]
    flags = ["--model", spec["model"], "--steps", str(spec["steps"]), "--batch-size", str(prompts),
             "--max-new-tokens", str(spec["max_new_tokens"]), "--eval-size", "8", "--eval-every", "0",
             "--save-every", "0", "--log-every", "1", "--no-tensorboard", "--no-progress", "--device", spec["device"],
             "--out-dir", spec["runs_dir"], "--run-name", spec["algo"], *algo[1], *spec["extra"]]
    if spec["algo"] == "sppo_critic":
        flags += ["--critic", spec["model"]]
    if spec.get("memory_plan"):
        flags += ["--memory-plan", spec["memory_plan"]]
    if spec["device"] == "cpu":
        flags += ["--threads", "1"]
    args = build_args(flags)
    t0 = time.perf_counter()
    result = train.main(args)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(result["run_dir"]) if "losses/policy" in r]
    measured = rows[1:] if len(rows) > 1 else rows  # step 1 warms up (Triton autotune, CUDA context, allocator)
    med = lambda xs: sorted(xs)[(len(xs) - 1) // 2] if xs else None
    # the trainer logs old-log-prob scoring (perf/score_s, num_minibatches > 1) apart from the update proper
    score_s = med([r["perf/score_s"] for r in measured])
    rollout = med([r["perf/rollout_s"] for r in measured])
    reward = med([r["perf/reward_s"] for r in measured])
    upd = med([r["perf/update_s"] for r in measured])
    step_s = med([r["perf/rollout_s"] + r["perf/reward_s"] + r["perf/score_s"] + r["perf/update_s"]
                  for r in measured])
    samples = prompts * G
    out = {"kind": "algo", "algo": spec["algo"], "label": algo[0], "device": spec["device"],
           "prompts_per_step": prompts, "samples_per_step": samples, "max_new_tokens": spec["max_new_tokens"],
           "steps": len(rows), "measured_steps": len(measured),
           "rollout_s": rollout, "scoring_s": reward + score_s, "reward_s": reward, "old_logp_score_s": score_s,
           "update_s": upd, "step_s": step_s,
           "prompts_per_s": prompts / step_s, "samples_per_s": samples / step_s,
           "tokens_per_s": med([r["perf/tokens_per_s"] for r in measured]),
           "response_len": med([r["rollout/response_len"] for r in measured]),
           "finished_frac": med([r["rollout/finished"] for r in measured]),
           "wall_s": wall, **(static_memory(probe["stepper"]) if "stepper" in probe else {}),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "rollout_peak_gib": max(probe["rollout_peak"]) / 2**30 if probe["rollout_peak"] else None,
           "update_peak_gib": max(probe["update_peak"]) / 2**30 if probe["update_peak"] else None,
           "before_train_gib": probe["before_train"] / 2**30 if probe["before_train"] is not None else None}
    for key in ("memory/rollout_peak_gib", "memory/update_peak_gib"):  # the trainer's own per-phase peaks (CUDA)
        vals = [r[key] for r in rows if key in r]
        out["trainer_" + key.split("/")[1]] = max(vals) if vals else None
    if cuda:  # whole-process peak: max over the phases (the phase resets cleared the counter)
        out["peak_gib"] = max(x for x in (out["peak_gib"], out["rollout_peak_gib"], out["update_peak_gib"]) if x)
    Path(spec["out_json"]).write_text(json.dumps(out))
    return 0


def _tensor_bytes(t) -> int:
    """Bytes of a state tensor; a tensor subclass (torchao's 8-bit state) as the sum of its inner tensors."""
    import torch

    if type(t) is torch.Tensor:
        return t.numel() * t.element_size()
    if isinstance(t, torch.Tensor) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return 0


def static_memory(stepper) -> dict:
    """Bytes of params + grads + optimizer states of the value function and of the policy (trainable parameters).
    States are read from the optimizer after the run (so an 8-bit plan counts its codes and scales); where the
    optimizer keeps them under other keys (offload's host copies) they are assumed: 2 per param in its dtype."""
    state = getattr(stepper.optimizer, "state", {})

    def count(modules):
        params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        b = sum(p.numel() * p.element_size() for p in params)
        found = [state[p] for p in params if p in state]
        if params and len(found) == len(params):
            states, how = sum(_tensor_bytes(v) for st in found for v in st.values()), "measured"
        else:
            states, how = 2 * b, "assumed"
        return n, 2 * b + states, how  # param + grad + states
    n_v, b_v, how_v = count([stepper.value_head, stepper.critic])
    n_p, b_p, how_p = count([stepper.policy])
    return {"value_params": n_v, "value_fn_gib": b_v / 2**30, "value_fn_bytes": b_v, "value_fn_states": how_v,
            "policy_params": n_p, "policy_static_gib": b_p / 2**30, "policy_states": how_p}


# ---------------------------------------------------------------------------------------------------------------------
def human(n_bytes):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes} B"


def fmt(x, f=".2f"):
    return "-" if x is None else format(x, f)


def write_markdown(path, env, o, rows, model_desc, targets):
    gpu = env["device"] != "cpu"
    L = [f"# Training-step cost — {env['device']} — {env['timestamp'][:10]}\n",
         f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers {env['transformers']}, "
         f"flash-attn {'yes' if env['flash_attn'] else 'no'}, liger {'yes' if env['liger_kernel'] else 'no'}; git "
         f"{env['git_sha']}{' (dirty tree)' if env['git_dirty'] else ''}.\n",
         f"Model: {model_desc}. Batch: {o.batch_size} samples per step "
         f"({'GRPO: batch/8 prompts x 8' if o.grpo_prompts == 'samples' else 'GRPO: batch prompts x 8'}), "
         f"max {o.max_new_tokens} new tokens, {o.steps} steps per algorithm (first = warm-up, median of the rest); "
         f"memory plan: {o.memory_plan or 'the trainer default'} (every algorithm); "
         f"extra trainer flags: {' '.join(o.extra) or 'none'}.\n"]
    if not gpu:
        L.append("**CPU smoke test: these timings are not figures, and no memory is reported (CPU memory is not GPU "
                 "memory).**\n")
    hdr = ["algorithm", "prompts×G", "resp len", "peak GiB", "rollout peak", "update peak", "value-fn memory (params)",
           "extra peak vs SPPO GiB", "rollout s", "scoring s", "update s", "step s", "prompts/s", "tokens/s"]
    L += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    base = next((r for r in rows if r.get("algo") == "sppo" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            L.append(f"| {r['label']} | error: {r['error'][:120]} |" + " |" * (len(hdr) - 2))
            continue
        extra = (r["peak_gib"] - base["peak_gib"]) if base and r["peak_gib"] is not None and base["peak_gib"] else None
        vf = f"{human(r['value_fn_bytes'])} ({r['value_params']:,})" if r.get("value_params") else "0 (none)"
        L.append("| " + " | ".join([
            r["label"], f"{r['prompts_per_step']}×{ALGOS[r['algo']][2]}", fmt(r["response_len"], ".0f"),
            fmt(r["peak_gib"]), fmt(r["rollout_peak_gib"]), fmt(r["update_peak_gib"]), vf, fmt(extra),
            fmt(r["rollout_s"], ".3f"), fmt(r["scoring_s"], ".3f"), fmt(r["update_s"], ".3f"), fmt(r["step_s"], ".3f"),
            fmt(r["prompts_per_s"]), fmt(r["tokens_per_s"], ".0f")]) + " |")
    L.append("")
    L.append("Columns: *peak GiB* `torch.cuda.max_memory_allocated` over the training process (weights, optimizer, "
             "rollout and update; evaluation is patched out); *rollout/update peak* the same, reset before each phase; "
             "*value-fn memory* params + grads + optimizer states of the value function (states as the optimizer "
             "holds them after the run) — SPPO: Linear(H,1); separate critic / PPO: critic decoder + head; *extra "
             "peak vs "
             "SPPO* measured peak minus SPPO's (the critic's static memory + its activations); *rollout s* generation; "
             "*scoring s* reward + old-log-prob scoring (the latter only when --num-minibatches > 1); *update s* "
             "forward + backward + optimizer; *step s* their sum; *prompts/s*, *tokens/s* prompts and response "
             "tokens per step second. Timings: median over steps 2..N.\n")
    if targets:
        L.append("## Targets\n")
        L += [f"- {t}" for t in targets]
        L.append("")
    Path(path).write_text("\n".join(L) + "\n")


def check_targets(rows) -> tuple[list, dict]:
    by = {r["algo"]: r for r in rows if "error" not in r}
    out, flags = [], {}
    s, p, g = by.get("sppo"), by.get("ppo"), by.get("grpo8")
    if s and p and s["peak_gib"] and p["peak_gib"]:
        ratio = s["peak_gib"] / p["peak_gib"]
        flags["peak_ratio_sppo_ppo"] = ratio
        out.append(f"SPPO peak ≤ 0.55× PPO's at equal batch: {s['peak_gib']:.2f} / {p['peak_gib']:.2f} GiB = "
                   f"{ratio:.3f} → **{'met' if ratio <= 0.55 else 'not met'}**")
    if s and p and p.get("value_fn_bytes"):
        ratio = s["value_fn_bytes"] / p["value_fn_bytes"]
        flags["value_fn_ratio_sppo_ppo"] = ratio
        out.append(f"value-function memory ≤ 1% of PPO's critic (params + grads + optimizer states): "
                   f"{s['value_fn_bytes'] / 2**10:.1f} KiB / {p['value_fn_bytes'] / 2**30:.2f} GiB = {ratio:.2e} → "
                   f"**{'met' if ratio <= 0.01 else 'not met'}**")
    if s and g:
        ratio = s["prompts_per_s"] / g["prompts_per_s"]
        flags["prompts_per_s_ratio_sppo_grpo8"] = ratio
        out.append(f"prompts/s ≥ 4× GRPO(G=8): {s['prompts_per_s']:.2f} / {g['prompts_per_s']:.2f} = {ratio:.2f}× → "
                   f"**{'met' if ratio >= 4 else 'not met'}**")
    return out, flags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="", help="local HF model dir (default: a random-init model of --arch)")
    ap.add_argument("--arch", default="qwen2-0.5b", choices=list(ARCHS),
                    help="architecture of the random-init model when no --model is given")
    ap.add_argument("--algos", default=",".join(ALGOS), help=f"comma list of {', '.join(ALGOS)}")
    ap.add_argument("--batch-size", type=int, default=64, help="samples per step (SPPO/PPO: prompts)")
    ap.add_argument("--grpo-prompts", choices=("samples", "equal"), default="samples",
                    help="samples: GRPO gets batch/8 prompts x 8 (equal samples); equal: batch prompts x 8")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4, help="steps per algorithm (the first is a warm-up)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: tiny random Qwen2, batch 8, 16 tokens, "
                                                         "1 step each, temp dir")
    ap.add_argument("--out", default="", help="output prefix (default bench/results/train-<gpu>-<date>)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per algorithm before it is killed")
    ap.add_argument("--memory-plan", default="", choices=("", "fp32", "ckpt", "bf16", "8bit", "offload"),
                    help="the trainer's --memory-plan for every algorithm (same precision and optimizer, so peaks "
                         "compare); default: the trainer's own")
    ap.add_argument("--train-arg", dest="extra", action="append", default=[],
                    help="extra trainer flag, repeatable, e.g. --train-arg=--gradient-checkpointing")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    o = ap.parse_args(argv)
    if o._worker:
        return worker(o._worker)
    import torch

    if o.quick:
        defaults = {"batch_size": 64, "max_new_tokens": 512, "steps": 4}  # quick's own, unless given explicitly
        for name, value in {"batch_size": 8, "max_new_tokens": 16, "steps": 1}.items():
            if getattr(o, name) == defaults[name]:
                setattr(o, name, value)
        o.device = "cpu" if o.device == "auto" else o.device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device
    if device == "cpu" and not o.quick:
        print("no CUDA device: running on CPU (timings only, no memory figures); use --quick for the smoke test",
              file=sys.stderr)
    algos = [a.strip() for a in o.algos.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALGOS]
    if bad:
        ap.error(f"unknown algorithm(s) {bad}; choose from {list(ALGOS)}")
    if o.grpo_prompts == "samples" and any(o.batch_size % ALGOS[a][2] for a in algos):
        ap.error("--batch-size must be a multiple of 8 for GRPO G=8 with --grpo-prompts samples")
    env = environment()
    if device == "cpu":
        env["device"] = "cpu"
    gpu_tag = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-").replace("nvidia-", "")
    date = datetime.date.today().isoformat()
    if o.quick or device == "cpu":
        prefix = Path(o.out) if o.out else Path(tempfile.mkdtemp(prefix="sppo_bench_train_quick-")) / f"train-cpu-{date}"
        if RESULTS.resolve() in prefix.resolve().parents and o.quick:
            raise SystemExit("--quick never writes to bench/results (smoke-test numbers are not figures)")
    else:
        prefix = Path(o.out) if o.out else RESULTS / f"train-{gpu_tag}-{date}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    jsonl, md = prefix.with_name(prefix.name + ".jsonl"), prefix.with_name(prefix.name + ".md")

    work = Path(tempfile.mkdtemp(prefix="sppo_bench_train-"))
    if o.model:
        model = str(Path(o.model).resolve())
        model_desc = f"{model}"
    else:
        cfg = QUICK_MODEL if o.quick else ARCHS[o.arch]
        t0 = time.perf_counter()
        model = str(build_random_model(work / "model", cfg))
        model_desc = (f"random-init Qwen2 ({'tiny quick config' if o.quick else o.arch + ' architecture'}: "
                      f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}), "
                      f"char tokenizer, EOS = unused row {cfg['vocab_size'] - 1} (fixed-length responses); built in "
                      f"{time.perf_counter() - t0:.0f} s")
    rows = []
    for algo in algos:
        spec = {"algo": algo, "model": model, "steps": o.steps, "batch_size": o.batch_size,
                "grpo_prompts": o.grpo_prompts, "max_new_tokens": o.max_new_tokens, "device": device,
                "extra": o.extra, "memory_plan": o.memory_plan, "runs_dir": str(work / "runs"),
                "out_json": str(work / f"{algo}.json")}
        spec_path = work / f"{algo}.spec.json"
        spec_path.write_text(json.dumps(spec))
        log_path = work / f"{algo}.log"
        t0 = time.perf_counter()
        envv = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)],
                                    cwd=work, stdout=log, stderr=subprocess.STDOUT, env=envv,
                                    timeout=o.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        out_json = Path(spec["out_json"])
        if rc == 0 and out_json.is_file():
            row = json.loads(out_json.read_text())
        else:
            tail = log_path.read_text()[-2000:]
            err = "out of memory" if "out of memory" in tail.lower() else f"exit {rc}"
            row = {"kind": "algo", "algo": algo, "label": ALGOS[algo][0], "error": err, "log_tail": tail}
            print(f"{algo} FAILED ({err}):\n{tail}", file=sys.stderr)
        row.update({k: v for k, v in env.items() if k != "kind"})
        row.update(model=model_desc, batch_size=o.batch_size, grpo_prompts=o.grpo_prompts, extra=o.extra,
                   memory_plan_flag=o.memory_plan or None)
        rows.append(row)
        with open(jsonl, "a") as f:  # at once: a later algorithm's crash or the caller's timeout keeps this row
            f.write(json.dumps(row) + "\n")
        print(f"{algo}: {time.perf_counter() - t0:.0f}s " + ("ok" if "error" not in row else row["error"]), flush=True)
    targets, ratios = check_targets(rows) if device != "cpu" else ([], {})
    with open(jsonl, "a") as f:
        if ratios:
            f.write(json.dumps({"kind": "targets", **ratios, "git_sha": env["git_sha"], "device": env["device"],
                                "timestamp": env["timestamp"]}) + "\n")
    write_markdown(md, env, o, rows, model_desc, targets)
    print(md.read_text())
    print(f"wrote {jsonl}\n      {md}")
    shutil.rmtree(work, ignore_errors=True)  # the random model dir is GBs
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
