"""The algorithms: how many samples each draws per prompt, what value function it learns, its advantages and its
value loss. The equations live here once; the trainer (`sppo_fast/train.py`) and the integrations
(`sppo_fast/integrations/trl.py`) import them.

    algo = get_algo("sppo")(args)          # args: the run's options (sppo_fast.config.Args)
    r = algo.batch_rewards(R)              # once per batch, from the rewards alone
    A, V = algo.advantages(r[group], old_v, lengths, starts)   # per micro-batch, from its pre-update values
    loss = pg_loss + value_coef * algo.value_loss(v, old_v, A, R[group])

The trainer never asks which algorithm it runs (verl's `register_adv_est` / `get_adv_estimator_fn`; Liger's one
`ppo_loss_fn` per algorithm): a new one is a class here with `@register_algo("name")`.

  SPPO  one sample per prompt; V(prompt) = sigmoid(v) from a value head on the prompt's state (the policy's own:
        `value = "head"`, or a separate critic LLM's: `--critic`); A = R - V per sequence, no std normalisation;
        value loss BCE(v, R) (or 0.5 * MSE with --value-loss mse, for rewards outside [0, 1]).
  GRPO  `group_size` samples per prompt; A = R - mean(R of the prompt's group) (optionally / std); no value.
  PPO   one sample per prompt; a critic LLM gives a value before every response token; A by GAE (gamma = 1, one
        terminal reward); value loss clipped around the pre-update values.
"""
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------------
# The math: tensors in, tensors out
def value_of(v: torch.Tensor, value_loss: str = "bce") -> torch.Tensor:
    """SPPO's V(prompt) from the head's logit: a probability of success under BCE, the raw output under MSE."""
    return torch.sigmoid(v) if value_loss == "bce" else v


