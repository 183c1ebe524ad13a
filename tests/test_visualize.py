"""Map drawing: the table-lookup colormap against the turbo polynomial it tabulates."""

import numpy as np
import pytest
from PIL import Image

from winclip.rows import OverlayFiles

from winclip.visualize import PANEL_SIDE, colormap, colormap_image, mask_overlay, overlay, panel_size, turbo


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


def test_panels_at_most_panel_side_in_the_image_shape():
    assert PANEL_SIDE == 512
    assert panel_size(900, 900) == (512, 512) and panel_size(600, 900) == (341, 512)
    assert panel_size(1600, 200) == (512, 64) and panel_size(300, 200) == (300, 200)  # never enlarged
    assert panel_size(5000, 4) == (512, 1)  # a side never rounds to 0


def test_component_panels_drawn_at_the_maps_size():
    from winclip.detector import Prediction
    from winclip.visualize import component_panels

    image = Image.new("RGB", (90, 60), (200, 30, 30))
    heat = np.zeros((30, 45))
    heat[:, 20:] = 1.0
    pred = Prediction(score=0.5, anomaly_map=heat, zero_shot_score=0.5, zero_shot_map=heat, few_shot_map=None,
                      components={"zero_shot/window_2": heat}, grid_map=heat[:3, :3], shots=0)
    panels = component_panels(image, pred)
    assert [c for _, c in panels] == ["zero-shot map (WinCLIP)", "zero-shot · 2x2 windows"]
    assert {im.size for im, _ in panels} == {(45, 30)}
    assert np.array_equal(np.asarray(panels[0][0]), np.asarray(overlay(image.resize((45, 30)), heat)))


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
