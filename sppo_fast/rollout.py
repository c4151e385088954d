"""Rollouts: a batch of prompts -> sampled responses, through one of three transformers generation engines, and
packing prompt + response into the update's layout.

Backends (`backend=` / `--rollout-backend`), all with the same sampling semantics (temperature, top_p, EOS,
min_new_tokens, stop strings, several samples per prompt) and the same `Sample` output:
  hf         `model.generate` with the dynamic KV cache: one eager forward per new token.
  hf-static  `model.generate(cache_implementation="static")`: a preallocated KV cache of fixed shape, which lets
             transformers compile the decode step (on CUDA it does so itself, torch.compile mode "reduce-overhead",
             i.e. CUDA graphs: one graph replay per token instead of hundreds of kernel launches). Prompt widths are
             padded to a multiple of 64 on CUDA so that steps reuse a few compiled shapes instead of recompiling.
  paged      transformers' continuous batching (`model.generate_batch`): a paged KV cache, requests scheduled as
             pages free up (no padding, prompts' shared prefixes can share pages).
  auto       the backend measured fastest on this kind of device (AUTO_BACKEND below, with its source).

Generation uses left padding (hf, hf-static: every prompt ends at the same column, new tokens line up). The update
forward instead runs each sequence once, unpadded where flash-attn varlen is available (packed, with per-sequence
position ids) and right-padded otherwise; both yield the same flat [T, H] hidden-state rows.
"""
import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch

BACKENDS = ("hf", "hf-static", "paged")
# `auto`, per device type, from committed measurements (decode tokens/s of each backend, same prompts and lengths):
#   cpu:  hf. bench/results/rollout-cpu-2026-11-29.md (the tiny model, 64 x 40 tokens, 2 shared cores, 7
#         interleaved rounds): hf fastest; hf-static 0.95x (no compile on CPU: the same eager loop), paged 0.27x
#         (its per-call set-up: cache allocation, scheduler thread, per-step host work).
#   cuda: hf, UNMEASURED. No backend has run on a GPU in this repository yet; `python bench/gpu_check.py` measures
#         all three at the 1.5B shape (batch 64 x 1024 new tokens) and prints which one `auto` should name here.
#         Until then the default is the engine every transformers user already runs, with no compile step: the
#         static backend compiles per new shape (tens of seconds each), which a first run must not pay unasked.
AUTO_BACKEND = {"cpu": "hf", "cuda": "hf"}
STATIC_PAD_MULTIPLE = 64  # hf-static on CUDA: prompt widths rounded up to this (fewer shapes, fewer recompiles)

