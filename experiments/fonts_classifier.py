"""Can the evaluator tell the fonts apart? Held-out accuracy of ldm-eval's user classifier on real `data=fonts` images.

ldm-eval judges a model by the user classifier it trains on the real images (about 20% per user held out); a
benchmark is only useful if that judge itself scores near 100% on real held-out images. This script generates the
dataset for several generator seeds (fresh samples of the same fonts), trains the classifier exactly as ldm-eval
does (the `eval.classifier` settings), and prints the held-out top-1 per seed, pooled, and the most confused pairs:

  PYTHONPATH=src python experiments/fonts_classifier.py data.images_per_user=10 data.resolution=32
  PYTHONPATH=src python experiments/fonts_classifier.py --seeds 1234,1,2,3,4 data.images_per_user=64

Any other argument is a config override. Caches go to a temporary folder unless LDM_USERS_CACHE is set.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1234,1,2,3,4", help="data.generator_seed values, comma separated")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.images_per_user=10")
    args = parser.parse_args()
    os.environ.setdefault("LDM_USERS_CACHE", tempfile.mkdtemp(prefix="fonts_classifier-"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    from ldm_users.config import compose
    from ldm_users.data.loading import prepare_dataset
    from ldm_users.evaluation.classifier import train_classifier

    correct, total, confused = 0, 0, collections.Counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = compose(["data=fonts", *args.overrides, f"data.generator_seed={seed}"])
        dataset = prepare_dataset(cfg, show_progress=False)
        _, meta, _, logits = train_classifier(dataset, dict(cfg.eval.classifier), torch.device("cpu"),
                                              show_progress=False)
        held = np.asarray(meta["holdout_indices"])
        truth, pred = dataset.labels.numpy()[held], logits[held].argmax(1)
        correct += int((truth == pred).sum())
        total += len(held)
        confused.update((dataset.users[t], dataset.users[p]) for t, p in zip(truth, pred) if t != p)
        print(f"seed {seed}: {dataset.num_users} users x {cfg.data.images_per_user} images at "
              f"{cfg.data.resolution} px: held-out top-1 {meta['holdout_top1']:.3f} ({len(held)} images), "
              f"train top-1 {meta['train_top1']:.3f}, {meta['steps_done']} steps, {meta['train_seconds']} s")
    print(f"pooled held-out top-1: {correct / total:.4f} ({correct}/{total})")
    for (true, pred), n in confused.most_common(12):
        print(f"  {true} -> {pred}: {n}")


if __name__ == "__main__":
    main()
