"""The sampling fast path: the graphed guided call must give the eager images; modes resolve safely."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import CompiledGraphs, compose

from ldm_users.inference.fast_sampling import FastGuidance, GraphedGuidance, resolve_mode, use_fast_sampling


def cpu_capture(calls):
    """Stands in for torch.cuda.graph: replay re-runs the function on the same static buffers."""

    def capture(fn, static):
        calls.append(tuple(t.shape for t in static))
        out = fn(*static)
        return (lambda: out.copy_(fn(*static))), out

    return capture


def tiny_pipeline(model="unet_tiny"):
    from ldm_users.inference.export import make_pipeline
    from ldm_users.inference.samplers import make_scheduler, training_noise_scheduler
    from ldm_users.models.build import build_denoiser, build_vae, latent_shape

    cfg = compose("experiment=smoke", f"model={model}")
    torch.manual_seed(0)
    users = [f"u{i}" for i in range(int(cfg.data.num_users))]
    scheduler = make_scheduler(cfg.sampler, training_noise_scheduler(cfg).config)
    return make_pipeline(build_vae(cfg).eval(), build_denoiser(cfg, users).eval(), scheduler, users,
                         latent_shape(cfg)[-1])


@pytest.mark.parametrize("model", ["unet_tiny", "dit_tiny", "flux_tiny"])
def test_graphed_guidance_gives_the_eager_images(model):
    pipe = tiny_pipeline(model)
    kwargs = {"users": [0, 1, 2], "num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "pt",
              "batch_size": 2, "show_progress": False}
    eager = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    calls = []
    pipe.set_predictor(GraphedGuidance(capture=cpu_capture(calls)))
    fast = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(fast, eager, rtol=0, atol=1e-6)
    # Chunks of 2 and 1 images: two captures (CFG doubles the batch inside), reused across the 4 steps.
    assert calls == [((2, 4, 8, 8), (2,), (2,)), ((1, 4, 8, 8), (1,), (1,))]
    pipe(generator=torch.Generator().manual_seed(1), **kwargs)
    assert len(calls) == 2  # cached across calls while the weights stay where they are
    # Re-allocated weights (a dtype round trip) must not be read through a stale graph.
    pipe.denoiser.backbone.to(torch.float64).to(torch.float32)
    again = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert len(calls) == 4
    torch.testing.assert_close(again, eager, rtol=0, atol=1e-6)


def test_modes_resolve_safely(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode("auto", cpu) == "off" and resolve_mode("auto", cuda) == "cuda_graph"
    assert resolve_mode(None, cuda) == "off" and resolve_mode("compile", cpu) == "compile"
    assert resolve_mode("cuda_graph", cpu) == "off" and "needs a CUDA device" in caplog.text
    with pytest.raises(ValueError, match="fast sampling mode"):
        resolve_mode("fastest", cpu)


def test_training_mode_never_uses_graphs():
    pipe = tiny_pipeline("dit_tiny")
    # A real torch.compile; aot_eager traces as inductor does without building kernels (tests/test_fast_paths.py
    # runs inductor itself).
    use_fast_sampling(pipe, "compile", compile_backend="aot_eager")
    assert isinstance(pipe.predictor, FastGuidance)
    kwargs = {"users": [0], "num_inference_steps": 2, "output_type": "pt", "show_progress": False}
    graphs = CompiledGraphs()
    pipe.denoiser.backbone.train()
    pipe(**kwargs)
    assert graphs() == 0  # dropout in train mode: the plain call
    pipe.denoiser.backbone.eval()
    pipe(**kwargs)
    assert graphs() > 0
    use_fast_sampling(pipe, "off")
    assert pipe.predictor is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_matches_eager_on_gpu():
    pipe = tiny_pipeline().to("cuda")
    kwargs = {"users": [0, 1], "num_inference_steps": 5, "guidance_scale": 3.0, "output_type": "pt", "show_progress": False}
    eager = pipe(generator=torch.Generator("cuda").manual_seed(1), **kwargs).images
    use_fast_sampling(pipe, "cuda_graph")
    fast = pipe(generator=torch.Generator("cuda").manual_seed(1), **kwargs).images
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)
