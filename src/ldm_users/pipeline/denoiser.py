"""One denoiser interface whatever the backbone: (noisy latents, timesteps, user ids) -> prediction.

`kind_of` is the one place that knows which kind of backbone a model is ("unet" | "dit" | "flux"), decided from
its class; everything else asks it (training, export, the memory model, the compatibility check). Shipped verbatim
in every export beside pipeline_user_ldm.py: it imports only torch, diffusers and its sibling by relative import.
"""

from __future__ import annotations

import torch
from torch import nn

from .condition import UserConditionEncoder
from .flux import flux_forward

# Backbone class name -> how it takes the users. Subclasses of these classes get their base's kind.
KINDS = {"UNet2DConditionModel": "unet", "DiTTransformer2DModel": "dit", "FluxTransformer2DModel": "flux"}


def kind_of(backbone_or_class_name) -> str:
    """"unet" | "dit" | "flux" for a backbone module, its class, or a class name (a dotted `_target_` works)."""
    if isinstance(backbone_or_class_name, str):
        names = [backbone_or_class_name.rsplit(".", 1)[-1]]
    else:
        cls = backbone_or_class_name if isinstance(backbone_or_class_name, type) else type(backbone_or_class_name)
        names = [c.__name__ for c in cls.__mro__]
    for name in names:
        if name in KINDS:
            return KINDS[name]
    raise ValueError(f"{names[0]} is not a known denoiser backbone: use one of {', '.join(KINDS)} "
                     f"(or a subclass of one).")


def disable_internal_label_dropout(backbone: nn.Module) -> None:
    # diffusers' DiT drops labels itself (10%, from the global RNG) in train mode; we do classifier-free
    # dropout in the trainer (train.p_uncond) so it is configurable and reproducible. The table keeps
    # its extra null row because that is sized at construction.
    for module in backbone.modules():
        if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0


class UserDenoiser(nn.Module):
    """A UNet2DConditionModel or FluxTransformer2DModel + UserConditionEncoder, or a DiTTransformer2DModel with users
    as its class labels. `kind` says which.

    UNet: the user's tokens are the cross-attention context; built with class_embed_type="projection"
    (model.condition.inject=time|both) it also adds the pooled user vector to its timestep embedding.
    Flux: the tokens take the place of its text tokens, the pooled vector that of its pooled text embedding (flux.py).
    """

    def __init__(self, backbone: nn.Module, condition: UserConditionEncoder | None = None):
        super().__init__()
        self.kind = kind_of(backbone)
        if (self.kind == "dit") == (condition is not None):
            raise ValueError(f"a {type(backbone).__name__} backbone takes "
                             f"{'no' if self.kind == 'dit' else 'a'} user condition encoder.")
        self.backbone = backbone
        self.condition = condition
        if self.kind == "dit":
            disable_internal_label_dropout(backbone)

    @property
    def null_id(self) -> int:
        """Index of the unconditional (null) user: the extra row of the user table."""
        if self.kind == "dit":
            return self.backbone.config.num_embeds_ada_norm  # DiT: the label table's extra CFG row
        return self.condition.null_id

    @property
    def num_users(self) -> int:
        return self.null_id

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, user_ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "dit":
            return self.backbone(latents, timestep=timesteps, class_labels=user_ids, return_dict=False)[0]
        tokens = self.condition(user_ids).to(latents.dtype)
        if self.kind == "flux":
            return flux_forward(self.backbone, latents, timesteps, tokens, self.condition.pooled(user_ids))
        time_users = None
        if self.backbone.config.class_embed_type == "projection":
            time_users = self.condition.pooled(user_ids).to(latents.dtype)
        return self.backbone(latents, timesteps, encoder_hidden_states=tokens, class_labels=time_users,
                             return_dict=False)[0]
