"""Training-recipe levers, each doing what its config key says: augmented latent cache, power EMA, scale_lr."""

from __future__ import annotations

import pytest
import torch

from ldm_users.data.folder import prepare_folder
from ldm_users.data.synthetic import generate
from ldm_users.models.build import build_vae
from ldm_users.perf.memory_model import placeholder_users, random_latents
from ldm_users.training.common import DataOrder, make_accelerator
from ldm_users.training.ema import make_ema
from ldm_users.training.latent_cache import Augment, load_or_encode, vae_hash
from ldm_users.training.trainer import build_ldm_trainer, reset_accelerator_state
from tests.helpers import compose


def test_augmented_latent_cache_holds_the_encodings_of_flipped_and_shifted_images(tmp_path):
    cfg = compose("experiment=smoke", "logger=none")
    data = prepare_folder(generate(tmp_path / "data", 2, 3, 32, 0), tmp_path / "cache", 32, show_progress=False)
    torch.manual_seed(0)
    vae = build_vae(cfg).eval()
    root = tmp_path / "cache"
    plain = load_or_encode(vae, data, root, "cpu", show_progress=False)
    # Without augmentation: today's cache, under today's name.
    assert plain.path.name == f"{vae_hash(vae)}-{data.fingerprint}-r32.npy" and plain.variants == 1
    assert Augment.from_cfg(cfg) == Augment()  # data=synthetic has random_flip=false, shift 0

    augment = Augment(flip=True, shift=2)
    cache = load_or_encode(vae, data, root, "cpu", show_progress=False, augment=augment)
    n = len(data)
    assert cache.path != plain.path and cache.variants == 10 and cache.num_images == n
    assert torch.equal(cache.labels, data.labels.repeat(10))
    assert torch.equal(cache.mean[:n], plain.mean) and torch.equal(cache.std[:n], plain.std)  # variant 0: as is
    images, _ = data.batch(range(n))
    flipped = augment.variants.index((True, 0, 0))
    moved = augment.variants.index((False, 2, 0))
    assert torch.equal(augment.apply(images, flipped), images.flip(-1))
    assert torch.equal(augment.apply(images, moved)[..., 2:], images[..., :-2])  # content 2 px to the right
    with torch.no_grad():
        for variant, expect in ((flipped, images.flip(-1)), (moved, augment.apply(images, moved))):
            dist = vae.encode(expect).latent_dist
            rows = slice(variant * n, (variant + 1) * n)
            torch.testing.assert_close(cache.mean[rows], dist.mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cache.std[rows], dist.std, rtol=1e-5, atol=1e-6)
    again = load_or_encode(vae, data, root, "cpu", show_progress=False, augment=augment)
    assert again.path == cache.path and torch.equal(again.mean, cache.mean)  # read back, not encoded again


def test_each_epoch_draws_one_variant_per_image_as_a_function_of_the_seed():
    n, variants = 6, 4
    order = DataOrder(n, seed=3, variants=variants)
    epochs = [order.indices(epoch * n, n) for epoch in range(4)]
    for rows in epochs:
        assert sorted((rows % n).tolist()) == list(range(n))  # every image once per epoch
        assert rows.max() < n * variants
    assert len({tuple((rows // n).tolist()) for rows in epochs}) > 1  # the variants change between epochs
    # A pure function of (seed, position): a fresh order, read from the middle, agrees (exact resume).
    assert torch.equal(DataOrder(n, seed=3, variants=variants).indices(n + 2, 7), torch.cat(epochs)[n + 2:n + 9])
    # Without variants the stream is the plain per-epoch permutation, as before.
    plain = DataOrder(n, seed=3)
    assert torch.equal(plain.indices(0, n), torch.randperm(n, generator=torch.Generator().manual_seed(3 * 1_000_003)))


@pytest.mark.parametrize("power, after", [(2 / 3, 0), (0.75, 2)])
def test_power_ema_follows_the_weights_early_as_diffusers_formula_says(power, after):
    cfg = compose("experiment=smoke", f"train.ema.power={power}", f"train.ema.update_after_step={after}",
                  "train.ema.decay=0.999")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = make_ema(cfg.train.ema, model, "cpu")
    expected = [p.detach().clone() for p in model.parameters()]
    for k in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step(model.parameters())
        j = max(0, k - after - 1)
        decay = 0.0 if j == 0 else min(0.999, 1 - (1 + j) ** -power)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
        for e, shadow in zip(expected, ema.shadow_params):
            torch.testing.assert_close(shadow, e)
        if k <= after + 1:  # until the averaging starts, the EMA is the weights
            assert all(torch.equal(s, p) for s, p in zip(ema.shadow_params, model.parameters()))
    assert ema.get_decay(2 + after) == pytest.approx(1 - 2 ** -power)  # small early: 0.37 (2/3), 0.41 (3/4)
    assert ema.get_decay(10**7) == 0.999  # the ceiling


@pytest.mark.parametrize("scale", [True, False])
def test_the_trainer_uses_the_scaled_learning_rate(scale):
    """tests/test_scale_lr.py checks the formula; this, that the LDM trainer's optimizer gets its result."""
    cfg = compose("experiment=smoke", f"train.scale_lr={str(scale).lower()}", "train.lr=1e-4",
                  "hardware.batch_size=4", "hardware.gradient_accumulation_steps=2")
    reset_accelerator_state()
    try:
        accelerator = make_accelerator(cfg)
        trainer = build_ldm_trainer(cfg, accelerator, placeholder_users(cfg), random_latents(cfg, 8, "cpu"), 1.0,
                                    num_steps=10)
    finally:
        reset_accelerator_state()
    lr = 1e-4 * 8 if scale else 1e-4  # 4 per device x 2 accumulation x 1 process
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(lr)
