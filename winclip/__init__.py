"""WinCLIP / WinCLIP+: zero- and few-normal-shot anomaly classification and segmentation with CLIP."""

from .config import WinClipConfig
from .detector import ImageFeatures, Prediction, ReferenceMemory, WinClip, WinClipOutput
from .loading import WeightsError
from .prompting import PromptEnsemble, build_ensemble

__all__ = [
    "ImageFeatures",
    "Prediction",
    "PromptEnsemble",
    "ReferenceMemory",
    "WeightsError",
    "WinClip",
    "WinClipConfig",
    "WinClipOutput",
    "build_ensemble",
]
__version__ = "0.1.0"