def sppo_advantages(R: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """SPPO: A = R - V per sequence. No normalisation by the batch's std: V is already on R's scale, and dividing
    would turn a batch of near-certain prompts into large advantages."""
    return R - V


def value_loss_fn(v: torch.Tensor, R: torch.Tensor, value_loss: str = "bce", reduction: str = "mean") -> torch.Tensor:
    """SPPO's value loss on the head's logits v: BCE(v, R) (V = sigmoid(v) predicts P(success), R in [0, 1]) or
    0.5 * (v - R)^2 (any real reward)."""
    if value_loss == "bce":
        return F.binary_cross_entropy_with_logits(v, R, reduction=reduction)
    return 0.5 * F.mse_loss(v, R, reduction=reduction)


def group_advantages(R: torch.Tensor, group_size: int, scale_std: bool) -> torch.Tensor:
    """GRPO: A = R - mean over the prompt's group (optionally / std); samples are prompt-major."""
    groups = R.view(-1, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (groups.std(dim=1, keepdim=True) + 1e-6)
    return adv.reshape(-1)


def gae_advantages(values: torch.Tensor, R: torch.Tensor, lengths: list, lam: float) -> torch.Tensor:
    """GAE with gamma = 1 for a terminal reward. values [N]: V of the state before each response token, sequences
    back to back (`lengths` tokens each); R [B]. Returns A [N]; the returns are A + values.

    delta_t = r_t + V_{t+1} - V_t (r only at the last token, V after it = 0); A_t = delta_t + lam * A_{t+1}.
    The recursion runs over a [B, L] padded grid, one vector op per position (L Python steps, no host sync).
    """
    B, L = len(lengths), max(lengths)
    flat = torch.tensor([b * L + t for b, n in enumerate(lengths) for t in range(n)], device=values.device)
    V = torch.zeros(B * L, device=values.device, dtype=torch.float32).index_copy(0, flat, values.float()).view(B, L)
    valid = torch.zeros(B * L, device=values.device, dtype=torch.bool).index_fill(0, flat, True).view(B, L)
    next_V = torch.cat([V[:, 1:], V.new_zeros(B, 1)], dim=1)  # 0 past the end: padding holds zeros
    last = torch.tensor([n - 1 for n in lengths], device=values.device)
    rewards = torch.zeros_like(V).index_put_((torch.arange(B, device=values.device), last), R.float())
    delta = (rewards + next_V - V) * valid
    adv = torch.zeros_like(V)
    running = V.new_zeros(B)
    for t in reversed(range(L)):
        running = delta[:, t] + lam * running
        adv[:, t] = running
    return adv.view(-1)[flat]


def clipped_value_loss(v, old_v, returns, clip: float):
    """PPO's value loss with value clipping: 0.5 * max((v - G)^2, (old + clip(v - old, +-clip) - G)^2), token-mean."""
    v_clipped = old_v + (v - old_v).clamp(-clip, clip)
    return 0.5 * torch.maximum((v - returns).square(), (v_clipped - returns).square()).mean()


# ---------------------------------------------------------------------------------------------------------------------
# The algorithms, registered by name
ALGOS: dict = {}


def register_algo(name: str):
    """Class decorator: make an Algorithm subclass available as `--algo name`."""
    def register(cls):
        if name in ALGOS:
            raise ValueError(f"algorithm {name!r} is registered twice ({ALGOS[name].__name__}, {cls.__name__})")
        cls.name = name
        ALGOS[name] = cls
        return cls
    return register


def get_algo(name: str) -> type:
    """The Algorithm class registered as `name`."""
    if name not in ALGOS:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(ALGOS)}")
    return ALGOS[name]


class Algorithm:
    """What the trainer asks of an algorithm. `args` is the run's options (the fields each subclass reads).

    Declarations:
      samples_per_prompt: responses sampled for each prompt of a batch.
      value: "head" (a value head on the policy's own prompt state: no extra forward), "critic" (a value head on a
        separate critic LLM's states: a second forward) or "none".
      token_values: the value is one number per response token (PPO's critic) rather than one per prompt.
      reward_range: (lo, hi) the rewards must lie in, or None for any real reward.
    """
    name = ""
    value = "none"
    token_values = False

    def __init__(self, args):
        self.args = args

    @property
    def samples_per_prompt(self) -> int:
        return 1

    @property
    def reward_range(self):
        return None

    def batch_rewards(self, R: torch.Tensor) -> torch.Tensor:
        """What the advantage starts from, computed once per batch from the rewards R [num_samples] alone: R
        itself, or (GRPO) R relative to its group. Slices of it go to `advantages`."""
        return R

    def advantages(self, r: torch.Tensor, old_v, lengths: list, starts: torch.Tensor):
        """(A, V) of one micro-batch: A [num_samples] or [num_tokens], and V [num_samples] (each prompt's
        pre-update value, for metrics) or None. r: `batch_rewards` of these samples; old_v: the pre-update value
        logits (None without a value); lengths: response tokens per sample; starts: each sample's first response
        token in the flat token order."""
        raise NotImplementedError

    def value_loss(self, v: torch.Tensor, old_v: torch.Tensor, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """The value loss of one micro-batch (a mean over its samples, or tokens with token_values)."""
        raise NotImplementedError

    def prompt_values(self, v: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """V(prompt) [num_samples] from the value output of a forward (evaluation's calibration check)."""
        raise NotImplementedError


@register_algo("sppo")
class SPPO(Algorithm):
    """Sequence-level PPO: one sample per prompt, A = R - V(prompt), V = sigmoid(v) learnt by BCE(v, R).
    `--critic` reads V off a separate critic LLM's prompt state (the paper's design) instead of the policy's."""

    @property
    def value(self):
        return "critic" if self.args.critic else "head"

    @property
    def reward_range(self):
        # the BCE value loss reads V as P(success); MSE predicts the reward itself, on any scale
        return (0.0, 1.0) if self.args.value_loss == "bce" else None

    def advantages(self, r, old_v, lengths, starts):
        V = value_of(old_v, self.args.value_loss)
        return sppo_advantages(r, V), V

    def value_loss(self, v, old_v, A, R):
        return value_loss_fn(v, R, self.args.value_loss)

    def prompt_values(self, v, starts):
        return value_of(v, self.args.value_loss)


@register_algo("grpo")
class GRPO(Algorithm):
    """GRPO: `group_size` samples per prompt, A = R - mean of the group's R (Dr. GRPO's default: no / std).
    No value function, so no value loss."""

    @property
    def samples_per_prompt(self):
        return self.args.group_size

    def batch_rewards(self, R):
        return group_advantages(R, self.args.group_size, self.args.grpo_scale_std)

    def advantages(self, r, old_v, lengths, starts):
        return r, None


@register_algo("ppo")
class PPO(Algorithm):
    """PPO with a critic LLM: a value before every response token, A by GAE (gamma = 1, --gae-lambda), and the value
    loss clipped to --value-clip around the pre-update values."""
    value = "critic"
    token_values = True

    def advantages(self, r, old_v, lengths, starts):
        # V of the state before the first response token: the prompt's value
        return gae_advantages(old_v, r, lengths, self.args.gae_lambda), old_v[starts]

    def value_loss(self, v, old_v, A, R):
        return clipped_value_loss(v, old_v, A + old_v, self.args.value_clip)

    def prompt_values(self, v, starts):
        return v[starts]
