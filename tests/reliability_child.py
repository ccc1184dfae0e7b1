"""ldm-train with one injected fault, for tests/test_reliability.py (run as a script, also under torchrun).

    LDM_TEST_FAULT="module:attr:n:action"   on the n-th call of module.attr (1-based; attr may be Class.method):
        kill        SIGKILL this process before the call        (a crash at that exact point)
        kill-after  make the call, then SIGKILL                  (e.g. a file written but not yet renamed)
        truncate    make the call, cut the file it wrote (2nd argument) to half, then SIGKILL (a torn write)
        term | int  send SIGTERM / SIGINT to this process before the call, then go on
        kill-in=S   go on, and SIGKILL this process S seconds later from another thread (whatever it is doing)
    LDM_TEST_FAULT_RANK=r                   only on this rank (default: every rank)
    LDM_TEST_NAN_LOSS="a-b"                 F.mse_loss calls a..b (1-based, inclusive; b may be empty) return NaN
    LDM_TEST_DUMP_WEIGHTS=dir               every rank writes its denoiser weights to dir/step<k>-rank<r>.safetensors
                                            each time a checkpoint is saved (ranks must hold identical weights)

The patches stand in for real faults at points a test cannot hit reliably from outside by timing alone.
Everything else is the real entry point, `ldm_users.cli.train.main`, with the command-line arguments given.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from pathlib import Path


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _install_fault(spec: str) -> None:
    module_name, attr, nth, action = spec.split(":")
    if os.environ.get("LDM_TEST_FAULT_RANK") not in (None, "", str(_rank())):
        return
    owner = importlib.import_module(module_name)
    *path, attr = attr.split(".")  # "Class.method" patches a method
    for name in path:
        owner = getattr(owner, name)
    original = getattr(owner, attr)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != int(nth):
            return original(*args, **kwargs)
        if action.startswith("kill-in="):
            timer = threading.Timer(float(action.split("=", 1)[1]), os.kill, (os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()
            return original(*args, **kwargs)
        if action in ("term", "int"):
            os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
            return original(*args, **kwargs)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if action == "truncate":
            path = Path(args[1] if len(args) > 1 else kwargs["filename"])
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, attr, wrapper)


def _install_nan_loss(spec: str) -> None:
    import torch
    import torch.nn.functional as F

    first, _, last = spec.partition("-")
    first, last = int(first), int(last) if last else None
    original = F.mse_loss
    calls = [0]

    def mse_loss(*args, **kwargs):
        calls[0] += 1
        loss = original(*args, **kwargs)
        if calls[0] >= first and (last is None or calls[0] <= last):
            return loss * torch.tensor(float("nan"))  # keeps the graph: the gradients become NaN too
        return loss

    F.mse_loss = mse_loss


def _install_weight_dump(folder: str) -> None:
    from safetensors.torch import save_file

    from ldm_users.training import checkpoint as ckpt
    from ldm_users.training import trainer

    built = []
    build, save = trainer.build_denoiser, ckpt.save_checkpoint

    def build_denoiser(*args, **kwargs):
        built.append(build(*args, **kwargs))  # the module itself: DDP wraps it and updates it in place
        return built[-1]

    def save_checkpoint(accelerator, root, step, *args, **kwargs):
        out = save(accelerator, root, step, *args, **kwargs)
        if built and Path(root).parent.name == "ldm":
            Path(folder).mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in built[-1].state_dict().items()}
            save_file(state, str(Path(folder) / f"step{step}-rank{accelerator.process_index}.safetensors"))
        return out

    trainer.build_denoiser, ckpt.save_checkpoint = build_denoiser, save_checkpoint


if __name__ == "__main__":
    if os.environ.get("LDM_TEST_FAULT"):
        _install_fault(os.environ["LDM_TEST_FAULT"])
    if os.environ.get("LDM_TEST_NAN_LOSS"):
        _install_nan_loss(os.environ["LDM_TEST_NAN_LOSS"])
    if os.environ.get("LDM_TEST_DUMP_WEIGHTS"):
        _install_weight_dump(os.environ["LDM_TEST_DUMP_WEIGHTS"])
    from ldm_users.cli.train import main

    sys.argv[0] = "ldm-train"
    main()
