"""The evaluator is right before any model is judged by it.

Fed images whose answer is known (real held-out images, the same with wrong labels, noise, a generator that
repeats itself), the metrics must say so, on the tiny smoke dataset (4 users x 16 images at 32 px).
"""

import numpy as np
import pytest
import torch

from ldm_users.data.synthetic import oracle_predict
from ldm_users.evaluation.classifier import holdout_split, load_or_train
from ldm_users.evaluation.evaluate import compute_metrics

pytestmark = pytest.mark.slow  # trains the (cached) user classifier: ~20 steps on the CPU


@pytest.fixture(scope="module")
def judge(session_cache):
    from ldm_users.config import compose
    from ldm_users.data.loading import prepare_dataset

    cfg = compose(["experiment=smoke", "logger=none"])
    dataset = prepare_dataset(cfg, show_progress=False)
    from omegaconf import OmegaConf

    clf = load_or_train(dataset, OmegaConf.to_container(cfg.eval.classifier), cfg.paths.cache_dir,
                        torch.device("cpu"), show_progress=False)
    return cfg, dataset, clf


def _score(judge, images, labels):
    cfg, dataset, clf = judge
    return compute_metrics(clf, dataset, np.asarray(images), np.asarray(labels), cfg.eval, oracle=oracle_predict)


def _holdout(judge):
    _, dataset, clf = judge
    idx = np.asarray(clf.meta["holdout_indices"])
    return np.asarray(dataset.images[idx]), dataset.labels.numpy()[idx]


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 16)
    train, held = holdout_split(labels, 0.2, seed=0)
    assert not set(train) & set(held) and len(train) + len(held) == 64
    assert np.bincount(labels[held]).tolist() == [3, 3, 3, 3]


def test_classifier_is_accurate_on_images_it_never_saw(judge):
    _, dataset, clf = judge
    assert clf.meta["holdout_top1"] >= 0.9
    assert len(clf.meta["holdout_indices"]) == 12 and dataset.num_users == 4


def test_real_images_score_high_accuracy_and_near_zero_distance_noise_does_not(judge):
    images, labels = _holdout(judge)
    real = _score(judge, images, labels)
    rng = np.random.default_rng(0)
    noise = _score(judge, rng.integers(0, 256, images.shape, dtype=np.uint8), labels)

    assert real["user_acc/top1"] >= 0.9
    assert real["oracle/top1"] == 1.0 and real["oracle/real_holdout_top1"] == 1.0
    assert noise["fd/classifier"] > 20 * real["fd/classifier"]
    assert noise["kid/classifier"] > 20 * max(real["kid/classifier"], 1e-6)
    assert noise["fd/classifier_per_user_mean"] > 20 * real["fd/classifier_per_user_mean"]
    assert noise["oracle/top1"] <= 0.5
    # Held-out images are dataset images (the diffusion model trains on all of them): flagged as copies.
    assert real["memorization/ratio"] < 0.01


def test_a_perfect_generator_scores_like_real_data(judge):
    """Fresh draws from the synthetic users' styles: right users, real variety, no copies."""
    from ldm_users.data.synthetic import render, user_styles

    styles = user_styles(4)
    fresh = np.stack([np.asarray(render(styles[u], np.random.default_rng([99, u, k]), 32))
                      for u in range(4) for k in range(8)])
    labels = np.repeat(np.arange(4), 8)
    good = _score(judge, fresh, labels)
    noise = _score(judge, np.random.default_rng(0).integers(0, 256, fresh.shape, dtype=np.uint8), labels)
    assert good["user_acc/top1"] >= 0.9 and good["oracle/top1"] == 1.0
    assert good["fd/classifier"] < 0.05 * noise["fd/classifier"]
    assert 0.5 < good["diversity/ratio"] < 2.0 and 0.5 < good["diversity/pixel_ratio"] < 2.0
    assert 0.5 < good["memorization/ratio"] < 2.0


def test_features_of_disjoint_real_sets_are_close(judge):
    """No self-comparison: the held-out images against the classifier's training split only."""
    from ldm_users.evaluation import metrics as M

    clf = judge[2]
    train, held = np.asarray(clf.meta["train_indices"]), np.asarray(clf.meta["holdout_indices"])
    noise_feats, _ = clf.classify(np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    real_fd = M.frechet_distance_features(clf.real_features[held], clf.real_features[train])
    noise_fd = M.frechet_distance_features(noise_feats, clf.real_features[train])
    assert real_fd < 0.05 * noise_fd


def test_wrong_user_labels_score_about_chance(judge):
    _, dataset, _ = judge
    images, labels = np.asarray(dataset.images), dataset.labels.numpy()
    shuffled = _score(judge, images, np.random.default_rng(0).permutation(labels))
    assert abs(shuffled["user_acc/top1"] - 0.25) < 0.15  # 64 images, chance = 1/4
    shifted = _score(judge, images, (labels + 1) % 4)  # every image labelled as the next user
    assert shifted["user_acc/top1"] <= 0.1
    assert shifted["confusion/top_pairs"].count("->") == 4  # user_k -> user_(k-1), all four pairs listed
    assert "user_01->user_00 (16)" in shifted["confusion/top_pairs"]
    assert shifted["per_user/user_01/top1"] <= 0.1


def test_a_generator_repeating_one_image_per_user_is_flagged(judge):
    _, dataset, _ = judge
    labels = dataset.labels.numpy()
    first = [int(np.flatnonzero(labels == u)[0]) for u in range(4)]
    repeated = np.concatenate([np.repeat(np.asarray(dataset.images[[i]]), 8, 0) for i in first])
    collapsed = _score(judge, repeated, np.repeat(np.arange(4), 8))
    # Right users, so accuracy alone would not notice; the diversity and memorisation figures do.
    assert collapsed["user_acc/top1"] >= 0.9
    assert collapsed["diversity/ratio"] < 0.05 and collapsed["diversity/pixel_ratio"] < 0.05
    assert all(collapsed[f"per_user/user_{u:02d}/diversity_ratio"] < 0.05 for u in range(4))
    assert collapsed["memorization/ratio"] < 0.05  # exact copies of training images
