"""The exponential moving average of the denoiser's weights: building it from `train.ema`, saving it with a
checkpoint, restoring it on resume, and swapping it into the model for sample grids and the export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig

from ldm_users.errors import CheckpointError
from ldm_users.layout import EMA_FILE
from ldm_users.training.checkpoint import load_tensors, save_tensors

log = logging.getLogger(__name__)


def make_ema(ema_cfg: DictConfig, module: torch.nn.Module, device) -> EMAModel | None:
    """diffusers' EMAModel from `train.ema` (None when disabled), kept on the device. With `warmup` (the "power
    EMA") the decay at update k after `update_after_step` is min(decay, 1 - (1 + k / inv_gamma) ** -power), so
    early in a short run the average follows the weights instead of holding on to the random initialisation."""
    if not ema_cfg.enabled:
        return None
    ema = EMAModel(module.parameters(), decay=float(ema_cfg.decay), use_ema_warmup=bool(ema_cfg.warmup),
                   power=float(ema_cfg.power), inv_gamma=float(ema_cfg.inv_gamma),
                   update_after_step=int(ema_cfg.update_after_step),
                   foreach=True)  # a few fused kernels per step, not two per parameter
    ema.to(device)
    return ema


class EMASwap:
    """Context for sampling: the model in eval mode (no dropout) holding the EMA weights; afterwards its training
    weights and mode again."""

    def __init__(self, ema: EMAModel | None, module: torch.nn.Module):
        self.ema, self.module = ema, module
        self.params = list(module.parameters())

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)
        self.module.train(self.was_training)


def save_ema(folder: Path, ema: EMAModel | None, module: torch.nn.Module) -> None:
    """ema.safetensors (named like the module's parameters, so a checkpoint loads as an EMA model) + its step."""
    if ema is None:
        return
    names = [n for n, _ in module.named_parameters()]
    save_tensors(folder / EMA_FILE, dict(zip(names, ema.shadow_params)))
    (folder / "ema_state.json").write_text(
        json.dumps({"optimization_step": int(ema.optimization_step), "decay": ema.decay}))


def load_ema(folder: Path, ema: EMAModel | None, module: torch.nn.Module) -> None:
    if ema is None:
        return
    path = folder / EMA_FILE
    if not path.exists():
        log.warning("%s has no EMA weights: EMA restarts from the current weights", folder)
        return
    tensors = load_tensors(path)
    names = [n for n, _ in module.named_parameters()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{path} lacks EMA weights for {missing[:3]}: it belongs to another model.")
    for shadow, name in zip(ema.shadow_params, names):
        shadow.data.copy_(tensors[name].to(shadow.device, shadow.dtype))
    state = json.loads((folder / "ema_state.json").read_text())
    ema.optimization_step = state["optimization_step"]
