"""Training FLOPs of the denoiser (torch.utils.flop_counter) and the accelerator's peak, for MFU.

FLOPs are counted on fake tensors (shapes only, no arithmetic), so counting an 860M UNet costs seconds
on any machine. MFU = counted forward+backward FLOPs per image x images/s / peak dense FLOP/s.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, longest name first.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L4", 121e12),
    ("V100", 125e12), ("P100", 18.7e12), ("T4", 65e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None  # no meaningful tensor-core peak for a CPU
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS:
        if key in name:
            return value
    return None


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
