"""The SPPO critic: a scalar head on the policy's own prompt hidden state.

V(prompt) = sigmoid(v), v = Linear(H, 1)(h_prompt). Because attention is causal, the prompt's hidden states do not
depend on the response, so the same backbone forward that produces the response log-probs also produces the critic's
input: the critic costs one [B, H] x [H, 1] product, not a second LLM.

Options a calibration study tries (``Args.value_*`` in config.py; measured in bench/results/head-*):
  * ``norm``: standardise the pooled state (LayerNorm without affine: the linear layer after it is the affine) so
    the head's effective step size does not depend on the scale of the residual stream;
  * ``mlp_hidden``: a small MLP (Linear -> GELU -> Linear) instead of one linear layer;
  * the input state: the last prompt token or the mean over prompt tokens (``pool_prompt_states``), from the final
    layer (after the model's final norm) or from an intermediate decoder layer (``capture_layer``);
  * more fitting per batch (``Args.value_steps``, ``Args.value_replay``): head-only optimizer steps on the detached
    prompt states of this batch and of earlier ones, which cost no backbone forward.
"""
import collections
import contextlib
import math

import torch
from torch import nn

NORMS = ("none", "layernorm")


class ValueHead(nn.Module):
    """Maps a pooled prompt state [B, H] to the value logit v [B] (V = sigmoid(v) = P(success | prompt)).

    Default: Linear(H, 1). ``norm="layernorm"`` standardises the input first; ``mlp_hidden > 0`` puts a hidden
    layer of that width (GELU) before the output layer. The output layer starts at zero weights and a bias of
    logit(init_value), so the first prediction is init_value for every prompt whatever the options.
    """

    def __init__(self, hidden_size: int, init_value: float = 0.5, norm: str = "none", mlp_hidden: int = 0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"value head norm must be one of {NORMS}, got {norm!r}")
        if mlp_hidden < 0:
            raise ValueError(f"value head mlp_hidden must be >= 0, got {mlp_hidden}")
        # no affine: a learned scale/shift right before a linear layer is redundant
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False) if norm == "layernorm" else nn.Identity()
        self.hidden = (nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU()) if mlp_hidden
                       else nn.Identity())
        self.linear = nn.Linear(mlp_hidden or hidden_size, 1)
        # Zero weights: the initial prediction is the same for every prompt, init_value, until the head has seen data.
        nn.init.zeros_(self.linear.weight)
        p = min(max(init_value, 1e-4), 1 - 1e-4)
        nn.init.constant_(self.linear.bias, math.log(p / (1 - p)))

    def forward(self, prompt_states: torch.Tensor) -> torch.Tensor:
        """prompt_states [B, H] (any float dtype) -> value logits v [B] in fp32."""
        x = prompt_states.to(self.linear.weight.dtype)
        return self.linear(self.hidden(self.norm(x))).squeeze(-1).float()


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


@contextlib.contextmanager
def capture_layer(model, layer: int):
    """Record the output of decoder layer ``layer`` (0-based; negative counts from the end) during a forward.

    Yields a dict whose "hidden" is the layer's output [batch, seq, H] after the forward ran (the residual stream
    before the model's final norm). ``layer=-1`` means the final hidden state, which the trainer already has: then
    nothing is hooked and the dict stays empty. A forward hook, not ``output_hidden_states``: that would keep every
    layer's states alive, and the backbone call in sppo_fast.model does not ask for them.
    """
    if layer == -1:
        yield {}
        return
    decoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no `.layers`: --value-layer needs a decoder with a layer "
                         f"list (Llama/Qwen/Mistral-style); use -1 (the final hidden state)")
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"--value-layer {layer} is out of range for a decoder with {len(layers)} layers")
    out = {}

    def hook(_module, _inputs, output):
        out["hidden"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


def flat_states(hidden: torch.Tensor, flat_index) -> torch.Tensor:
    """[batch, seq, H] -> the flat [T, H] rows of a PackedBatch (``flat_index``: its valid tokens, None = all),
    the same flattening as ``sppo_fast.model.hidden_states`` applies to the final layer."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat if flat_index is None else flat[flat_index]


class ReplayBuffer(collections.deque):
    """--value-steps / --value-replay: (detached prompt states [B, H], rewards [B]) of this batch and the
    `replay` before it, which the head-only refits fit. Saved in the checkpoint, so a resumed run refits the same."""

    def __init__(self, replay: int):
        super().__init__(maxlen=replay + 1)

    def tensors(self) -> dict:
        """The buffer as named tensors, for the checkpoint's extra tensors."""
        return {f"value_buffer.{i}.{name}": t for i, (x, r) in enumerate(self)
                for name, t in (("states", x), ("rewards", r))}

    def load(self, tensors: dict, device) -> None:
        """Append what `tensors()` saved (other keys are ignored; none: nothing is added)."""
        n = sum(1 for k in tensors if k.startswith("value_buffer.") and k.endswith(".states"))
        self.extend((tensors[f"value_buffer.{i}.states"].to(device), tensors[f"value_buffer.{i}.rewards"].to(device))
                    for i in range(n))
