"""The memory planner's ESTIMATES (sppo_fast/memory.py) for real model shapes: no GPU, no download, no weights.

    python bench/bench_planner.py                       # prints, writes bench/results/planner-estimates-<date>.md
    python bench/bench_planner.py --out /tmp/x.md       # somewhere else
    python bench/bench_planner.py --models qwen2.5-1.5b --responses 1024 --budgets 24

For each model x response length x budget: an SPPO step of 64 prompts (one response each, 512-token prompts), the
rung make_plan's auto ladder picks, the micro_batch_tokens and gen_batch_size the budget holds (the trainer's
defaults asked for: 16384 tokens per micro-batch, the whole batch generated at once), and the estimated update and
rollout peaks. Then SPPO against PPO with a critic LLM on the qlora rung at the same sizes (the critic: its own NF4
copy of the base decoder with its own adapters, under the same fp32 value head), and their ratio.

Every number is a model of the allocator's live tensors (`memory.estimate`), not a measurement; bench/bench_memory.py
and bench/gpu_check.py measure the peaks on a GPU.
"""
import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sppo_fast import memory  # noqa: E402

# The models' own config.json values (Hugging Face hub, Qwen/Qwen2.5-1.5B, Qwen/Qwen2.5-7B, meta-llama/Llama-3.1-8B)
CONFIGS = {
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   tie_word_embeddings=False)),
}
PROMPTS, PROMPT_LEN = 64, 512  # prompts per step (SPPO: one response each), the longest prompt
MICRO_BATCH_TOKENS = 16384  # the trainer's default --micro-batch-tokens; the plan lowers it to what the budget holds
RESPONSES = (1024, 2048, 4096)
BUDGETS = (24, 40, 80)  # GiB


def config(name):
    from transformers import LlamaConfig, Qwen2Config
    kind, values = CONFIGS[name]
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**values)


def shapes(name):
    """(policy shape, shape with a critic LLM of the same architecture) from the config alone (meta device)."""
    cfg = config(name)
    return memory.model_shape(cfg), memory.model_shape(cfg, critic=True)


def sppo_plan(shape, response: int, budget_gib: float, level: str = "auto"):
    return memory.make_plan(shape, budget=f"{budget_gib}GiB", level=level, seq_len=PROMPT_LEN + response,
                            prompt_len=PROMPT_LEN, micro_batch_tokens=MICRO_BATCH_TOKENS, batch_sequences=PROMPTS)


def peak(est: dict) -> int:
    return max(est["update_peak"], est["rollout_peak"])


def plan_row(name, shape, response, budget_gib) -> dict:
    try:
        plan = sppo_plan(shape, response, budget_gib)
    except MemoryError:
        return {"model": name, "response": response, "budget_gib": budget_gib, "rung": "none fits"}
    e = plan.estimate
    return {"model": name, "response": response, "budget_gib": budget_gib, "rung": plan.level,
            "micro_batch_tokens": plan.micro_batch_tokens, "gen_batch_size": plan.gen_batch_size,
            "update_gib": e["update_peak"] / memory.GiB, "rollout_gib": e["rollout_peak"] / memory.GiB}


def ppo_row(name, shape, critic_shape, response, budget_gib=24) -> dict:
    """SPPO on the qlora rung at the sizes its plan holds within `budget_gib`, and PPO with a critic LLM estimated
    at exactly those sizes (same micro-batch, same generation batch)."""
    plan = sppo_plan(shape, response, budget_gib, level="qlora")
    ppo = memory.estimate(critic_shape, "qlora", micro_batch_tokens=plan.micro_batch_tokens,
                          seq_len=PROMPT_LEN + response, prompt_len=PROMPT_LEN, gen_batch_size=plan.gen_batch_size)
    ppo = {"update_peak": ppo.update_peak, "rollout_peak": ppo.rollout_peak}
    return {"model": name, "response": response, "micro_batch_tokens": plan.micro_batch_tokens,
            "gen_batch_size": plan.gen_batch_size, "sppo_gib": peak(plan.estimate) / memory.GiB,
            "ppo_gib": peak(ppo) / memory.GiB, "ppo_update_gib": ppo["update_peak"] / memory.GiB,
            "ratio": peak(plan.estimate) / peak(ppo)}


