"""The SPPO critic: a scalar head on the policy's own prompt hidden state.

V(prompt) = sigmoid(v), v = Linear(H, 1)(h_prompt). Because attention is causal, the prompt's hidden states do not
depend on the response, so the same backbone forward that produces the response log-probs also produces the critic's
input: the critic costs one [B, H] x [H, 1] product, not a second LLM.
"""
import math

import torch
from torch import nn


class ValueHead(nn.Module):
    """Linear(H, 1) mapping a pooled prompt state to the value logit v (V = sigmoid(v) = P(success | prompt))."""

    def __init__(self, hidden_size: int, init_value: float = 0.5):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # Zero weights: the initial prediction is the same for every prompt, init_value, until the head has seen data.
        nn.init.zeros_(self.linear.weight)
        p = min(max(init_value, 1e-4), 1 - 1e-4)
        nn.init.constant_(self.linear.bias, math.log(p / (1 - p)))

    def forward(self, prompt_states: torch.Tensor) -> torch.Tensor:
        """prompt_states [B, H] (any float dtype) -> value logits v [B] in fp32."""
        return self.linear(prompt_states.to(self.linear.weight.dtype)).squeeze(-1).float()


def pool_prompt_states(hidden: torch.Tensor, prompt_rows: torch.Tensor, prompt_seq_ids: torch.Tensor,
                       last_rows: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """Pool each prompt's hidden states into one vector [B, H].

    hidden: [T, H] flat hidden states of the batch's tokens. last_rows [B]: the row of each prompt's last token.
    prompt_rows [P], prompt_seq_ids [P]: every prompt token's row and its sequence index (built on the host with the
    batch, so pooling needs no host sync). pooling: "last" (the SPPO paper's default) or "mean" over prompt tokens.
    """
    if pooling == "last":
        return hidden[last_rows]
    if pooling == "mean":
        num_seqs = last_rows.shape[0]
        sums = torch.zeros(num_seqs, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, prompt_seq_ids, hidden[prompt_rows].float())
        counts = torch.bincount(prompt_seq_ids, minlength=num_seqs).clamp(min=1)
        return (sums / counts[:, None]).to(hidden.dtype)
    raise ValueError(f"value pooling must be 'last' or 'mean', got {pooling!r}")
