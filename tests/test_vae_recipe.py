"""The autoencoder recipe: the adversarial loss's adaptive weight, the discriminator in checkpoints and exact resume,
the VAE's EMA, a perceptual loss from a local file, the FFT term, Stable Diffusion's VAE layout through vae_path,
and a decoder-only fine-tune of a pretrained VAE."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm_users.cli.train import run
from ldm_users.errors import ConfigError
from ldm_users.models.build import build_vae
from ldm_users.models.discriminator import NLayerDiscriminator
from ldm_users.models.perceptual import VGGFeatures
from ldm_users.training.vae_losses import Adversarial, ReconstructionLoss, fft_loss
from ldm_users.training.vae_stage import check_vae_matches
from tests.helpers import compose, hydra_job

# The smallest VAE stage: 16 px images, a few steps, no judge (its reconstruction metrics are tested elsewhere).
TINY = ("experiment=smoke", "logger=none", "data.images_per_user=4",
        "vae_train.share=false", "++vae_train.recon_metrics=false", "vae_train.scale_samples=16",
        "hardware.batch_size=4")
DISC = ("vae_train.disc.weight=0.5", "vae_train.disc.start=2", "vae_train.disc.channels=8", "vae_train.disc.layers=2",
        "vae_train.disc.augment_shift=0.125")
SD_SMALL = ("vae=kl_sd", "vae.autoencoder.block_out_channels=[8,8,16,16]", "vae.autoencoder.norm_num_groups=8",
            "vae.autoencoder.layers_per_block=1")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions gain nothing from a second thread, and on a busy 2-core machine its spin-waits make each
    # step 20x slower; conftest restores the thread count after the test.
    torch.set_num_threads(1)


def _run(run_dir, *overrides, stage="vae", resolution=16):
    with hydra_job(run_dir, *TINY, f"stage={stage}", f"data.resolution={resolution}", *overrides) as cfg:
        return run(cfg)


def _tcfg(**values):
    base = OmegaConf.to_container(compose().vae_train, resolve=True)
    return OmegaConf.create({**base, **values})


def test_adaptive_weight_follows_its_formula():
    torch.manual_seed(0)
    vae = build_vae(compose("vae=kl_tiny", "data.resolution=16"))
    disc = NLayerDiscriminator(channels=8, layers=2)
    adversarial = Adversarial(OmegaConf.create({"weight": 0.5, "start": 0}), disc)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    last = vae.decoder.conv_out.weight

    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    nll = (recon - images).abs().mean()
    g_term, terms = adversarial.generator_loss(recon, nll, last)

    # Independently: each loss's own backward, read at the last layer's .grad.
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    (recon - images).abs().mean().backward(retain_graph=True)
    nll_grad = last.grad.clone()
    vae.zero_grad()
    (-disc(recon).mean()).backward()
    g_grad = last.grad.clone()
    expected = 0.5 * torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0, 1e4)
    torch.testing.assert_close(terms["d_weight"], expected, rtol=1e-5, atol=0)
    # What the weight is for: the adversarial gradient at the last layer is 0.5 x the reconstruction's.
    vae.zero_grad()
    disc.zero_grad()
    g_term.backward()
    torch.testing.assert_close(last.grad.norm(), 0.5 * nll_grad.norm(), rtol=1e-3, atol=0)
    assert all(p.grad is None for p in disc.parameters())  # the generator's loss never trains the discriminator


@pytest.mark.slow
def test_discriminator_and_ema_are_checkpointed_and_resume_is_bit_exact(tmp_path):
    common = (*DISC, "vae_train.ema.enabled=true", "vae_train.ema.decay=0.9", "vae_train.max_steps=6",
              "vae_train.save_interval=3", "vae_train.warmup_steps=0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(straight, *common)
    _run(split, *common, "+vae_train.stop_at_step=3")
    assert not (split / "vae" / "final").exists()
    checkpoint = split / "vae" / "checkpoints" / "checkpoint-0000003"
    disc = load_file(str(checkpoint / "model_1.safetensors"))
    assert set(disc) == set(NLayerDiscriminator(channels=8, layers=2).state_dict())  # batch-norm statistics too
    optimizer = torch.load(checkpoint / "optimizer_1.bin", weights_only=True)
    assert int(optimizer["state"][0]["step"]) == 1  # step 2 only: the discriminator starts at vae_train.disc.start
    ema, model = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    assert not torch.equal(ema["decoder.conv_out.weight"], model["vae.decoder.conv_out.weight"])
    _run(split, *common)  # resumes at step 3: the discriminator's weights, its Adam moments and the EMA restored
    a, b = (load_file(str(run_dir / "vae" / "final" / "diffusion_pytorch_model.safetensors"))
            for run_dir in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save_vae(folder, *overrides, scaling_factor):
    torch.manual_seed(3)
    vae = build_vae(compose(*overrides, "data.resolution=32"))
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(folder, safe_serialization=True)
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_sd_layout_vae_folder_loads_through_vae_path(tmp_path):
    folder = tmp_path / "sd_vae"
    saved = _save_vae(folder, *SD_SMALL, scaling_factor=0.18215)
    assert len(json.loads((folder / "config.json").read_text())["down_block_types"]) == 4
    with pytest.raises(ConfigError, match="vae=kl_sd"):  # the default layout refuses it, naming the fix
        check_vae_matches(folder, compose("data.resolution=32"))
    result = _run(tmp_path / "run", *SD_SMALL, f"vae_path={folder}", "train.max_steps=2", "sampler.num_inference_steps=2", "train.grid_users=1", "train.grid_per_user=1",
                  stage="ldm", resolution=32)
    export_vae = result["export"] + "/vae"
    config = json.loads(open(export_vae + "/config.json").read())
    assert config["scaling_factor"] == 0.18215  # kept, not re-measured
    exported = load_file(export_vae + "/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], saved[k]) for k in saved)


def test_decoder_only_finetune_keeps_the_encoder_bit_identical(tmp_path):
    folder = tmp_path / "pretrained"
    before = _save_vae(folder, "vae=kl_tiny", scaling_factor=0.5)
    _run(tmp_path / "run", f"vae_train.init_from={folder}", "vae_train.train_decoder_only=true",
         "vae_train.max_steps=3", "vae_train.lr=1e-2", "vae_train.warmup_steps=0")
    final = tmp_path / "run" / "vae" / "final"
    after = load_file(str(final / "diffusion_pytorch_model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    assert json.loads((final / "config.json").read_text())["scaling_factor"] == 0.5  # same encoder, same scale
    with pytest.raises(ConfigError, match="vae_train.init_from"):
        _run(tmp_path / "bad", "vae_train.train_decoder_only=true")


def test_perceptual_loss_from_a_local_file(tmp_path):
    stages = [[4, 1], [8, 1]]
    torch.manual_seed(0)
    path = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in VGGFeatures(stages).features.state_dict().items()}, path)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = (images + 0.3 * torch.randn_like(images)).requires_grad_(True)

    plain, _ = ReconstructionLoss(_tcfg())(recon, images)
    loss = ReconstructionLoss(_tcfg(perceptual={"weight": 1.0, "weights_path": str(path), "stages": stages}))
    with_lpips, terms = loss(recon, images)
    assert terms["perceptual"] > 0
    torch.testing.assert_close(with_lpips, plain + terms["perceptual"])
    assert loss.perceptual(images, images).abs().max() < 1e-6
    with_lpips.backward()
    assert recon.grad is not None and all(p.grad is None for p in loss.perceptual.parameters())


def test_missing_or_wrong_perceptual_weights_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="vae_train.perceptual.weights_path=") as err:
        ReconstructionLoss(_tcfg(perceptual={"weight": 1.0, "weights_path": str(tmp_path / "missing.pth")}))
    assert "\n" not in str(err.value)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="other.pth") as err:
        ReconstructionLoss(_tcfg(perceptual={"weight": 1.0, "weights_path": str(tmp_path / "other.pth")}))
    assert "\n" not in str(err.value)


def test_fft_term_is_the_mean_spectral_difference():
    images = torch.zeros(1, 3, 8, 8)
    # A constant offset c has all its (orthonormal) spectrum at DC: c * sqrt(64) in 1 of 64 bins per channel.
    torch.testing.assert_close(fft_loss(images + 0.4, images), torch.tensor(0.4 * 8 / 64))
    loss = ReconstructionLoss(_tcfg(fft_weight=2.0, ssim_weight=0.5))
    nll, terms = loss(images + 0.4, images)
    torch.testing.assert_close(nll, terms["l1"] + 2.0 * terms["fft"] + 0.5 * (1 - terms["ssim"]))


def test_shared_vae_key_follows_the_pretrained_files(tmp_path):
    from types import SimpleNamespace

    from ldm_users.training.shared_vae import vae_key

    folder = tmp_path / "pretrained"
    _save_vae(folder, "vae=kl_tiny", scaling_factor=0.5)
    cfg = compose(f"vae_train.init_from={folder}")
    dataset = SimpleNamespace(fingerprint="abc", resolution=32)
    accelerator = SimpleNamespace(gradient_accumulation_steps=1, num_processes=1, mixed_precision="no")
    before, _ = vae_key(cfg, dataset, accelerator)
    assert vae_key(compose(), dataset, accelerator)[0] != before
    _save_vae(folder, "vae=kl_tiny", "vae.autoencoder.block_out_channels=[8,16,16]", scaling_factor=0.5)
    assert vae_key(cfg, dataset, accelerator)[0] != before  # same path, other weights: not the cached VAE
