"""Pure RL maths: tensors in, tensors out. Importing this must not import Ray, vLLM or PEFT."""
from .advantages import gae
from .correction import IS_LEVELS, correction_stats, staleness_histogram, truncated_is_weights
from .estimators import ESTIMATORS, estimate_advantages
from .kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalty,
    kl_shaped_rewards,
)
from .losses import (
    entropy_from_logits,
    logprobs_from_logits,
    pairwise_reward_loss,
    policy_loss,
    ppo_loss,
    value_loss,
)
from .masked import masked_mean, masked_sum, masked_var, whiten
from .truncation import TRUNCATION_MODES, apply_truncation
from .sampling import sampled_token_logprobs, truncation_mask

__all__ = [
    "gae", "apply_truncation", "TRUNCATION_MODES", "ESTIMATORS", "estimate_advantages", "whiten", "masked_mean", "masked_sum", "masked_var", "sampled_token_logprobs", "truncation_mask",
    "policy_loss", "value_loss", "entropy_from_logits", "ppo_loss", "logprobs_from_logits",
    "pairwise_reward_loss",
    "IS_LEVELS", "correction_stats", "staleness_histogram", "truncated_is_weights",
    "kl_penalty", "kl_shaped_rewards", "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController",
]
