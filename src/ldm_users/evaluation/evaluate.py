"""Judge an exported model: K images per user, then conditioning accuracy, Fréchet distances, KID, diversity
and memorisation against the real training images. Used by ldm-eval and by ldm-train (eval.enabled=true).

Every number lands in one flat dict (metrics.json), self-describing (export, sampler settings, dataset), so a
sweep's jobs can be tabled side by side. Keys:
  user_acc/top1, user_acc/top5 (top-k with k = min(5, users)), user_acc/chance, confusion/top_pairs,
  classifier/holdout_top1 ...  the judge's own accuracy on real images it never saw,
  oracle/top1, oracle/real_holdout_top1  (datasets with a rule-based judge, data.oracle; null otherwise),
  fd/classifier, fd/classifier_per_user_mean, fd/classifier_real_holdout (a real-vs-real yardstick),
  fd/inception (standard FID; null without eval.inception_weights), kid/classifier, kid/classifier_std,
  diversity/generated, diversity/real, diversity/ratio (~1 healthy, near 0 = mode collapse), diversity/min_ratio,
  diversity/pixel_ratio (the same ratio in pixel space),
  memorization/nn_dist_generated, memorization/nn_dist_real, memorization/ratio (well below 1 = copying),
  per_user/<user>/{top1,top5,fd,diversity_ratio,pixel_diversity_ratio,oracle_top1},
  ceiling/{psnr,ssim,fd_classifier,kid_classifier,top1,images} (the judge's held-out real images through the VAE),
  bottleneck/{stage,autoencoder_share,line}, judge/{reliable,skill,advice}  (evaluation/diagnosis.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm_users.data.folder import PreparedDataset, to_model_range
from ldm_users.data.loading import prepare_dataset
from ldm_users.errors import ConfigError
from ldm_users.evaluation import metrics as M
from ldm_users.evaluation.classifier import TrainedClassifier, load_or_train, resize_for
from ldm_users.evaluation.diagnosis import ceiling_metrics, diagnose
from ldm_users.evaluation.inception import load_inception, weights_key
from ldm_users.formatting import fmt
from ldm_users.grid import make_grid, to_uint8
from ldm_users.inference.device import move_pipeline, resolve_device_dtype
from ldm_users.inference.export import write_model_card
from ldm_users.inference.loading import load_pipeline
from ldm_users.inference.samplers import call_kwargs
from ldm_users.io import atomic_path, write_json
from ldm_users.progress import progress

log = logging.getLogger(__name__)

# Memorisation is measured in pixel space (what "a copy" means), at most this many pixels a side.
MEMORIZATION_RESOLUTION = 64


def _finite(x):
    """JSON has no NaN/inf: such values are written as null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _device(ecfg) -> tuple[torch.device, torch.dtype]:
    return resolve_device_dtype(str(ecfg.get("device", "auto")), str(ecfg.get("dtype", "auto")))


def check_matches(pipe, dataset: PreparedDataset) -> None:
    """The evaluation compares against the data the model learned: same users in the same order, same size."""
    names = pipe.user_names
    if names != dataset.users:
        raise ConfigError(f"the model's {len(names)} users ({', '.join(names[:4])}...) are not the dataset's "
                          f"{dataset.num_users} ({', '.join(dataset.users[:4])}...) at data.root={dataset.folder}: "
                          f"pass the data settings the model was trained with (e.g. data.num_users=..., "
                          f"data.images_per_user=..., data.resolution=..., or data=folder data.data_dir=...).")
    size = pipe.image_size
    if size != dataset.resolution:
        raise ConfigError(f"the model generates {size}px images but data.resolution={dataset.resolution}: "
                          f"set data.resolution={size} (the resolution it was trained at).")


