"""model=flux: packing as FluxPipeline does, users in the text stream and pooled vector, exact sizes, and the
pipeline's flow sampler."""

from __future__ import annotations

import pytest
import torch

from ldm_users.compat import check_compatibility
from ldm_users.errors import ConfigError
from ldm_users.models.build import build_denoiser
from ldm_users.pipeline.flux import image_ids, pack_latents, resolution_shift, unpack_latents
from tests.helpers import compose, hydra_job


def test_packing_is_2x2_patches_in_raster_order_with_matching_ids():
    latents = torch.randn(2, 4, 6, 8)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 3 * 4, 16)
    # token (row r, column c) holds channel ch of pixel (2r + dy, 2c + dx) at feature ch * 4 + dy * 2 + dx
    r, c, ch, dy, dx = 1, 2, 3, 1, 0
    assert tokens[1, r * 4 + c, ch * 4 + dy * 2 + dx] == latents[1, ch, 2 * r + dy, 2 * c + dx]
    assert torch.equal(unpack_latents(tokens, 6, 8), latents)
    ids = image_ids(6, 8, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[r * 4 + c].tolist() == [0.0, r, c]


def test_resolution_shift_is_fluxpipelines():
    assert resolution_shift(256) == pytest.approx(0.5)
    assert resolution_shift(4096) == pytest.approx(1.15)
    assert resolution_shift(16) < 0.5  # fewer tokens, less shift


def flux_denoiser(**overrides):
    cfg = compose("experiment=smoke", "model=flux_tiny", *[f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return build_denoiser(cfg, [f"u{i}" for i in range(4)]).eval()


@pytest.mark.parametrize("inject", ["both", "cross_attention", "time"])
def test_users_reach_flux_through_each_stream(inject):
    den = flux_denoiser(**{"model.condition.inject": inject})
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 30.5])
    a, b = den(latents, t, torch.tensor([0, 1])), den(latents, t, torch.tensor([2, 3]))
    assert a.shape == latents.shape and torch.isfinite(a).all()
    assert (a - b).abs().amax() > 1e-4
    # the stream that does not carry the user gets the null row for everyone
    tokens, pooled = den.condition(torch.tensor([0, 2])), den.condition.pooled(torch.tensor([0, 2]))
    assert torch.equal(tokens[0], tokens[1]) == (inject == "time")
    assert torch.equal(pooled[0], pooled[1]) == (inject == "cross_attention")


def test_flux_gets_fractional_timesteps_divided_by_1000(monkeypatch):
    den = flux_denoiser()
    seen = {}
    original = den.backbone.forward

    def spy(*args, **kwargs):
        seen["timestep"] = kwargs["timestep"].clone()
        seen["hidden"] = kwargs["hidden_states"].shape
        return original(*args, **kwargs)

    monkeypatch.setattr(den.backbone, "forward", spy)
    den(torch.randn(2, 4, 8, 8), torch.tensor([999.5, 0.25]), torch.tensor([0, 1]))
    assert torch.allclose(seen["timestep"], torch.tensor([0.9995, 0.00025]))
    assert seen["hidden"] == (2, 16, 16)


def test_model_flux_trains_by_flow_matching_and_samples_with_flow_euler():
    cfg = compose("model=flux", "data.num_users=31")  # its exact size is asserted in test_diagnose.py
    assert check_compatibility(cfg) == []
    assert cfg.sampler.name == "flow_euler" and cfg.train.objective == "flow_matching"
    assert compose("model=flux", "sampler=ddim").sampler.name == "ddim"  # the command line still wins


def test_an_older_flux_runs_saved_config_still_resolves():
    """Flux runs saved before ldm_input_channels name ${ldm_packed_channels:...} in their .hydra/config.yaml."""
    from omegaconf import OmegaConf

    old = OmegaConf.create({"latent_channels": 4, "in_channels": "${ldm_packed_channels:${latent_channels}}"})
    assert old.in_channels == compose("model=flux").model.denoiser.in_channels == 16


@pytest.mark.parametrize("override, key", [
    ("model.denoiser.axes_dims_rope=[4,4,4]", "axes_dims_rope"),
    ("model.denoiser.in_channels=4", "model.denoiser.in_channels=16"),
    ("data.resolution=20", "even latents"),
    ("sampler=ddim", "sampler=flow_euler"),
    ("model.denoiser.pooled_projection_dim=16", "pooled_dim"),
])
def test_flux_config_mistakes_name_the_fix(override, key):
    problems = check_compatibility(compose("experiment=smoke", "model=flux_tiny", override))
    assert any(key in p for p in problems), problems


def test_evaluation_knows_the_image_size_of_a_flux_pipeline():
    from types import SimpleNamespace

    from ldm_users.evaluation.evaluate import check_matches
    from ldm_users.inference.export import make_pipeline
    from ldm_users.models.build import build_vae

    cfg = compose("experiment=smoke", "model=flux_tiny")
    den = flux_denoiser()
    users = [f"u{i}" for i in range(4)]
    with pytest.raises(ValueError, match="latent size"):
        make_pipeline(build_vae(cfg), den, None, users)
    pipe = make_pipeline(build_vae(cfg), den, None, users, latent_size=8)
    assert pipe.latent_size == 8
    check_matches(pipe, SimpleNamespace(users=users, resolution=32))
    with pytest.raises(ConfigError, match="data.resolution=32"):
        check_matches(pipe, SimpleNamespace(users=users, resolution=64))


class ExactVelocity(torch.nn.Module):
    """Predicts noise - x0 toward a fixed x0 from the current sample: (x_t - x0) / sigma with sigma = t / 1000."""

    null_id = 4
    num_users = 4

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.backbone = torch.nn.Linear(1, 1)  # the pipeline reads the parameters' dtype and the training mode

    def forward(self, latents, timesteps, user_ids):
        sigma = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        return (latents - self.x0) / sigma


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pipeline_flow_sampling_with_the_exact_velocity_lands_on_the_data_point(monkeypatch, guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ldm_users.models.build import build_vae
    from ldm_users.pipeline import UserLDMPipeline

    cfg = compose("experiment=smoke", "model=flux_tiny")
    den = flux_denoiser()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = UserLDMPipeline(vae=build_vae(cfg).eval(), scheduler=scheduler, transformer=den.backbone,
                           user_encoder=den.condition, user_names=list("abcd"), sample_size=8)
    x0 = torch.randn(1, 4, 8, 8)
    monkeypatch.setattr(UserLDMPipeline, "denoiser", property(lambda self: ExactVelocity(x0)))
    out = pipe(users=["b"], num_inference_steps=30, guidance_scale=guidance, output_type="latent",
               generator=torch.Generator().manual_seed(0), show_progress=False).images
    assert torch.allclose(out, x0, atol=1e-4)


@pytest.mark.slow
def test_flux_tiny_smoke_run_trains_exports_and_samples_users_apart(tiny_run, tmp_path):
    """ldm-train experiment=smoke model=flux_tiny (on the shared smoke VAE): the export is a Flux + flow-matching
    pipeline that loads back and gives different images for different users from the same noise."""
    import json

    from ldm_users.cli.train import run
    from ldm_users.inference.loading import load_pipeline

    vae = tiny_run["run_dir"] / "vae" / "final"
    with hydra_job(tmp_path, "experiment=smoke", "model=flux_tiny", "logger=none", f"vae_path={vae}") as cfg:
        export = run(cfg)["export"]
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["transformer"][1] == "FluxTransformer2DModel"
    assert index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    pipe = load_pipeline(export)  # with the sampler it was trained with (sampler.json)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.use_dynamic_shifting
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    images = pipe(users=[0, 3], num_inference_steps=8, latents=noise, output_type="pt", show_progress=False).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert (images[0] - images[1]).abs().mean() > 1e-3
