"""Where and in which precision a pipeline samples: the one place that moves a pipeline to a device and dtype."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """device auto -> cuda when available, else cpu; dtype auto -> bf16 on GPUs that have it, else fp32."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype}: use auto, {', '.join(DTYPES)}.")
    return dev, DTYPES[dtype]


def move_pipeline(pipe, device: torch.device | str, dtype: torch.dtype = torch.float32):
    """The whole pipeline to `device`; the denoiser (backbone and user encoder) in `dtype`. The VAE stays fp32:
    reduced-precision VAE decoders can overflow, and the decode is one call against num_inference_steps denoiser
    calls, so it costs little."""
    pipe.to(device)
    if dtype != torch.float32:
        pipe.denoiser.to(dtype)
    return pipe