def generate_images(pipe, ecfg, sampler_cfg, num_users: int, device, dtype, show_progress: bool = True):
    """K images per user as uint8 NHWC (quantised exactly like saved PNGs and like the real data), and labels."""
    move_pipeline(pipe, device, dtype)
    per_user = int(ecfg.images_per_user)
    generator = torch.Generator(device).manual_seed(int(ecfg.seed))
    images = pipe(users=list(range(num_users)), num_images_per_user=per_user, generator=generator,
                  batch_size=int(ecfg.batch_size), output_type="pt",
                  show_progress=None if show_progress else False,  # None: the sampling bar in a terminal only
                  **call_kwargs(sampler_cfg)).images
    labels = np.repeat(np.arange(num_users), per_user)
    return to_uint8(images), labels


def _pixels(images_uint8: np.ndarray) -> np.ndarray:
    size = min(images_uint8.shape[1], MEMORIZATION_RESOLUTION)
    x = resize_for(to_model_range(images_uint8), size)
    return x.reshape(len(x), -1).double().numpy()


def _real_pixel_nn(dataset: PreparedDataset, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real images as pixel vectors and each one's distance to its nearest other real image (cached)."""
    pixels = np.concatenate([_pixels(np.asarray(dataset.images[s:s + 512])) for s in range(0, len(dataset), 512)])
    cache = folder / "real_pixel_nn.npy"
    if cache.exists():
        return pixels, np.load(cache)
    nn_real = M.nearest_distances(pixels, pixels, exclude_self=True)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.save(f, nn_real)
    return pixels, nn_real


def inception_fid(weights: str, dataset: PreparedDataset, generated: np.ndarray, cache_root: Path, ecfg,
                  device, show_progress: bool = True) -> tuple[float, int]:
    """Standard FID (FID InceptionV3 from local weights); real statistics cached per dataset and weights file."""
    model = load_inception(weights).to(device)
    limit = ecfg.get("max_real_images")
    n_real = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n_real < 2 or len(generated) < 2:
        raise ConfigError("the Inception FID needs at least 2 real and 2 generated images (eval.max_real_images).")
    real_idx = np.sort(np.random.default_rng(0).choice(len(dataset), n_real, replace=False))
    batch = int(ecfg.get("inception_batch_size", 32))

    @torch.no_grad()
    def features(get, n, desc):
        out = []
        for s in progress(range(0, n, batch), desc=desc, disable=not show_progress, unit="batch"):
            out.append(model(get(s, min(s + batch, n)).to(device)).double().cpu())
        return torch.cat(out).numpy()

    cache = cache_root / f"inception-{weights_key(weights)}-n{n_real}.npz"
    if cache.exists():
        stats = np.load(cache)
        mu_r, sigma_r = stats["mu"], stats["sigma"]
    else:
        real = features(lambda a, b: dataset.batch(real_idx[a:b])[0], n_real, "inception (real)")
        mu_r, sigma_r = M.gaussian_stats(real)
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:  # a killed run never leaves a torn .npz behind
            np.savez(f, mu=mu_r, sigma=sigma_r)
    gen = features(lambda a, b: to_model_range(generated[a:b]), len(generated), "inception (generated)")
    return M.frechet_distance_to_stats(gen, mu_r, sigma_r), n_real


def save_grid(generated: np.ndarray, gen_labels: np.ndarray, dataset: PreparedDataset, ecfg, path: Path) -> Path:
    """One row per user: generated images, a blank, then that user's first real images."""
    per = int(ecfg.get("grid_per_user", 6))
    users = range(min(dataset.num_users, int(ecfg.get("grid_users", 16))))
    labels = dataset.labels.numpy()
    blank = Image.new("RGB", (dataset.resolution, dataset.resolution), (255, 255, 255))  # the gap between them
    rows = []
    for u in users:
        gen = [Image.fromarray(im) for im in generated[gen_labels == u][:per]]
        real = [Image.fromarray(np.asarray(dataset.images[i])) for i in np.flatnonzero(labels == u)[:per]]
        rows.append(gen + [blank] + real)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, [f"{dataset.users[u]}" for u in users],
              columns=[("generated", per), ("", 1), ("real", per)]).save(path)
    return path


