"""Every fast path of the hardware profiles runs for real on the CPU, against fp32 eager: bf16 autocast, fp16
autocast with the GradScaler, torch.compile of the training step and of sampling, fused AdamW, channels_last,
gradient checkpointing and each SDPA attention backend the CPU has, on tiny UNet, DiT and Flux models.

Tolerances, over STEPS optimizer steps of the same seeded data, noise and timesteps (losses at lr 1e-3):
- fp32 paths (fused AdamW, channels_last, checkpointing, another attention kernel, compile): the same math in
  another order, so the per-step losses stay within FP32_TOL (relative) of eager's;
- bf16 autocast: 8-bit mantissas, within BF16_TOL of eager's loss on average over the steps.
Resume is exact (bit-identical weights and optimizer state) with bf16, fp16 + GradScaler and compile as in fp32.

torch.compile with inductor generates and builds C++ kernels with gcc, tens of seconds even for the tiniest
model, so one slow test compiles with inductor; the others compile with the aot_eager backend (the same Dynamo
graph capture and AOT autograd, without the code generation), which is what recompilation and graph-break bugs
show up in.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm_users.errors import ConfigError
from ldm_users.inference.export import export_pipeline, make_pipeline
from ldm_users.inference.fast_sampling import use_fast_sampling
from ldm_users.inference.loading import load_pipeline
from ldm_users.inference.samplers import make_scheduler
from ldm_users.models.build import build_vae
from ldm_users.perf.memory_model import latent_shape, placeholder_users, random_latents
from ldm_users.training import checkpoint as ckpt
from ldm_users.training.common import make_accelerator
from ldm_users.training.ema import load_ema, save_ema
from ldm_users.training.trainer import build_ldm_trainer, reset_accelerator_state
from tests.helpers import CompiledGraphs, compose

MODELS = ["unet_tiny", "dit_tiny", "flux_tiny"]
STEPS = 24
FP32_TOL = 1e-3
BF16_TOL = 0.05
LATENT_SCALE = 0.5


def config(model: str, *overrides: str):
    return compose("experiment=bench_cpu", f"model={model}", "train.warmup_steps=0", "logger=none", *overrides)


def make_trainer(cfg):
    reset_accelerator_state()
    accelerator = make_accelerator(cfg)
    cache = random_latents(cfg, 64, accelerator.device)
    trainer = build_ldm_trainer(cfg, accelerator, placeholder_users(cfg), cache, LATENT_SCALE, num_steps=1000)
    trainer.model.train()
    return accelerator, trainer


def train(cfg, steps: int = STEPS, backend=None):
    """(per-step losses, trainer) of `steps` optimizer steps, inside sdpa_kernel([backend]) when given."""
    accelerator, trainer = make_trainer(cfg)
    if backend is None:
        losses = [float(trainer.step(i).loss) for i in range(steps)]
    else:
        with sdpa_kernel([backend]):
            losses = [float(trainer.step(i).loss) for i in range(steps)]
    return losses, trainer


_eager: dict = {}


def eager_losses(model: str) -> list[float]:
    """fp32 eager with the default (foreach) AdamW, the reference every path is compared with (once per model)."""
    if model not in _eager:
        _eager[model] = train(config(model, "hardware.fused_adam=false"))[0]
    return _eager[model]


def max_relative_gap(a, b) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def cpu_sdpa_backends() -> list:
    """The SDPA kernels this CPU build has (flash attention has a CPU kernel; memory-efficient and cuDNN are
    CUDA-only)."""
    q = torch.randn(1, 2, 8, 16)
    found = []
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            found.append(backend)
        except RuntimeError:
            pass
    return found


def test_cpu_has_the_math_and_flash_attention_kernels():
    assert cpu_sdpa_backends()[:2] == [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("attention", [*(b.name for b in cpu_sdpa_backends()), "eager"])
def test_every_cpu_attention_kernel_trains_like_eager(model, attention):
    """Each SDPA kernel the CPU has, and hardware.attention=eager (diffusers' matmul-softmax processors)."""
    if attention == "eager":
        losses, _ = train(config(model, "hardware.fused_adam=false", "hardware.attention=eager"))
    else:
        losses, _ = train(config(model, "hardware.fused_adam=false"), backend=getattr(SDPBackend, attention))
    assert max_relative_gap(losses, eager_losses(model)) < FP32_TOL


@pytest.mark.parametrize("model", MODELS)
def test_bf16_autocast_follows_fp32(model):
    accelerator, trainer = make_trainer(config(model, "hardware.mixed_precision=bf16", "hardware.fused_adam=false"))
    assert accelerator.mixed_precision == "bf16" and accelerator.native_amp
    with accelerator.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    losses = [float(trainer.step(i).loss) for i in range(STEPS)]
    eager = eager_losses(model)
    mean_gap = sum(abs(a - b) for a, b in zip(losses, eager)) / sum(eager)
    assert 0 < mean_gap < BF16_TOL  # > 0: bf16 really ran


def train_compiled(trainer, steps: int) -> tuple[list[float], int, int]:
    """(losses, graphs compiled in the first 2 steps, graphs compiled after them); after the first 2 steps a
    recompilation is an error."""
    graphs = CompiledGraphs()
    losses = [float(trainer.step(i).loss) for i in range(2)]
    first = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses += [float(trainer.step(i).loss) for i in range(2, steps)]
    return losses, first, graphs() - first


# The fp32 fast paths together: compile (aot_eager), fused AdamW, channels_last (UNet), gradient checkpointing.
FP32_FAST = ["hardware.fused_adam=true", "hardware.channels_last=true", "hardware.gradient_checkpointing=true",
             "hardware.compile=true", "hardware.compile_backend=aot_eager"]


@pytest.fixture(scope="module")
def fast_runs():
    """model -> (cfg, trainer, *train_compiled(...)) for FP32_FAST: each model is compiled once for the tests
    below."""
    runs = {}

    def get(model):
        if model not in runs:
            cfg = config(model, *FP32_FAST)
            _, trainer = make_trainer(cfg)
            runs[model] = (cfg, trainer, *train_compiled(trainer, STEPS))
        return runs[model]

    return get


@pytest.mark.parametrize("model", MODELS)
def test_compiled_fused_checkpointed_step_matches_eager_and_never_recompiles(model, fast_runs):
    _, trainer, losses, first, later = fast_runs(model)
    assert trainer.compiled and first >= 1 and later == 0  # Dynamo captured the forward once, and only once
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    assert trainer.unwrapped.backbone.is_gradient_checkpointing
    if model == "unet_tiny":
        conv = trainer.unwrapped.backbone.conv_in
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert max_relative_gap(losses, eager_losses(model)) < FP32_TOL


def tiny_pipe(cfg, trainer):
    scheduler = make_scheduler(cfg.sampler, trainer.noise_scheduler.config)
    torch.manual_seed(0)
    return make_pipeline(build_vae(cfg).eval(), trainer.unwrapped.eval(), scheduler, placeholder_users(cfg),
                         latent_shape(cfg)[-1])


SAMPLE = {"users": [0, 1, 2], "num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "pt",
          "show_progress": False}


@pytest.mark.parametrize("model", MODELS)
def test_export_of_a_fast_path_run_loads_and_samples_and_compiled_sampling_matches(tmp_path, model, fast_runs):
    cfg, trainer, *_ = fast_runs(model)
    pipe = tiny_pipe(cfg, trainer)
    eager = pipe(generator=torch.Generator().manual_seed(1), **SAMPLE).images
    export_pipeline(pipe, tmp_path / "export", cfg)
    loaded = load_pipeline(tmp_path / "export")
    images = loaded(generator=torch.Generator().manual_seed(1), **SAMPLE).images
    torch.testing.assert_close(images, eager, rtol=1e-5, atol=1e-5)
    # Sampling through torch.compile (sampler.fast=compile): the same images, compiled once.
    use_fast_sampling(loaded, "compile", compile_backend="aot_eager")
    graphs = CompiledGraphs()
    fast = loaded(generator=torch.Generator().manual_seed(1), **SAMPLE).images
    first = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = loaded(generator=torch.Generator().manual_seed(1), **SAMPLE).images
    assert first >= 1 and graphs() == first
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, fast, rtol=0, atol=0)
    trainer.unwrapped.train()


