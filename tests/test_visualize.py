"""Map drawing: the table-lookup colormap against the turbo polynomial it tabulates."""

import numpy as np
import pytest
from PIL import Image

from winclip.rows import OverlayFiles

from winclip.visualize import colormap, colormap_image, mask_overlay, overlay, turbo


def test_colormap_table_matches_the_polynomial():
    values = np.random.default_rng(0).random((300, 400))
    values[0, :3] = (0.0, 1.0, 0.5)
    got, exact = colormap(values).astype(int), turbo(values).astype(int)
    assert got.shape == (300, 400, 3) and got.dtype == int
    assert np.abs(got - exact).max() <= 1  # at most one level of 255 in any channel
    assert (got[0, 0] == exact[0, 0]).all() and (got[0, 1] == exact[0, 1]).all()  # the ends exactly
    assert (colormap(np.array([[-3.0, 7.0]])) == turbo(np.array([[0.0, 1.0]]))).all()  # clipped to [0, 1]
    assert (np.asarray(colormap_image(values)) == colormap(values)).all()


def test_overlay_and_mask_keep_the_image_size():
    from PIL import Image

    image = Image.new("RGB", (40, 30), (90, 90, 90))
    heat = np.zeros((30, 40))
    heat[10:20, 10:20] = 0.9
    assert overlay(image, heat).size == (40, 30)
    masked = np.asarray(mask_overlay(image, heat, 0.5))
    assert masked[15, 15, 0] > masked[15, 15, 1] and (masked[2, 2] == 90).all()


def test_overlay_files_jpeg_by_default_png_lossless(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((400, 300))
    jpeg = OverlayFiles(tmp_path / "j").write(image, "set.zip/good/001.png")
    png = OverlayFiles(tmp_path / "p", "png").write(image, "set.zip/good/001.png")
    assert (jpeg.name, png.name) == ("set.zip__good__001.jpg", "set.zip__good__001.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), np.asarray(image))
    with Image.open(jpeg) as im:
        assert im.format == "JPEG" and im.size == image.size
        assert np.abs(np.asarray(im, dtype=float) - np.asarray(image, dtype=float)).mean() < 6
    with pytest.raises(ValueError, match="overlay format must be one of jpeg, png, got 'tiff'"):
        OverlayFiles(tmp_path, "tiff")