def _oracle_metrics(out: dict, dataset: PreparedDataset, generated, gen_labels, held, oracle) -> np.ndarray:
    """The dataset's rule-based user detector (data.oracle) on the generated and the held-out real images; returns
    whether it agrees with each generated image's user."""
    oracle_gen = oracle(generated, dataset.num_users) == gen_labels
    out["oracle/top1"] = float(oracle_gen.mean())
    out["oracle/real_holdout_top1"] = None
    if len(held):
        real_held = np.asarray(dataset.images[np.sort(held)])
        truth = dataset.labels.numpy()[held]
        out["oracle/real_holdout_top1"] = float((oracle(real_held, dataset.num_users) == truth).mean())
    return oracle_gen


def dataset_oracle(cfg: DictConfig):
    """The data module's judge (`data.oracle`, a partial `_target_`), or None."""
    node = cfg.data.get("oracle")
    return instantiate(node) if node is not None else None


def _spread_ratio(gen, real) -> float:
    # Within-user spread of generated images relative to the real ones: ~1 healthy, near 0 = mode collapse.
    gd = M.mean_pairwise_distance(gen)
    rd = M.mean_pairwise_distance(real) if len(real) >= 2 else float("nan")
    return gd / rd if rd > 0 else float("nan")


def _per_user_metrics(out: dict, names: list[str], feats, pixels, labels, correct) -> None:
    """per_user/<user>/... and the diversity summary. feats, pixels, labels: (generated, real) pairs; correct:
    (top-1 hits, top-5 hits, oracle hits or None) per generated image."""
    (gen_feats, real_feats), (gen_pixels, real_pixels), (gen_labels, real_labels) = feats, pixels, labels
    top1, top5, oracle_gen = correct
    gen_div, real_div, ratios, pixel_ratios, fds = [], [], [], [], []
    for u, name in enumerate(names):
        mask = gen_labels == u
        g, r = gen_feats[mask], real_feats[real_labels == u]
        gen_div.append(M.mean_pairwise_distance(g))
        real_div.append(M.mean_pairwise_distance(r) if len(r) >= 2 else float("nan"))
        ratios.append(_spread_ratio(g, r))
        pixel_ratios.append(_spread_ratio(gen_pixels[mask], real_pixels[real_labels == u]))
        fds.append(M.frechet_distance_features(g, r) if len(r) >= 2 else float("nan"))
        out[f"per_user/{name}/top1"] = float(top1[mask].mean())
        out[f"per_user/{name}/top5"] = float(top5[mask].mean())
        out[f"per_user/{name}/fd"] = _finite(fds[-1])
        out[f"per_user/{name}/diversity_ratio"] = _finite(ratios[-1])
        out[f"per_user/{name}/pixel_diversity_ratio"] = _finite(pixel_ratios[-1])
        out[f"per_user/{name}/oracle_top1"] = float(oracle_gen[mask].mean()) if oracle_gen is not None else None
    ratios_arr = np.asarray(ratios)
    out["fd/classifier_per_user_mean"] = _finite(np.nanmean(fds))
    out["diversity/generated"] = float(np.mean(gen_div))
    out["diversity/real"] = _finite(np.nanmean(real_div))
    out["diversity/ratio"] = _finite(np.nanmean(ratios_arr))
    out["diversity/min_ratio"] = _finite(np.nanmin(ratios_arr))
    out["diversity/min_ratio_user"] = names[int(np.nanargmin(ratios_arr))]
    # The classifier's features are trained to ignore within-user variation, so they are complemented by the
    # same ratio in pixel space, which no training can make blind to a generator repeating itself.
    out["diversity/pixel_ratio"] = _finite(np.nanmean(pixel_ratios))