# `model.generate` fills every knob the call leaves unset from the checkpoint's generation_config (Qwen2.5-Instruct
# ships repetition_penalty=1.05). Any logits processor besides temperature / top_p samples from a distribution
# other than the policy's, whose log-probs the update computes: off-policy data with no correction, and a backend
# (paged builds its own config) that disagrees with the others. As TRL's GRPO does, the call sets them neutral.
_NEUTRAL = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                encoder_no_repeat_ngram_size=0, min_length=0, num_beams=1, num_return_sequences=1)
_NEUTRAL_SAMPLING = dict(typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
# Knobs whose neutral value is None, which the merge would refill from the checkpoint: refused instead.
_UNSUPPORTED = ("min_p", "top_h", "sequence_bias", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
                "watermarking_config")


@dataclass
class Sample:
    """One sampled response. prompt_ids/response_ids are token lists; response_ids ends with EOS if it finished."""
    prompt_ids: list
    response_ids: list
    text: str
    finished: bool
    row: int  # index of the prompt row in the batch (GRPO draws several samples per row)


def resolve_backend(backend: str, device) -> str:
    """`auto` -> the measured default for the device's type; any other name is checked and returned."""
    if backend == "auto":
        return AUTO_BACKEND.get(torch.device(device).type, "hf")
    if backend not in BACKENDS:
        raise ValueError(f"rollout backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


@torch.no_grad()
def eos_ids(generation_config, tokenizer) -> set:
    """The token ids that end a response: the generation config's EOS (one id or several), else the tokenizer's.
    Preflight checks a model directory with the same rule before anything loads."""
    ids = generation_config.eos_token_id if generation_config.eos_token_id is not None else tokenizer.eos_token_id
    return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}


def generate(model, tokenizer, prompts: list, *, num_samples: int = 1, temperature: float = 0.6, top_p: float = 1.0,
             max_new_tokens: int = 256, min_new_tokens: int = 0, greedy: bool = False, stop_strings=None,
             max_batch: int | None = None, add_special_tokens: bool = True, backend: str = "hf"):
    """Sample `num_samples` responses per prompt. Returns a list of Sample, grouped by prompt (prompt-major).

    A response ends at the first EOS (kept, finished=True), at the first stop string (the response is cut after the
    token that completes it; finished=False), or at max_new_tokens (finished=False). EOS cannot be sampled before
    min_new_tokens new tokens (stop strings still apply). greedy=True ignores temperature/top_p. max_batch caps the
    sequences generated at once (hf, hf-static: chunks; paged: sequences holding KV pages at a time).

    Only temperature and top_p shape the distribution (the update scores samples under the plain policy): the
    checkpoint's generation_config processors (repetition_penalty, no_repeat_ngram_size, min_length, ...) are
    switched off, and those that cannot be (min_p, bad_words_ids, suppress_tokens, ...) are an error."""
    backend = resolve_backend(backend, model.device)
    if max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, got "
                         f"max_new_tokens={max_new_tokens}, min_new_tokens={min_new_tokens}")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    eos_set = eos_ids(model.generation_config, tokenizer)
    if not eos_set:
        raise ValueError("neither the model's generation_config nor the tokenizer names an EOS token")
    if tokenizer.pad_token_id is None:  # batches are padded; sppo_fast.model.load_tokenizer sets one
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to tokenizer.eos_token)")
    config = model.generation_config
    changed = [f"{k}={getattr(config, k)!r}" for k in _UNSUPPORTED if getattr(config, k, None) is not None]
    if changed:
        raise ValueError(f"the model's generation_config sets {', '.join(changed)}, which changes the sampling "
                         f"distribution away from the policy's (the update's log-probs would not match the samples); "
                         f"set them to None on model.generation_config")
    stop_strings = [s for s in (stop_strings or []) if s]
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    prompt_ids = [ids for ids in encoded for _ in range(num_samples)]
    rows = [i for i in range(len(prompts)) for _ in range(num_samples)]
    sampling = dict(greedy=greedy, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens, eos=sorted(eos_set), pad=tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        if backend == "paged":
            outputs = _generate_paged(model, tokenizer, prompt_ids, stop_strings, max_batch, **sampling)
        else:
            outputs = _generate_hf(model, tokenizer, prompt_ids, stop_strings, max_batch,
                                   static=backend == "hf-static", **sampling)
    finally:
        model.train(was_training)
    samples = []
    for ids, new_tokens, row in zip(prompt_ids, outputs, rows):
        response, finished = _cut(tokenizer, ids, new_tokens, eos_set, stop_strings)
        samples.append(Sample(list(ids), response, tokenizer.decode(response, skip_special_tokens=True), finished, row))
    return samples


def _generate_hf(model, tokenizer, prompt_ids, stop_strings, max_batch, *, static, greedy, temperature, top_p,
                 max_new_tokens, min_new_tokens, eos, pad):
    """model.generate on left-padded chunks; returns the new tokens of every sequence (padding included)."""
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None, pad_token_id=pad,
                  eos_token_id=eos, use_cache=True, **_NEUTRAL)
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **_NEUTRAL_SAMPLING)
    if stop_strings:  # stops early; _cut then applies the same rule to every backend's output
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    multiple = 1
    if static:
        kwargs["cache_implementation"] = "static"
        multiple = _static_pad_multiple(model.device)
    step = max_batch or len(prompt_ids)
    out_tokens = []
    for start in range(0, len(prompt_ids), step):
        chunk = prompt_ids[start:start + step]
        width = -(-max(len(p) for p in chunk) // multiple) * multiple
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, ids in enumerate(chunk):  # left padding: every prompt ends at column `width`
            if ids:
                input_ids[j, width - len(ids):] = torch.tensor(ids)
                attention_mask[j, width - len(ids):] = 1
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             **kwargs)
        out_tokens.extend(out[:, width:].tolist())
    return out_tokens


def _static_pad_multiple(device) -> int:
    """Prompt-width rounding of hf-static: on CUDA, where the decode step is compiled per cache shape."""
    return STATIC_PAD_MULTIPLE if torch.device(device).type == "cuda" else 1


