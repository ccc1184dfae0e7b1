"""Peak live-tensor memory of a piece of code, on any device, without a GPU allocator.

`torch.cuda.max_memory_allocated` only exists on CUDA. This dispatch mode sees every tensor an aten op
creates (including inside autograd's backward, the optimizer and gradient checkpointing's recomputation),
counts each storage once from birth until the storage is freed, and keeps the peak. Tensors created
before the mode starts (weights, say) are counted only when registered with `track`. Under a
FakeTensorMode the same code measures a workload's allocations with no arithmetic at all, which is how
ldm-diagnose sizes an 860M-parameter UNet at batch 128 on a laptop.

What it does not see: the CUDA context, the caching allocator's rounding and fragmentation, cuDNN/cuBLAS
workspaces. ldm-diagnose adds a stated reserve for those.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveMemory(TorchDispatchMode):
    def __init__(self, limit_bytes: int | None = None):
        """limit_bytes: raise torch.OutOfMemoryError past it, as a capped GPU allocator would (CPU emulation)."""
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        self.limit = limit_bytes

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def track(self, *objects) -> LiveMemory:
        """Count tensors (or every parameter, buffer and gradient of modules) that already exist."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                tensors = [*obj.parameters(), *obj.buffers()] + [p.grad for p in obj.parameters() if p.grad is not None]
            elif isinstance(obj, torch.optim.Optimizer):
                tensors = [t for state in obj.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
            else:
                tensors = [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]
            for tensor in tensors:
                self._add(tensor)
        return self

    def _add(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse or storage-less subclasses
            return
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        # Storages keep their Python object alive as long as the C++ storage lives (autograd's saved
        # tensors included), so this runs exactly when the memory is released.
        weakref.finalize(storage, self._free, nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        if self.limit is not None and self.current > self.limit:
            raise torch.OutOfMemoryError(f"live tensors need {self.current / 2**30:.3f} GiB, over the emulated "
                                         f"cap of {self.limit / 2**30:.3f} GiB")

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out


class PeakMemory:
    """Bytes live now and at the peak while the block runs: the CUDA allocator's statistics on a GPU (everything
    allocated, whenever), a LiveMemory trace elsewhere (what is created inside, plus the objects in `track`).
    On CPU, `limit_bytes` makes the trace raise torch.OutOfMemoryError past it, as a capped GPU would."""

    def __init__(self, device: torch.device, track=(), limit_bytes: int | None = None):
        self.device, self.track, self.limit = torch.device(device), track, limit_bytes
        self.live: LiveMemory | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.live = LiveMemory(self.limit).track(*self.track)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
        else:
            torch.cuda.synchronize(self.device)

    def current(self) -> int:
        return self.live.current if self.live is not None else torch.cuda.memory_allocated(self.device)

    @property
    def peak(self) -> int:
        return self.live.peak if self.live is not None else torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        if self.live is not None:
            self.live.reset_peak()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)
