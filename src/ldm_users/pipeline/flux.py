"""How a FluxTransformer2DModel takes latents and users: 2x2-packed latent tokens with their RoPE position ids, the
user's tokens where Flux has its text tokens, the pooled user vector where Flux has CLIP's, timesteps in [0, 1].

Packing, ids and the resolution shift are diffusers' FluxPipeline (`_pack_latents`, `_unpack_latents`,
`_prepare_latent_image_ids`, `calculate_shift`), replicated here because importing FluxPipeline needs
`transformers` (its CLIP/T5 text encoders), and this file must run inside an export with only torch + diffusers.
The one change: ids are made on the latents' device, so the call can be captured in a CUDA graph (no host copy).
"""

from __future__ import annotations

import torch

# Latents per side of the patch that becomes one token: a token has PATCH * PATCH times the latent channels. The one
# statement of Flux's packing: families.FluxFamily (channels, config checks) and the config's resolver read it.
PATCH = 2


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)  # any layout
    return latents.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W) for latent height and width (FluxPipeline._unpack_latents)."""
    b, _, channels = tokens.shape
    c = channels // (PATCH * PATCH)
    latents = tokens.reshape(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed tokens: (0, row, column) (FluxPipeline._prepare_latent_image_ids)."""
    rows, cols = height // PATCH, width // PATCH
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the flow-matching schedule's time shift, linear in the number of image tokens (FluxPipeline's
    calculate_shift): more tokens keep more noise longer."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flux_forward(backbone, latents: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
    """latents (B, C, H, W), timesteps on the scheduler's 0..num_train_timesteps scale (Flux multiplies its input by
    1000 itself, so it gets t / 1000 as FluxPipeline gives it), user tokens (B, T, joint_attention_dim) and pooled
    vector (B, pooled_projection_dim) -> the prediction, (B, C, H, W)."""
    _, _, height, width = latents.shape
    if height % PATCH or width % PATCH:
        raise ValueError(f"Flux packs {PATCH}x{PATCH} latent patches: the latents are {height}x{width}, which is not "
                         f"even.")
    dtype = latents.dtype
    out = backbone(hidden_states=pack_latents(latents), encoder_hidden_states=tokens.to(dtype),
                   pooled_projections=pooled.to(dtype), timestep=timesteps.to(dtype) / 1000,
                   img_ids=image_ids(height, width, latents.device, dtype),
                   txt_ids=torch.zeros(tokens.shape[1], 3, device=latents.device, dtype=dtype), return_dict=False)[0]
    return unpack_latents(out, height, width)
