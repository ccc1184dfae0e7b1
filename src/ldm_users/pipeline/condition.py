"""UserConditionEncoder: learned user tokens for the denoiser's attention, and a pooled user vector for its
timestep embedding.

Shipped verbatim in every export (as `user_encoder/condition.py`, a diffusers custom component): it imports only
torch and diffusers.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

INJECT = ("cross_attention", "time", "both")


class UserConditionEncoder(ModelMixin, ConfigMixin):
    """user ids (B,) -> (B, num_tokens, embed_dim) tokens (`forward`) and, with `pooled_dim`, a (B, pooled_dim)
    vector (`pooled`).

    The tokens go where text goes (a UNet's cross-attention context, Flux's text stream); the pooled vector is added
    to the timestep embedding (a UNet's class embedding, Flux's `pooled_projections`). `inject` says which of the two
    carries the user: cross_attention | time | both; the other gets the null user's row, so it is the same for every
    user (a UNet's cross-attention and Flux's joint attention need some context tokens).

    Row `num_users` is the null user: classifier-free guidance trains on it (with probability p_uncond)
    and sampling uses it for the unconditional branch. A diffusers ModelMixin so it saves and loads with
    `save_pretrained` / `from_pretrained` like any pipeline component; the user names travel in its config.
    """

    @register_to_config
    def __init__(self, num_users: int, embed_dim: int, num_tokens: int = 1, dropout: float = 0.1,
                 user_names: list[str] | None = None, pooled_dim: int | None = None,
                 inject: str = "cross_attention"):
        super().__init__()
        if user_names is not None and len(user_names) != num_users:
            raise ValueError(f"user_names has {len(user_names)} names for num_users={num_users}")
        if inject not in INJECT:
            raise ValueError(f"model.condition.inject={inject}: use one of {', '.join(INJECT)}.")
        if inject != "cross_attention" and not pooled_dim:
            raise ValueError(f"model.condition.inject={inject} adds the user to the timestep embedding, which needs "
                             f"a pooled vector: set model.condition.pooled_dim (e.g. to model.embed_dim).")
        # Module names differ from the config keys: ConfigMixin exposes those keys as attributes too.
        self.embedding = nn.Embedding(num_users + 1, num_tokens * embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.norm = nn.LayerNorm(embed_dim)
        self.token_dropout = nn.Dropout(dropout)
        if pooled_dim:
            self.pooled_embedding = nn.Embedding(num_users + 1, pooled_dim)
            nn.init.normal_(self.pooled_embedding.weight, std=0.02)
            self.pooled_norm = nn.LayerNorm(pooled_dim)

    @property
    def null_id(self) -> int:
        return self.config.num_users

    def _carrying(self, user_ids: torch.Tensor, stream: str) -> torch.Tensor:
        """The ids themselves if `stream` carries the user, else the null user for every sample."""
        if self.config.inject in (stream, "both"):
            return user_ids
        return torch.full_like(user_ids, self.null_id)

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        ids = self._carrying(user_ids, "cross_attention")
        tokens = self.embedding(ids).view(ids.shape[0], self.config.num_tokens, self.config.embed_dim)
        return self.token_dropout(self.norm(tokens))

    def pooled(self, user_ids: torch.Tensor) -> torch.Tensor:
        if not self.config.pooled_dim:
            raise ValueError("this UserConditionEncoder has no pooled vector (model.condition.pooled_dim is not set).")
        return self.token_dropout(self.pooled_norm(self.pooled_embedding(self._carrying(user_ids, "time"))))