def state_of(trainer) -> dict:
    """Weights, EMA and optimizer moments, as tensors (what resume must restore bit for bit)."""
    out = {f"w.{k}": v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    out.update({f"ema.{i}": p.detach().clone() for i, p in enumerate(trainer.ema.shadow_params)})
    for i, s in enumerate(trainer.optimizer.optimizer.state.values()):
        out.update({f"opt.{i}.{k}": v.detach().clone() for k, v in s.items()})
    return out


ALL_FAST = ["hardware.mixed_precision=bf16", *FP32_FAST]


@pytest.mark.parametrize("extra", [ALL_FAST, ["hardware.mixed_precision=fp16"]], ids=["bf16+compile+all", "fp16"])
def test_resume_is_exact_with_fast_paths(tmp_path, extra):
    cfg = config("dit_tiny", *extra)
    half = 3
    _, straight = make_trainer(cfg)
    for i in range(2 * half):
        straight.step(i)
    expected = state_of(straight)
    accelerator, first = make_trainer(cfg)
    for i in range(half):
        first.step(i)
    folder = ckpt.save_checkpoint(accelerator, tmp_path, half, {},
                                  write_extra=lambda d: save_ema(d, first.ema, first.unwrapped))
    assert (folder / "scaler.pt").is_file() == ("hardware.mixed_precision=fp16" in extra)
    accelerator, resumed = make_trainer(cfg)
    ckpt.load_checkpoint(accelerator, folder)
    load_ema(folder, resumed.ema, resumed.unwrapped)
    for i in range(half, 2 * half):
        resumed.step(i)
    got = state_of(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


# fp16 with loss scaling: the p100_16gb / gpu_8gb path.

def test_fp16_scaler_skips_an_overflowing_step_and_backs_off():
    cfg = config("dit_tiny", "hardware=p100_16gb", "hardware.batch_size=2", "hardware.gradient_accumulation_steps=2",
                 "train.ema.enabled=true")
    accelerator, trainer = make_trainer(cfg)
    scaler = accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and accelerator.native_amp
    with accelerator.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.float16
    for i in range(3):
        assert not trainer.step(i).skipped
    assert scaler.get_scale() == 2.0 ** 16 and scaler.state_dict()["_growth_tracker"] == 3
    # A scale so large that the fp16 gradients overflow: the step must be skipped, the weights, the optimizer's
    # step count and the EMA left alone, and the scale halved.
    scaler.update(new_scale=2.0 ** 30)
    weights = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    ema_before = [p.clone() for p in trainer.ema.shadow_params]
    adam_steps = [float(s["step"]) for s in trainer.optimizer.optimizer.state.values()]
    result = trainer.step(3)
    assert result.skipped and torch.isfinite(result.loss)
    assert scaler.get_scale() == 2.0 ** 29
    for k, v in trainer.unwrapped.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(torch.equal(a, b) for a, b in zip(trainer.ema.shadow_params, ema_before))
    assert [float(s["step"]) for s in trainer.optimizer.optimizer.state.values()] == adam_steps
    step = 4  # each further overflow halves the scale again, until the gradients fit in fp16 and training goes on
    while trainer.step(step).skipped:
        assert scaler.get_scale() == 2.0 ** (29 - (step - 3)) and step < 30
        step += 1
    assert 2.0 ** 8 < scaler.get_scale() < 2.0 ** 29


def test_fp16_scaler_state_is_checkpointed_and_restored(tmp_path):
    cfg = config("dit_tiny", "hardware=p100_16gb", "hardware.batch_size=2", "hardware.gradient_accumulation_steps=1")
    accelerator, trainer = make_trainer(cfg)
    trainer.step(0)
    accelerator.scaler.update(new_scale=1024.0)
    trainer.step(1)
    saved = accelerator.scaler.state_dict()
    folder = ckpt.save_checkpoint(accelerator, tmp_path, 2, {})
    assert torch.load(folder / "scaler.pt", weights_only=True)["scale"] == 1024.0
    accelerator, _ = make_trainer(cfg)
    assert accelerator.scaler.get_scale() == 2.0 ** 16
    ckpt.load_checkpoint(accelerator, folder)
    assert accelerator.scaler.state_dict() == saved


# What a profile asks for on a machine without a GPU, and who decides the precision.

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallbacks")
def test_a_gpu_profile_on_the_cpu_keeps_every_path_it_can_and_says_which_it_cannot(caplog):
    caplog.set_level(logging.INFO, logger="ldm_users.training.common")
    cfg = config("dit_tiny", "hardware=h100_80gb", "hardware.batch_size=2", "hardware.compile_backend=aot_eager")
    accelerator, trainer = make_trainer(cfg)
    assert accelerator.mixed_precision == "bf16" and trainer.compiled
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    lines = [r.getMessage() for r in caplog.records if "need a GPU" in r.getMessage()]
    assert lines == ["hardware=h100_80gb on the CPU: allow_tf32 (TF32 matmuls) need a GPU and are off; everything "
                     "else in the profile runs."]
    assert not torch.backends.cuda.matmul.allow_tf32
    caplog.clear()
    make_trainer(config("dit_tiny", "hardware=cpu", "hardware.num_threads=1"))
    assert not [r for r in caplog.records if "need a GPU" in r.getMessage()]
    assert torch.get_num_threads() == 1  # hardware.num_threads (conftest restores the count after each test)


def test_precision_left_to_accelerate_and_disagreement_is_an_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    reset_accelerator_state()
    assert make_accelerator(config("dit_tiny", "hardware.mixed_precision=null")).mixed_precision == "bf16"
    reset_accelerator_state()
    assert make_accelerator(config("dit_tiny", "hardware.mixed_precision=bf16")).mixed_precision == "bf16"
    reset_accelerator_state()
    with pytest.raises(ConfigError) as err:
        make_accelerator(config("dit_tiny", "hardware=p100_16gb"))
    message = str(err.value)
    assert "\n" not in message and "hardware.mixed_precision=fp16 (hardware=p100_16gb)" in message
    assert "hardware.mixed_precision=null" in message and "--mixed_precision fp16" in message
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    reset_accelerator_state()
    assert make_accelerator(config("dit_tiny", "hardware.mixed_precision=null")).mixed_precision == "no"
    reset_accelerator_state()


# torch.compile with inductor: C++ kernels built by gcc, for the training step and for sampling.

@pytest.mark.slow
def test_inductor_compiles_training_and_sampling_on_the_cpu():
    model, tiny = "dit_tiny", ["model.denoiser.num_layers=1", "model.denoiser.num_attention_heads=1"]
    steps = 8
    eager, _ = train(config(model, *tiny), steps=steps)
    cfg = config(model, *tiny, "hardware.compile=true", "hardware.compile_backend=inductor")
    _, trainer = make_trainer(cfg)
    losses, first, later = train_compiled(trainer, steps)
    assert first >= 1 and later == 0
    assert max_relative_gap(losses, eager) < FP32_TOL
    pipe = tiny_pipe(cfg, trainer)
    reference = pipe(generator=torch.Generator().manual_seed(1), **SAMPLE).images
    use_fast_sampling(pipe, "compile")
    fast = pipe(generator=torch.Generator().manual_seed(1), **SAMPLE).images
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
