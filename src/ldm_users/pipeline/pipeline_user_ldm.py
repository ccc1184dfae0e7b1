"""UserLDMPipeline: a diffusers DiffusionPipeline that generates images in the style of chosen users.

    pipe = UserLDMPipeline.from_pretrained("outputs/runs/default/export")
    images = pipe(users=["alice", 3], num_inference_steps=50, guidance_scale=3.0, generator=g).images

Shipped verbatim in every export (the diffusers custom pipeline named in model_index.json), so it imports only
torch, diffusers, the standard library and its siblings by relative import.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Sequence

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

from .condition import UserConditionEncoder
from .denoiser import UserDenoiser
from .families import downsampling_factor, is_flow_matching
from .flux import PATCH, resolution_shift


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4):
    give the guided prediction the per-sample std of the conditional one, mixed back by `guidance_rescale`.

    The same formula as diffusers' `rescale_noise_cfg`, written here because its stable home
    (diffusers.pipelines.stable_diffusion) imports transformers, which an export must not need.
    """
    dims = list(range(1, noise_cfg.ndim))
    rescaled = noise_cfg * (noise_pred_cond.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def guided(denoiser: UserDenoiser, model_input, timesteps, ids, guidance_scale: float, guidance_rescale: float = 0.0):
    """Classifier-free guidance with the conditional and null branches in one batched forward."""
    if guidance_scale == 1.0:
        return denoiser(model_input, timesteps, ids)
    null = torch.full_like(ids, denoiser.null_id)
    out = denoiser(torch.cat([model_input, model_input]), torch.cat([timesteps, timesteps]), torch.cat([ids, null]))
    cond, uncond = out.chunk(2)
    prediction = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        prediction = rescale_noise_cfg(prediction, cond, guidance_rescale)
    return prediction


def set_timesteps(scheduler, num_inference_steps: int, device, latent_size: int) -> None:
    """The scheduler's timesteps for this many steps. Flow-matching schedulers get FluxPipeline's evenly spaced
    sigmas 1 .. 1/N and, with use_dynamic_shifting, its resolution shift mu for (latent_size/2)^2 image tokens."""
    if not is_flow_matching(scheduler):
        scheduler.set_timesteps(num_inference_steps, device=device)
        return
    config = scheduler.config
    mu = None
    if config.get("use_dynamic_shifting"):
        mu = resolution_shift((latent_size // PATCH) ** 2, config.get("base_image_seq_len", 256),
                              config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                              config.get("max_shift", 1.15))
    sigmas = [1 - i / num_inference_steps for i in range(num_inference_steps)]  # np.linspace(1, 1/N, N)
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)


class UserLDMPipeline(DiffusionPipeline):
    """VAE + (UNet or Flux with a UserConditionEncoder | DiT with users as class labels) + a scheduler.

    Exactly one of `unet` / `transformer` is set. `user_names[i]` is the name of user index i.
    Classifier-free guidance runs the conditional and null-user branches in one batched forward.
    """

    _optional_components = ["unet", "transformer", "user_encoder"]

    # `user_encoder` has no annotation on purpose: loaded by diffusers from an export, the encoder's class comes from
    # user_encoder/condition.py, a different class object from the one this module imported, and diffusers' type
    # check would warn about a correct pipeline.
    def __init__(self, vae: AutoencoderKL, scheduler: SchedulerMixin, unet=None, transformer=None, user_encoder=None,
                 user_names: list[str] | None = None, sample_size: int | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("UserLDMPipeline needs exactly one of `unet` or `transformer`.")
        UserDenoiser(unet if unet is not None else transformer, user_encoder)  # the backbone's family checks the pair
        self.register_modules(vae=vae, scheduler=scheduler, unet=unet, transformer=transformer,
                              user_encoder=user_encoder)
        # Flux's config has no input size (it takes any number of tokens): the latent size it was trained at
        # travels here. UNet and DiT keep theirs in their own config (sample_size).
        self.register_to_config(user_names=list(user_names) if user_names is not None else None,
                                sample_size=sample_size)

    # -- users -------------------------------------------------------------------------------------------
    @property
    def backbone(self):
        return self.unet if self.unet is not None else self.transformer

    @property
    def denoiser(self) -> UserDenoiser:
        return UserDenoiser(self.backbone, self.user_encoder)

    @property
    def latent_size(self) -> int:
        """Height (= width) of the latents it samples: from the pipeline config where the backbone's config has no
        input size (Flux), else from the backbone's."""
        return int(self.config.get("sample_size") or self.backbone.config.sample_size)

    @property
    def image_size(self) -> int:
        """Height (= width) of the images it generates."""
        return self.latent_size * downsampling_factor(self.vae.config.down_block_types)

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

    # The hook every denoiser call goes through: predictor(denoiser, model_input, timesteps, ids, guidance_scale,
    # guidance_rescale) -> prediction. None is the plain guided call; ldm_users.inference.fast_sampling installs
    # CUDA-graph / compiled replays of the same call, which this shipped file knows nothing about.
    predictor = None

    def set_predictor(self, predictor) -> None:
        self.predictor = predictor

    def predict_noise(self, denoiser: UserDenoiser, latents, t, ids, guidance_scale: float,
                      guidance_rescale: float = 0.0):
        """One denoiser call; with guidance the conditional and null branches share one batched forward."""
        scale = getattr(self.scheduler, "scale_model_input", None)  # flow-matching schedulers have none
        model_input = scale(latents, t) if scale is not None else latents
        # Broadcast the scheduler's own timestep tensor (int(t) would sync the GPU at every step), in its own dtype:
        # Euler-type schedulers step through fractional timesteps.
        t = t if torch.is_tensor(t) else torch.tensor(t)
        timesteps = t.to(latents.device).reshape(1).expand(latents.shape[0])
        predictor = self.predictor or guided
        return predictor(denoiser, model_input, timesteps, ids, guidance_scale, guidance_rescale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scaling = getattr(self.vae.config, "scaling_factor", 1.0) or 1.0
        latents = latents.to(self.vae.dtype) / scaling
        return self.vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, users: Sequence[str | int], num_inference_steps: int = 50, guidance_scale: float = 3.0,
                 guidance_rescale: float = 0.0, generator: torch.Generator | None = None, eta: float = 0.0,
                 num_images_per_user: int = 1, batch_size: int | None = None, output_type: str = "pil",
                 latents: torch.Tensor | None = None, return_dict: bool = True, show_progress: bool | None = None):
        """`num_images_per_user` images for each of `users` (names or indices). output_type: pil | np | pt (images
        in [-1, 1]) | latent. `guidance_rescale` in [0, 1] (Lin et al. 2023; 0 = off). `show_progress`: the sampling
        bar; None: as set_progress_bar_config(disable=...) says, else only when stderr is a terminal (in a log
        file each redraw would be a line)."""
        denoiser = self.denoiser
        backbone = denoiser.backbone
        device = self._execution_device
        dtype = next(backbone.parameters()).dtype
        ids = torch.tensor([i for i in self.user_ids(users) for _ in range(num_images_per_user)], device=device)
        size = self.latent_size
        shape = (len(ids), self.vae.config.latent_channels, size, size)
        # All starting noise is drawn at once, so images do not depend on batch_size.
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        batch_size = batch_size or len(ids)
        step_kwargs = self._step_kwargs(generator, eta)

        outputs = []
        chunks = list(range(0, len(ids), batch_size))
        config = getattr(self, "_progress_bar_config", {})  # what the caller set with set_progress_bar_config
        if show_progress is None:
            show_progress = not config["disable"] if "disable" in config else sys.stderr.isatty()
        self.set_progress_bar_config(**{**config, "disable": not show_progress})
        with self.progress_bar(total=len(chunks) * num_inference_steps) as bar:
            for start in chunks:
                # Reset per chunk: multistep schedulers keep state between steps. The initial sigma (Euler-type
                # schedulers) depends on the timesteps just set.
                set_timesteps(self.scheduler, num_inference_steps, device, size)
                x = latents[start:start + batch_size].float() * getattr(self.scheduler, "init_noise_sigma", 1.0)
                chunk_ids = ids[start:start + batch_size]
                for t in self.scheduler.timesteps:
                    prediction = self.predict_noise(denoiser, x.to(dtype), t, chunk_ids, guidance_scale,
                                                    guidance_rescale).float()
                    x = self.scheduler.step(prediction, t, x, **step_kwargs, return_dict=False)[0]
                    bar.update()
                outputs.append(x if output_type == "latent" else self.decode(x))
        result = torch.cat(outputs)
        self.maybe_free_model_hooks()
        if output_type not in ("pt", "latent"):
            array = ((result + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
            result = self.numpy_to_pil(array) if output_type == "pil" else array
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)

    # -- loading without running an export's code ----------------------------------------------------------
    _components = ("vae", "scheduler", "unet", "transformer", "user_encoder")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, **unsupported):
        """Load a local export with the code installed here, never with code from the export's folder.

        An export's model_index.json names the pipeline and user-encoder modules shipped beside its weights, so
        diffusers' loader (`DiffusionPipeline.from_pretrained(export, trust_remote_code=True)`) imports those files.
        This one reads model_index.json, takes each component's class from diffusers (models and schedulers only)
        or this package (the user encoder), and reads configs and safetensors weights: a tampered export cannot run
        code through it.
        """
        folder = Path(pretrained_model_name_or_path)
        if unsupported:
            raise TypeError(f"UserLDMPipeline.from_pretrained takes a local export and torch_dtype only (got "
                            f"{', '.join(sorted(unsupported))}); DiffusionPipeline.from_pretrained(..., "
                            f"trust_remote_code=True) is diffusers' full loader.")
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} is not an exported pipeline: it has no model_index.json.")
        index = json.loads((folder / "model_index.json").read_text())
        parts = {}
        for name in cls._components:
            library, class_name = index.get(name) or (None, None)
            if library is None:
                continue
            component = cls._component_class(name, class_name)
            if issubclass(component, SchedulerMixin):
                parts[name] = component.from_pretrained(folder, subfolder=name)
            else:
                parts[name] = component.from_pretrained(folder, subfolder=name, torch_dtype=torch_dtype,
                                                        use_safetensors=True)
        return cls(**parts, user_names=index.get("user_names"), sample_size=index.get("sample_size"))

    @staticmethod
    def _component_class(name: str, class_name: str) -> type:
        if name == "user_encoder" and class_name == UserConditionEncoder.__name__:
            return UserConditionEncoder
        component = getattr(diffusers, class_name, None) if name != "user_encoder" else None
        if not (isinstance(component, type) and issubclass(component, (ModelMixin, SchedulerMixin))):
            raise ValueError(f"model_index.json names {class_name!r} for {name}: not a diffusers model or "
                             f"scheduler this pipeline can load.")
        return component
