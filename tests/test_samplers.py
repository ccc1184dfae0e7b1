"""The sampler group: each sampler solves the same ODE as DDIM, guidance rescale follows its formula, and ldm-sample /
ldm-eval default to the sampler a model was trained with."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm_users.errors import ConfigError
from ldm_users.inference.export import make_pipeline
from ldm_users.inference.samplers import adopt_recorded_sampler, call_kwargs, make_scheduler
from ldm_users.models.build import build_denoiser, build_vae
from ldm_users.pipeline.pipeline_user_ldm import guided, rescale_noise_cfg
from tests.helpers import compose

SAMPLERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
            "unipc": "UniPCMultistepScheduler", "euler": "EulerDiscreteScheduler"}
ODE_SAMPLERS = ["dpmpp_2m", "unipc", "euler"]


def tiny_pipeline(prediction_type: str):
    # v: the default recipe's schedule (zero terminal SNR, trailing spacing); epsilon cannot take zero terminal SNR.
    cfg = compose("experiment=smoke", f"train.prediction_type={prediction_type}",
                  *(["noise_scheduler.rescale_betas_zero_snr=false"] if prediction_type == "epsilon" else []))
    torch.manual_seed(0)
    users = [f"u{i}" for i in range(4)]
    noise = instantiate(cfg.noise_scheduler).config
    pipe = make_pipeline(build_vae(cfg).eval(), build_denoiser(cfg, users).eval(), make_scheduler(cfg.sampler, noise),
                         users)
    return pipe, noise


def scheduler_for(name: str, noise_config):
    return make_scheduler(compose("experiment=smoke", f"sampler={name}").sampler, noise_config)


def test_each_sampler_is_a_target_node_over_the_training_noise_schedule():
    # the measured default: DPM-Solver++ 2M at 20 steps met DDIM-50's quality (experiments/README.md, "Samplers")
    assert (compose().sampler.name, compose().sampler.num_inference_steps) == ("dpmpp_2m", 20)
    noise = instantiate(compose("train.prediction_type=v_prediction").noise_scheduler).config
    for name, cls in SAMPLERS.items():
        sampler = compose(f"sampler={name}").sampler
        assert sampler.scheduler._target_ == f"diffusers.{cls}.from_config" and sampler.guidance_rescale == 0.0
        scheduler = make_scheduler(sampler, noise)
        assert type(scheduler).__name__ == cls
        assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_end == noise["beta_end"]
    dpm = scheduler_for("dpmpp_2m", noise)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    with pytest.raises(ConfigError, match="sampler.scheduler=ddim is not a `_target_` node"):
        make_scheduler(OmegaConf.create({"scheduler": "ddim"}), noise)
    for target in ("builtins.print", "diffusers.UNet2DModel.from_config", "os.system"):  # only diffusers schedulers
        with pytest.raises(ConfigError, match="name a diffusers scheduler"):
            make_scheduler(OmegaConf.create({"scheduler": {"_target_": target}}), noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_sampler_reproduces_ddim_at_high_step_counts(prediction_type):
    """All of them integrate the same probability-flow ODE, so at many steps they meet DDIM's image.

    Tolerance: DDIM is a first-order solver, so its own error at N steps is about twice its distance to DDIM at 2N
    (Richardson). A sampler at least as accurate lies within that error plus its own of DDIM(N): we allow 3x the
    DDIM(N)-DDIM(2N) distance (measured over 5 random models: at most 1.55x). Reading the model's output as the
    wrong prediction type misses by 70x (epsilon) to 4000x (v). Every sampler takes the training config's trailing
    spacing, so all of them start at t=999.
    The denoiser is a fixed random tiny model (a 3x3 convolution and a user embedding, smooth in x and t) put in
    through the pipeline's predictor hook, so 250-step runs cost milliseconds; the next test runs the real UNet.
    """
    pipe, noise = tiny_pipeline(prediction_type)
    torch.manual_seed(1)
    conv, embedding = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Embedding(5, 4)

    def model(denoiser, x, t, ids, guidance_scale, guidance_rescale):
        return torch.tanh(conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000) + embedding(ids)[:, :, None, None])

    pipe.set_predictor(model)

    def sample(scheduler, steps):
        pipe.scheduler = scheduler
        return pipe(users=[0, 1], num_inference_steps=steps, output_type="latent", show_progress=False,
                    generator=torch.Generator().manual_seed(0)).images

    def distance(a, b):
        return float((a - b).norm() / b.norm())

    steps = 250
    with torch.no_grad():
        ddim = sample(scheduler_for("ddim", noise), steps)
        ddim_error = distance(sample(scheduler_for("ddim", noise), 2 * steps), ddim)
        for name in ODE_SAMPLERS:
            assert distance(sample(scheduler_for(name, noise), steps), ddim) < 3 * ddim_error, name
        other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
        wrong = sample(scheduler_for("ddim", {**noise, "prediction_type": other}), steps)
    # far off, or NaN: epsilon read off a zero-terminal-SNR schedule divides by alpha = 0 at t=999
    assert not distance(wrong, ddim) <= 20 * ddim_error


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_sampler_runs_the_real_denoiser(prediction_type):
    pipe, noise = tiny_pipeline(prediction_type)
    for name in SAMPLERS:
        pipe.scheduler = scheduler_for(name, noise)
        images = pipe(users=[0, 3], num_inference_steps=3, guidance_scale=2.0, guidance_rescale=0.5,
                      output_type="pt", show_progress=False, generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all(), name


class Recorder(torch.nn.Module):
    """A denoiser whose conditional and null predictions are fixed tensors."""

    null_id = 9

    def __init__(self, cond, uncond):
        super().__init__()
        self.cond, self.uncond = cond, uncond

    def forward(self, x, t, ids):
        return torch.where((ids == self.null_id).view(-1, 1, 1, 1), self.uncond.repeat(2, 1, 1, 1),
                           self.cond.repeat(2, 1, 1, 1))


def test_guidance_rescale_follows_the_formula():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 4, 8, 8) * 2 + 1, torch.randn(2, 4, 8, 8)
    denoiser, x, t, ids = Recorder(cond, uncond), torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.tensor([0, 1])
    plain = uncond + 5.0 * (cond - uncond)
    assert torch.equal(guided(denoiser, x, t, ids, 5.0, 0.0), plain)  # 0 is a no-op
    full = guided(denoiser, x, t, ids, 5.0, 1.0)
    std = lambda v: v.std(dim=(1, 2, 3))  # noqa: E731
    torch.testing.assert_close(std(full), std(cond))  # rescale 1: the guided prediction gets the conditional std
    torch.testing.assert_close(full, plain * (std(cond) / std(plain)).view(-1, 1, 1, 1))
    torch.testing.assert_close(guided(denoiser, x, t, ids, 5.0, 0.7), 0.7 * full + 0.3 * plain)
    try:  # the same function as diffusers' own (where this diffusers has it without transformers)
        from diffusers.guiders.guider_utils import rescale_noise_cfg as reference
    except ImportError:
        return
    torch.testing.assert_close(rescale_noise_cfg(plain, cond, 0.7), reference(plain, cond, guidance_rescale=0.7))


def test_guidance_rescale_in_the_pipeline():
    pipe, _ = tiny_pipeline("epsilon")
    kwargs = {"users": [0, 1], "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent",
              "show_progress": False}
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), guidance_rescale=0.0, **kwargs).images, base)
    rescaled = pipe(generator=torch.Generator().manual_seed(0), guidance_rescale=0.7, **kwargs).images
    assert (rescaled - base).abs().max() > 1e-4
    sampler = compose("sampler.guidance_rescale=0.7").sampler
    assert call_kwargs(sampler)["guidance_rescale"] == 0.7


def test_the_recorded_sampler_is_the_default_and_the_command_line_wins():
    recorded = compose("sampler=dpmpp_2m", "sampler.num_inference_steps=12", "sampler.guidance_scale=1.25").sampler
    cfg = compose()
    assert not adopt_recorded_sampler(cfg, None, [])  # nothing recorded: the config as given
    assert adopt_recorded_sampler(cfg, recorded, ["data.num_users=3"])
    assert cfg.sampler.name == "dpmpp_2m" and cfg.sampler.num_inference_steps == 12
    cfg = compose("sampler.guidance_scale=5")
    adopt_recorded_sampler(cfg, recorded, ["sampler.guidance_scale=5"])  # one key: the recorded sampler, that key
    assert cfg.sampler.name == "dpmpp_2m" and cfg.sampler.guidance_scale == 5 and cfg.sampler.num_inference_steps == 12
    assert compose().sampler.guidance_scale != 1.25
    cfg = compose("sampler=euler")
    # Another sampler: its own steps and scheduler, the run's guidance (the model's), unless the command line sets it.
    assert adopt_recorded_sampler(cfg, recorded, ["sampler=euler"])
    assert cfg.sampler.name == "euler" and cfg.sampler.num_inference_steps == 50 and cfg.sampler.guidance_scale == 1.25
    assert cfg.sampler.scheduler._target_ != recorded.scheduler._target_
    cfg = compose("sampler=euler", "sampler.guidance_scale=4")
    adopt_recorded_sampler(cfg, recorded, ["sampler=euler", "sampler.guidance_scale=4"])
    assert cfg.sampler.guidance_scale == 4
