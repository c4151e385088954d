"""Rollouts: HF `generate` for a batch of prompts, and packing prompt + response into the update's layout.

Generation uses the KV cache with left padding (so every prompt ends at the same column and new tokens line up).
The update forward instead runs each sequence once, unpadded where flash-attn varlen is available (packed, with
per-sequence position ids) and right-padded otherwise; both yield the same flat [T, H] hidden-state rows.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One sampled response. prompt_ids/response_ids are token lists; response_ids ends with EOS if it finished."""
    prompt_ids: list
    response_ids: list
    text: str
    finished: bool
    row: int  # index of the prompt row in the batch (GRPO draws several samples per row)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, num_samples: int = 1, temperature: float = 0.6, top_p: float = 1.0,
             max_new_tokens: int = 256, min_new_tokens: int = 0, greedy: bool = False, stop_strings=None,
             max_batch: int | None = None,
             add_special_tokens: bool = True):
    """Sample `num_samples` responses per prompt. Returns a list of Sample, grouped by prompt (prompt-major)."""
    eos_ids = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    eos_set = set(eos_ids if isinstance(eos_ids, (list, tuple)) else [eos_ids])
    expanded = [p for p in prompts for _ in range(num_samples)]
    rows = [i for i in range(len(prompts)) for _ in range(num_samples)]
    step = max_batch or len(expanded)
    samples = []
    was_training = model.training
    model.eval()
    for start in range(0, len(expanded), step):
        chunk = expanded[start:start + step]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=add_special_tokens)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        gen_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                          pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=list(eos_set), use_cache=True)
        if greedy:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if stop_strings:
            gen_kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
        out = model.generate(**enc, **gen_kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
        for j, (ids, mask) in enumerate(zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist())):
            prompt_ids = [t for t, m in zip(ids, mask) if m]
            response, finished = [], False
            for t in new_tokens[j]:
                response.append(t)
                if t in eos_set:
                    finished = True
                    break
            if not finished:  # generation stopped by length (or a stop string): drop trailing padding
                while response and response[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id not in eos_set:
                    response.pop()
            text = tokenizer.decode(response, skip_special_tokens=True)
            samples.append(Sample(prompt_ids, response, text, finished, rows[start + j]))
    model.train(was_training)
    return samples


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
