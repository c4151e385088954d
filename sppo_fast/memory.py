"""The memory-constrained single-GPU mode (`--memory-budget 20GiB`): estimates, the plan, the optimizer, the report.

A plan is a rung of one ladder, each rung adding a saving on top of the previous one (the ladder is ordered by what
each saving costs in speed or precision, so the planner takes the first rung whose estimate fits):

  fp32     fp32 weights + torch AdamW (fp32 states), bf16 autocast           16 B/param + activations
  ckpt     + gradient checkpointing (recompute each decoder layer in backward: ~1/3 more backbone compute)
  bf16     + bf16 weights and grads; torchao AdamW with fp32 states and bf16 STOCHASTIC ROUNDING    12 B/param
  8bit     + 8-bit block-quantized AdamW states (torchao AdamW8bit), still stochastic rounding      ~6 B/param
  offload  bf16 weights/grads on the GPU, fp32 AdamW states on the host (torchao CPUOffloadOptimizer) ~4 B/param
  qlora    a frozen base: every decoder nn.Linear in NF4 (torchao, ~0.516 B/param), embeddings, norms and the
           lm_head bf16; fp32 LoRA adapters (rank --lora-rank, default 16) on every decoder linear and the fp32
           value head are all that train (torch AdamW); gradient checkpointing on            ~0.6 B/param
The last rung is not a full-parameter one: the auto ladder reaches it only when every full-parameter rung fails.

Why stochastic rounding (the precision rule of this mode): the spacing of bf16 numbers near 1.0 is 2^-8 = 0.0039,
so a plain AdamW step on bf16 weights, whose update is ~lr = 1e-6 per element, rounds back to the old weight and
is silently lost (measured: exactly 0 change over 10-20 steps for torch AdamW, tests/test_memory.py, and for
bitsandbytes 0.50.2's AdamW8bit on bf16 weights, run once by hand on CPU). Stochastic rounding rounds up with
probability (fraction / spacing), so the bf16 weight equals the fp32 trajectory in expectation; an fp32 master
copy would do the same but costs the 4 B/param this mode saves. torchao's optimizers implement it
(`bf16_stochastic_round=True`, documented in torchao's optim README); bitsandbytes' AdamW8bit has no such option.
On CPU (tests, the tiny demo) the step runs eagerly (`torch.compiler.set_stance("force_eager")`): torchao compiles
it per parameter shape, which costs more there than the whole run; on CUDA it stays compiled.

Two changes to torchao's classes (subclasses below, nothing patched): states that torchao keeps unquantized (all of
`_AdamW`'s, and 8-bit AdamW's small tensors) are fp32 rather than the parameter's bf16 (a bf16 second moment
cannot absorb its own 1e-3 EMA increments), and the learning rate stays a float in `param_groups` (torchao holds a
tensor there, which LR schedulers' state and the JSON checkpoint metadata do not expect) and becomes a tensor only
inside `step()`. `state_dict()` is plain: floats, fp32 tensors, and an 8-bit state as its uint8 codes and fp32
scales, so `sppo_fast.checkpoint` stores it in safetensors and a resumed run continues bit-exactly (checked on CPU:
the 8bit plan's step 3 after resuming at step 2 equals the uninterrupted run's).

Estimates are a model, not a measurement: the trainer logs the measured peaks per phase (`memory/rollout_peak_gib`,
`memory/update_peak_gib`, from torch.cuda.max_memory_allocated) beside them.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sppo_fast.kernels import DEFAULT_CHUNK_BYTES

GiB = 1 << 30
LEVELS = ("fp32", "ckpt", "bf16", "8bit", "offload", "qlora")
OPTIMIZERS = {  # plan level -> (optimizer name, weights dtype)
    "fp32": ("adamw", torch.float32), "ckpt": ("adamw", torch.float32), "bf16": ("adamw-sr", torch.bfloat16),
    "8bit": ("adamw8bit-sr", torch.bfloat16), "offload": ("offload-adamw-sr", torch.bfloat16),
    "qlora": ("adamw", torch.bfloat16)}  # torch AdamW on the fp32 adapters; bf16 = the frozen base's unquantized parts
DESCRIPTIONS = {
    "adamw": "torch AdamW, fp32 weights and states",
    "adamw-sr": "torchao AdamW, fp32 states, bf16 weights with stochastic rounding",
    "adamw8bit-sr": "torchao AdamW8bit (8-bit block-quantized states), bf16 weights with stochastic rounding",
    "offload-adamw-sr": "torchao CPUOffloadOptimizer: fp32 AdamW states on the host, bf16 weights with stochastic "
                        "rounding"}
RESERVE_FRACTION = 0.10  # of the budget, kept free: caching-allocator fragmentation and cuBLAS/kernel workspaces
QUANT_BLOCK = 256  # torchao AdamW8bit block size; tensors under 4096 elements (or not divisible) stay fp32
QUANT_MIN_SIZE = 4096
OFFLOAD_MIN_SIZE = 4096  # CPUOffloadOptimizer keeps tensors smaller than this (and their states) on the GPU
LORA_RANK_DEFAULT = 16  # the qlora rung's LoRA rank when --lora-rank is 0
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # torchao's NF4 defaults: a scaler per 64 elements, a factor per 256 scalers
# Peak bytes per element while torchao 0.18's NF4Tensor.get_original_weight dequantizes a weight to bf16 (what F.linear
# on an NF4 weight does in forward, and again in backward for dX): two int64 index tensors of n/2 (8 B/elem), the
# looked-up and the scaled halves in bf16 (4 B/elem), and the stacked bf16 result (2 B/elem), all alive at once.
# Measured 14.03 on CPU (torch.profiler's allocator events, tests/test_memory.py); the same eager ops run on CUDA.
NF4_DEQUANT_BYTES = 14


def nf4_bytes(numel: int, *, block_size: int = NF4_BLOCK, scaler_block_size: int = NF4_SCALER_BLOCK,
              dtype_bytes: int = 2) -> int:
    """Bytes of one weight of `numel` elements as torchao's NF4Tensor (quantized from `dtype_bytes` floats): its
    inner tensors are the packed 4-bit codes (uint8, 2 per byte), an int8 scaler per block, a factor per scaler
    block and one scaler mean in the source dtype, and the 16-entry code book in the source dtype."""
    blocks = math.ceil(numel / block_size)
    return (math.ceil(numel / 2) + blocks + dtype_bytes * math.ceil(blocks / scaler_block_size)
            + dtype_bytes + 16 * dtype_bytes)


def parse_bytes(text) -> int:
    """'20GiB', '20G' (binary), '20GB' (decimal), '512MiB', '1.5TiB' or a plain byte count -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (examples: 20GiB, 20G, 24GB, 512MiB)")
    number, prefix, binary, unit_b = m.groups()
    power = "KMGT".find(prefix.upper()) + 1 if prefix else 0
    base = 1000 if (unit_b and not binary and prefix) else 1024  # GB = 10^9 (as GPU spec sheets); G, GiB = 2^30
    return int(float(number) * base ** power)


