"""The model card (README.md) of an export, built with huggingface_hub's ModelCard: the Hub's metadata (license,
tags, and a model-index with ldm-eval's figures when there are some, which the Hub shows as evaluation results),
the users, how it was trained, the W&B run, the sample grid and a usage snippet that runs as written from the
export folder.

pipeline_tag is unconditional-image-generation: the model takes no text, only a user id from a closed set (a
class label, like DiT's ImageNet classes), and the Hub has no class-conditional task; text-to-image would promise
a prompt.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from omegaconf import DictConfig, OmegaConf

from ldm_users.formatting import fmt, round_sig
from ldm_users.tracking.base import stored_wandb_run

SAMPLES_FILE = "samples.png"
TASK = "unconditional-image-generation"
LISTED_USERS = 50
# Evaluation figures on the card (ldm-eval's metrics.json keys): the model-index metric type and the label.
CARD_METRICS = {"user_acc/top1": ("accuracy", "user accuracy (top-1)"), "user_acc/chance": ("accuracy", "chance"),
                "fd/classifier": ("frechet_distance", "Fréchet distance (classifier features)"),
                "fd/classifier_real_holdout": ("frechet_distance", "same, real held-out images"),
                "kid/classifier": ("kid", "KID"), "fd/inception": ("fid", "FID (Inception)"),
                "diversity/ratio": ("diversity_ratio", "diversity ratio (~1 healthy)"),
                "memorization/ratio": ("memorization_ratio", "memorisation ratio (<<1 copies)")}


def wandb_run(export: Path | None, cfg: DictConfig) -> str | None:
    """Where the W&B run that trained the export is: its URL when known (stored by an online run, or built from
    logger.entity), else its id and project (an offline run not synced yet); None when it was not tracked with W&B.
    The run dir is the export's parent (`<run>/export`) or grandparent (`<run>/snapshots/<s>`)."""
    stored = next((found for folder in (Path(export).parents[:2] if export else ())
                   if (found := stored_wandb_run(folder)).get("id")), {})
    if not stored:
        return None
    run_id = stored["id"]
    logger = cfg.get("logger") or {}
    project = logger.get("project") or "ldm-users"
    if stored.get("url"):
        return f"[{project}/{run_id}]({stored['url']})"
    if logger.get("entity"):
        return f"[{project}/{run_id}](https://wandb.ai/{logger.entity}/{project}/runs/{run_id})"
    return f"run `{run_id}` in project `{project}` (logged offline: `wandb sync` it to get a link)"


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


def _card_data(cfg: DictConfig, users: list[str], backbone: str, kind: str, metrics: dict | None) -> ModelCardData:
    name = f"{cfg.model.name}-{len(users)}-users"
    data = cfg.data
    results = [EvalResult(task_type=TASK, dataset_type=str(data.name),
                          dataset_name=f"{data.name} ({len(users)} users, {data.resolution} px)",
                          metric_type=metric, metric_name=label, metric_value=round_sig(metrics[key]))
               for key, (metric, label) in CARD_METRICS.items()
               if metrics and isinstance(metrics.get(key), (int, float)) and not isinstance(metrics[key], bool)]
    tags = ["ldm-users", "latent-diffusion", "user-conditioned", kind, backbone, str(cfg.model.name)]
    return ModelCardData(license=str(cfg.get("export", {}).get("license") or "mit"), library_name="diffusers",
                         pipeline_tag=TASK, tags=list(dict.fromkeys(tags)), model_name=name,
                         eval_results=results or None)


def _users(users: list[str], metrics: dict | None) -> list[str]:
    """A row per user (index, name; its accuracy when evaluated), the first LISTED_USERS of them."""
    scored = bool(metrics) and any(k.startswith("per_user/") for k in metrics)
    head = ["| index | user |" + (" top-1 |" if scored else ""), "|---|---|" + ("---|" if scored else "")]
    rows = [f"| {i} | `{name}` |" + (f" {fmt(metrics.get(f'per_user/{name}/top1'), 3)} |" if scored else "")
            for i, name in enumerate(users[:LISTED_USERS])]
    more = ["", f"... and {len(users) - LISTED_USERS} more (all of them in `users.json`)."] \
        if len(users) > LISTED_USERS else []
    return [*head, *rows, *more]


def _settings(cfg: DictConfig, backbone: str, wandb: str | None) -> list[str]:
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
    if wandb:
        rows.append(("W&B run", wandb))
    return ["| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _metrics(metrics: dict) -> list[str]:
    rows = [f"| {label} | {fmt(metrics[key], 3)} |" for key, (_, label) in CARD_METRICS.items()
            if isinstance(metrics.get(key), (int, float))]
    how = (f"{metrics.get('images_per_user')} images per user, sampler `{metrics.get('sampler')}`, "
           f"{metrics.get('num_inference_steps')} steps, guidance {metrics.get('guidance_scale')}")
    return ["## Evaluation", "", f"`ldm-eval` ({how}):", "", "| metric | value |", "|---|---|", *rows, ""]


def render_card(cfg: DictConfig, users: list[str], backbone: str, kind: str, metrics: dict | None = None,
                samples: bool = False, export: Path | None = None) -> str:
    """The card's text; `export`: the folder it is written into (its run dir has the W&B run)."""
    lines = [f"# {cfg.model.name}: images in the style of {len(users)} users",
             "", "A user-conditioned latent diffusion model trained with ldm-users: a KL autoencoder and a denoiser "
             "in its latent space that generates new images in the style of a chosen user, with classifier-free "
             "guidance.", ""]
    if samples:
        lines += [f"![one row per user]({SAMPLES_FILE})", ""]
    lines += ["## Users", "", "Give users by name or index:", "", *_users(users, metrics), "",
              "## Usage", "", "With only `torch` and `diffusers` installed (the pipeline code ships in this folder, "
              "hence `trust_remote_code=True`):", "", "```python", usage_snippet(users, cfg.sampler), "```", "",
              "With `ldm-users` installed, `UserLDMPipeline.from_pretrained(\".\")` loads the same weights without "
              "running any code from this folder, and `ldm-sample model_path=.` writes images and a grid.", "",
              "## Training", "", *_settings(cfg, backbone, wandb_run(export, cfg)), ""]
    if metrics:
        lines += _metrics(metrics)
    lines += ["<details><summary>Full training configuration</summary>", "", "```yaml",
              OmegaConf.to_yaml(cfg).rstrip(), "```", "", "</details>", ""]
    card = ModelCard(f"---\n{_card_data(cfg, users, backbone, kind, metrics).to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)
