"""Config groups compose for every combination, derived values agree, and every mismatch is one clear line."""

import itertools
import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_users.compat import assert_compatible, check_compatibility
from ldm_users.errors import ConfigError
from ldm_users.models.build import latent_shape, model_family
from ldm_users.pipeline.families import is_flow_matching
from tests.helpers import REPO, compose

CONF = REPO / "conf"


def options(group: str) -> list[str]:
    """The options of a config group: its files in conf/ (a new option is covered without editing the tests)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


MODELS, VAES = options("model"), options("vae")


@pytest.mark.parametrize("model,vae", list(itertools.product(MODELS, VAES)))
def test_every_model_and_vae_compose_and_are_compatible(model, vae):
    cfg = compose(f"model={model}", f"vae={vae}")
    assert check_compatibility(cfg, dataset_num_users=31) == []
    resolved = OmegaConf.to_container(cfg, resolve=True)
    den, latent_channels = resolved["model"]["denoiser"], resolved["vae"]["autoencoder"]["latent_channels"]
    family = model_family(cfg)
    size = 128 // 2 ** (len(resolved["vae"]["autoencoder"]["down_block_types"]) - 1)  # 3 blocks: 32
    assert latent_shape(cfg) == (latent_channels, size, size)
    assert den.get("sample_size", size) == size  # Flux keeps no input size: the pipeline records it
    assert den["in_channels"] == family.input_channels(latent_channels) == latent_channels * family.packing
    # the family decides the objective and the sampler that objective needs
    assert resolved["train"]["objective"] == family.objective
    assert cfg.sampler.name == (family.sampler or compose().sampler.name)


def _group_overrides(group: str, option: str) -> list[str]:
    extra = {("data", "folder"): ["data.data_dir=/x"]}.get((group, option), [])
    if group == "sampler" and is_flow_matching(str(compose(f"sampler={option}").sampler.scheduler._target_)):
        extra.append("model=flux_tiny")  # a flow-matching sampler samples a flow-matching family
    return [f"{group}={option}", *extra]


@pytest.mark.parametrize("group,option", [(g, o) for g in ("data", "sampler", "hardware", "logger", "eval", "paths")
                                          for o in options(g)])
def test_every_group_option_composes_and_is_compatible(group, option):
    cfg = compose(*_group_overrides(group, option))
    users = 31 if cfg.data.num_users is None else int(cfg.data.num_users)
    assert check_compatibility(cfg, dataset_num_users=users) == []
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if "name" in cfg[group]:
        assert cfg[group].name == option


def test_the_shipped_sizes():
    medium = OmegaConf.to_container(compose("model=unet_medium").model, resolve=True)
    assert medium["denoiser"]["block_out_channels"] == [128, 256, 512, 512]
    assert medium["denoiser"]["cross_attention_dim"] == 512 == medium["condition"]["embed_dim"]
    assert medium["denoiser"]["attention_head_dim"] == 8 and medium["denoiser"]["use_linear_projection"]
    assert medium["condition"]["num_users"] == 31
    sd = compose("model=unet_sd").model.denoiser
    assert list(sd.block_out_channels) == [320, 640, 1280, 1280] and sd.cross_attention_dim == 768
    vae = compose("vae=kl_128").vae.autoencoder
    assert list(vae.block_out_channels) == [128, 256, 512] and vae.latent_channels == 4 and vae.sample_size == 128
    p100 = compose("hardware=p100_16gb").hardware
    assert (p100.mixed_precision, p100.batch_size, p100.gradient_accumulation_steps) == ("fp16", 1, 4)
    cadence = compose()  # run cadence is the run's, not the hardware's
    assert (cadence.train.sample_interval, cadence.train.save_interval) == (1000, 5000)
    assert (cadence.vae_train.sample_interval, cadence.vae_train.save_interval) == (1000, 5000)
    assert "sample_interval" not in p100 and "save_interval" not in p100
    small = compose("hardware=gpu_8gb").hardware
    assert small.gradient_checkpointing and small.gradient_accumulation_steps == 8 and small.memory_gb == 8


def test_derived_values_follow_overrides():
    cfg = compose("model=unet_light", "data.resolution=64", "model.embed_dim=128", "data.num_users=7")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["denoiser"]["sample_size"] == 16
    assert resolved["model"]["denoiser"]["cross_attention_dim"] == 128 == resolved["model"]["condition"]["embed_dim"]
    assert resolved["model"]["condition"]["num_users"] == 7
    dit = OmegaConf.to_container(compose("model=dit", "data.num_users=5").model, resolve=True)
    assert dit["denoiser"]["num_embeds_ada_norm"] == 5


def test_command_line_override_and_cfg_job():
    out = subprocess.run([sys.executable, "-m", "ldm_users.cli.train", "--cfg", "job", "model=unet_light",
                          "hardware=gpu_8gb", "train.lr=2e-4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.train.lr == 2e-4 and cfg.model.name == "unet_light" and cfg.hardware.name == "gpu_8gb"


@pytest.mark.parametrize("overrides,expected", [
    (["model.denoiser.in_channels=8"], "model.denoiser.in_channels=8 but vae.autoencoder.latent_channels=4"),
    (["model.denoiser.sample_size=64"], "set model.denoiser.sample_size=32"),
    (["model.denoiser.cross_attention_dim=300"], "model.denoiser.cross_attention_dim=300 but model.condition.embed_dim=512"),
    (["model=dit", "model.denoiser.patch_size=3"], "model.denoiser.patch_size=3 does not divide the latent size 32"),
    (["model.denoiser.attention_head_dim=7"], "attention_head_dim=7 (attention heads) does not divide"),
    (["data.resolution=90"], "data.resolution=90 is not divisible by the VAE's downsampling factor 4"),
    (["vae.autoencoder.norm_num_groups=24"], "not divisible by vae.autoencoder.norm_num_groups=24"),
])
def test_each_mismatch_gives_one_clear_line(overrides, expected):
    cfg = compose(*overrides)
    problems = check_compatibility(cfg, dataset_num_users=31)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ConfigError, match="not consistent"):
        assert_compatible(cfg, 31)


def test_user_count_mismatch_names_the_fix():
    cfg = compose("data.num_users=31")
    (problem,) = check_compatibility(cfg, dataset_num_users=12)
    assert "model.condition.num_users=31" in problem and "set data.num_users=12" in problem
    (problem,) = check_compatibility(compose("model=dit"), dataset_num_users=12)
    assert "model.denoiser.num_embeds_ada_norm=31" in problem


def test_bad_override_exits_with_message_not_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ldm_users.cli.train", "experiment=smoke", "logger=none",
                          "model.denoiser.sample_size=4", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "set model.denoiser.sample_size=8" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("group,option,base", [("model", m, m.split("_")[0]) for m in MODELS]
                         + [("vae", v, "kl") for v in VAES])
def test_a_size_is_a_few_lines_naming_its_base(group, option, base):
    text = (REPO / "conf" / group / f"{option}.yaml").read_text()
    assert f"- _base_/{base}@_here_" in text and len(text.splitlines()) <= 15
    cfg = compose(f"{group}={option}")
    assert cfg[group].name == option and "???" not in OmegaConf.to_yaml(cfg[group])  # the size fills the base
    assert "kind" not in cfg.model  # the kind of model is its backbone class, stated once


def test_the_backbone_class_decides_the_checks():
    cfg = compose("model=dit", "model.denoiser._target_=my.Backbone")
    assert any("model.denoiser._target_=my.Backbone is not a known backbone" in p
               for p in check_compatibility(cfg, dataset_num_users=31))


def test_data_generate_is_a_target_node(tmp_path):
    cfg = compose("data.num_users=2", "data.images_per_user=1", "data.resolution=16", f"data.root={tmp_path / 'd'}")
    root = instantiate(cfg.data.generate)  # what prepare_dataset calls, once
    assert root == tmp_path / "d" and sorted(p.name for p in root.iterdir() if p.is_dir()) == ["user_00", "user_01"]
    assert compose("data=folder", "data.data_dir=/x").data.generate is None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_with_a_folder_dataset(experiment, tmp_path):
    cfg = compose(f"experiment={experiment}", "data=folder", f"data.data_dir={tmp_path}")
    users = 31 if cfg.data.num_users is None else int(cfg.data.num_users)
    assert check_compatibility(cfg, dataset_num_users=users) == []
    assert cfg.data.name == "folder"  # a command-line data= wins over the preset
    OmegaConf.to_container(cfg, resolve=True)


def test_the_small_data_presets():
    cpu = compose("experiment=small_data_cpu", "data=fonts", "data.images_per_user=10")
    assert (cpu.data.name, cpu.data.resolution, cpu.hardware.name, cpu.model.name) == ("fonts", 32, "cpu", "unet_tiny")
    assert cpu.train.augment.shift == 1 and cpu.eval.enabled
    gpu = compose("experiment=small_data_16gb", "data=folder", "data.data_dir=/x")
    assert (gpu.data.resolution, gpu.hardware.name, gpu.model.name, gpu.vae.name) == (128, "p100_16gb", "unet_light",
                                                                                      "kl_128")
    assert gpu.hardware.batch_size * gpu.hardware.gradient_accumulation_steps == 16 and gpu.data.random_flip
    # Both train the autoencoder with the measured free terms (experiments/README.md, "Autoencoder recipe"); the
    # discriminator only where the steps are (the GPU preset).
    for preset in (cpu, gpu):
        assert (preset.vae_train.fft_weight, preset.vae_train.ssim_weight) == (0.5, 0.2)
    assert cpu.vae_train.disc.weight == 0 and gpu.vae_train.disc.weight > 0 and gpu.vae_train.disc.start > 0
    # Few images per user: the measured guidance, below the samplers' default, and a command line still wins.
    assert cpu.sampler.guidance_scale == gpu.sampler.guidance_scale == 1.25 < compose().sampler.guidance_scale
    assert compose("experiment=small_data_cpu", "sampler=ddim").sampler.guidance_scale == 1.25
    assert compose("experiment=small_data_cpu", "sampler.guidance_scale=2").sampler.guidance_scale == 2


def test_learning_rate_follows_the_model_size_unless_fixed():
    assert compose("model=unet_tiny").train.lr == 1e-3
    assert compose("model=unet_light").train.lr == 2e-4
    assert compose("model=unet_medium").train.lr == compose("model=dit").train.lr == 1e-4
    assert compose("model=unet_light", "train.lr=5e-5").train.lr == 5e-5
    # the size sweep trains every size at its own rate
    assert compose("experiment=model_size_sweep", "model=unet_light").train.lr == 2e-4


def test_the_default_recipe_is_the_measured_one():
    from ldm_users.inference.samplers import make_scheduler, noise_scheduler

    cfg = compose()
    assert (cfg.train.prediction_type, cfg.train.min_snr_gamma) == ("v_prediction", 5)
    assert cfg.noise_scheduler.rescale_betas_zero_snr and cfg.sampler.name == "dpmpp_2m"
    assert cfg.sampler.num_inference_steps == 20
    sampler = make_scheduler(cfg.sampler, noise_scheduler(cfg.noise_scheduler).config)
    sampler.set_timesteps(20)
    assert int(sampler.timesteps[0]) == 999  # trailing: sampling starts where zero terminal SNR puts pure noise
    # flow matching has its own weightings: min-SNR is off for flux, and the flux family samples with flow_euler
    flux = compose("model=flux")
    assert flux.train.min_snr_gamma is None and flux.sampler.name == "flow_euler"