# ---------------------------------------------------------------------------------------------------------------------
# The model's shape, from its config alone (before any weight is loaded: the plan picks the dtype to load in)
@dataclass
class ModelShape:
    numels: list  # element count of every parameter tensor of the causal LM
    frozen_numels: list  # LoRA: the frozen base tensors (then `numels` are the adapters); else empty
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    critic_numels: list = field(default_factory=list)  # a separate critic LLM's decoder (PPO / --critic)
    linears: list = field(default_factory=list)  # (in, out) of every decoder nn.Linear (not the output head)
    critic_linears: list = field(default_factory=list)  # the same for the critic's decoder
    lora_rank: int = 0  # the rank `numels` were counted with (0: full-parameter)

    @property
    def params(self) -> int:
        return sum(self.numels) + sum(self.frozen_numels)

    @property
    def base_params(self) -> int:
        """The causal LM's own parameters (without any LoRA adapters)."""
        return sum(self.frozen_numels) if self.frozen_numels else sum(self.numels)

    def adapter_params(self, rank: int, critic: bool = False) -> int:
        """peft "all-linear" LoRA at `rank`: A [r, in] and B [out, r] on every decoder linear."""
        return rank * sum(i + o for i, o in (self.critic_linears if critic else self.linears))

    @property
    def trainable(self) -> int:
        return sum(self.numels) + sum(self.critic_numels)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache: keys and values (2) for every layer, kv_heads x head_dim each."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def model_shape(config, *, lora_rank: int = 0, critic: bool = False) -> ModelShape:
    """Parameter tensors of the causal LM described by `config` (a transformers config or a model directory),
    counted on the meta device: exact for any architecture, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, (str, Path)):
        from sppo_fast.model import check_model_dir
        config = AutoConfig.from_pretrained(str(check_model_dir(config)))  # the loader's clear errors, first
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    numels = [p.numel() for p in model.parameters()]  # tied weights appear once
    head = model.get_output_embeddings()
    # peft "all-linear" and the NF4 base (sppo_fast/quant.py) both take every nn.Linear but the output head
    linears = [(m.in_features, m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    frozen = []
    if lora_rank > 0:  # every such linear gets A [r, in] and B [out, r]
        frozen, numels = numels, [lora_rank * (i + o) for i, o in linears]
    critic_numels, critic_linears = [], []
    if critic:  # the critic is the decoder only (AutoModel): no lm_head unless it is tied to the embeddings
        decoder = model.get_decoder()
        critic_numels = [p.numel() for p in decoder.parameters()]
        critic_linears = [(m.in_features, m.out_features) for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
    return ModelShape(numels, frozen, text.num_hidden_layers, text.hidden_size, text.intermediate_size, heads,
                      getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size, critic_numels,
                      linears, critic_linears, lora_rank)


# ---------------------------------------------------------------------------------------------------------------------
# The estimate
@dataclass
class Estimate:
    """Bytes of each term, per phase. Resident terms live in both phases; grads are freed after each optimizer step
    (the trainer sets them to None), so the rollout never holds them."""
    level: str
    optimizer: str
    weights: int
    grads: int
    optimizer_states: int  # on the GPU
    optimizer_host: int  # offload: states + pinned param/grad copies in host RAM
    activations: int  # update phase, one micro-batch of `micro_batch_tokens`
    head_workspace: int  # update phase: the fused log-prob backward's fp32 dW [V, H] and dX [N, H]
    kv_cache: int  # rollout phase, gen_batch_size sequences of seq_len tokens
    rollout_transient: int  # rollout phase: next-token logits/probs [B, V] fp32, one layer's prefill activations
    micro_batch_tokens: int
    gen_batch_size: int
    seq_len: int
    kv_bytes_per_token: int
    # qlora: the NF4 part of `weights` (codes + scalers, policy and critic), the trainable adapter parameters (policy
    # and critic), their rank, and the working set of dequantizing the largest linear (both phases: every forward,
    # and the backward's dX, rebuild one dense weight at a time)
    nf4_weights: int = 0
    adapter_params: int = 0
    lora_rank: int = 0
    dequant_transient: int = 0

    @property
    def update_peak(self) -> int:
        return (self.weights + self.grads + self.optimizer_states + self.activations + self.head_workspace
                + self.dequant_transient)

    @property
    def rollout_peak(self) -> int:
        return self.weights + self.optimizer_states + self.kv_cache + self.rollout_transient + self.dequant_transient


def _bytes_of(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _optimizer_bytes(numels, optimizer: str) -> tuple[int, int]:
    """(GPU bytes, host bytes) of the AdamW states (exp_avg + exp_avg_sq) for these parameter tensors."""
    gpu = host = 0
    for n in numels:
        if optimizer == "adamw8bit-sr" and n >= QUANT_MIN_SIZE and n % QUANT_BLOCK == 0:
            gpu += 2 * (n + 4 * (n // QUANT_BLOCK))  # 1 byte per element + an fp32 scale per block, two states
        elif optimizer == "offload-adamw-sr" and n >= OFFLOAD_MIN_SIZE:
            host += 8 * n + 2 * 2 * n  # fp32 states + pinned bf16 param and grad copies
        else:
            gpu += 8 * n
    return gpu, host


def activation_bytes_per_token(shape: ModelShape, *, weight_bytes: int, compute_bytes: int, autocast: bool,
                               checkpointing: bool, lora_rank: int = 0) -> tuple[int, int]:
    """(bytes kept per token for the whole backbone, bytes of one layer's full activations per token).

    Per decoder layer and token, saved for backward (Llama/Qwen2-style block, SDPA or flash attention: no S^2 term):
      attention: RMSNorm input (residual dtype) + its output (+2 more casts under autocast of fp32 weights, one per
                 q/k/v projection) + q, k, v + rotated q, k + attention output (compute dtype)
      MLP:       RMSNorm input + output (+1 cast) + gate, up, act(gate) and act(gate)*up (compute dtype)
    The residual stream keeps the weights' dtype (autocast casts matmul inputs, not the residual adds).
    With checkpointing only each layer's input is kept, and one layer is rebuilt at a time in backward.
    lora_rank > 0 (the qlora rung: a frozen base under fp32 peft adapters): the frozen linear saves no input, but
    peft casts each linear's input to the adapter's fp32 and autocast casts it back, so every adapted linear saves a
    copy of its own input (q, k, v: three; gate, up: two; down's stands in for the act*up the frozen down_proj no
    longer saves) and its [T, r] intermediate. Checked against autograd's saved tensors of one NF4 + peft layer
    under CPU bf16 autocast (tests/test_memory.py): the term is ~11% above them (H 256, I 1024).
    """
    r, a, h, kvd = weight_bytes, compute_bytes, shape.hidden, shape.kv_heads * shape.head_dim
    # fp32 weights under bf16 autocast: a cast per projection; LoRA adapters: a copy per adapted projection
    cast = (autocast and weight_bytes != compute_bytes) or lora_rank > 0
    # RMSNorm keeps its input and normalised output (2 r h); each projection its (cast) input
    attn = 2 * r * h + (3 if cast else 1) * a * h + a * (h + 2 * kvd) + 2 * a * h  # + rotated q/k, v; out, o_proj in
    mlp = 2 * r * h + (2 if cast else 1) * a * h + 4 * a * shape.intermediate  # gate, up, act(gate), act*up
    per_layer = attn + mlp
    if lora_rank > 0:
        per_layer += a * lora_rank * len(shape.linears) // max(1, shape.layers)
    if checkpointing:
        return shape.layers * h * r, per_layer
    return shape.layers * per_layer, 0


def qlora_rank(shape: ModelShape, lora_rank: int = 0) -> int:
    """The qlora rung's LoRA rank: --lora-rank as given (to make_plan, or to model_shape), else the default."""
    if lora_rank and shape.lora_rank and lora_rank != shape.lora_rank:
        raise ValueError(f"lora_rank {lora_rank} differs from the rank the model shape was counted with "
                         f"({shape.lora_rank})")
    return lora_rank or shape.lora_rank or LORA_RANK_DEFAULT


def _qlora_weights(shape: ModelShape, rank: int) -> tuple[int, int, list]:
    """(NF4 bytes, bf16 bytes, trainable fp32 tensors' numels) of the qlora rung: the policy's decoder linears in NF4
    and its other parameters (embeddings, norms, biases, the lm_head) in bf16; a critic (PPO / --critic) is its own
    NF4 copy of the decoder (no lm_head) with its own adapters; one fp32 value head Linear(H, 1) reads either."""
    nf4 = dense = 0
    trainable = [shape.hidden, 1]  # the shared value head
    parts = [(shape.linears, shape.base_params)] + ([(shape.critic_linears, sum(shape.critic_numels))]
                                                    if shape.critic_numels else [])
    for linears, params in parts:
        nf4 += sum(nf4_bytes(i * o) for i, o in linears)
        dense += 2 * (params - sum(i * o for i, o in linears))
        trainable += [n for i, o in linears for n in (rank * i, rank * o)]  # A [r, in], B [out, r]
    return nf4, dense, trainable


def estimate(shape: ModelShape, level: str, *, micro_batch_tokens: int, seq_len: int, gen_batch_size: int,
             prompt_len: int | None = None, cuda: bool = True, kernel_impl: str = "auto",
             lora_rank: int = 0) -> Estimate:
    """Bytes per term for one plan level. seq_len: the longest prompt + response (max_prompt_tokens +
    max_new_tokens); prompt_len: the longest prompt (default seq_len); micro_batch_tokens: prompt+response tokens
    per update forward; gen_batch_size: sequences generated at once (their KV cache grows to seq_len tokens each);
    lora_rank: the qlora rung's rank (0: --lora-rank as model_shape counted it, else LORA_RANK_DEFAULT)."""
    prompt_len = seq_len if prompt_len is None else prompt_len
    optimizer, wdtype = OPTIMIZERS[level]
    wb = _bytes_of(wdtype)
    qlora = level == "qlora"
    lora = bool(shape.frozen_numels) or qlora
    rank = nf4 = dequant = 0
    if qlora:
        rank = qlora_rank(shape, lora_rank)
        nf4, dense, trainable = _qlora_weights(shape, rank)
        weights, grads = nf4 + dense + 4 * sum(trainable), 4 * sum(trainable)
        # F.linear on an NF4 weight rebuilds the dense weight, one linear at a time (forward, and backward's dX)
        dequant = NF4_DEQUANT_BYTES * max((i * o for i, o in shape.linears + shape.critic_linears), default=0)
    else:
        trainable = shape.numels + shape.critic_numels
        # LoRA adapters stay fp32 (peft's default), whatever the frozen base's dtype
        tb = 4 if lora else wb
        weights = sum(shape.frozen_numels) * wb + sum(trainable) * tb
        grads = sum(trainable) * tb
    opt_gpu, opt_host = _optimizer_bytes(trainable, optimizer)
    ckpt = level != "fp32"
    cb = 2 if cuda else wb  # bf16 autocast on CUDA; CPU computes in the weights' dtype
    kept, layer = activation_bytes_per_token(shape, weight_bytes=wb, compute_bytes=cb, autocast=cuda,
                                             checkpointing=ckpt, lora_rank=rank)
    n_backbones = 2 if shape.critic_numels else 1
    # kept for the whole micro-batch, plus (checkpointing) one layer rebuilt with its grads in flight (x2), plus the
    # flat hidden states, their response-row gather and dX in fp32 (~4 x [T, H] x 4 bytes)
    per_token = n_backbones * (kept + 2 * layer) + 4 * shape.hidden * 4
    activations = micro_batch_tokens * per_token
    vh = shape.vocab * shape.hidden
    # fp32 dW accumulator, then its cast to the grad dtype (none for LoRA: the kernel skips dW of a frozen head)
    head_workspace = 0 if lora else vh * 4 + (0 if wb == 4 else vh * wb)
    if kernel_impl != "triton":  # the chunked impls' (auto's) [C, V] scratch: their chunk budget, or less at small N
        head_workspace += min(DEFAULT_CHUNK_BYTES["cuda" if cuda else "cpu"], micro_batch_tokens * shape.vocab * 8)
    kv_tok = shape.kv_bytes_per_token(wb)  # generate runs outside autocast: the cache has the weights' dtype
    # DynamicCache grows by concatenation: one layer's old and new tensors coexist for a moment (1 + 1/L)
    kv_cache = math.ceil(gen_batch_size * seq_len * kv_tok * (1 + 1 / shape.layers))
    # per sequence: next-token logits, warped scores, probs and the sampler's copy in fp32 [V]; and the prefill,
    # which runs the whole prompt through one layer at a time (hidden-sized and 3 MLP-sized temporaries)
    rollout_transient = gen_batch_size * (4 * shape.vocab * 4
                                          + prompt_len * (4 * shape.hidden + 3 * shape.intermediate) * wb)
    adapters = sum(trainable) - shape.hidden - 1 if qlora else 0  # the value head is not an adapter
    return Estimate(level, optimizer, weights, grads, opt_gpu, opt_host, activations, head_workspace, kv_cache,
                    rollout_transient, micro_batch_tokens, gen_batch_size, seq_len, kv_tok, nf4, adapters, rank,
                    dequant)


# ---------------------------------------------------------------------------------------------------------------------
# The plan: the first rung of the ladder that fits the budget, with micro-batch and generation sizes from it
@dataclass
class Plan:
    level: str
    optimizer: str
    weights_dtype: str  # "float32" | "bfloat16"
    gradient_checkpointing: bool
    micro_batch_tokens: int
    gen_batch_size: int  # 0 = the whole batch at once
    budget: int | None  # bytes, or None (no budget)
    usable: int | None  # budget minus the reserve
    estimate: dict  # Estimate fields + update_peak / rollout_peak
    ladder: list  # every rung considered: level, update_peak, rollout_peak (one sequence), fits
    quantize: str = ""  # "nf4" on the qlora rung (the frozen base's format, sppo_fast/quant.py), else ""
    lora_rank: int = 0  # the run's LoRA rank: the qlora rung's (--lora-rank or LORA_RANK_DEFAULT), else --lora-rank

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.weights_dtype)


