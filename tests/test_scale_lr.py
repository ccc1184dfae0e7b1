"""train.scale_lr / vae_train.scale_lr: the learning rate grows with the global batch, as in diffusers' examples."""

from types import SimpleNamespace

from ldm_users.training.common import global_batch, learning_rate
from tests.helpers import compose


def _accelerator(accum: int, world: int):
    return SimpleNamespace(gradient_accumulation_steps=accum, num_processes=world)


def test_lr_is_scaled_by_the_global_batch_only_when_asked():
    cfg = compose("experiment=smoke", "hardware.batch_size=8", "train.lr=1e-4")
    acc = _accelerator(accum=2, world=4)
    assert global_batch(cfg, acc) == 8 * 2 * 4
    assert learning_rate(cfg.train, cfg, acc) == 1e-4  # off by default
    cfg = compose("experiment=smoke", "hardware.batch_size=8", "train.lr=1e-4", "train.scale_lr=true")
    assert learning_rate(cfg.train, cfg, acc) == 1e-4 * 64
    assert learning_rate(cfg.vae_train, cfg, acc) == float(cfg.vae_train.lr)  # each stage has its own switch
