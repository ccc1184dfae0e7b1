"""Sampling fast path: one guided denoiser call replayed from a CUDA graph.

An eager UNet step launches hundreds of small kernels; at batch 1 the GPU waits on the CPU (~2 s per
DDIM-50 image whatever the model size). Captured once into a torch.cuda.CUDAGraph with static input
buffers, each step is one graph launch. Graphs are cached per (shape, dtype, guidance scale, weight
storage addresses): in-place weight updates (EMA swaps, training) are seen by the replay; re-allocated
weights (a dtype or device move) get a fresh capture instead of reading freed memory.

Modes (`sampler.fast`, installed on a pipeline with `use_fast_sampling(pipe, mode)`, through the pipeline's
predictor hook): off | cuda_graph | compile | auto (auto = cuda_graph on CUDA, off elsewhere).
"""

from __future__ import annotations

import logging

import torch

from ldm_users.pipeline import guided

log = logging.getLogger(__name__)
MODES = ("off", "auto", "cuda_graph", "compile")


def check_mode(mode: str | None) -> str:
    mode = str(mode or "off")
    if mode not in MODES:
        raise ValueError(f"fast sampling mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


def resolve_mode(mode: str | None, device: torch.device) -> str:
    mode = check_mode(mode)
    if mode == "auto":
        return "cuda_graph" if device.type == "cuda" else "off"
    if mode == "cuda_graph" and device.type != "cuda":
        log.warning("fast sampling cuda_graph needs a CUDA device (have %s): sampling eagerly", device)
        return "off"
    return mode


def _cuda_capture(fn, args):
    """Warm up on a side stream (lazy inits, cuDNN autotuning must not be captured), then capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph.replay, out


class GraphedGuidance:
    """`predict(model_input, timesteps, ids) -> guided noise`, replayed from captured graphs.

    `capture(fn, static_args) -> (replay, static_out)` is injectable so the static-buffer logic is testable
    without a GPU; on CUDA it is a real torch.cuda.CUDAGraph capture.
    """

    max_graphs = 4

    def __init__(self, capture=_cuda_capture):
        self.capture = capture
        self.graphs: dict = {}

    @staticmethod
    def _weights_key(denoiser) -> tuple:
        return tuple(p.data_ptr() for p in denoiser.parameters())

    def __call__(self, denoiser, model_input, timesteps, ids, guidance_scale: float, guidance_rescale: float = 0.0):
        key = (tuple(model_input.shape), model_input.dtype, model_input.device, float(guidance_scale),
               float(guidance_rescale), self._weights_key(denoiser))
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.clear()
            static = (model_input.clone(), timesteps.expand(model_input.shape[0]).clone(), ids.clone())

            def fn(x, t, u):
                return guided(denoiser, x, t, u, guidance_scale, guidance_rescale)

            replay, out = self.capture(fn, static)
            entry = self.graphs[key] = (static, replay, out)
        (x, t, u), replay, out = entry
        x.copy_(model_input)
        t.copy_(timesteps.expand_as(t))
        u.copy_(ids)
        replay()
        return out.clone()  # the static output is overwritten by the next replay


class CompiledDenoiser:
    """torch.compile of the denoiser (slow first call; pays off for long batched runs)."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self.compiled = None
        self.source = None

    def __call__(self, denoiser, model_input, timesteps, ids, guidance_scale: float, guidance_rescale: float = 0.0):
        if self.source is not denoiser.backbone:
            self.source = denoiser.backbone
            self.compiled = torch.compile(denoiser, backend=self.backend)
        return guided(self.compiled, model_input, timesteps, ids, guidance_scale, guidance_rescale)


class FastGuidance:
    """The pipeline's predictor for a mode: the replayed call where the mode resolves to one on the device at hand;
    the plain guided call where it resolves to off, or while the denoiser is in train mode (dropout must not be
    frozen into a graph)."""

    def __init__(self, mode: str, compile_backend: str = "inductor"):
        self.mode = check_mode(mode)  # an unknown mode fails here, not at the first step
        self.compile_backend = compile_backend
        self.resolved: dict = {}  # device type -> mode (warn once, not at every step)
        self.replays: dict = {}  # mode -> GraphedGuidance | CompiledDenoiser

    def __call__(self, denoiser, model_input, timesteps, ids, guidance_scale: float, guidance_rescale: float = 0.0):
        device = model_input.device
        if device.type not in self.resolved:
            self.resolved[device.type] = resolve_mode(self.mode, device)
        mode = self.resolved[device.type]
        if mode == "off" or denoiser.backbone.training:
            return guided(denoiser, model_input, timesteps, ids, guidance_scale, guidance_rescale)
        if mode not in self.replays:
            self.replays[mode] = GraphedGuidance() if mode == "cuda_graph" else CompiledDenoiser(self.compile_backend)
        return self.replays[mode](denoiser, model_input, timesteps, ids, guidance_scale, guidance_rescale)


def use_fast_sampling(pipe, mode: str | None, compile_backend: str = "inductor") -> None:
    """Route the pipeline's denoiser calls through `mode` (sampler.fast); off restores the plain call.
    compile_backend: torch.compile's backend for mode=compile."""
    pipe.set_predictor(None if check_mode(mode) == "off" else FastGuidance(mode, compile_backend))
