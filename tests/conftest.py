"""Shared fixtures: a tiny registered open_clip ViT (2 layers, 64 wide, 96 px -> 6x6 grid), seeded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from winclip import WinClip, WinClipConfig

TINY_CONFIG = str(Path(__file__).parent / "assets" / "winclip-tiny.json")


def tiny_detector(config: WinClipConfig = WinClipConfig(), seed: int = 0, **kwargs) -> WinClip:
    return WinClip.from_pretrained(TINY_CONFIG, pretrained=None, config=config, seed=seed, **kwargs)


@pytest.fixture(scope="session")
def tiny() -> WinClip:
    """Shared tiny detector; tests that change prompts or references must restore them."""
    return tiny_detector()


@pytest.fixture()
def fresh() -> WinClip:
    return tiny_detector()


@pytest.fixture()
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
