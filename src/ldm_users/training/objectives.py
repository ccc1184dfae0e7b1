"""What the denoiser is trained to predict: timesteps, the noisy input, the regression target, loss weights.

The LDM step calls one Objective per micro-batch, in this order (the RNG draws happen in this order, so a run is
a pure function of its seed):

    t      = objective.sample_timesteps(batch, device)
    x_t    = objective.noisy(z, noise, t)
    target = objective.target(z, noise, t)
    loss   = weighted_mse(pred, target, objective.loss_weights(t))     # None = every sample weighs the same

`train.prediction_type` picks the objective: `epsilon` (the noise) or `v_prediction` (v = alpha_t * noise -
sigma_t * z), both on the DDPM noise schedule of `noise_scheduler`. New targets (flow matching) or weightings
(min-SNR) are one subclass and one entry in OBJECTIVES.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig

from ldm_users.errors import ConfigError


def make_noise_scheduler(cfg: DictConfig, device):
    """The training noise schedule (`noise_scheduler`), its alphas on the device so add_noise stays there."""
    scheduler = instantiate(cfg.noise_scheduler)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler


class Objective:
    """Epsilon prediction on a DDPM schedule: the base every objective refines."""

    name = "epsilon"

    def __init__(self, noise_scheduler):
        self.noise_scheduler = noise_scheduler
        self.num_timesteps = int(noise_scheduler.config.num_train_timesteps)

    def sample_timesteps(self, batch: int, device) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), device=device)

    def noisy(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(z, noise, t)

    def target(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return None


class VPrediction(Objective):
    name = "v_prediction"

    def target(self, z, noise, t):
        return self.noise_scheduler.get_velocity(z, noise, t)


OBJECTIVES = {cls.name: cls for cls in (Objective, VPrediction)}


def build_objective(cfg: DictConfig, noise_scheduler) -> Objective:
    kind = str(cfg.train.prediction_type)
    if kind not in OBJECTIVES:
        raise ConfigError(f"train.prediction_type={kind}: use one of {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[kind](noise_scheduler)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error in fp32; with weights, each sample's mean error times its weight, averaged."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights.float()).mean()
