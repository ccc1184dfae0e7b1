"""How well an autoencoder reconstructs real images: PSNR, SSIM, and the judge's Fréchet distance, KID and top-1.

One function scores both the VAE stage's end (its log line and summary, `vae/recon_*`) and ldm-eval's autoencoder
ceiling (`ceiling/*`), so the two figures are the same number for the same VAE. The scored images are the judge's
held-out real images (evaluation/classifier.py: about 20% of each user's, never seen by the judge): their Fréchet
distance to all real images, without the autoencoder, is the real floor (`fd/classifier_real_holdout`), so the
reconstructions' distance has a yardstick measured on the same images and the same number of them. The
autoencoder, however, trains on every image: with ~10 images per user, holding some out of its training costs a
tenth of the data, so these are reconstructions of images it has seen (`vae/recon_seen_in_training`).

Reconstruction is encode -> posterior mode -> decode, quantised to uint8 like a saved PNG and like generated images.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm_users.data.folder import PreparedDataset, to_model_range
from ldm_users.evaluation import metrics as M
from ldm_users.evaluation.classifier import holdout_split, load_or_train
from ldm_users.grid import to_uint8

log = logging.getLogger(__name__)

# PSNR of a lossless reconstruction is infinite; capped so it stays a number in JSON and in W&B charts. An error of
# one 8-bit level in every pixel is 48 dB; good autoencoders score 25-35 dB.
PSNR_CAP_DB = 100.0


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """(N,) peak signal-to-noise ratio in dB of NCHW images (in [-1, 1] by default), capped at PSNR_CAP_DB."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    db = 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-300))
    return db.clamp(max=PSNR_CAP_DB)


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(N,) structural similarity (Wang et al. 2004) of NCHW images in [-1, 1]: an 11 x 11 Gaussian window
    (sigma 1.5), K1 = 0.01, K2 = 0.03, each channel separately, the map averaged over its valid positions; 1 for
    identical images. Differentiable, so it can serve as a loss term too. The window shrinks to tiny images.

    Computed on intensities in [0, 1]: the luminance term assumes non-negative values (on [-1, 1] an image and
    its negative would score as similar)."""
    a, b = (a.float() + 1) / 2, (b.float() + 1) / 2
    channels = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(size, sigma, channels, a)

    def blur(x):
        return F.conv2d(x, w, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, device, batch_size: int = 32) -> np.ndarray:
    """Float NCHW images in [-1, 1] -> their reconstructions (encode, posterior mode, decode) as uint8 NHWC."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, vae.dtype)
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)))
    return np.concatenate(out)


def reconstruction_metrics(vae, clf, dataset: PreparedDataset, device, batch_size: int = 32) -> dict:
    """The judge's held-out real images through the autoencoder, scored against the originals (PSNR, SSIM) and
    like generated images (FD and KID to all real images in the judge's feature space, the judge's top-1).

    Keys: psnr, ssim, fd_classifier, kid_classifier, top1, images. Empty when the judge holds nothing out."""
    held = np.sort(np.asarray(clf.meta["holdout_indices"], dtype=np.int64))
    if len(held) < 2:
        return {}
    was_training = vae.training
    vae.eval()
    real_u8 = np.asarray(dataset.images[held])
    recon_u8 = reconstruct(vae, to_model_range(real_u8), device, batch_size)
    vae.train(was_training)
    real, recon = to_model_range(real_u8), to_model_range(recon_u8)
    feats, logits = clf.classify(recon_u8)
    labels = dataset.labels.numpy()[held]
    kid, _ = M.kernel_inception_distance(feats, clf.real_features)
    return {"psnr": float(psnr(real, recon).mean()), "ssim": float(ssim(real, recon).mean()),
            "fd_classifier": M.frechet_distance_features(feats, clf.real_features), "kid_classifier": kid,
            "top1": float(M.topk_correct(logits, labels, 1).mean()), "images": len(held)}


def report_vae_stage(cfg, vae, dataset: PreparedDataset, device, tracker) -> dict:
    """The VAE stage's end: its reconstruction figures in the log (one line), the summary and W&B (`vae/recon_*`).

    The judge is ldm-eval's own classifier (same settings, same cache), so a later ldm-eval reuses it and its
    ceiling equals `vae/recon_fd_classifier`. vae_train.recon_metrics=false skips all of it (the judge's first
    training costs seconds to a minute on a CPU). A failure is logged, not raised: the VAE is saved by then, and
    these figures only describe it."""
    if not cfg.vae_train.get("recon_metrics", True) or cfg.get("eval") is None or dataset.num_users < 2:
        return {}
    try:
        ccfg = OmegaConf.to_container(cfg.eval.classifier, resolve=True)
        _, held = holdout_split(dataset.labels.numpy(), float(ccfg["holdout_fraction"]), int(ccfg["seed"]))
        if len(held) < 2:  # known before the judge is trained for nothing
            log.warning("VAE reconstructions: not scored (the judge would hold out %d image(s); it needs users "
                        "with 2 or more images).", len(held))
            return {}
        clf = load_or_train(dataset, ccfg, cfg.paths.cache_dir, device, show_progress=False)
        scores = reconstruction_metrics(vae, clf, dataset, device)
    except Exception as err:  # noqa: BLE001 - reported; the trained VAE stands
        log.error("VAE reconstructions: not scored (%s). Fix eval.classifier.* or set vae_train.recon_metrics=false.",
                  err)
        return {}
    held = np.asarray(clf.meta["holdout_indices"], dtype=np.int64)  # the same split, as the judge recorded it
    floor = M.frechet_distance_features(clf.real_features[held], clf.real_features)
    summary = {f"vae/recon_{k}": v for k, v in scores.items()}
    summary.update({"vae/recon_fd_real_floor": floor, "vae/recon_seen_in_training": True})
    tracker.set_summary(summary)
    log.info("VAE reconstructions of %d real images (seen in training): PSNR %.3g dB, SSIM %.3g, FD %.3g "
             "(real images themselves: %.3g), judge top-1 %.3g", scores["images"], scores["psnr"], scores["ssim"],
             scores["fd_classifier"], floor, scores["top1"])
    return summary
