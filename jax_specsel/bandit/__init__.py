"""The contextual bandit: rewards, the selection policy, its offline trainer (paper sec. 2) and
its online updates across queries."""

from jax_specsel.bandit.online import (
    OnlinePolicyUpdater,
    default_online_config,
    load_online_updater,
    validate_online_config,
)
from jax_specsel.bandit.policy import Policy, PolicyLoadError, load_policy
from jax_specsel.bandit.policy_network import PolicyNetwork
from jax_specsel.bandit.reinforce import (
    default_train_config,
    paper_train_config,
    train_policy,
    validate_train_config,
)
from jax_specsel.bandit.rewards import mix_rewards, rouge_l, size_costs

__all__ = [
    "OnlinePolicyUpdater",
    "Policy",
    "PolicyLoadError",
    "PolicyNetwork",
    "default_online_config",
    "default_train_config",
    "load_online_updater",
    "load_policy",
    "mix_rewards",
    "paper_train_config",
    "rouge_l",
    "size_costs",
    "train_policy",
    "validate_online_config",
    "validate_train_config",
]
