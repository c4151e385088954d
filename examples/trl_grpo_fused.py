"""TRL's GRPO with sppo_fast's fused log-prob kernel: `FusedGRPOTrainer` is `GRPOTrainer` with one change.

    pip install -e ".[trl]"            # from the checkout (sppo_fast is not on a package index)
    python examples/trl_grpo_fused.py            # CPU, a tiny random Llama, a few seconds

Everything is TRL's (config, sampling, rewards, loss types, metrics) except the per-token log-probs and entropies,
which `sppo_fast.kernels.token_logprobs` computes from the completion tokens' hidden states and the lm_head weight.
"""
import tempfile

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig

from sppo_fast import synthetic
from sppo_fast.integrations.trl import FusedGRPOTrainer
from sppo_fast.tiny import build_tokenizer


def progress(completions, answer, **kwargs):
    """A reward in [0, 1] with signal even for an untrained model: 1 if the answer after the last ';' is the sum
    (the synthetic addition-chain task), else 0.5 x the share of characters from the task's alphabet."""
    def score(text, gold):
        if synthetic.is_correct(text, gold):
            return 1.0
        return 0.5 * sum(c in "0123456789+=,;" for c in text) / max(len(text), 1)

    return [score(text, gold) for text, gold in zip(completions, answer)]


def main():
    tokenizer = build_tokenizer()  # the repo's character-level tokenizer, built in memory (offline)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    rows = synthetic.make_dataset(16, seed=0)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, num_generations=4, per_device_train_batch_size=8, max_completion_length=12,
                          max_steps=3, learning_rate=1e-3, temperature=1.0, logging_steps=1, report_to="none",
                          save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True)
        trainer = FusedGRPOTrainer(model=model, reward_funcs=progress, args=args, train_dataset=dataset,
                                   processing_class=tokenizer)
        trainer.train()
    for log in trainer.state.log_history[:-1]:
        print({k: round(log[k], 4) for k in ("step", "loss", "reward", "entropy", "grad_norm")})


if __name__ == "__main__":
    main()
