"""Training FLOPs of the denoiser, counted by torch.utils.flop_counter on fake tensors (shapes only, no
arithmetic), so counting an 860M UNet costs seconds on any machine. ldm-train reports them in its run summary,
ldm-bench turns them into MFU (perf/flops.py has the accelerators' peaks)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode


def denoiser_train_flops_per_image(build_model, latent_shape: tuple[int, int, int], num_users: int,
                                   batch: int = 2) -> float:
    """Forward + backward FLOPs of one image through the denoiser (counted at `batch`, divided by it)."""
    with FakeTensorMode():
        model = build_model()
        model.train()
        x = torch.randn(batch, *latent_shape)
        t = torch.randint(0, 1000, (batch,))
        users = torch.randint(0, num_users, (batch,))
        with FlopCounterMode(display=False) as counter:
            model(x, t, users).float().pow(2).mean().backward()
    return counter.get_total_flops() / batch
