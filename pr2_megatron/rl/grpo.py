"""GRPO: group-normalised advantages and the PPO clipped policy loss."""

from __future__ import annotations

import torch


def group_advantages(rewards_N: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean_group) / (std_group + eps)`` for rewards laid out group after group.

    A group whose rewards are all equal gets advantage 0 (it carries no learning signal).
    """
    if rewards_N.numel() % group_size:
        raise ValueError(f"{rewards_N.numel()} rewards do not split into groups of {group_size}")
    groups = rewards_N.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def ppo_loss(
    logp_BS: torch.Tensor,
    old_logp_BS: torch.Tensor,
    advantages_B1: torch.Tensor,
    mask_BS: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over masked tokens of ``-min(r·A, clip(r, 1-eps_low, 1+eps_high)·A)``, and ``r``.

    ``r = exp(logp - old_logp)``. The caller divides by the global token count (token-mean
    over the mini-batch on all data-parallel ranks).
    """
    ratio = torch.exp(logp_BS - old_logp_BS)
    unclipped = ratio * advantages_B1
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages_B1
    per_token = -torch.minimum(unclipped, clipped)
    return (per_token * mask_BS).sum(), ratio
