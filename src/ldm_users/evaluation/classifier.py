"""The user classifier that judges generated images: a small CNN trained on the real images, with a held-out split.

It answers "which user drew this?" for generated images (conditioning accuracy), and its penultimate
features give a feature space, tuned to what tells users apart, for Fréchet distance, KID and diversity.
Training takes a few hundred steps; the result (weights, held-out accuracy, and the real images' features)
is cached under `<paths.cache_dir>/eval/`, keyed by the prepared dataset (its fingerprint and resolution)
and by the classifier settings, so a guidance sweep trains it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ldm_users.data.folder import PreparedDataset, to_model_range
from ldm_users.errors import ConfigError
from ldm_users.evaluation.metrics import topk_correct
from ldm_users.io import build_once
from ldm_users.progress import progress

log = logging.getLogger(__name__)

CLASSIFIER_VERSION = 1


class UserClassifier(nn.Module):
    """Images in [-1, 1] -> (features, logits). Strided conv stages down to 4x4, global pool, a linear bottleneck."""

    def __init__(self, num_users: int, input_resolution: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {"num_users": num_users, "input_resolution": input_resolution, "width": width,
                       "feature_dim": feature_dim}
        groups = 8 if width % 8 == 0 else 1
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(groups, width), nn.SiLU()]
        channels, size = width, input_resolution
        while size > 4:
            out = min(channels * 2, width * 4)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(groups, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(groups, out), nn.SiLU()]
            channels, size = out, (size + 1) // 2
        self.trunk = nn.Sequential(*layers)
        self.project = nn.Linear(channels, feature_dim)
        self.head = nn.Linear(feature_dim, num_users)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.project(self.trunk(x).mean(dim=(2, 3)))
        return features, self.head(features)


def input_resolution(resolution: int, max_resolution: int) -> int:
    return min(int(resolution), int(max_resolution))


def resize_for(images: torch.Tensor, size: int) -> torch.Tensor:
    """Downsample (antialiased) to the classifier's input size; a no-op at that size already."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def dataset_inputs(dataset: PreparedDataset, size: int, chunk: int = 256) -> torch.Tensor:
    """All real images, float NCHW in [-1, 1] at the classifier's input size (small: <= 64 px by default)."""
    out = []
    for start in range(0, len(dataset), chunk):
        x, _ = dataset.batch(np.arange(start, min(start + chunk, len(dataset))))
        out.append(resize_for(x, size))
    return torch.cat(out)


def uint8_inputs(images_uint8: np.ndarray, size: int) -> torch.Tensor:
    """uint8 NHWC (how generated images are saved, and how real ones were stored) -> classifier inputs."""
    return resize_for(to_model_range(images_uint8), size)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified: about `fraction` of each user's images held out (at least one when the user has two)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for user in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == user))
        n_held = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations (reflect-padded) so the classifier keys on style, not on exact pixel positions.

    No flips or colour jitter: in this project a user's identity may well be a colour or an orientation.
    """
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def embed(model: UserClassifier, inputs: torch.Tensor, device, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D), logits (N, U)) as float64 numpy."""
    model.eval()
    feats, logits = [], []
    for start in range(0, len(inputs), batch_size):
        f, lg = model(inputs[start:start + batch_size].to(device))
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


