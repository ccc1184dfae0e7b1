"""An LPIPS-style perceptual distance whose feature net is loaded from a local file (nothing is downloaded).

LPIPS (Zhang et al. 2018), as latent-diffusion's autoencoder loss uses it: VGG16 features after each stage's last
ReLU, unit-normalised over channels, squared differences averaged over positions, summed over stages (each channel
weighted by LPIPS' learned linear layer when the file has one, else 1). The net is a VGG built like
torchvision's `vgg16().features`, so its state dict (torchvision's own file, or LPIPS' `vgg.pth` next to it)
loads as it is; `stages` builds smaller VGG-like nets (a tiny one is what the tests use with random weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm_users.errors import ConfigError

# torchvision's VGG16: (width, convolutions) per stage, a max-pool between stages.
VGG16 = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# LPIPS' input scaling (its ScalingLayer): images in [-1, 1] -> the ImageNet statistics VGG was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class VGGFeatures(nn.Module):
    """`features` laid out as torchvision's (conv, ReLU, ..., max-pool), returning each stage's last ReLU."""

    def __init__(self, stages=VGG16, in_channels: int = 3):
        super().__init__()
        layers, taps, width = [], [], in_channels
        for i, (out, convs) in enumerate(stages):
            if i:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(convs):
                layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(inplace=False)]
                width = out
            taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.taps, self.widths = taps, [out for out, _ in stages]

    def forward(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class PerceptualDistance(nn.Module):
    """(N,) LPIPS-style distance of NCHW images in [-1, 1]. Frozen: only the images get gradients."""

    def __init__(self, net: VGGFeatures, channel_weights: list[torch.Tensor] | None = None):
        super().__init__()
        self.net = net
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
        weights = channel_weights or [torch.ones(w) for w in net.widths]
        for i, w in enumerate(weights):
            self.register_buffer(f"lin{i}", w.reshape(1, -1, 1, 1).float())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # stays in eval mode whatever the model around it does
        return super().train(False)

    def forward(self, a, b):
        fa = self.net((a.float() - self.shift) / self.scale)
        fb = self.net((b.float() - self.shift) / self.scale)
        total = 0.0
        for i, (x, y) in enumerate(zip(fa, fb)):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((x - y).pow(2) * getattr(self, f"lin{i}")).sum(1).mean((1, 2))
        return total


def load_perceptual(weights_path, stages=VGG16, key: str = "vae_train.perceptual.weights_path"
                    ) -> PerceptualDistance:
    """The distance with its feature net (and LPIPS' channel weights `lin<i>.model.1.weight`, when present) read
    from `weights_path` (a torch state dict or a safetensors file). Errors name the key and what to give."""
    path = Path(str(weights_path)) if weights_path else None
    if path is None or not path.is_file():
        raise ConfigError(f"{key}={weights_path}: no such file. Give a local VGG16 state dict (torchvision's "
                          f"vgg16 weights; nothing is downloaded) or set vae_train.perceptual.weight=0.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = VGGFeatures(tuple(tuple(s) for s in stages))
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    try:
        net.features.load_state_dict(features, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{key}={path} does not hold this feature net's `features.*` weights ({first}); give a "
                          f"torchvision vgg16 state dict or set vae_train.perceptual.stages to its layout.") from None
    lin = [state.get(f"lin{i}.model.1.weight") for i in range(len(net.widths))]
    return PerceptualDistance(net, [w.flatten() for w in lin] if all(w is not None for w in lin) else None)
