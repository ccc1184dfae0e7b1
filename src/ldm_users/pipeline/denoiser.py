"""One denoiser interface whatever the backbone: (noisy latents, timesteps, user ids) -> prediction.

What differs by backbone is its family's (families.py); this class only holds the parts. Shipped verbatim in every
export beside pipeline_user_ldm.py: it imports only torch, diffusers and its siblings by relative import.
"""

from __future__ import annotations

import torch
from torch import nn

from .condition import UserConditionEncoder
from .families import Family, family_of


class UserDenoiser(nn.Module):
    """A backbone and, for the families that take one, a UserConditionEncoder (`family` says how they meet)."""

    def __init__(self, backbone: nn.Module, condition: UserConditionEncoder | None = None):
        super().__init__()
        family = family_of(backbone)
        if family.takes_encoder != (condition is not None):
            raise ValueError(f"a {type(backbone).__name__} backbone takes "
                             f"{'a' if family.takes_encoder else 'no'} user condition encoder.")
        self.family: Family = family
        self.backbone = backbone
        self.condition = condition
        family.prepare(backbone)

    @property
    def null_id(self) -> int:
        """Index of the unconditional (null) user: the extra row of the user table."""
        return self.family.null_id(self)

    @property
    def num_users(self) -> int:
        return self.null_id

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, user_ids: torch.Tensor) -> torch.Tensor:
        return self.family.forward(self, latents, timesteps, user_ids)
