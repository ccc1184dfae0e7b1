"""Backbone families: everything that differs between a UNet, a DiT and a Flux transformer, in one class each.

A family says how its backbone takes the user (a UserConditionEncoder's tokens, or the backbone's own label table),
which row is the null user, which pipeline slot holds it, how latents become its input (Flux packs 2x2 patches),
which objective and sampler it trains and samples with by default, and what its config must satisfy. Everything
else (training, export, the memory model, the compatibility check) asks the family and never branches on it.

The latent geometry lives here too (`latent_size`): it is the one formula for how far the VAE shrinks an image.

Shipped verbatim in every export beside pipeline_user_ldm.py: it imports only torch, diffusers and its siblings by
relative import, and its config checks take plain dicts (the config's `model.denoiser` and `model.condition`).

A new family is a subclass registered in FAMILIES plus a config base `conf/model/_base_/<name>.yaml`
(docs/architecture.md shows one).
"""

from __future__ import annotations

from collections.abc import Mapping

from .flux import PATCH, flux_forward


def downsampling_factor(down_blocks) -> int:
    """How many pixels a latent spans per side: each VAE down block but the last halves the image. `down_blocks`:
    the VAE's down_block_types or their count."""
    count = down_blocks if isinstance(down_blocks, int) else len(down_blocks)
    return 2 ** (int(count) - 1)


def latent_size(resolution, down_blocks) -> int:
    """Height (= width) of the VAE latents of a `resolution`-pixel image: 128 px with 3 down blocks -> 32."""
    return int(resolution) // downsampling_factor(down_blocks)


def is_flow_matching(scheduler) -> bool:
    """Whether a scheduler (instance, class, class name, dotted `_target_` or bare config dict) steps along a
    flow-matching velocity rather than a noise / v prediction over betas. A model trained with one kind cannot be
    sampled by the other. diffusers names every flow-matching scheduler FlowMatch*; a bare config (diffusers keeps
    no class name in it) is recognised by the key only those schedulers have and the betas they lack."""
    if isinstance(scheduler, Mapping):
        return "use_dynamic_shifting" in scheduler and "beta_schedule" not in scheduler
    if isinstance(scheduler, str):
        name = scheduler.replace(".from_config", "").rsplit(".", 1)[-1]
    else:
        name = (scheduler if isinstance(scheduler, type) else type(scheduler)).__name__
    return name.startswith("FlowMatch")


class Family:
    """The defaults are a UNet-like backbone whose users come from a UserConditionEncoder."""

    name: str = ""
    backbone_class: str = ""            # the diffusers class; subclasses of it belong to the family too
    slot: str = "transformer"           # UserLDMPipeline's component that holds the backbone
    objective: str = "diffusion"        # train.objective's default (diffusion | flow_matching)
    takes_encoder: bool = True          # users through a UserConditionEncoder (else the backbone's label table)
    packing: int = 1                    # latent channels per input feature (Flux: a 2x2 patch per token)
    size_in_pipeline: bool = False      # its config has no input size: the pipeline config keeps the latent size
    channels_last: bool = False         # hardware.channels_last applies (convolutional backbones)
    attention_dispatch: bool = False    # attention kernels chosen by diffusers' dispatch, not processors
    sampler: str | None = None          # the sampler its config base picks (None: conf/config.yaml's default)
    users_key: str = "model.condition.num_users"

    # -- the model ---------------------------------------------------------------------------------------------
    def prepare(self, backbone) -> None:
        """Adjust a freshly built or loaded backbone before it is used."""

    def null_id(self, denoiser) -> int:
        """Index of the unconditional (null) user: the extra row of the user table."""
        return denoiser.condition.null_id

    def forward(self, denoiser, latents, timesteps, user_ids):
        tokens = denoiser.condition(user_ids).to(latents.dtype)
        time_users = None
        if denoiser.backbone.config.class_embed_type == "projection":
            time_users = denoiser.condition.pooled(user_ids).to(latents.dtype)
        return denoiser.backbone(latents, timesteps, encoder_hidden_states=tokens, class_labels=time_users,
                                 return_dict=False)[0]

    def input_channels(self, latent_channels: int) -> int:
        return int(latent_channels) * self.packing

    def pipeline_sample_size(self, size: int | None) -> int | None:
        """What the pipeline config records as the latent size (None where the backbone's config has it)."""
        if not self.size_in_pipeline:
            return None
        if size is None:
            raise ValueError(f"a {self.backbone_class} pipeline needs the latent size it samples at "
                             f"(its config has none).")
        return int(size)

    def build_kwargs(self, model: dict) -> tuple[dict, dict]:
        """(backbone kwargs, condition-encoder kwargs) derived from `model` beyond what the config lists."""
        return {}, {}

    # -- config checks (plain dicts: model.denoiser, model.condition) ------------------------------------------
    def model_users(self, den: dict, cond: dict | None):
        return (cond or {}).get("num_users")

    def problems(self, den: dict, cond: dict | None, latent_channels: int, size: int, factor: int) -> list[str]:
        """One line per inconsistency of the family's config with the VAE latents (`latent_channels`, `size` x
        `size`, `factor` pixels per latent) or with itself."""
        problems = []
        channels = self.input_channels(latent_channels)
        packed = f" x {self.packing} ({self.name} packs {PATCH}x{PATCH} patches)" if self.packing > 1 else ""
        for key in ("in_channels", "out_channels"):
            value = den.get(key)
            if value is not None and int(value) != channels:
                problems.append(f"model.denoiser.{key}={value} but vae.autoencoder.latent_channels={latent_channels}"
                                f"{packed}: set model.denoiser.{key}={channels} (or remove the override: it is "
                                f"derived).")
        if not self.size_in_pipeline and int(den["sample_size"]) != size:
            problems.append(f"model.denoiser.sample_size={den['sample_size']} but the latents are {size}x{size} "
                            f"(data.resolution / {factor}): set model.denoiser.sample_size={size}.")
        return problems + self.own_problems(den, cond or {})

    def own_problems(self, den: dict, cond: dict) -> list[str]:
        return []


