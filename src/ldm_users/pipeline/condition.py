"""UserConditionEncoder: one learned embedding per user, fed to the UNet's cross-attention.

Shipped verbatim in every export (as `user_encoder/condition.py`, a diffusers custom component): it imports only
torch and diffusers.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class UserConditionEncoder(ModelMixin, ConfigMixin):
    """user ids (B,) -> (B, num_tokens, embed_dim) context for cross-attention.

    Row `num_users` is the null user: classifier-free guidance trains on it (with probability p_uncond)
    and sampling uses it for the unconditional branch. A diffusers ModelMixin so it saves and loads with
    `save_pretrained` / `from_pretrained` like any pipeline component; the user names travel in its config.
    """

    @register_to_config
    def __init__(self, num_users: int, embed_dim: int, num_tokens: int = 1, dropout: float = 0.1,
                 user_names: list[str] | None = None):
        super().__init__()
        if user_names is not None and len(user_names) != num_users:
            raise ValueError(f"user_names has {len(user_names)} names for num_users={num_users}")
        # Module names differ from the config keys: ConfigMixin exposes those keys as attributes too.
        self.embedding = nn.Embedding(num_users + 1, num_tokens * embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.norm = nn.LayerNorm(embed_dim)
        self.token_dropout = nn.Dropout(dropout)

    @property
    def null_id(self) -> int:
        return self.config.num_users

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(user_ids).view(user_ids.shape[0], self.config.num_tokens, self.config.embed_dim)
        return self.token_dropout(self.norm(tokens))
