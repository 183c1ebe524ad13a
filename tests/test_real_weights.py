"""Checks that need the real ViT-B-16-plus-240 / laion400m_e31 weights; skipped without them.

    WINCLIP_WEIGHTS=weights/open_clip_pytorch_model.bin python -m pytest -m real_weights
"""

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from winclip import WinClip
from winclip.synthetic import make_part

WEIGHTS = os.environ.get("WINCLIP_WEIGHTS", "")
pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not Path(WEIGHTS).is_file(), reason="set WINCLIP_WEIGHTS to the laion400m_e31 weights file"),
]


@pytest.fixture(scope="module")
def detector():
    det = WinClip.from_pretrained(pretrained=WEIGHTS)
    det.set_prompts("metal washer")
    return det


def test_few_shot_map_peaks_on_the_defect(detector):
    detector.set_references([make_part(i, 480).image for i in range(2)])
    try:
        for seed, defect in ((21, "spot"), (22, "scratch")):
            sample = make_part(seed, 480, defect)
            pred = detector.predict(sample.image)
            region = ndimage.binary_dilation(sample.mask, iterations=24)  # 1.5 patches of slack
            peak = np.unravel_index(pred.few_shot_map.argmax(), pred.few_shot_map.shape)
            assert region[peak], f"{defect}: few-shot peak at {peak} is off the defect"
    finally:
        detector.set_references([])


def test_defective_part_scores_above_normal_parts(detector):
    detector.set_references([make_part(i, 480).image for i in range(2)])
    try:
        normal = [detector.predict(make_part(30 + i, 480).image).score for i in range(3)]
        defective = [detector.predict(make_part(40 + i, 480, "spot").image).score for i in range(3)]
        assert min(defective) > max(normal)
    finally:
        detector.set_references([])
