"""Map drawing: the table-lookup colormap against the turbo polynomial it tabulates."""

import numpy as np

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
