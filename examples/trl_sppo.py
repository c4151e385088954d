"""SPPO (Sequence-level PPO) as a TRL trainer: one completion per prompt, a value head as the baseline.

    pip install -e ".[trl]"            # from the checkout (sppo_fast is not on a package index)
    python examples/trl_sppo.py            # CPU, a tiny random Llama, a few seconds

A = R - sigmoid(v(prompt)), with v = Linear(H, 1) on the policy's own last-prompt-token hidden state (the same
forward that scores the completion), PPO clip with dual clip from `sppo_fast.kernels`, and a BCE value loss.
The value head is trained with its own learning rate (its gradient norm is logged as sppo/value_grad_norm) and
saved as value_head.safetensors next to the model, by save_model and in every checkpoint.
"""
import tempfile

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from sppo_fast import synthetic
from sppo_fast.integrations.trl import SPPOConfig, SPPOTrainer, load_value_head
from sppo_fast.tiny import build_tokenizer
from sppo_fast.value_head import ValueHead


def progress(completions, answer, **kwargs):
    """A reward in [0, 1] with signal even for an untrained model: 1 if the answer after the last ';' is the sum
    (the synthetic addition-chain task), else 0.5 x the share of characters from the task's alphabet."""
    def score(text, gold):
        if synthetic.is_correct(text, gold):
            return 1.0
        return 0.5 * sum(c in "0123456789+=,;" for c in text) / max(len(text), 1)

    return [score(text, gold) for text, gold in zip(completions, answer)]


def main():
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    rows = synthetic.make_dataset(32, seed=0)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    with tempfile.TemporaryDirectory() as out:
        args = SPPOConfig(output_dir=out, per_device_train_batch_size=8, max_completion_length=12, max_steps=4,
                          learning_rate=1e-3, value_learning_rate=1e-2, temperature=1.0, logging_steps=1,
                          report_to="none", save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True)
        trainer = SPPOTrainer(model=model, reward_funcs=progress, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
        trainer.train()
        trainer.save_model(out)  # the policy (model.safetensors), the tokenizer and value_head.safetensors
        critic = load_value_head(ValueHead(model.config.hidden_size), out)  # no pickle involved
        assert all(torch.equal(a, b) for a, b in zip(critic.parameters(), trainer.value_head.parameters()))
    for log in trainer.state.log_history[:-1]:
        print({k: round(log[k], 4) for k in ("step", "loss", "reward", "sppo/value_mean", "sppo/value_loss",
                                             "sppo/value_grad_norm", "sppo/advantage_abs_mean", "entropy")})


if __name__ == "__main__":
    main()
