"""The demo's plate picture explains itself: a legend under the plate says what the labels and colours
mean, wrapped to the picture's width, so a one-well picture is as readable as a whole plate."""
from __future__ import annotations

from PIL import Image, ImageDraw

from cpb.demo.montage import LEGEND, TILE, _legend_lines, make_montage


def test_the_legend_wraps_to_the_width_and_keeps_every_word():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _legend_lines(draw, 2 * TILE - 8, raw=True)
    assert len(lines) > len(LEGEND)  # too wide for two tiles: wrapped
    assert all(draw.textlength(line) <= 2 * TILE - 8 for line in lines)
    assert " ".join(" ".join(lines).split()) == " ".join(" ".join(LEGEND).split())


def test_the_picture_grows_by_its_legend_and_marks_a_wrong_count(tmp_path):
    truth = {("A01", 1): 13, ("A01", 2): 14}
    path = make_montage(tmp_path / "none", truth, tmp_path / "plate.png", counted={("A01", 1): 13, ("A01", 2): 12})
    with Image.open(path) as picture:
        width, height = picture.size
        assert height > 16 + TILE + 2 * 14  # label row + one tile row + at least two legend lines
        rgb = picture.convert("RGB")
        label_colours = {rgb.getpixel((x, y)) for x in range(TILE, 2 * TILE) for y in range(2, 14)}
    assert any(r > 200 and 100 < g < 200 and b < 80 for r, g, b in label_colours)  # 12/14 in orange
