"""`sppo_fast.hf.causal_lm_logprobs` against the naive logits path on tiny random Llamas (CPU, a few seconds).

The naive path: logits = model(...).logits; log_softmax(logits[:, :-1] / T).gather(input_ids[:, 1:]), zeroed where
`scored_positions` says a position is not scored. Values and gradients wrt every model parameter must match.
"""
import pytest
import torch

from sppo_fast.hf import causal_lm_logprobs, lm_head_params, scored_positions

torch.set_num_threads(1)
VOCAB = 101


def tiny_llama(tied: bool, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, pad_token_id=0, attn_implementation="eager", **extra)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    # random init has tiny logits (std 0.02): scale the head up so the softmax is far from uniform
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def padded_batch(lengths, side: str, total: int, seed: int = 1):
    """input_ids [B, total] with random real tokens (ids >= 1) and pad id 0 on `side`, and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        cols = slice(total - n, total) if side == "left" else slice(0, n)
        ids[b, cols] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, cols] = 1
    return ids, mask


def naive(model, ids, mask, temperature=1.0, response_mask=None):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    logp = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    valid = scored_positions(mask, response_mask)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_matches_naive_values_and_grads(tied, side):
    model = tiny_llama(tied)
    ids, mask = padded_batch([9, 5, 12, 1], side, total=12)
    temperature = 0.7
    g = torch.Generator().manual_seed(2)
    w_logp, w_ent = torch.randn(4, 11, generator=g), torch.randn(4, 11, generator=g)

    ref_logp, ref_ent = naive(model, ids, mask, temperature)
    ref_grads = grads(model, (ref_logp * w_logp).sum() + (ref_ent * w_ent).sum())

    logp, ent = causal_lm_logprobs(model, ids, mask, temperature=temperature, return_entropy=True)
    assert logp.shape == (4, 11) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    # padding and the single-token row give exactly 0
    assert (logp[~scored_positions(mask)] == 0).all()
    assert (logp[3] == 0).all()
    got = grads(model, (logp * w_logp).sum() + (ent * w_ent).sum())
    assert got.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_tied_head_is_the_embedding():
    model = tiny_llama(tied=True)
    weight, softcap, scale = lm_head_params(model)
    assert weight is model.get_input_embeddings().weight
    assert softcap is None and scale == 1.0


def test_response_mask_and_logits_to_keep():
    """TRL's layout: left-padded prompt (6) + right-padded completion (5); score the completion only."""
    model = tiny_llama(tied=False)
    p_ids, p_mask = padded_batch([6, 3, 4], "left", total=6, seed=3)
    c_ids, c_mask = padded_batch([5, 2, 4], "right", total=5, seed=4)
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1)
    response = torch.cat([torch.zeros_like(p_mask), c_mask], 1)

    ref, _ = naive(model, ids, mask, 1.3, response_mask=response)
    full = causal_lm_logprobs(model, ids, mask, response_mask=response, temperature=1.3)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    assert (full[:, :5] == 0).all()  # prompt positions are not scored

    kept = causal_lm_logprobs(model, ids, mask, logits_to_keep=5, temperature=1.3)
    assert kept.shape == (3, 5)
    torch.testing.assert_close(kept, ref[:, -5:], atol=1e-5, rtol=1e-5)


def test_softcap_and_logit_scale_from_config():
    """Gemma-style final_logit_softcapping and a Cohere-style logit_scale are read from the config."""
    model = tiny_llama(tied=True, final_logit_softcapping=3.0, logit_scale=0.5)
    ids, mask = padded_batch([7, 4], "right", total=7, seed=5)
    logp = causal_lm_logprobs(model, ids, mask, temperature=0.9)

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = 0.5 * hidden @ model.lm_head.weight.T
    logits = 3.0 * torch.tanh(logits / 3.0) / 0.9
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref = torch.where(scored_positions(mask), ref, 0.0)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)