def _generate_paged(model, tokenizer, prompt_ids, stop_strings, max_batch, *, greedy, temperature, top_p,
                    max_new_tokens, min_new_tokens, eos, pad):
    """transformers' continuous batching. It has no min_new_tokens (its processor is dropped there), so that runs
    as two phases with the same distribution as generate's: first min_new_tokens tokens with the EOS logits
    masked (suppress_tokens, as MinNewTokensLengthLogitsProcessor does), then the rest from prompt + those tokens."""
    from transformers import GenerationConfig

    base = dict(do_sample=not greedy, pad_token_id=pad, eos_token_id=eos)
    base.update(dict(temperature=None, top_p=None, top_k=None) if greedy else
                dict(temperature=temperature, top_p=top_p, top_k=0))
    outputs = [[] for _ in prompt_ids]
    todo = list(range(len(prompt_ids)))
    phases = [(min_new_tokens, True), (max_new_tokens - min_new_tokens, False)]
    for n_new, mask_eos in phases:
        if n_new <= 0 or not todo:
            continue
        config = GenerationConfig(max_new_tokens=n_new, **base, **({"suppress_tokens": eos} if mask_eos else {}))
        inputs = [list(prompt_ids[i]) + outputs[i] for i in todo]
        generated = _generate_batch(model, inputs, config, n_new, max_batch)
        for i, tokens in zip(todo, generated):
            outputs[i] = outputs[i] + list(tokens)
        # a sequence that already ended (EOS, or a stop string in its text) gets no second phase
        todo = [i for i in todo if not set(outputs[i]) & set(eos)
                and len(_cut(tokenizer, prompt_ids[i], outputs[i], set(eos), stop_strings)[0]) == len(outputs[i])]
    return outputs


def _generate_batch(model, inputs, config, max_new_tokens, max_batch):
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    cuda = model.device.type == "cuda"
    # The KV cache is sized here rather than from free GPU memory (transformers' default takes most of the card):
    # pages for the sequences that may be in flight at once, each at its full length.
    names = {f.name for f in fields(ContinuousBatchingConfig)}
    page = 256 if cuda else 32
    in_flight = min(len(inputs), max_batch or len(inputs))
    per_seq = math.ceil((max(len(x) for x in inputs) + max_new_tokens) / page)
    cb = dict(num_blocks=in_flight * per_seq + 1, max_batch_tokens=max(in_flight, min(8192, sum(map(len, inputs)))),
              max_requests_per_batch=in_flight)
    cb["page_size" if "page_size" in names else "block_size"] = page  # renamed in transformers 5.2x
    if not cuda:
        cb["use_cuda_graph"] = False
    cb = {k: v for k, v in cb.items() if k in names}
    with _autocast_in_worker(model):
        results = model.generate_batch(inputs, generation_config=config,
                                       continuous_batching_config=ContinuousBatchingConfig(**cb),
                                       max_new_tokens=max_new_tokens, warmup=cuda, progress_bar=False)
    ordered = list(results.values())  # generate_batch returns them in input order
    failed = [r.request_id for r in ordered if getattr(r, "error", None)]
    if len(ordered) != len(inputs) or failed:
        raise RuntimeError(f"continuous batching returned {len(ordered)} of {len(inputs)} sequences "
                           f"(failed: {failed[:5]}); see transformers' log above")
    return [list(r.generated_tokens) for r in ordered]


@contextmanager
def _autocast_in_worker(model):
    """generate_batch runs the model in its own thread, and autocast is thread-local: carry the caller's autocast
    into the model's forward for the duration (its fp32 ops, e.g. softmax, then match the other backends).

    The paged cache is allocated in the model's dtype, and autocast's bf16 keys/values cannot be written into an
    fp32 one (index_copy_ refuses mixed dtypes): under autocast the weights must already be in its dtype."""
    device_type = model.device.type
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    if model.dtype != dtype:
        raise ValueError(f"the paged rollout backend needs the weights in the autocast dtype ({dtype}), got "
                         f"{model.dtype}: transformers' continuous batching keeps its KV cache in the model's dtype. "
                         f"Use --memory-plan bf16 (bf16 weights) or --rollout-backend hf / hf-static")
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = target.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    target.forward = autocast_forward
    try:
        yield
    finally:
        del target.forward  # the instance attribute: the class's forward shows through again


