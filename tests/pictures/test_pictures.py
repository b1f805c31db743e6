"""Pictures: colour maps by sign, shared scales with a colorbar, colour photos, file formats,
and images wider than 8 bits read at their full range."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from libragrad_fx import LibraError
from libragrad_fx.commands.cli import main
from libragrad_fx.loading.inputs import Preprocessing, open_image, prepare
from libragrad_fx.pictures import Panel, figure_size, overlay, save_grid
from libragrad_fx.pictures.grid import group_scale, shared_scales

GREY = np.full((4, 4), 0.5)


def ramp(sign: float = 1.0) -> np.ndarray:
    return sign * np.linspace(0.0, 1.0, 16).reshape(4, 4)


def test_a_non_negative_map_is_drawn_on_the_sequential_colormap_at_its_peak():
    drawn = overlay(np.ones((4, 4)), ramp())
    # full opacity at the peak: exactly the colormap's top colour
    assert np.allclose(drawn[-1, -1], colormaps["inferno"](1.0)[:3])
    assert np.allclose(drawn[0, 0], 0.7)  # zero: the dimmed image, no colour


def test_a_signed_map_is_red_for_positive_and_blue_for_negative():
    heat = ramp() - 0.5
    drawn = overlay(np.ones((4, 4)), heat)
    red, blue = drawn[-1, -1], drawn[0, 0]
    assert red[0] > red[2] and blue[2] > blue[0]


def test_a_shared_peak_draws_the_weaker_map_fainter():
    own = overlay(GREY, ramp())
    shared = overlay(GREY, ramp(), peak=10.0)
    base = overlay(GREY, None)
    assert np.abs(shared - 0.7 * base).sum() < np.abs(own - 0.7 * base).sum()


def test_colour_photos_stay_in_colour():
    photo = np.zeros((4, 4, 3))
    photo[..., 0] = 1.0
    assert np.array_equal(overlay(photo, None), photo)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        overlay(np.zeros((4, 4, 2)), None)


def _grid(heat_scale: float = 10.0) -> list[list[Panel]]:
    return [[Panel(GREY, None, "image"), Panel(GREY, ramp(), "vanilla"),
             Panel(GREY, heat_scale * ramp(), "Libra")]]


@pytest.mark.parametrize("scale", ["panel", "row", "grid"])
def test_grid_size_follows_rows_columns_and_the_colorbar(tmp_path, scale):
    path = save_grid(_grid() * 2, tmp_path / "g.png", scale=scale)
    with Image.open(path) as image:
        assert image.size == figure_size(2, 3, scale=scale)
    assert (figure_size(2, 3, scale=scale)[0] > figure_size(2, 3)[0]) == (scale != "panel")


def test_a_row_scale_is_the_largest_magnitude_of_its_row_and_a_grid_scale_of_all():
    rows = [_grid(10.0)[0], _grid(-3.0)[0]]
    assert shared_scales(rows, "panel") == []
    assert [group_scale(rows, g) for g in shared_scales(rows, "row")] == [(10.0, False),
                                                                           (3.0, True)]
    assert [group_scale(rows, g) for g in shared_scales(rows, "grid")] == [(10.0, True)]


@pytest.mark.parametrize("suffix, magic", [(".jpg", b"\xff\xd8"), (".jpeg", b"\xff\xd8"),
                                           (".pdf", b"%PDF"), (".svg", b"<?xml"),
                                           (".png", b"\x89PNG")])
def test_the_format_follows_the_file_name(tmp_path, suffix, magic):
    path = save_grid(_grid(), tmp_path / f"maps{suffix}")
    assert path.read_bytes().startswith(magic)


def test_an_unknown_format_is_refused_before_the_work(tmp_path, capsys):
    with pytest.raises(LibraError, match=r"\.gif is not one of \.png"):
        save_grid(_grid(), tmp_path / "maps.gif")
    assert main(["demo", "-o", str(tmp_path / "demo.gif")]) == 2
    assert ".gif is not one of" in capsys.readouterr().err


def test_a_16_bit_grey_png_keeps_its_grey_levels(tmp_path):
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "wide.png")
    image = open_image(tmp_path / "wide.png")
    assert image.mode.startswith("I")
    for grey in (True, False):
        picture = prepare(image, "wide.png", Preprocessing(size=(32, 32), grey=grey), "m")
        values = picture.x[0, 0].numpy()
        # spread over [0, 1] as the file is, not clipped to near binary at 255 of 65535
        assert 0.4 < float(np.median(values)) < 0.6
        assert (values > 0.99).mean() < 0.05
        assert picture.image.shape == ((32, 32) if grey else (32, 32, 3))


def test_a_colour_image_is_kept_in_colour_for_drawing(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    Image.fromarray(rgb).save(tmp_path / "green.png")
    picture = prepare(open_image(tmp_path / "green.png"), "green.png", Preprocessing(), "m")
    assert picture.image.shape == (8, 8, 3)
    assert picture.image[..., 1].min() == 1.0 and picture.image[..., 0].max() == 0.0