def test_lora_model_gets_adapter_grads():
    peft = pytest.importorskip("peft")
    model = tiny_llama(tied=False)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, init_lora_weights=False))
    ids, mask = padded_batch([6, 8], "left", total=8, seed=6)
    ref, _ = naive(lora, ids, mask)
    ref_grads = grads(lora, ref.sum())
    logp = causal_lm_logprobs(lora, ids, mask)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    got = grads(lora, logp.sum())
    assert any("lora_" in n for n in got)
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bad_shapes():
    model = tiny_llama(tied=False)
    ids, mask = padded_batch([3], "right", total=4)
    with pytest.raises(ValueError, match="logits_to_keep"):
        causal_lm_logprobs(model, ids, mask, logits_to_keep=4)
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_logprobs(model, ids, mask[:, :3])


def test_labels_minus_100_equal_response_mask():
    """HF's convention: labels = input_ids with -100 outside the response score exactly what response_mask scores,
    values and gradients (the same rows reach the kernel)."""
    model = tiny_llama(tied=False)
    p_ids, p_mask = padded_batch([6, 3, 4], "left", total=6, seed=3)
    c_ids, c_mask = padded_batch([5, 2, 4], "right", total=5, seed=4)
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1)
    response = torch.cat([torch.zeros_like(p_mask), c_mask], 1)
    labels = ids.masked_fill(response == 0, -100)

    by_mask = causal_lm_logprobs(model, ids, mask, response_mask=response, temperature=0.8)
    mask_grads = grads(model, by_mask.sum())
    by_labels = causal_lm_logprobs(model, ids, mask, labels=labels, temperature=0.8)
    label_grads = grads(model, by_labels.sum())
    assert torch.equal(by_labels, by_mask)
    assert (by_labels[:, :5] == 0).all() and (by_labels[:, 5:] != 0).any()
    for name in mask_grads:
        assert torch.equal(label_grads[name], mask_grads[name]), name
    kept = causal_lm_logprobs(model, ids, mask, labels=labels, logits_to_keep=5, temperature=0.8)
    assert torch.equal(kept, by_mask[:, -5:])


def test_labels_are_shifted_as_hf_does():
    """Against transformers' own loss: with right padding and -100 labels on the padding and on a few more tokens,
    HF's `model(ids, labels=labels).loss` is the mean of -logp over the scored positions. Labels that differ from
    the input tokens are the scored targets."""
    model = tiny_llama(tied=True)
    ids, mask = padded_batch([9, 6, 12], "right", total=12, seed=7)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a "prompt" that is not scored
    labels[1, 4] = -100
    logp = causal_lm_logprobs(model, ids, mask, labels=labels)
    scored = labels[:, 1:] != -100
    assert ((logp != 0) == scored).all()
    hf_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(-logp.sum() / scored.sum(), hf_loss, atol=1e-5, rtol=1e-5)

    g = torch.Generator().manual_seed(8)
    other = torch.where(labels == -100, -100, torch.randint(1, VOCAB, labels.shape, generator=g))
    logp_other = causal_lm_logprobs(model, ids, mask, labels=other)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, other[:, 1:].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(logp_other, torch.where(scored, ref, 0.0), atol=1e-5, rtol=1e-5)


def test_loss_keywords_and_bad_labels_are_refused():
    model = tiny_llama(tied=False)
    ids, mask = padded_batch([3, 4], "right", total=4)
    with pytest.raises(TypeError, match="shift_labels.*response_mask"):
        causal_lm_logprobs(model, ids, mask, shift_labels=ids)
    with pytest.raises(TypeError, match="num_items_in_batch"):
        causal_lm_logprobs(model, ids, mask, num_items_in_batch=3)
    with pytest.raises(ValueError, match="labels must have the shape"):
        causal_lm_logprobs(model, ids, mask, labels=ids[:, :3])


def test_lm_head_bias_error_names_the_alternative():
    model = tiny_llama(tied=False)
    model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    ids, mask = padded_batch([3], "right", total=4)
    with pytest.raises(NotImplementedError, match=r"bias.*model\(\.\.\.\)\.logits"):
        causal_lm_logprobs(model, ids, mask)
