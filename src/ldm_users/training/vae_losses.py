"""The autoencoder's training loss, latent-diffusion's recipe (its `LPIPSWithDiscriminator`) made of config values.

Reconstruction ("NLL" in latent-diffusion): l1_weight * L1 + l2_weight * MSE + perceptual.weight * LPIPS-style
distance (models/perceptual.py, weights from a local file) + ssim_weight * (1 - SSIM) + fft_weight * the L1
distance of the 2-D spectra (which weighs the fine detail that pixel losses average away as much as the coarse).
Plus kl_weight * KL per pixel.

Adversarial (vae_train.disc.weight > 0): a patch discriminator (models/discriminator.py) with the hinge loss; from
step vae_train.disc.start the generator adds d_weight * (-mean D(recon)), where the adaptive weight
d_weight = weight * clamp(||grad_last NLL|| / (||grad_last G|| + 1e-4), 0, 1e4) at the decoder's last layer keeps
the adversarial gradient a fixed fraction of the reconstruction gradient whatever the scales of the two losses.
With few images the discriminator can memorise them; `disc.augment_shift` shows it randomly shifted copies of
real and reconstructed images (DiffAugment's translation), so it must judge texture rather than recall images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ldm_users.errors import ConfigError


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (taming-transformers' hinge_d_loss)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, weight: float
                    ) -> torch.Tensor:
    """weight * clamp(||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), 0, 1e4), detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * weight


def fft_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean |FFT(recon) - FFT(images)| over the 2-D spectra of each channel (orthonormal, so the scale does not
    depend on the image size)."""
    diff = torch.fft.fft2(recon.float(), norm="ortho") - torch.fft.fft2(images.float(), norm="ortho")
    return diff.abs().mean()


def random_shift(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """Each image moved by up to `fraction` of its size in x and y (reflected border); differentiable."""
    pad = int(round(fraction * images.shape[-1]))
    if pad <= 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    size_h, size_w = images.shape[-2:]
    offsets = torch.randint(0, 2 * pad + 1, (images.shape[0], 2)).tolist()
    return torch.stack([padded[i, :, dy:dy + size_h, dx:dx + size_w] for i, (dy, dx) in enumerate(offsets)])


class ReconstructionLoss:
    """The reconstruction terms (not a Module: the perceptual net is loaded from its file, never checkpointed)."""

    def __init__(self, tcfg: DictConfig, device=None):
        self.l1, self.l2 = float(tcfg.l1_weight), float(tcfg.l2_weight)
        self.ssim, self.fft = float(tcfg.get("ssim_weight", 0.0)), float(tcfg.get("fft_weight", 0.0))
        pcfg = tcfg.get("perceptual") or {}
        self.perceptual_weight = float(pcfg.get("weight", 0.0))
        self.perceptual = None
        if self.perceptual_weight:
            from ldm_users.models.perceptual import VGG16, load_perceptual
            self.perceptual = load_perceptual(pcfg.get("weights_path"), pcfg.get("stages") or VGG16).to(device)

    def __call__(self, recon: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        terms = {"l1": F.l1_loss(recon, images), "l2": F.mse_loss(recon, images)}
        nll = self.l1 * terms["l1"] + self.l2 * terms["l2"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(recon, images).mean()
            nll = nll + self.perceptual_weight * terms["perceptual"]
        if self.ssim:
            from ldm_users.evaluation.reconstruction import ssim
            terms["ssim"] = ssim(recon, images).mean()
            nll = nll + self.ssim * (1.0 - terms["ssim"])
        if self.fft:
            terms["fft"] = fft_loss(recon, images)
            nll = nll + self.fft * terms["fft"]
        return nll, {k: v.detach() for k, v in terms.items()}


class Adversarial:
    """The patch discriminator's part of the loss: `disc` is the prepared (maybe DDP-wrapped) discriminator."""

    def __init__(self, dcfg: DictConfig, disc):
        self.disc = disc
        self.weight, self.start = float(dcfg.weight), int(dcfg.start)
        self.shift = float(dcfg.get("augment_shift", 0.0))
        if self.weight < 0 or self.start < 0 or not 0 <= self.shift < 0.5:
            raise ConfigError(f"vae_train.disc.weight={self.weight}, start={self.start}, augment_shift={self.shift}:"
                              f" use weight >= 0, start >= 0 and 0 <= augment_shift < 0.5.")

    def active(self, step: int) -> bool:
        return self.weight > 0 and step >= self.start

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        return random_shift(images, self.shift)

    def generator_loss(self, recon: torch.Tensor, nll: torch.Tensor, last_layer: torch.Tensor
                       ) -> tuple[torch.Tensor, dict]:
        """d_weight * -mean D(recon), through a copy of D's weights that takes no gradient: the generator's
        backward must not touch the discriminator (it has its own step)."""
        module = getattr(self.disc, "module", self.disc)  # D itself, not its DDP wrapper (no D gradients here)
        params = {name: p.detach() for name, p in module.named_parameters()}
        logits = torch.func.functional_call(module, params, (self.augment(recon),))
        g_loss = -logits.float().mean()
        d_weight = adaptive_weight(nll, g_loss, last_layer, self.weight)
        return d_weight * g_loss, {"g_loss": g_loss.detach(), "d_weight": d_weight}

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits_real = self.disc(self.augment(images.detach()))
        logits_fake = self.disc(self.augment(recon.detach()))
        loss = hinge_d_loss(logits_real.float(), logits_fake.float())
        return loss, {"d_loss": loss.detach(), "logits_real": logits_real.detach().float().mean(),
                      "logits_fake": logits_fake.detach().float().mean()}