@dataclass
class TrainedClassifier:
    model: UserClassifier
    meta: dict                 # held-out accuracy, split, settings
    real_features: np.ndarray  # (N, D) features of every real image, in dataset order
    real_logits: np.ndarray    # (N, U)
    folder: Path
    device: torch.device

    @property
    def input_resolution(self) -> int:
        return int(self.model.config["input_resolution"])

    def classify(self, images_uint8: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        return embed(self.model, uint8_inputs(images_uint8, self.input_resolution), self.device, batch_size)


def settings_key(ccfg: dict) -> str:
    blob = json.dumps({"version": CLASSIFIER_VERSION, **ccfg}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _check_settings(ccfg: dict) -> None:
    if int(ccfg["steps"]) < 1:
        raise ConfigError(f"eval.classifier.steps={ccfg['steps']}: the classifier needs at least one step.")
    if not 0.0 < float(ccfg["holdout_fraction"]) < 1.0:
        raise ConfigError(f"eval.classifier.holdout_fraction={ccfg['holdout_fraction']}: use a fraction in (0, 1), "
                          f"e.g. 0.2.")


def train_classifier(dataset: PreparedDataset, ccfg: dict, device: torch.device,
                     show_progress: bool = True) -> tuple[UserClassifier, dict, np.ndarray, np.ndarray]:
    """Train on the training split; returns the model, its metadata and every real image's features/logits."""
    _check_settings(ccfg)
    labels = dataset.labels.numpy()
    if dataset.num_users < 2:
        raise ConfigError("evaluation needs at least 2 users: with one user there is nothing to tell apart.")
    train_idx, held_idx = holdout_split(labels, float(ccfg["holdout_fraction"]), int(ccfg["seed"]))
    size = input_resolution(dataset.resolution, int(ccfg["max_resolution"]))
    inputs = dataset_inputs(dataset, size)
    y = torch.as_tensor(labels)
    with torch.random.fork_rng(devices=[]):  # a fixed init without touching the caller's global RNG
        torch.manual_seed(int(ccfg["seed"]))
        model = UserClassifier(dataset.num_users, size, int(ccfg["width"]), int(ccfg["feature_dim"])).to(device)
    steps, batch = int(ccfg["steps"]), int(ccfg["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(ccfg["lr"]), weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))  # short warmup
    stop_loss = ccfg.get("stop_loss")
    recent: list[float] = []
    generator = torch.Generator().manual_seed(int(ccfg["seed"]))
    train_t = torch.as_tensor(train_idx)
    start = time.perf_counter()
    model.train()
    loss_value = float("nan")
    done = 0
    bar = progress(range(steps), desc="user classifier", disable=not show_progress, unit="step")
    for done in bar:
        pick = train_t[torch.randint(len(train_t), (batch,), generator=generator)]
        x = _augment(inputs[pick], generator).to(device)
        _, logits = model(x)
        loss = F.cross_entropy(logits, y[pick].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        recent = (recent + [loss_value])[-10:]
        # Once the training split is fitted, more steps only tighten the clusters (and cost time).
        if stop_loss is not None and len(recent) == 10 and sum(recent) / 10 < float(stop_loss):
            bar.close()
            break
    model.eval()
    feats, logits = embed(model, inputs, device)
    held_top1 = float(topk_correct(logits[held_idx], labels[held_idx], 1).mean()) if len(held_idx) else float("nan")
    held_top5 = float(topk_correct(logits[held_idx], labels[held_idx], 5).mean()) if len(held_idx) else float("nan")
    meta = {"version": CLASSIFIER_VERSION, "settings": ccfg, "model": model.config, "users": dataset.users,
            "dataset": dataset.folder.name, "fingerprint": dataset.fingerprint, "resolution": dataset.resolution,
            "train_indices": train_idx.tolist(), "holdout_indices": held_idx.tolist(),
            "holdout_top1": held_top1, "holdout_top5": held_top5,
            "train_top1": float(topk_correct(logits[train_idx], labels[train_idx], 1).mean()),
            "final_loss": loss_value, "steps_done": done + 1, "train_seconds": round(time.perf_counter() - start, 2)}
    log.info("user classifier: held-out top-1 %.3f on %d images (%d users), %d steps in %.1f s", held_top1,
             len(held_idx), dataset.num_users, done + 1, meta["train_seconds"])
    return model, meta, feats, logits


def load_or_train(dataset: PreparedDataset, ccfg: dict, cache_dir: str | os.PathLike, device: torch.device,
                  show_progress: bool = True) -> TrainedClassifier:
    """The cached classifier for this dataset and these settings, trained (and cached) on first use."""
    ccfg = {k: ccfg[k] for k in sorted(ccfg)}
    folder = Path(cache_dir) / "eval" / f"{dataset.folder.name}-clf{settings_key(ccfg)}"

    def build(tmp: Path) -> None:  # one process trains it; the others (ranks, sweep jobs) wait and load it
        model, meta, feats, logits = train_classifier(dataset, ccfg, device, show_progress)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "classifier.safetensors"))
        np.savez(tmp / "real_features.npz", features=feats, logits=logits)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    build_once(folder, build, ready=lambda f: (f / "meta.json").exists(), directory=True)
    meta = json.loads((folder / "meta.json").read_text())
    model = UserClassifier(**meta["model"])
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    model.to(device).eval()
    real = np.load(folder / "real_features.npz")
    log.info("user classifier: cached in %s (held-out top-1 %.3f)", folder, meta["holdout_top1"])
    return TrainedClassifier(model, meta, real["features"], real["logits"], folder, device)