class UNetFamily(Family):
    """UNet2DConditionModel: the user's tokens are the cross-attention context; with model.condition.inject=time or
    both the pooled user vector is also added to its timestep embedding (diffusers' projection class embedding)."""

    name, backbone_class, slot, channels_last = "unet", "UNet2DConditionModel", "unet", True

    def build_kwargs(self, model: dict) -> tuple[dict, dict]:
        # Derived here so the widths cannot disagree, and absent for inject=cross_attention so no unused weights
        # exist (DDP refuses those).
        cond = model.get("condition")
        if cond is None or cond.get("inject", "cross_attention") == "cross_attention":
            return {}, {}
        pooled_dim = int(cond.get("pooled_dim") or model["embed_dim"])
        return ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": pooled_dim},
                {"pooled_dim": pooled_dim})

    def own_problems(self, den: dict, cond: dict) -> list[str]:
        problems = []
        channels = [int(c) for c in den["block_out_channels"]]
        if len(den["down_block_types"]) != len(channels) or len(den["up_block_types"]) != len(channels):
            problems.append(f"model.denoiser has {len(channels)} block_out_channels but {len(den['down_block_types'])} "
                            f"down and {len(den['up_block_types'])} up block types: give them the same length.")
        if int(den["cross_attention_dim"]) != int(cond["embed_dim"]):
            problems.append(f"model.denoiser.cross_attention_dim={den['cross_attention_dim']} but "
                            f"model.condition.embed_dim={cond['embed_dim']}: set both from model.embed_dim "
                            f"(e.g. model.embed_dim={den['cross_attention_dim']}).")
        heads = den.get("attention_head_dim", 8)  # diffusers' UNet uses this value as the number of heads
        head_list = list(heads) if not isinstance(heads, int) else [heads] * len(channels)
        for ch, h, block in zip(channels, head_list, den["down_block_types"]):
            if "CrossAttn" in block and int(ch) % int(h):
                problems.append(f"model.denoiser.attention_head_dim={h} (attention heads) does not divide the "
                                f"{ch} channels of a {block}: use a divisor of {ch}, e.g. model.denoiser."
                                f"attention_head_dim=8.")
        groups = int(den.get("norm_num_groups", 32))
        for ch in channels:
            if ch % groups:
                problems.append(f"model.denoiser.block_out_channels has {ch}, not divisible by "
                                f"model.denoiser.norm_num_groups={groups}.")
        return problems


