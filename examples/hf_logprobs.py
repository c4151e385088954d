"""Per-token log-probs of a Hugging Face causal LM through sppo_fast's fused kernel, next to the naive logits path.

    python examples/hf_logprobs.py            # CPU, a tiny random Llama, a couple of seconds

The naive path materialises [B, L, V] logits; `causal_lm_logprobs` runs the backbone, sends only the rows of real
(non-padding, response) tokens to `sppo_fast.kernels.token_logprobs`, and never stores [tokens, V] logits.
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sppo_fast.hf import causal_lm_logprobs, scored_positions


def main():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    model = LlamaForCausalLM(config)

    # A left-padded batch: prompt (4 tokens) + response; row 1 has two pad tokens in front.
    input_ids = torch.randint(1, 1000, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :2], attention_mask[1, :2] = 0, 0
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 4:] = 1
    temperature = 0.7

    # naive: full logits, log_softmax, gather; unscored positions zeroed
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    naive = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    naive = torch.where(scored_positions(attention_mask, response_mask), naive, 0.0)

    # fused: same numbers, [B, L - 1], 0 at padding and prompt positions
    logp, entropy = causal_lm_logprobs(model, input_ids, attention_mask, response_mask=response_mask,
                                       temperature=temperature, return_entropy=True)
    print("log-probs  [B, L-1]:\n", logp.detach().numpy().round(3))
    print("entropies  [B, L-1]:\n", entropy.detach().numpy().round(3))
    print(f"max |fused - naive| = {(logp - naive).abs().max().item():.2e}")

    # the same positions in Hugging Face's `labels` convention: -100 = not scored (shifted inside, as HF's loss does)
    labels = input_ids.masked_fill(response_mask == 0, -100)
    same = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels, temperature=temperature)
    print("labels=-100 masking equals response_mask masking:", torch.equal(same, logp))

    # it is differentiable: a REINFORCE-style loss backpropagates into the model
    (-(logp.sum())).backward()
    print("grad norm of lm_head/embeddings:", model.lm_head.weight.grad.norm().item())


if __name__ == "__main__":
    main()
