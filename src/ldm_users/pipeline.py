"""UserLDMPipeline: a diffusers DiffusionPipeline that generates images in the style of chosen users.

    pipe = UserLDMPipeline.from_pretrained("outputs/runs/default/export")
    images = pipe(users=["alice", 3], num_inference_steps=50, guidance_scale=3.0, generator=g).images
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ldm_users.models.condition import UserConditionEncoder
from ldm_users.models.denoiser import UserDenoiser
from ldm_users.perf.fast_sampling import CompiledDenoiser, GraphedGuidance, guided, resolve_mode


class UserLDMPipeline(DiffusionPipeline):
    """VAE + (UNet with a UserConditionEncoder | DiT with users as class labels) + a scheduler.

    Exactly one of `unet` / `transformer` is set. `user_names[i]` is the name of user index i.
    Classifier-free guidance runs the conditional and null-user branches in one batched forward.
    """

    _optional_components = ["unet", "transformer", "user_encoder"]

    def __init__(self, vae: AutoencoderKL, scheduler: SchedulerMixin, unet=None, transformer=None,
                 user_encoder: UserConditionEncoder | None = None, user_names: list[str] | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("UserLDMPipeline needs exactly one of `unet` or `transformer`.")
        if unet is not None and user_encoder is None:
            raise ValueError("a UNet pipeline needs its `user_encoder`.")
        self.register_modules(vae=vae, scheduler=scheduler, unet=unet, transformer=transformer,
                              user_encoder=user_encoder)
        self.register_to_config(user_names=list(user_names) if user_names is not None else None)

    # -- users -------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> UserDenoiser:
        return UserDenoiser(self.unet if self.unet is not None else self.transformer, self.user_encoder)

    @property
    def user_names(self) -> list[str]:
        names = self.config.user_names
        return list(names) if names else [str(i) for i in range(self.denoiser.num_users)]

    def user_ids(self, users: Sequence[str | int]) -> list[int]:
        """Names or indices -> indices, with a clear error for an unknown user."""
        names = self.user_names
        ids = []
        for user in users:
            if isinstance(user, str) and not user.lstrip("-").isdigit():
                if user not in names:
                    raise ValueError(f"unknown user {user!r}; known users: {', '.join(names[:20])}"
                                     f"{' ...' if len(names) > 20 else ''}")
                ids.append(names.index(user))
            else:
                index = int(user)
                if not 0 <= index < len(names):
                    raise ValueError(f"user index {index} is out of range: there are {len(names)} users (0..{len(names) - 1}).")
                ids.append(index)
        return ids

    # -- sampling ----------------------------------------------------------------------------------------
    def _step_kwargs(self, generator, eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # How the denoiser calls run: off | auto | cuda_graph | compile (ldm_users.perf.fast_sampling).
    fast_sampling = "off"

    def predict_noise(self, denoiser: UserDenoiser, latents, t, ids, guidance_scale: float, fast=None):
        """One denoiser call; with guidance the conditional and null branches share one batched forward."""
        model_input = self.scheduler.scale_model_input(latents, t)
        # Broadcast the scheduler's own timestep tensor: int(t) would sync the GPU at every step.
        t = t if torch.is_tensor(t) else torch.tensor(t)
        timesteps = t.to(latents.device, torch.long).reshape(1).expand(latents.shape[0])
        if fast is not None:
            return fast(denoiser, model_input, timesteps, ids, guidance_scale)
        return guided(denoiser, model_input, timesteps, ids, guidance_scale)

    def _fast_predictor(self, denoiser: UserDenoiser, device: torch.device):
        mode = resolve_mode(self.fast_sampling, device)
        if mode == "off" or denoiser.backbone.training:  # dropout in train mode: no graphs
            return None
        cache = self.__dict__.setdefault("_fast_cache", {})
        if mode not in cache:
            cache[mode] = GraphedGuidance() if mode == "cuda_graph" else CompiledDenoiser()
        return cache[mode]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scaling = getattr(self.vae.config, "scaling_factor", 1.0) or 1.0
        latents = latents.to(self.vae.dtype) / scaling
        return self.vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, users: Sequence[str | int], num_inference_steps: int = 50, guidance_scale: float = 3.0,
                 generator: torch.Generator | None = None, eta: float = 0.0, num_images_per_user: int = 1,
                 batch_size: int | None = None, output_type: str = "pil", latents: torch.Tensor | None = None,
                 return_dict: bool = True, show_progress: bool = True):
        denoiser = self.denoiser
        backbone = denoiser.backbone
        device = self._execution_device
        dtype = next(backbone.parameters()).dtype
        ids = torch.tensor([i for i in self.user_ids(users) for _ in range(num_images_per_user)], device=device)
        size = backbone.config.sample_size
        shape = (len(ids), backbone.config.in_channels, size, size)
        # All starting noise is drawn at once, so images do not depend on batch_size.
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma
        batch_size = batch_size or len(ids)
        step_kwargs = self._step_kwargs(generator, eta)
        fast = self._fast_predictor(denoiser, device)

        outputs = []
        chunks = list(range(0, len(ids), batch_size))
        self.set_progress_bar_config(disable=not show_progress)
        with self.progress_bar(total=len(chunks) * num_inference_steps) as bar:
            for start in chunks:
                # Reset per chunk: multistep schedulers keep state between steps.
                self.scheduler.set_timesteps(num_inference_steps, device=device)
                timesteps = self.scheduler.timesteps
                x = latents[start:start + batch_size]
                chunk_ids = ids[start:start + batch_size]
                for t in timesteps:
                    eps = self.predict_noise(denoiser, x.to(dtype), t, chunk_ids, guidance_scale, fast).float()
                    x = self.scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
                    bar.update()
                outputs.append(self.decode(x))
        images = torch.cat(outputs)
        self.maybe_free_model_hooks()
        if output_type == "pt":
            result = images
        else:
            array = ((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            result = self.numpy_to_pil(array) if output_type == "pil" else array
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