class DiTFamily(Family):
    """DiTTransformer2DModel: users are its class labels (adaLN-Zero); the label table's extra row is the null user,
    so there is no user encoder."""

    name, backbone_class, takes_encoder = "dit", "DiTTransformer2DModel", False
    users_key = "model.denoiser.num_embeds_ada_norm"

    def prepare(self, backbone) -> None:
        # diffusers' DiT drops labels itself (10%, from the global RNG) in train mode; classifier-free dropout is
        # the trainer's (train.p_uncond), configurable and reproducible. The table keeps its extra null row because
        # that is sized at construction.
        for module in backbone.modules():
            if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
                module.dropout_prob = 0.0

    def null_id(self, denoiser) -> int:
        return denoiser.backbone.config.num_embeds_ada_norm

    def forward(self, denoiser, latents, timesteps, user_ids):
        return denoiser.backbone(latents, timestep=timesteps, class_labels=user_ids, return_dict=False)[0]

    def model_users(self, den: dict, cond: dict | None):
        return den.get("num_embeds_ada_norm")

    def own_problems(self, den: dict, cond: dict) -> list[str]:
        patch = int(den["patch_size"])
        if int(den["sample_size"]) % patch:
            return [f"model.denoiser.patch_size={patch} does not divide the latent size {den['sample_size']}: "
                    f"use a divisor, e.g. model.denoiser.patch_size=2."]
        return []


class FluxFamily(Family):
    """FluxTransformer2DModel: latents packed into 2x2-patch tokens (flux.py), the user's tokens in place of its text
    tokens and the pooled user vector in place of its pooled text embedding; trained by flow matching."""

    name, backbone_class, objective, sampler = "flux", "FluxTransformer2DModel", "flow_matching", "flow_euler"
    packing, size_in_pipeline, attention_dispatch = PATCH * PATCH, True, True

    def forward(self, denoiser, latents, timesteps, user_ids):
        tokens = denoiser.condition(user_ids).to(latents.dtype)
        return flux_forward(denoiser.backbone, latents, timesteps, tokens, denoiser.condition.pooled(user_ids))

    def problems(self, den: dict, cond: dict | None, latent_channels: int, size: int, factor: int) -> list[str]:
        problems = super().problems(den, cond, latent_channels, size, factor)
        if size % PATCH:
            even = PATCH * factor * max(1, size // PATCH)
            problems.append(f"the latents are {size}x{size} but Flux packs {PATCH}x{PATCH} patches: use a "
                            f"data.resolution giving even latents, e.g. data.resolution={even}.")
        return problems

    def own_problems(self, den: dict, cond: dict) -> list[str]:
        problems = []
        rope, head = [int(d) for d in den["axes_dims_rope"]], int(den["attention_head_dim"])
        if sum(rope) != head:
            problems.append(f"model.denoiser.axes_dims_rope={rope} sums to {sum(rope)} but attention_head_dim="
                            f"{head}: the rotary axes must split the head exactly (e.g. [{head // 8}, "
                            f"{3 * head // 8}, {3 * head // 8}]).")
        if int(den["joint_attention_dim"]) != int(cond["embed_dim"]):
            problems.append(f"model.denoiser.joint_attention_dim={den['joint_attention_dim']} but "
                            f"model.condition.embed_dim={cond['embed_dim']}: set both from model.embed_dim.")
        if int(den["pooled_projection_dim"]) != int(cond.get("pooled_dim") or 0):
            problems.append(f"model.denoiser.pooled_projection_dim={den['pooled_projection_dim']} but model.condition."
                            f"pooled_dim={cond.get('pooled_dim')}: set both from model.embed_dim.")
        return problems


FAMILIES = {family.backbone_class: family for family in (UNetFamily(), DiTFamily(), FluxFamily())}


def family_of(backbone) -> Family:
    """The family of a backbone module, its class, or a class name (a dotted `_target_` works); subclasses of a
    family's class belong to it."""
    if isinstance(backbone, str):
        names = [backbone.rsplit(".", 1)[-1]]
    else:
        cls = backbone if isinstance(backbone, type) else type(backbone)
        names = [c.__name__ for c in cls.__mro__]
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    raise ValueError(f"{names[0]} is not a known denoiser backbone: use one of {', '.join(FAMILIES)} "
                     f"(or a subclass of one).")


def family_named(name: str) -> Family:
    """The family called `name` ("unet", "dit", "flux", ...)."""
    for family in FAMILIES.values():
        if family.name == name:
            return family
    raise ValueError(f"no backbone family {name!r}: use one of {', '.join(f.name for f in FAMILIES.values())}.")