def _fits(shape, level, usable, seq_len, prompt_len, cuda, kernel_impl, lora_rank=0):
    one = estimate(shape, level, micro_batch_tokens=seq_len, seq_len=seq_len, gen_batch_size=1, prompt_len=prompt_len,
                   cuda=cuda, kernel_impl=kernel_impl, lora_rank=lora_rank)
    return one, one.update_peak <= usable and one.rollout_peak <= usable


def max_gen_batch(shape, level, usable, seq_len, prompt_len=None, cuda=True, kernel_impl="auto", lora_rank=0) -> int:
    """How many sequences of seq_len tokens generate at once within `usable` bytes (0 if not even one)."""
    kw = dict(micro_batch_tokens=seq_len, seq_len=seq_len, prompt_len=prompt_len, cuda=cuda, kernel_impl=kernel_impl,
              lora_rank=lora_rank)
    base = estimate(shape, level, gen_batch_size=0, **kw)
    one = estimate(shape, level, gen_batch_size=1, **kw)
    per_seq = one.rollout_peak - base.rollout_peak
    return max(0, (usable - base.rollout_peak) // per_seq)


def max_micro_batch_tokens(shape, level, usable, seq_len, cuda=True, kernel_impl="auto", lora_rank=0) -> int:
    """The most prompt+response tokens one update forward can hold within `usable` bytes. Activations are linear in
    the tokens; the chunked log-prob impls' [C, V] scratch grows with them only until their chunk budget caps it, so
    the token count is solved in both regimes (before: the scratch's per-token slope was taken as if it never
    capped, which cut the micro-batch of a large-vocabulary model by up to ~60%)."""
    kw = dict(seq_len=seq_len, gen_batch_size=1, cuda=cuda, kernel_impl=kernel_impl, lora_rank=lora_rank)
    zero = estimate(shape, level, micro_batch_tokens=0, **kw)
    one = estimate(shape, level, micro_batch_tokens=1, **kw)
    base = zero.update_peak  # no scratch at 0 tokens
    per_token = one.activations - zero.activations
    scratch_per_token = one.head_workspace - zero.head_workspace  # 0 with impl triton
    cap = estimate(shape, level, micro_batch_tokens=1 << 40, **kw).head_workspace - zero.head_workspace
    growing = max(0, (usable - base) // (per_token + scratch_per_token))
    if scratch_per_token == 0 or growing * scratch_per_token < cap:
        return growing
    return max(growing, (usable - base - cap) // per_token)


def make_plan(shape: ModelShape, *, budget=None, level: str = "auto", seq_len: int, micro_batch_tokens: int,
              gen_batch_size: int = 0, batch_sequences: int, prompt_len: int | None = None,
              gradient_checkpointing: bool = False, cuda: bool = True, kernel_impl: str = "auto",
              lora_rank: int = 0) -> Plan:
    """Choose the plan. budget: bytes or a string ('20GiB') or None; level: 'auto' or one of LEVELS; lora_rank:
    --lora-rank (0: full-parameter rungs; the qlora rung then takes LORA_RANK_DEFAULT).

    Without a budget: level 'auto' is today's default (fp32, or ckpt with --gradient-checkpointing) and the sizes
    are the user's. With one: 'auto' takes the first rung where one full-length sequence fits both phases (qlora only
    after every full-parameter rung failed); then micro_batch_tokens and gen_batch_size are lowered (never raised)
    to what the budget holds. A budget that holds no sequence even on the last rung (or on a forced one) is an error
    that says what each phase needs and what to change."""
    if level != "auto" and level not in LEVELS:
        raise ValueError(f"--memory-plan must be auto or one of {LEVELS}, got {level!r}")
    if level == "offload" and not cuda:
        raise ValueError("--memory-plan offload needs a CUDA device (torchao's CPUOffloadOptimizer moves the states "
                         "from the GPU to the host; on a CPU-only run there is nothing to offload)")
    rank = qlora_rank(shape, lora_rank)  # checks that the shape and the flag agree
    budget = parse_bytes(budget) if budget not in (None, "", 0) else None
    usable = None if budget is None else int(budget * (1 - RESERVE_FRACTION))
    if level == "auto":  # offload has nothing to offload to without CUDA; qlora (NF4 on CPU too) stays
        candidates = [lv for lv in LEVELS if cuda or lv != "offload"]
    else:
        candidates = [level]
    if level == "auto" and gradient_checkpointing:
        candidates = [c for c in candidates if c != "fp32"]
    ladder, chosen = [], None
    for lv in candidates:
        if usable is None:
            chosen = lv
            break
        one, ok = _fits(shape, lv, usable, seq_len, prompt_len, cuda, kernel_impl, rank)
        ladder.append({"level": lv, "update_peak": one.update_peak, "rollout_peak_1seq": one.rollout_peak, "fits": ok})
        if ok:
            chosen = lv
            break
    if chosen is None:
        raise MemoryError(_nothing_fits(shape, candidates[-1], budget, usable, seq_len, prompt_len, cuda, kernel_impl,
                                        rank, lora_rank))
    ckpt = chosen != "fp32" or gradient_checkpointing
    mbt, gbs = micro_batch_tokens, gen_batch_size
    if usable is not None:
        mbt = min(micro_batch_tokens, max_micro_batch_tokens(shape, chosen, usable, seq_len, cuda, kernel_impl, rank))
        fit = max_gen_batch(shape, chosen, usable, seq_len, prompt_len, cuda, kernel_impl, rank)
        want = gen_batch_size or batch_sequences
        gbs = min(want, fit)
    kw = dict(micro_batch_tokens=mbt, seq_len=seq_len, gen_batch_size=gbs or batch_sequences, prompt_len=prompt_len,
              cuda=cuda, kernel_impl=kernel_impl, lora_rank=rank)
    est = estimate(shape, chosen, **kw)
    if chosen == "fp32" and ckpt:  # --gradient-checkpointing without a plan: estimate it as such
        est = estimate(shape, "ckpt", **kw)
        est.level = "fp32"
    optimizer, wdtype = OPTIMIZERS[chosen]
    est_dict = asdict(est) | {"update_peak": est.update_peak, "rollout_peak": est.rollout_peak}
    qlora = chosen == "qlora"
    return Plan(chosen, optimizer, str(wdtype).removeprefix("torch."), ckpt, mbt, gbs, budget, usable, est_dict,
                ladder, "nf4" if qlora else "", rank if qlora else lora_rank)


def _nothing_fits(shape, level, budget, usable, seq_len, prompt_len, cuda, kernel_impl, rank, lora_rank) -> str:
    """The MemoryError's text: what one sequence needs in each phase on the lightest rung tried, and what to change."""
    e = estimate(shape, level, micro_batch_tokens=seq_len, seq_len=seq_len, gen_batch_size=1, prompt_len=prompt_len,
                 cuda=cuda, kernel_impl=kernel_impl, lora_rank=rank)
    g = lambda b: f"{b / GiB:.2f}"
    if level == "qlora":
        weights = (f"weights {g(e.weights)} (NF4 base {g(e.nf4_weights)}, {e.adapter_params / 1e6:.1f}M fp32 LoRA "
                   f"params at rank {rank})")
    else:
        weights = f"weights {g(e.weights)}"
    need = max(e.update_peak, e.rollout_peak) / (1 - RESERVE_FRACTION)
    if level == "qlora":
        lighter = f"lower --lora-rank (now {rank})"
    elif lora_rank:
        lighter = "use --memory-plan qlora (a 4-bit NF4 base under the LoRA adapters)"
    else:
        lighter = f"use --memory-plan qlora (a 4-bit NF4 base with rank-{LORA_RANK_DEFAULT} LoRA adapters)"
    return (f"--memory-budget {budget / GiB:.2f} GiB ({usable / GiB:.2f} GiB usable after a {RESERVE_FRACTION:.0%} "
            f"reserve) cannot hold even one sequence of {seq_len} tokens (--max-prompt-tokens + --max-new-tokens) "
            f"with the lightest plan tried ({level}): the update needs ~{g(e.update_peak)} GiB ({weights}, grads "
            f"{g(e.grads)}, optimizer {g(e.optimizer_states)}, activations {g(e.activations)}, log-prob head "
            f"{g(e.head_workspace)}" + (f", NF4 dequantization {g(e.dequant_transient)}" if e.dequant_transient else "")
            + f"), the rollout ~{g(e.rollout_peak)} GiB (KV cache {e.kv_cache / GiB:.3f}, sampling + prefill "
            f"{g(e.rollout_transient)}). --micro-batch-tokens and --gen-batch-size are already lowered "
            f"automatically, down to one sequence. To fit: raise --memory-budget to ~{need / GiB:.1f} GiB or more, "
            f"shorten --max-new-tokens / --max-prompt-tokens, {lighter}, or use a smaller model.")


# ---------------------------------------------------------------------------------------------------------------------
# The optimizer
def _require_torchao():
    try:
        import torchao.optim  # noqa: F401
    except ImportError as err:
        raise ImportError("bf16 weights with stochastic rounding, 8-bit states and offload use torchao: "
                          "pip install 'torchao>=0.18' (or pip install -e '.[memory]' in the checkout)") from err


def _plain_state_dict(sd: dict) -> dict:
    """A torchao optimizer's state dict with plain tensors only: a quantized state is stored as its own parts
    ('exp_avg.codes' uint8, 'exp_avg.scale' fp32; the constant code map is rebuilt on load), so a reload is
    bit-exact."""
    def parts(key, value):
        if type(value) is torch.Tensor or not isinstance(value, torch.Tensor):
            return {key: value}
        names, _ = value.__tensor_flatten__()
        return {f"{key}.{name}": getattr(value, name) for name in names if name != "qmap"}

    # new dicts: the packed per-param dicts are the optimizer's live state objects
    sd["state"] = {pid: {k2: v2 for k, v in st.items() for k2, v2 in parts(k, v).items()}
                   for pid, st in sd["state"].items()}
    return sd


def _restore_states(opt, saved: dict) -> None:
    """After torch's load_state_dict (which cast every state to its param's dtype): rebuild each Adam state from the
    saved dict `saved` ({param id: state}) at full precision, or from a quantized state's parts; lr back to floats."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for pid, st in saved.items():
        p, state = params[pid], opt.state[params[pid]]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            own = {k[len(key) + 1:]: v for k, v in st.items() if k.startswith(key + ".")}
            if key not in st and not own:
                continue
            buf = opt._new_buffer(p, key == "exp_avg")
            if own:  # a quantized state's parts
                for name, value in own.items():
                    getattr(buf, name).copy_(value.to(p.device))
                    state.pop(f"{key}.{name}", None)
            else:
                buf.copy_(st[key].to(device=p.device, dtype=torch.float32))
            state[key] = buf
    for group in opt.param_groups:
        group["lr"] = float(group["lr"])


@functools.lru_cache(maxsize=None)
def _torchao_classes():
    """The torchao optimizers with fp32 unquantized states, float learning rates and plain state dicts."""
    _require_torchao()
    from torchao.optim import AdamW8bit, CPUOffloadOptimizer, _AdamW

    class _Portable:
        def add_param_group(self, param_group):
            lr = param_group.get("lr", self.defaults["lr"])
            super().add_param_group(param_group)
            # torchao made it an fp32 tensor; schedulers and checkpoints want the float as given
            self.param_groups[-1]["lr"] = float(lr)

        def _new_buffer(self, p, signed):
            out = super()._new_buffer(p, signed)
            # unquantized states default to the param's dtype: keep them fp32 (a bf16 second moment cannot take
            # its own (1 - beta2) = 1e-3 relative EMA steps, which are below half a bf16 ulp)
            return out.float() if type(out) is torch.Tensor and out.dtype != torch.float32 else out

        @torch.no_grad()
        def step(self, closure=None):
            # torchao's compiled step takes lr as a tensor, so a changing lr never recompiles it
            lrs = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            # On CPU (tests, the tiny demo) the same update runs eagerly: torchao compiles it once per parameter
            # shape, which costs more on 2 CPU cores than the eager steps of a whole run (and needs a C++ compiler).
            on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
            try:
                with torch.compiler.set_stance("force_eager") if on_cpu else contextlib.nullcontext():
                    return super().step(closure)
            finally:
                for group, lr in zip(self.param_groups, lrs):
                    group["lr"] = lr

        def state_dict(self):
            return _plain_state_dict(super().state_dict())

        def load_state_dict(self, state_dict):
            saved = {int(pid): dict(st) for pid, st in state_dict["state"].items()}
            super().load_state_dict(state_dict)  # casts states to the param dtype: rebuilt below at full precision
            _restore_states(self, saved)

    class AdamWSR(_Portable, _AdamW):
        """AdamW, fp32 states, bf16 params updated with stochastic rounding (fp32 params: plain AdamW)."""

    class AdamW8bitSR(_Portable, AdamW8bit):
        """AdamW with 8-bit block-quantized states, bf16 params updated with stochastic rounding."""

    class OffloadAdamWSR(CPUOffloadOptimizer):
        """CPUOffloadOptimizer over AdamWSR: fp32 states and the update on the host, bf16 weights on the GPU.

        Grads are copied to the host as each one is accumulated (torchao's backward hooks, on a side stream):
        `params_for_clipping` waits for those copies, so clipping and the NaN check see the host grads that the
        step uses. state_dict() is one flat torch-style dict (the checkpoint's format), not torchao's nested one."""

        def __init__(self, params, **kwargs):
            super().__init__(params, optimizer_class=AdamWSR, offload_gradients=False, **kwargs)

        def _inner(self):
            return list(self.optim_dict.values()) + ([self.d_opt] if self.d_opt is not None else [])

        def wait_for_grads(self):
            for event in self.queue.values():
                event.synchronize()

        def zero_grad(self, set_to_none=True):
            self.wait_for_grads()
            self.queue.clear()
            super().zero_grad(set_to_none=True)

        def state_dict(self):
            return merge_state_dicts([opt.state_dict() for opt in self._inner()])

        def load_state_dict(self, state_dict):
            inner = self._inner()
            for opt, sd in zip(inner, split_state_dict(state_dict, [len(opt.param_groups) for opt in inner])):
                opt.load_state_dict(sd)

    return AdamWSR, AdamW8bitSR, OffloadAdamWSR


def merge_state_dicts(state_dicts: list) -> dict:
    """Several optimizers' state dicts -> one torch-style dict (param ids renumbered in order)."""
    state, groups, base = {}, [], 0
    for sd in state_dicts:
        for group in sd["param_groups"]:
            groups.append({**group, "params": [base + i for i in group["params"]]})
        for pid, st in sd["state"].items():
            state[base + int(pid)] = st
        base += sum(len(group["params"]) for group in sd["param_groups"])
    return {"state": state, "param_groups": groups}


def split_state_dict(state_dict: dict, group_counts: list) -> list:
    """Inverse of merge_state_dicts, given how many param groups each optimizer has."""
    out, groups, state = [], list(state_dict["param_groups"]), {int(k): v for k, v in state_dict["state"].items()}
    for count in group_counts:
        mine, groups = groups[:count], groups[count:]
        ids = [i for group in mine for i in group["params"]]
        local = {pid: n for n, pid in enumerate(ids)}
        out.append({"param_groups": [{**g, "params": [local[i] for i in g["params"]]} for g in mine],
                    "state": {local[pid]: state[pid] for pid in ids if pid in state}})
    return out


def build_optimizer(param_groups: list, optimizer: str, device: torch.device, *, betas=(0.9, 0.999), eps=1e-8):
    """The plan's optimizer over `param_groups` (each with its own lr and weight_decay)."""
    if optimizer == "adamw":
        return torch.optim.AdamW(param_groups, betas=betas, eps=eps, fused=device.type == "cuda")
    AdamWSR, AdamW8bitSR, OffloadAdamWSR = _torchao_classes()
    kwargs = dict(betas=betas, eps=eps, weight_decay=0.0)  # torchao's default decay is 0.01: groups set their own
    if optimizer == "adamw-sr":
        return AdamWSR(param_groups, bf16_stochastic_round=True, **kwargs)
    if optimizer == "adamw8bit-sr":
        return AdamW8bitSR(param_groups, bf16_stochastic_round=True, **kwargs)
    if optimizer == "offload-adamw-sr":
        if device.type != "cuda":
            raise ValueError("the offload plan needs a CUDA device")
        return OffloadAdamWSR(param_groups, bf16_stochastic_round=True, **kwargs)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def params_for_clipping(optimizer) -> list:
    """The tensors whose .grad the optimizer steps with (for the offload plan: the host copies, once they landed)."""
    if hasattr(optimizer, "wait_for_grads"):
        optimizer.wait_for_grads()
    return [p for group in optimizer.param_groups for p in group["params"]]


# ---------------------------------------------------------------------------------------------------------------------
# Runtime: capping the process at the budget, releasing the rollout's cache, measuring each phase's peak
def apply_budget(plan: Plan, device: torch.device) -> str | None:
    """Cap this process's CUDA caching allocator at the budget, so exceeding it is an OOM here rather than a
    surprise on the smaller GPU the budget stands for. Returns a warning line when the GPU is smaller."""
    if plan.budget is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if plan.budget >= total:
        return (f"--memory-budget {plan.budget / GiB:.2f} GiB is not below this GPU's {total / GiB:.2f} GiB: "
                f"no cap applied")
    torch.cuda.set_per_process_memory_fraction(plan.budget / total, device)
    return None


def release_cached(device: torch.device) -> None:
    """Give the caching allocator's free blocks (the generation KV cache, once generate returned) back to the
    driver before the update, so its differently-sized blocks cannot fragment the budget."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def phase_peak_gib(device: torch.device) -> float | None:
    """Peak allocated GiB since the last call (then resets the counter); None on CPU (not measured there)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / GiB
    torch.cuda.reset_peak_memory_stats(device)
    return peak


# ---------------------------------------------------------------------------------------------------------------------
# The report
def report(plan: Plan, shape: ModelShape) -> str:
    e, g = plan.estimate, lambda b: f"{b / GiB:8.3f}"
    budget = "none" if plan.budget is None else (f"{plan.budget / GiB:.2f} GiB ({plan.usable / GiB:.2f} GiB usable "
                                                 f"after a {RESERVE_FRACTION:.0%} reserve for fragmentation)")
    lora = f", LoRA adapters {sum(shape.numels) / 1e6:.2f}M trainable" if shape.frozen_numels else ""
    params = shape.base_params if plan.quantize else shape.params
    count = f"{params / 1e9:.3f} B" if params >= 1e9 else f"{params / 1e6:.2f} M"
    if plan.quantize:
        critic = " (and the critic's own copy and adapters)" if shape.critic_numels else ""
        lora = ""
        weights_line = (f"frozen base: {len(shape.linears)} decoder linears in NF4 (block {NF4_BLOCK}, scaler block "
                        f"{NF4_SCALER_BLOCK}: {e['nf4_weights'] / GiB:.3f} GiB{critic}), embeddings, norms and lm_head "
                        f"{plan.weights_dtype}; LoRA rank {plan.lora_rank} on every decoder linear: "
                        f"{e['adapter_params'] / 1e6:.2f}M fp32 adapter params + the fp32 value head train; "
                        f"optimizer: torch AdamW, fp32 states")
    else:
        weights_line = f"weights {plan.weights_dtype}; optimizer: {DESCRIPTIONS[plan.optimizer]}"
    lines = [
        f"memory plan: {plan.level}  (budget: {budget})",
        f"model: {count} params{lora}, {shape.layers} layers, hidden {shape.hidden}, "
        f"kv {shape.kv_heads}x{shape.head_dim}, vocab {shape.vocab}",
        f"{weights_line}; gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
        "", "estimate (GiB)                                 update    rollout",
        f"  weights" + (" (NF4 + bf16 rest + fp32 adapters)" if plan.quantize else "").ljust(38)
        + f"{g(e['weights'])}   {g(e['weights'])}",
        f"  grads (freed after each step)                {g(e['grads'])}   {g(0)}",
        f"  optimizer states on the GPU                  {g(e['optimizer_states'])}   {g(e['optimizer_states'])}",
        f"  activations ({e['micro_batch_tokens']} tokens per micro-batch)".ljust(47) + f"{g(e['activations'])}",
        f"  log-prob head workspace ({'chunk scratch' if plan.quantize else 'fp32 dW'})".ljust(47)
        + f"{g(e['head_workspace'])}",  # a frozen head (qlora) has no dW
        f"  KV cache ({e['gen_batch_size']} seqs x {e['seq_len']} tokens x "
        f"{e['kv_bytes_per_token'] / 1024:.1f} KiB)".ljust(47) + f"{'':8}   {g(e['kv_cache'])}",
        f"  sampling logits + prefill (transient)        {'':8}   {g(e['rollout_transient'])}",
        *([f"  NF4 dequantization of the largest linear     {g(e['dequant_transient'])}   "
           f"{g(e['dequant_transient'])}"] if e.get("dequant_transient") else []),
        f"  peak                                         {g(e['update_peak'])}   {g(e['rollout_peak'])}",
    ]
    if plan.usable is not None:
        lines.append(f"  usable budget                                {g(plan.usable)}   {g(plan.usable)}")
    if e["optimizer_host"]:
        lines.append(f"  host RAM for offloaded states: {e['optimizer_host'] / GiB:.2f} GiB")
    lines.append(f"micro_batch_tokens {plan.micro_batch_tokens}, gen_batch_size "
                 f"{plan.gen_batch_size or 'whole batch'}")
    if plan.ladder:
        lines.append("ladder (one full-length sequence): " + ", ".join(
            f"{r['level']} {r['update_peak'] / GiB:.1f}/{r['rollout_peak_1seq'] / GiB:.1f} GiB "
            f"{'fits' if r['fits'] else 'no'}" for r in plan.ladder))
    lines.append("estimates model the allocator's live tensors (torch.cuda.max_memory_allocated), not the CUDA context;"
                 " measured peaks per phase are logged as memory/rollout_peak_gib and memory/update_peak_gib (CUDA)")
    return "\n".join(lines)


def save_report(plan: Plan, shape: ModelShape, run_dir) -> str:
    text = report(plan, shape)
    run_dir = Path(run_dir)
    (run_dir / "memory_report.txt").write_text(text + "\n")
    # qlora: the base's own parameters, and what trains there (adapters + the value head Linear(H, 1))
    params = shape.base_params if plan.quantize else shape.params
    trainable = plan.estimate["adapter_params"] + shape.hidden + 1 if plan.quantize else shape.trainable
    (run_dir / "memory_report.json").write_text(json.dumps(
        asdict(plan) | {"params": params, "trainable": trainable}, indent=1) + "\n")
    return text
