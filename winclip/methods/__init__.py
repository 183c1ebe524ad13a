"""Scoring methods behind one interface (``base.Method``) and their registry; WinCLIP and MuSc are built in."""

from .base import FeatureList, Method, Scores, Setup, all_methods, get, names, register, unregister
from .musc import MuscMethod, musc_features, musc_precision, musc_scores
from .winclip import WinClipMethod

register(WinClipMethod())
register(MuscMethod())

__all__ = ["FeatureList", "Method", "MuscMethod", "Scores", "Setup", "WinClipMethod", "all_methods", "get",
           "musc_features", "musc_precision", "musc_scores", "names", "register", "unregister"]