def _cut(tokenizer, prompt_ids, new_tokens, eos_set, stop_strings):
    """(response, finished) from a backend's raw new tokens: up to and including the first EOS, else without
    trailing padding; then cut after the first token that completes a stop string. Like generate's
    StopStringCriteria, a stop string may begin in the prompt's last characters but must end in the response."""
    response, finished = [], False
    for t in new_tokens:
        response.append(t)
        if t in eos_set:
            finished = True
            break
    pad = tokenizer.pad_token_id
    if not finished:  # stopped by length or a stop string: generate pads the rows that finished early
        while response and response[-1] == pad and pad not in eos_set:
            response.pop()
    if not stop_strings or not response:
        return response, finished
    tail = list(prompt_ids[-max(len(s) for s in stop_strings):])
    base = len(tokenizer.decode(tail, skip_special_tokens=False))

    def stops(n):  # does response[:n] complete a stop string? (monotone in n: text only grows)
        text = tokenizer.decode(tail + response[:n], skip_special_tokens=False)
        return any(text.find(s, max(0, base - len(s) + 1)) != -1 for s in stop_strings)

    if not stops(len(response)):
        return response, finished
    lo, hi = 1, len(response)  # the shortest prefix that stops: binary search, ~log2(len) decodes
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stops(mid) else (mid + 1, hi)
    return response[:lo], finished and lo == len(response)


@dataclass
class PackedBatch:
    """The update's view of a list of samples. Row = one token position in the flat [T, H] hidden states.

    resp_rows [N]: rows whose hidden state predicts a response token (the last prompt token .. the second-to-last
    response token); targets [N]: those response tokens; cu_seqlens [B+1]: response-token bounds per sample.
    last_prompt_rows [B], prompt_rows / prompt_seq_ids: for the value head's pooling.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    flat_index: torch.Tensor | None  # for the padded layout: valid positions of the [B*L] grid, in sequence order
    resp_rows: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    last_prompt_rows: torch.Tensor
    prompt_rows: torch.Tensor
    prompt_seq_ids: torch.Tensor
    num_tokens: int  # prompt + response tokens
    num_resp_tokens: int
    indices: list = field(default_factory=list)  # which samples of the step this batch holds

    def to(self, device):
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device, non_blocking=True))
        return self


def pack(samples: list, indices: list, *, packed: bool, pad_token_id: int) -> PackedBatch:
    """Lay out samples[i] for i in indices for one backbone forward (built on the host: no device syncs later)."""
    seqs = [samples[i].prompt_ids + samples[i].response_ids for i in indices]
    lens = [len(s) for s in seqs]
    resp_rows, targets, cu, last_rows, prompt_rows, prompt_seq = [], [], [0], [], [], []
    offset = 0
    for b, i in enumerate(indices):
        p, r = len(samples[i].prompt_ids), len(samples[i].response_ids)
        resp_rows.extend(range(offset + p - 1, offset + p + r - 1))
        targets.extend(samples[i].response_ids)
        cu.append(cu[-1] + r)
        last_rows.append(offset + p - 1)
        prompt_rows.extend(range(offset, offset + p))
        prompt_seq.extend([b] * p)
        offset += lens[b]
    if packed:
        # one row, positions restart per sequence: flash-attn varlen keeps sequences from attending to each other
        input_ids = torch.tensor([sum(seqs, [])])
        position_ids = torch.tensor([[j for n in lens for j in range(n)]])
        attention_mask, flat_index = None, None
    else:
        width = max(lens)
        input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            input_ids[b, :len(s)] = torch.tensor(s)
            attention_mask[b, :len(s)] = 1
        position_ids = None
        flat_index = torch.cat([torch.arange(b * width, b * width + n) for b, n in enumerate(lens)])
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)
    return PackedBatch(input_ids, attention_mask, position_ids, flat_index, as_long(resp_rows), as_long(targets),
                       as_long(cu), as_long(last_rows), as_long(prompt_rows), as_long(prompt_seq), sum(lens),
                       len(targets), list(indices))


def split_by_tokens(samples: list, indices: list, token_budget: int) -> list:
    """Greedy split of `indices` into micro-batches of at most `token_budget` prompt+response tokens (>= 1 sample)."""
    groups, current, used = [], [], 0
    for i in indices:
        n = len(samples[i].prompt_ids) + len(samples[i].response_ids)
        if current and used + n > token_budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups
