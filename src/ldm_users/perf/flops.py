"""The accelerator's peak FLOP/s, for MFU = counted forward+backward FLOPs per image (models/flops.py) x images/s
/ peak dense FLOP/s.
"""

from __future__ import annotations

import torch

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