def render(plan_rows, ppo_rows) -> str:
    lines = ["| model | response | budget (GiB) | rung | micro_batch_tokens | gen_batch_size | update peak (GiB) "
             "| rollout peak (GiB) |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in plan_rows:
        if r["rung"] == "none fits":
            lines.append(f"| {r['model']} | {r['response']} | {r['budget_gib']} | none fits | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['response']} | {r['budget_gib']} | {r['rung']} | "
                         f"{r['micro_batch_tokens']} | {r['gen_batch_size']} | {r['update_gib']:.2f} | "
                         f"{r['rollout_gib']:.2f} |")
    lines += ["", "| model | response | micro_batch_tokens | gen_batch_size | SPPO peak (GiB) | PPO + critic peak "
              "(GiB) | SPPO / PPO |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in ppo_rows:
        lines.append(f"| {r['model']} | {r['response']} | {r['micro_batch_tokens']} | {r['gen_batch_size']} | "
                     f"{r['sppo_gib']:.2f} | {r['ppo_gib']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


NOTES = """Notes
- Every figure is `sppo_fast.memory.estimate`'s model of the CUDA allocator's live tensors at the peak of each phase
  (not the CUDA context): NO GPU has measured any of these rows. The pieces checked on CPU (tests/test_memory.py):
  the NF4 byte count equals a real torchao NF4Tensor's inner tensors (0.5157 B/param); the dequantization working
  set of F.linear on an NF4 weight (14 B per element of the largest linear, torch.profiler allocator events); the
  LoRA adapter count equals peft's all-linear trainable parameters (policy and feature-extraction critic); the qlora
  per-layer activation term is 11% above what autograd saves for one NF4 + peft layer under bf16 autocast.
- The ladder is the trainer's auto ladder: the first rung where one full-length sequence fits both phases, qlora
  only after every full-parameter rung failed. A full-parameter rung that fits with a small micro-batch is kept over
  qlora (e.g. Qwen2.5-7B at 40 GiB: offload with 6312 tokens per micro-batch).
- PPO rows: the critic is a second NF4 copy of the decoder (no lm_head) with its own rank-16 adapters, and its
  backbone's activations live beside the policy's in the same backward (the trainer's one forward/backward). The
  rollout side counts the critic's weights but not a separate critic scoring pass. The ratio depends on the sizes:
  it is update-dominated at 16384 tokens per micro-batch; where SPPO's peak is the rollout's (long responses, large
  KV caches), the ratio rises toward 1 because the KV cache is the same for both.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    ap.add_argument("--responses", default=",".join(map(str, RESPONSES)), help="response lengths in tokens")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="budgets in GiB")
    ap.add_argument("--out", default="", help="markdown file (default bench/results/planner-estimates-<date>.md)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in CONFIGS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {list(CONFIGS)}")
    responses = [int(x) for x in args.responses.split(",")]
    budgets = [float(x) if "." in x else int(x) for x in args.budgets.split(",")]
    plan_rows, ppo_rows = [], []
    for name in models:
        shape, critic_shape = shapes(name)
        for response in responses:
            plan_rows += [plan_row(name, shape, response, b) for b in budgets]
            ppo_rows.append(ppo_row(name, shape, critic_shape, response))
    table = render(plan_rows, ppo_rows)
    print(table)
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"planner-estimates-{datetime.date.today().isoformat()}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Memory planner ESTIMATES (no GPU measurement)\n\n`python bench/bench_planner.py "
                   f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                   f"SPPO, {PROMPTS} prompts x ({PROMPT_LEN}-token prompt + response), --micro-batch-tokens "
                   f"{MICRO_BATCH_TOKENS} asked, the whole batch generated at once asked; the plan lowers both to what "
                   f"the budget holds. PPO rows: the qlora rung's SPPO plan at 24 GiB, and PPO with a critic LLM "
                   f"estimated at the same sizes.\n\n{table}\n\n{NOTES}")
    print(f"wrote {out}")
    return plan_rows, ppo_rows


if __name__ == "__main__":
    main()
