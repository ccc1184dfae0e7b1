"""The model card (README.md) of an export: the Hub's YAML header, the users, how it was trained, its evaluation
when there is one, the sample grid and a usage snippet that runs as written from the export folder.

pipeline_tag is unconditional-image-generation: the model takes no text, only a user id from a closed set (a
class label, like DiT's ImageNet classes), and the Hub has no class-conditional task; text-to-image would promise
a prompt.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

SAMPLES_FILE = "samples.png"
# Evaluation figures shown on the card (ldm-eval's metrics.json keys), in this order.
CARD_METRICS = {"user_acc/top1": "user accuracy (top-1)", "user_acc/chance": "chance",
                "fd/classifier": "Fréchet distance (classifier features)",
                "fd/classifier_real_holdout": "same, real held-out images", "kid/classifier": "KID",
                "fd/inception": "FID (Inception)", "diversity/ratio": "diversity ratio (~1 healthy)",
                "memorization/ratio": "memorisation ratio (<<1 copies)"}


def _front_matter(cfg: DictConfig, backbone: str, kind: str) -> str:
    tags = ["ldm-users", "latent-diffusion", "user-conditioned", kind, backbone, str(cfg.model.name)]
    return "\n".join(["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation", "tags:",
                      *[f"- {tag}" for tag in dict.fromkeys(tags)], "---", ""])


def usage_snippet(users: list[str], sampler: DictConfig) -> str:
    """Python that generates one image for each of the first two users with the model's own sampler settings."""
    shown = users[:2]
    return "\n".join([
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        "# \".\" is this folder: run from it, or give its path (or a Hub repo id once uploaded).",
        "pipe = DiffusionPipeline.from_pretrained(\".\", trust_remote_code=True)",
        "generator = torch.Generator().manual_seed(0)",
        f"users = {shown!r}",
        f"images = pipe(users=users, num_inference_steps={int(sampler.num_inference_steps)}, "
        f"guidance_scale={float(sampler.guidance_scale)}, generator=generator).images",
        "for user, image in zip(users, images):",
        "    image.save(f\"{user}.png\")",
    ])


def _settings(cfg: DictConfig, backbone: str) -> list[str]:
    train, data = cfg.train, cfg.data
    length = f"{train.num_epochs} epochs" if train.get("num_epochs") else f"{train.max_steps} steps"
    rows = [("denoiser", f"`{cfg.model.name}` ({backbone})"), ("VAE", f"`{cfg.vae.name}`"),
            ("data", f"`{data.name}`, {data.resolution} px"), ("training", length),
            ("learning rate", train.lr), ("batch x accumulation",
                                          f"{cfg.hardware.batch_size} x {cfg.hardware.gradient_accumulation_steps}"),
            ("prediction type", train.prediction_type), ("guidance dropout (p_uncond)", train.p_uncond),
            ("EMA", f"decay {train.ema.decay}" if train.ema.enabled else "off"), ("seed", cfg.seed),
            ("sampler", f"`{cfg.sampler.name}`, {cfg.sampler.num_inference_steps} steps, guidance "
                        f"{cfg.sampler.guidance_scale}")]
    return ["| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _metrics(metrics: dict) -> list[str]:
    rows = [f"| {label} | {metrics[key]:.4g} |" for key, label in CARD_METRICS.items()
            if isinstance(metrics.get(key), (int, float))]
    how = (f"{metrics.get('images_per_user')} images per user, sampler `{metrics.get('sampler')}`, "
           f"{metrics.get('num_inference_steps')} steps, guidance {metrics.get('guidance_scale')}")
    return ["## Evaluation", "", f"`ldm-eval` ({how}):", "", "| metric | value |", "|---|---|", *rows, ""]


def render_card(cfg: DictConfig, users: list[str], backbone: str, kind: str, metrics: dict | None = None,
                samples: bool = False) -> str:
    listed = ", ".join(f"{i}: `{name}`" for i, name in enumerate(users[:50])) + (" ..." if len(users) > 50 else "")
    lines = [_front_matter(cfg, backbone, kind),
             f"# {cfg.model.name}: images in the style of {len(users)} users",
             "", "A user-conditioned latent diffusion model trained with ldm-users: a KL autoencoder and a denoiser "
             "in its latent space that generates new images in the style of a chosen user, with classifier-free "
             "guidance.", ""]
    if samples:
        lines += [f"![one row per user]({SAMPLES_FILE})", ""]
    lines += ["## Users", "", "Give users by name or index:", "", listed, "",
              "## Usage", "", "With only `torch` and `diffusers` installed (the pipeline code ships in this folder, "
              "hence `trust_remote_code=True`):", "", "```python", usage_snippet(users, cfg.sampler), "```", "",
              "With `ldm-users` installed, `UserLDMPipeline.from_pretrained(\".\")` loads the same weights without "
              "running any code from this folder, and `ldm-sample model_path=.` writes images and a grid.", "",
              "## Training", "", *_settings(cfg, backbone), ""]
    if metrics:
        lines += _metrics(metrics)
    lines += ["<details><summary>Full training configuration</summary>", "", "```yaml",
              OmegaConf.to_yaml(cfg).rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)
