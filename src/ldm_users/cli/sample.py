"""ldm-sample: N images per chosen user, as PNGs and a grid (one row per user)."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ldm_users.config import config_dir
from ldm_users.errors import ConfigError, exit_on_user_error
from ldm_users.grid import user_rows_grid
from ldm_users.inference.device import move_pipeline, resolve_device_dtype
from ldm_users.inference.loading import adopt_run_sampler, load_pipeline, parse_users
from ldm_users.inference.samplers import call_kwargs
from ldm_users.runtime import output_dir, task_overrides


def generate(cfg: DictConfig, out_dir: Path) -> list[Path]:
    pipe = load_pipeline(cfg.model_path, use_ema=bool(cfg.use_ema), sampler=cfg.sampler)
    device, dtype = resolve_device_dtype(str(cfg.device), str(cfg.dtype))
    move_pipeline(pipe, device, dtype)
    users = parse_users(cfg.users, pipe)
    try:
        ids = pipe.user_ids(users)
    except ValueError as err:
        raise ConfigError(f"users={list(users)}: {err}") from None
    per_user = int(cfg.num_images)
    generator = torch.Generator(device).manual_seed(int(cfg.seed))
    images = pipe(users=ids, num_images_per_user=per_user, generator=generator, batch_size=int(cfg.batch_size),
                  **call_kwargs(cfg.sampler)).images
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = pipe.user_names
    for k, image in enumerate(images):
        user = names[ids[k // per_user]]
        path = out_dir / f"{user}_{k % per_user:03d}.png"
        image.save(path)
        written.append(path)
    user_rows_grid(images, per_user, [names[i] for i in ids]).save(out_dir / "grid.png")
    print(f"ldm-sample: {len(images)} images and grid.png in {out_dir}\n  next, judge the model:\n"
          f"  $ ldm-eval export_path={cfg.model_path}")
    return written


@hydra.main(config_path=config_dir(), config_name="sample", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    adopt_run_sampler(cfg, cfg.model_path, task_overrides())  # the run's sampler unless overridden
    generate(cfg, output_dir())


if __name__ == "__main__":
    main()
