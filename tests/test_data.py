"""Folder datasets: discovery, formats, bad input with clear messages; the synthetic dataset and its oracle."""

import hashlib
import logging

import numpy as np
import pytest
from PIL import Image

from ldm_users.data import synthetic
from ldm_users.data.folder import discover, prepare_folder
from ldm_users.errors import DataError


def _img(path, size=(40, 30), color=(200, 10, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else (color[0] if mode == "L" else color + (255,))).save(path)


def test_users_are_sorted_subfolders_and_formats_become_rgb(tmp_path):
    root = tmp_path / "data"
    _img(root / "bob" / "a.png")
    _img(root / "alice" / "b.jpg")
    _img(root / "alice" / "gray.png", mode="L", color=(128, 0, 0))
    _img(root / "alice" / "alpha.png", mode="RGBA", color=(0, 0, 255))
    _img(root / "carol" / "c.bmp")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(root / "carol" / "deep.png")  # 16-bit
    Image.new("L", (40, 40), 77).save(root / "carol" / "p.pgm")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / "carol" / "w.webp")
    ds = prepare_folder(root, tmp_path / "cache", resolution=16, show_progress=False)
    assert ds.users == ["alice", "bob", "carol"]
    assert ds.counts() == [3, 1, 4]
    assert ds.images.shape == (8, 16, 16, 3) and ds.images.dtype == np.uint8
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and -1.0 <= x.min() and x.max() <= 1.0
    deep = ds.images[ds.paths.index(str(root / "carol" / "deep.png"))]
    assert abs(int(deep.mean()) - round(40000 / 65535 * 255)) <= 1  # 16-bit scaled, not clipped to white


def test_center_crop_keeps_the_middle(tmp_path):
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # a white middle third
    root = tmp_path / "d"
    (root / "u").mkdir(parents=True)
    Image.fromarray(arr).save(root / "u" / "wide.png")
    ds = prepare_folder(root, tmp_path / "c", resolution=20, show_progress=False)
    assert ds.images[0].mean() > 240


def test_missing_data_dir_names_the_path_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"data.data_dir=.*nowhere does not exist.*data=synthetic"):
        discover(tmp_path / "nowhere")


def test_no_user_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    _img(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="has no user subfolders"):
        discover(tmp_path / "flat")


def test_user_without_readable_image_is_named(tmp_path):
    root = tmp_path / "data"
    _img(root / "good" / "a.png")
    (root / "broken").mkdir()
    (root / "broken" / "x.png").write_text("not an image")
    with pytest.raises(DataError, match=r"user folder .*broken has no readable image"):
        prepare_folder(root, tmp_path / "c", resolution=16, show_progress=False)


def test_corrupt_files_are_skipped_and_counted_or_strict_error(tmp_path, caplog):
    root = tmp_path / "data"
    _img(root / "u" / "ok.png")
    (root / "u" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "u" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        ds = prepare_folder(root, tmp_path / "c", resolution=16, show_progress=False)
    assert len(ds) == 1 and len(ds.skipped) == 2
    assert "skipped 2 unusable file(s)" in caplog.text
    with pytest.raises(DataError, match=r"bad.png: cannot decode.*data.strict=false"):
        prepare_folder(root, tmp_path / "c2", resolution=16, strict=True, show_progress=False)


def test_small_images_are_upscaled_with_a_warning_naming_them(tmp_path, caplog):
    root = tmp_path / "data"
    _img(root / "u" / "tiny.png", size=(10, 10))
    with caplog.at_level(logging.WARNING):
        ds = prepare_folder(root, tmp_path / "c", resolution=32, show_progress=False)
    assert ds.images.shape == (1, 32, 32, 3)
    assert "tiny.png is 10x10, smaller than data.resolution=32" in caplog.text


def test_prepared_dataset_is_reused_until_files_change(tmp_path):
    root = tmp_path / "data"
    _img(root / "u" / "a.png")
    first = prepare_folder(root, tmp_path / "c", resolution=16, show_progress=False)
    again = prepare_folder(root, tmp_path / "c", resolution=16, show_progress=False)
    assert again.folder == first.folder
    _img(root / "u" / "b.png")
    changed = prepare_folder(root, tmp_path / "c", resolution=16, show_progress=False)
    assert changed.folder != first.folder and len(changed) == 2


def _tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_synthetic_generator_is_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", num_users=5, images_per_user=3, resolution=32, seed=7)
    b = synthetic.generate(tmp_path / "b", num_users=5, images_per_user=3, resolution=32, seed=7)
    c = synthetic.generate(tmp_path / "c", num_users=5, images_per_user=3, resolution=32, seed=8)
    assert _tree_digest(a) == _tree_digest(b) != _tree_digest(c)
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == synthetic.user_names(5)


@pytest.mark.parametrize("num_users,resolution", [(31, 128), (31, 32), (8, 32)])
def test_oracle_identifies_the_generators_users(num_users, resolution):
    images, labels = [], []
    for u, style in enumerate(synthetic.user_styles(num_users)):
        rng = np.random.default_rng([99, u])
        for _ in range(12):
            images.append(np.asarray(synthetic.render(style, rng, resolution)))
            labels.append(u)
    accuracy = (synthetic.oracle_predict(np.stack(images), num_users) == np.asarray(labels)).mean()
    assert accuracy >= 0.99


def test_oracle_is_not_fooled_by_noise():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(62, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(62) % 31
    assert (synthetic.oracle_predict(noise, 31) == labels).mean() < 0.2
