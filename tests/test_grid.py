"""Grids are for people: small images enlarged (sharp), column headers over real | generated spans."""

import numpy as np
from PIL import Image

from ldm_users.grid import HEADER_H, MIN_CELL_PX, make_grid, user_rows_grid


def _tile(value: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, np.uint8))


def test_small_images_are_enlarged_by_an_integer_factor_nearest_neighbour():
    img = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]] * 2, np.uint8))  # 2x2 checker-ish
    grid = make_grid([[img]], pad=0)
    factor = -(-MIN_CELL_PX // 2)
    assert grid.size == (2 * factor, 2 * factor)
    arr = np.asarray(grid)
    assert set(np.unique(arr)) <= {0, 255}  # nearest neighbour: no blended grey
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255


def test_user_rows_grid_has_a_row_per_user_cells_of_at_least_96px_and_a_header():
    images = [_tile(30 * u) for u in range(8) for _ in range(6)]
    grid = user_rows_grid(images, 6, [f"user_{u:02d}" for u in range(8)])
    assert grid.height >= HEADER_H + 8 * MIN_CELL_PX and grid.width >= 6 * MIN_CELL_PX
    header = np.asarray(grid)[:HEADER_H]
    assert (header < 128).any()  # the header text and rule are drawn


def test_column_headers_span_their_columns():
    rows = [[_tile(0), _tile(0), _tile(200), _tile(200)]]
    plain = make_grid(rows)
    titled = make_grid(rows, columns=[("real", 2), ("reconstruction", 2)])
    assert titled.height == plain.height + HEADER_H and titled.width == plain.width
    assert (np.asarray(titled)[:HEADER_H] < 128).any() and not (np.asarray(plain)[:1] < 128).any()