def compute_metrics(clf: TrainedClassifier, dataset: PreparedDataset, generated: np.ndarray, gen_labels: np.ndarray,
                    ecfg, oracle=None) -> dict:
    """Everything that needs only the classifier and the images (no model, no Inception). `oracle`: the dataset's
    rule-based judge, (images, num_users) -> user ids, when it has one."""
    names, num_users = dataset.users, dataset.num_users
    real_labels = dataset.labels.numpy()
    real_feats = clf.real_features
    gen_feats, gen_logits = clf.classify(generated)
    top1 = M.topk_correct(gen_logits, gen_labels, 1)
    top5 = M.topk_correct(gen_logits, gen_labels, 5)
    counts = M.confusion_matrix(gen_labels, gen_logits.argmax(1), num_users)
    pairs = M.top_confusions(counts, names, int(ecfg.get("confusion_pairs", 10)))
    held = np.asarray(clf.meta["holdout_indices"], dtype=np.int64)

    out: dict = {
        "user_acc/top1": float(top1.mean()),
        "user_acc/top5": float(top5.mean()),
        "user_acc/top5_k": min(5, num_users),
        "user_acc/chance": 1.0 / num_users,
        "confusion/top_pairs": ", ".join(f"{t}->{p} ({c})" for t, p, c in pairs),
        "classifier/holdout_top1": _finite(clf.meta["holdout_top1"]),
        "classifier/holdout_top5": _finite(clf.meta["holdout_top5"]),
        "classifier/train_top1": _finite(clf.meta["train_top1"]),
        "classifier/holdout_images": len(held),
        "classifier/train_images": len(clf.meta["train_indices"]),
        "classifier/cache_dir": str(clf.folder),
    }
    kid_mean, kid_std = M.kernel_inception_distance(gen_feats, real_feats, int(ecfg.get("kid_subsets", 100)),
                                                    int(ecfg.get("kid_subset_size", 1000)), seed=int(ecfg.seed))
    out["fd/classifier"] = M.frechet_distance_features(gen_feats, real_feats)
    out["fd/classifier_real_holdout"] = (M.frechet_distance_features(real_feats[held], real_feats)
                                         if len(held) >= 2 else None)
    out["kid/classifier"], out["kid/classifier_std"] = kid_mean, kid_std

    oracle_gen = _oracle_metrics(out, dataset, generated, gen_labels, held, oracle) if oracle else None
    if oracle_gen is None:
        out["oracle/top1"] = out["oracle/real_holdout_top1"] = None
    real_pixels, nn_real = _real_pixel_nn(dataset, clf.folder)
    gen_pixels = _pixels(generated)
    _per_user_metrics(out, names, (gen_feats, real_feats), (gen_pixels, real_pixels), (gen_labels, real_labels),
                      (top1, top5, oracle_gen))

    nn_gen = M.nearest_distances(gen_pixels, real_pixels)
    scale = math.sqrt(real_pixels.shape[1])  # per-pixel RMS units, comparable across resolutions
    out["memorization/nn_dist_generated"] = float(nn_gen.mean() / scale)
    out["memorization/nn_dist_real"] = float(nn_real.mean() / scale)
    out["memorization/ratio"] = _finite(nn_gen.mean() / nn_real.mean()) if nn_real.mean() > 0 else None
    return {k: (_finite(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


def evaluate_export(cfg: DictConfig, model_path, out_dir, dataset: PreparedDataset | None = None,
                    show_progress: bool = True) -> dict:
    """Generate from the model at model_path (export, run dir or checkpoint), score it, write metrics.json + grid."""
    start = time.perf_counter()
    ecfg = cfg.eval
    if int(ecfg.images_per_user) < 2:
        raise ConfigError(f"eval.images_per_user={ecfg.images_per_user}: use at least 2 (diversity and the "
                          f"per-user statistics need pairs); 16 or more for stable numbers.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, dtype = _device(ecfg)
    pipe = load_pipeline(model_path, use_ema=True, sampler=cfg.sampler)
    if dataset is None:
        dataset = prepare_dataset(cfg, show_progress=show_progress)
    check_matches(pipe, dataset)
    clf = load_or_train(dataset, OmegaConf.to_container(ecfg.classifier, resolve=True), cfg.paths.cache_dir,
                        device, show_progress)

    generated, gen_labels = generate_images(pipe, ecfg, cfg.sampler, dataset.num_users, device, dtype, show_progress)
    ceiling = ceiling_metrics(pipe.vae, clf, dataset, device)  # the autoencoder's best, scored like generated images
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    metrics: dict = {
        "export_path": str(Path(model_path).resolve()),
        "sampler": str(cfg.sampler.name),
        **call_kwargs(cfg.sampler),
        "images_per_user": int(ecfg.images_per_user),
        "seed": int(ecfg.seed),
        "num_users": dataset.num_users,
        "dataset": dataset.folder.name,
        "data_name": str(cfg.data.name),
        "resolution": dataset.resolution,
    }
    for key in ("model", "vae", "hardware"):  # what was trained, beside what it scored (ldm-report's columns)
        name = OmegaConf.select(cfg, f"{key}.name", default=None)
        if name:
            metrics[key] = str(name)
    metrics.update(compute_metrics(clf, dataset, generated, gen_labels, ecfg, oracle=dataset_oracle(cfg)))
    metrics.update({k: _finite(v) if isinstance(v, float) else v for k, v in ceiling.items()})
    metrics.update(diagnose(metrics))  # which stage limits quality, and whether the judge can tell

    weights = ecfg.get("inception_weights")
    metrics["inception_weights"] = str(weights) if weights else None
    metrics["fd/inception"] = metrics["fd/inception_real_images"] = None
    if weights:
        fid, n_real = inception_fid(str(weights), dataset, generated, clf.folder.parent / dataset.folder.name, ecfg,
                                    device, show_progress)
        metrics["fd/inception"], metrics["fd/inception_real_images"] = _finite(fid), n_real

    metrics["grid"] = str(save_grid(generated, gen_labels, dataset, ecfg, out_dir / "grid.png"))
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    write_json(out_dir / "metrics.json", metrics)
    log.info("eval: top-1 %s (chance %s), FD(classifier) %s, diversity ratio %s, memorization ratio %s; %s",
             *(fmt(metrics[k], 3) for k in ("user_acc/top1", "user_acc/chance", "fd/classifier", "diversity/ratio",
                                            "memorization/ratio")), out_dir / "metrics.json")
    return metrics


PER_USER = "per_user/"


def per_user_table(metrics: dict) -> tuple[list[str], list[list]]:
    """The `per_user/<user>/<metric>` entries as one table: a row per user, a column per metric."""
    rows: dict[str, dict] = {}
    for key, value in metrics.items():
        if key.startswith(PER_USER):
            user, _, name = key[len(PER_USER):].rpartition("/")
            rows.setdefault(user, {})[name] = value
    columns = sorted({name for row in rows.values() for name in row})
    return ["user", *columns], [[user, *(row.get(c) for c in columns)] for user, row in rows.items()]


def log_to_tracker(tracker, metrics: dict, prefix: str = "") -> None:
    """Aggregates into the run summary (the runs table, parallel coordinates), per-user figures as one table (its
    size grows with the users, the summary's does not), the grid as an image with a caption."""
    summary = {f"{prefix}{k}": v for k, v in metrics.items() if not k.startswith(PER_USER) and k != "grid"}
    tracker.set_summary(summary)
    columns, rows = per_user_table(metrics)
    if rows:
        tracker.log_table(f"{prefix}per_user", columns, rows)
    if metrics.get("grid"):
        tracker.log_image(f"{prefix}grid", metrics["grid"], caption="per user: generated | real")


def evaluate_and_record(cfg: DictConfig, export, out_dir, tracker, dataset: PreparedDataset | None = None,
                        card: bool = True) -> dict:
    """The one evaluation sequence of ldm-eval and ldm-train: metrics.json and the grid in `out_dir`, the tracker
    (under `eval/`), then, with `card`, the export's model card with the figures."""
    metrics = evaluate_export(cfg, export, out_dir, dataset=dataset)
    log_to_tracker(tracker, metrics, prefix="eval/")
    if card:
        write_model_card(export, metrics)
    return metrics
