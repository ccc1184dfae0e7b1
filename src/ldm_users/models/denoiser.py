"""One denoiser interface whatever the backbone: (noisy latents, timesteps, user ids) -> prediction."""

from __future__ import annotations

import torch
from torch import nn

from ldm_users.models.condition import UserConditionEncoder


def null_user_id(backbone: nn.Module, condition: UserConditionEncoder | None) -> int:
    """Index of the unconditional (null) user: the extra row of the user table."""
    if condition is not None:
        return condition.null_id
    return backbone.config.num_embeds_ada_norm  # DiT: the label table's extra CFG row


def disable_internal_label_dropout(backbone: nn.Module) -> None:
    # diffusers' DiT drops labels itself (10%, from the global RNG) in train mode; we do classifier-free
    # dropout in the trainer (train.p_uncond) so it is configurable and reproducible. The table keeps
    # its extra null row because that is sized at construction.
    for module in backbone.modules():
        if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0


class UserDenoiser(nn.Module):
    """A UNet2DConditionModel + UserConditionEncoder, or a DiTTransformer2DModel with users as class labels."""

    def __init__(self, backbone: nn.Module, condition: UserConditionEncoder | None = None):
        super().__init__()
        self.backbone = backbone
        self.condition = condition
        self.is_dit = condition is None
        if self.is_dit:
            disable_internal_label_dropout(backbone)

    @property
    def null_id(self) -> int:
        return null_user_id(self.backbone, self.condition)

    @property
    def num_users(self) -> int:
        return self.null_id

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, user_ids: torch.Tensor) -> torch.Tensor:
        if self.is_dit:
            return self.backbone(latents, timestep=timesteps, class_labels=user_ids, return_dict=False)[0]
        context = self.condition(user_ids).to(latents.dtype)
        return self.backbone(latents, timesteps, encoder_hidden_states=context, return_dict=False)[0]
