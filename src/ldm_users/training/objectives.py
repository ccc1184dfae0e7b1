"""What the denoiser is trained to predict: timesteps, the noisy input, the regression target, loss weights.

The LDM step calls one Objective per micro-batch, in this order (the RNG draws happen in this order, so a run is
a pure function of its seed):

    t      = objective.sample_timesteps(batch, device)
    x_t    = objective.noisy(z, noise, t)
    target = objective.target(z, noise, t)
    loss   = weighted_mse(pred, target, objective.loss_weights(t))     # None = every sample weighs the same

`train.objective` picks the family:
- diffusion: the DDPM forward process of `noise_scheduler`, predicting `train.prediction_type` = `epsilon` (the
  noise) or `v_prediction` (v = alpha_t * noise - sigma_t * z); `train.min_snr_gamma` weights the loss by
  min-SNR-gamma (Hang et al. 2023); `noise_scheduler.rescale_betas_zero_snr` gives zero terminal SNR (Lin et al.
  2023; it needs v-prediction).
- flow_matching: rectified flow as SD3 and Flux train it: x_t = (1 - t) z + t noise, the velocity noise - z as the
  target, t drawn from `train.flow.timestep_density` (uniform | logit_normal | mode), optionally SD3's loss weighting.
Both give the model its timesteps on the scale its sampler uses (0..num_train_timesteps: Flow matching's t x 1000,
as FlowMatchEulerDiscreteScheduler's timesteps = sigmas x 1000), so one denoiser call serves training and sampling.
The densities, weightings and SNR are diffusers.training_utils' own functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
from omegaconf import DictConfig

from ldm_users.errors import ConfigError
from ldm_users.inference.samplers import training_noise_scheduler

DENSITIES = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def make_noise_scheduler(cfg: DictConfig, device):
    """The training noise schedule of `train.objective` (inference.samplers.training_noise_scheduler); a DDPM
    schedule's alphas on the device, so add_noise stays there."""
    scheduler = training_noise_scheduler(cfg)
    if hasattr(scheduler, "alphas_cumprod"):
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


class Objective:
    """Epsilon prediction on a DDPM schedule: the base every objective refines. With `min_snr_gamma`, each sample's
    loss is weighted by min(SNR, gamma) / SNR, which caps the weight of the low-noise timesteps."""

    name = "epsilon"

    def __init__(self, noise_scheduler, min_snr_gamma: float | None = None):
        self.noise_scheduler = noise_scheduler
        self.num_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.min_snr_gamma = min_snr_gamma

    def sample_timesteps(self, batch: int, device) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), device=device)

    def noisy(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(z, noise, t)

    def target(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        if self.min_snr_gamma is None:
            return None
        snr = compute_snr(self.noise_scheduler, t)
        return snr.clamp(max=self.min_snr_gamma) / self._snr_denominator(snr)

    @staticmethod
    def _snr_denominator(snr: torch.Tensor) -> torch.Tensor:
        return snr


class VPrediction(Objective):
    """v = alpha_t * noise - sigma_t * z; min-SNR weights min(SNR, gamma) / (SNR + 1), the same weight on the
    implied error in z as epsilon's."""

    name = "v_prediction"

    def target(self, z, noise, t):
        return self.noise_scheduler.get_velocity(z, noise, t)

    @staticmethod
    def _snr_denominator(snr):
        return snr + 1


class FlowMatching(Objective):
    """x_t = (1 - sigma) z + sigma noise with sigma = t / num_train_timesteps, target noise - z."""

    name = "flow_matching"

    def __init__(self, noise_scheduler, density: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, weighting: str = "none"):
        super().__init__(noise_scheduler)
        self.density, self.weighting = density, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self._timesteps = noise_scheduler.timesteps.clone()  # sigmas x num_train_timesteps, shifted by its `shift`

    def sample_timesteps(self, batch, device):
        # As diffusers' SD3 / Flux training scripts: u ~ density on [0, 1], then the scheduler's timestep at u.
        u = compute_density_for_timestep_sampling(self.density, batch, self.logit_mean, self.logit_std,
                                                  self.mode_scale, device=device)
        index = (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)
        if self._timesteps.device != index.device:
            self._timesteps = self._timesteps.to(index.device)
        return self._timesteps[index]

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_timesteps

    def noisy(self, z, noise, t):
        sigma = self.sigmas(t).reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype)
        return (1 - sigma) * z + sigma * noise

    def target(self, z, noise, t):
        return noise - z

    def loss_weights(self, t):
        if self.weighting == "none":
            return None
        return compute_loss_weighting_for_sd3(self.weighting, self.sigmas(t))


OBJECTIVES = {cls.name: cls for cls in (Objective, VPrediction)}  # diffusion, by train.prediction_type


def _choice(value, key: str, options) -> str:
    if str(value) not in options:
        raise ConfigError(f"{key}={value}: use one of {', '.join(options)}.")
    return str(value)


def _flow_matching(cfg: DictConfig, noise_scheduler) -> FlowMatching:
    if cfg.train.get("min_snr_gamma") is not None:
        raise ConfigError("train.min_snr_gamma weights the diffusion objective; with train.objective=flow_matching use "
                          "train.flow.loss_weighting=sigma_sqrt|cosmap, or set train.min_snr_gamma=null.")
    flow = cfg.train.flow
    return FlowMatching(noise_scheduler, _choice(flow.timestep_density, "train.flow.timestep_density", DENSITIES),
                        float(flow.logit_mean), float(flow.logit_std), float(flow.mode_scale),
                        _choice(flow.loss_weighting, "train.flow.loss_weighting", FLOW_WEIGHTINGS))


def build_objective(cfg: DictConfig, noise_scheduler) -> Objective:
    """The objective of `train.objective` over `noise_scheduler` (make_noise_scheduler's)."""
    if _choice(cfg.train.get("objective", "diffusion"), "train.objective", ("diffusion", "flow_matching")) \
            == "flow_matching":
        return _flow_matching(cfg, noise_scheduler)
    kind = _choice(cfg.train.prediction_type, "train.prediction_type", OBJECTIVES)
    if noise_scheduler.config.get("rescale_betas_zero_snr") and kind == "epsilon":
        raise ConfigError("noise_scheduler.rescale_betas_zero_snr=true makes the last timestep pure noise, where "
                          "epsilon says nothing about the image: set train.prediction_type=v_prediction.")
    gamma = cfg.train.get("min_snr_gamma")
    if gamma is not None and float(gamma) <= 0:
        raise ConfigError(f"train.min_snr_gamma={gamma}: use a positive value (5 in the paper) or null.")
    return OBJECTIVES[kind](noise_scheduler, float(gamma) if gamma is not None else None)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error in fp32; with weights, each sample's mean error times its weight, averaged."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights.float()).mean()
