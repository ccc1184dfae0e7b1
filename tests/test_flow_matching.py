"""Training objectives: the flow-matching path and target, its timestep densities, min-SNR-gamma weights,
zero-terminal-SNR betas, and that Euler steps along the exact velocity land on the data point."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_users.errors import ConfigError
from ldm_users.training.objectives import (
    FlowMatching,
    VPrediction,
    build_objective,
    make_noise_scheduler,
    weighted_mse,
)
from tests.helpers import compose


def objective_for(*overrides: str):
    """The objective ldm-train builds for `experiment=smoke` plus the overrides."""
    cfg = compose("experiment=smoke", *overrides)
    return build_objective(cfg, make_noise_scheduler(cfg, "cpu"))


def test_flow_matching_noisy_input_and_velocity_target():
    objective = objective_for("model=flux_tiny")
    assert isinstance(objective, FlowMatching)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1000.0, 500.0, 250.0])  # the scheduler's scale: sigma = t / 1000
    noisy = objective.noisy(x0, noise, t)
    assert torch.allclose(noisy[0], noise[0])
    assert torch.allclose(noisy[1], 0.5 * x0[1] + 0.5 * noise[1])
    assert torch.allclose(noisy[2], 0.75 * x0[2] + 0.25 * noise[2])
    assert torch.equal(objective.target(x0, noise, t), noise - x0)
    assert objective.loss_weights(t) is None


def test_flow_matching_timesteps_are_the_schedulers_sigmas_times_1000():
    objective = objective_for("model=flux_tiny")
    torch.manual_seed(0)
    t = objective.sample_timesteps(4096, "cpu")
    assert t.dtype == torch.float32 and 1.0 <= t.min() and t.max() <= 1000.0
    table = objective.noise_scheduler.sigmas * 1000  # FlowMatchEulerDiscreteScheduler: timesteps = sigmas * 1000
    assert torch.isin(t, table).all()
    assert abs(t.mean().item() / 1000 - 0.5) < 0.03  # uniform density


@pytest.mark.parametrize("density, check", [
    ("logit_normal", lambda s: abs(s.median().item() - 0.5) < 0.03 and (s.sub(0.5).abs() < 0.25).float().mean() > 0.7),
    ("mode", lambda s: abs(s.median().item() - 0.5) < 0.05),
])
def test_timestep_densities(density, check):
    objective = objective_for("model=flux_tiny", f"train.flow.timestep_density={density}")
    torch.manual_seed(0)
    sigmas = objective.sample_timesteps(8192, "cpu") / 1000
    assert check(sigmas)


def test_flow_loss_weighting_and_shift():
    objective = objective_for("model=flux_tiny", "train.flow.loss_weighting=cosmap", "train.flow.shift=3.0")
    t = torch.tensor([500.0])
    assert torch.allclose(objective.loss_weights(t), torch.tensor([2 / (math.pi * (1 - 1 + 0.5))]))
    assert objective.noise_scheduler.config.shift == 3.0
    torch.manual_seed(0)
    assert objective.sample_timesteps(4096, "cpu").mean() / 1000 > 0.6  # shift 3 moves training toward noise


def test_min_snr_gamma_weights_match_the_formula():
    plain = ("train.prediction_type=epsilon", "noise_scheduler.rescale_betas_zero_snr=false")  # the formula's schedule
    objective = objective_for("model=unet_tiny", "train.min_snr_gamma=5", *plain)
    t = torch.tensor([0, 100, 500, 999])
    alpha_bar = objective.noise_scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    expected_eps = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(objective.loss_weights(t), expected_eps, rtol=1e-5)
    assert objective.loss_weights(t)[0] < 0.01 and objective.loss_weights(t)[-1] == 1.0  # low noise down-weighted
    v = objective_for("model=unet_tiny", "train.min_snr_gamma=5", *plain, "train.prediction_type=v_prediction")
    assert torch.allclose(v.loss_weights(t), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), rtol=1e-5)
    assert objective_for("model=unet_tiny", "train.min_snr_gamma=null").loss_weights(t) is None
    # the default recipe (v, zero terminal SNR, min-SNR-5): finite weights in [0, 1] even where the SNR is 0
    weights = objective_for("model=unet_tiny").loss_weights(t)
    assert torch.isfinite(weights).all() and (weights >= 0).all() and (weights <= 1).all()


def test_weighted_mse_is_plain_mse_with_unit_weights():
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    plain = weighted_mse(pred, target, None)
    assert torch.allclose(weighted_mse(pred, target, torch.ones(4)), plain)
    only_first = weighted_mse(pred, target, torch.tensor([4.0, 0, 0, 0]))
    assert torch.allclose(only_first, (pred[0] - target[0]).pow(2).mean())


def test_zero_terminal_snr_makes_the_last_step_pure_noise():
    objective = objective_for("model=unet_tiny", "train.prediction_type=v_prediction",
                              "noise_scheduler.rescale_betas_zero_snr=true")
    assert isinstance(objective, VPrediction)
    assert objective.noise_scheduler.alphas_cumprod[-1] == 0
    assert objective_for("model=unet_tiny").noise_scheduler.alphas_cumprod[-1] == 0  # the default recipe
    assert objective_for("model=unet_tiny", "noise_scheduler.rescale_betas_zero_snr=false",
                         "train.prediction_type=epsilon").noise_scheduler.alphas_cumprod[-1] > 0
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 999])
    assert torch.allclose(objective.noisy(x0, noise, t), noise, atol=1e-6)
    assert torch.allclose(objective.target(x0, noise, t), -x0, atol=1e-6)  # v = sqrt(a) noise - sqrt(1-a) x0


@pytest.mark.parametrize("overrides, key", [
    (["model=unet_tiny", "train.prediction_type=epsilon"], "train.prediction_type=v_prediction"),  # zero SNR default
    (["model=flux_tiny", "train.min_snr_gamma=5"], "train.flow.loss_weighting"),
    (["model=flux_tiny", "train.flow.timestep_density=beta"], "train.flow.timestep_density=beta"),
    (["model=unet_tiny", "train.objective=rectified"], "train.objective=rectified"),
])
def test_bad_objective_settings_are_clear_errors(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        objective_for(*overrides)


def test_euler_along_the_exact_velocity_reproduces_the_data_point():
    """The pipeline's flow sampler, fed a 'model' whose velocity is the exact one toward a fixed point x0
    (noise - x0 = (x_t - x0) / sigma), must end on x0: this checks the timesteps and sigmas the pipeline gives."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ldm_users.pipeline.pipeline_user_ldm import set_timesteps

    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8)
    training = objective_for("model=flux_tiny").noise_scheduler
    for steps in (4, 50):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(training.config, use_dynamic_shifting=True)
        set_timesteps(scheduler, steps, "cpu", latent_size=8)
        x = torch.randn(2, 4, 8, 8)
        assert scheduler.sigmas[0] == 1.0
        for t in scheduler.timesteps:
            sigma = t / 1000  # the denoiser's timestep scale: sigma * num_train_timesteps
            velocity = (x - x0) / sigma
            x = scheduler.step(velocity, t, x, return_dict=False)[0]
        assert torch.allclose(x, x0, atol=1e-4), steps
