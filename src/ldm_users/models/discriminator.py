"""The patch discriminator of the autoencoder's adversarial loss: taming-transformers' NLayerDiscriminator (the
pix2pix PatchGAN), which latent-diffusion's LPIPSWithDiscriminator uses. It scores overlapping patches of an image
as real or reconstructed, so its loss pushes the decoder towards the local texture an L1 loss averages away."""

from __future__ import annotations

from torch import nn


class NLayerDiscriminator(nn.Module):
    """`layers` stride-2 4x4 convolutions (width `channels`, doubling up to 8x), one stride-1 conv, a 1-channel
    patch-logit conv; BatchNorm between them, LeakyReLU(0.2). Initialised as taming's `weights_init`
    (convs N(0, 0.02), norm scales N(1, 0.02)); the caller seeds the initialisation."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images):
        return self.main(images)
