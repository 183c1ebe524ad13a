"""The int8 self-check: a reduced precision is used only after it has matched fp32 with the weights
actually loaded.

int8 was measured here on random weights; real CLIP activations have outlier channels that per-token
int8 may handle worse, and nobody can promise that for every checkpoint. So when ``auto`` would pick
int8 (``Runtime.candidate``), the app and CLI first score the bundled example parts (the synthetic
washers of ``examples/``, made in memory by ``winclip.synthetic``) both ways, zero-shot, and switch only
if every image score moves by at most ``MAX_SCORE_DIFF`` and every map keeps a Spearman correlation of
at least ``MIN_SPEARMAN`` with fp32's; otherwise they stay in fp32 and say why. The verdict is cached
on disk per (model, weights, torch, CPU, code) so later starts do not repeat it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .detector import WinClip
from .hardware import Runtime, cpu_info
from .prompting import PromptEnsemble, build_ensemble
from .synthetic import make_part

MAX_SCORE_DIFF = 0.01
MIN_SPEARMAN = 0.99
# bump when the int8 path's arithmetic changes: cached verdicts are then redone (2: compiled float steps,
# int8_epilogue; 3: the windows' attention fused with the quantisation, another summation order)
CHECK_VERSION = 3
EXAMPLES = ((11, "scratch"), (12, "spot"), (13, "crack"))  # the app's example queries (scripts/make_examples.py)
EXAMPLE_SIZE = 320


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    max_score_diff: float
    min_spearman: float
    images: int
    seconds: float  # fp32 and int8 passes together
    cached: bool = False

    def summary(self) -> str:
        verdict = "passed" if self.passed else "failed"
        return (f"int8 self-check {verdict} on {self.images} example images: max |score - fp32| "
                f"{self.max_score_diff:.4f} (<= {MAX_SCORE_DIFF}), min map Spearman {self.min_spearman:.4f} "
                f"(>= {MIN_SPEARMAN})" + (", cached" if self.cached else f", {self.seconds:.1f} s"))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two maps (ties broken by position; maps are continuous)."""
    ra = a.flatten().double().argsort().argsort().double()
    rb = b.flatten().double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def compare_int8(detector: WinClip, step: Callable[[Callable[[], None]], None] = lambda work: work()) -> CheckResult:
    """Score the example parts in fp32 and in int8 (zero-shot, "washer" prompts) and compare. ``step``
    runs each image's pair of passes (the app passes one that holds its inference lock, so requests
    interleave). Only this thread's passes change precision (``int8_for_this_thread``): requests served
    meanwhile by other threads keep the detector's setting."""
    images = [make_part(seed, EXAMPLE_SIZE, defect).image for seed, defect in EXAMPLES]
    backbone = detector.backbone
    prototypes = detector.prototypes_for(_washer_prompts(detector))
    diffs, rhos = [], []
    start = time.perf_counter()

    def pair(image) -> None:
        pixels = detector.preprocess(image)[None]
        with backbone.int8_for_this_thread(False):  # other threads (requests) keep what they had
            ref = detector.score(detector.encode(pixels), prototypes)
        with backbone.int8_for_this_thread(True):
            low = detector.score(detector.encode(pixels), prototypes)
        diffs.append(float((ref.image_scores - low.image_scores).abs().max()))
        rhos.append(spearman(ref.grid_maps, low.grid_maps))

    backbone.prepare_int8()  # quantising the weights and compiling take seconds: not inside ``step``
    for image in images:
        step(lambda image=image: pair(image))
    max_diff = max(diffs)
    min_rho = min(rhos)
    finite = all(x == x for x in diffs + rhos)  # NaN (a broken path) fails
    return CheckResult(finite and max_diff <= MAX_SCORE_DIFF and min_rho >= MIN_SPEARMAN, max_diff, min_rho,
                       len(images), time.perf_counter() - start)


def _washer_prompts(detector: WinClip) -> PromptEnsemble:
    return build_ensemble("washer", (), None, None, None, detector.config.max_defect_words)


def cache_dir() -> Path:
    if os.environ.get("WINCLIP_CACHE"):
        return Path(os.environ["WINCLIP_CACHE"])
    try:
        home_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    except RuntimeError:  # no home directory (some containers): the check is then redone per process
        import tempfile

        home_cache = tempfile.gettempdir()
    return Path(home_cache) / "winclip"


def cache_key(detector: WinClip) -> str:
    """Model, weights (file identity or tag), torch, CPU and check version: a verdict holds for these."""
    source = detector.source
    weights = "random" if source is None or source.pretrained is None else str(source.pretrained)
    path = Path(weights)
    if path.is_file():
        stat = path.stat()
        weights = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    info = cpu_info()
    parts = [source.model_name if source else "?", weights, torch.__version__, info.model,
             ",".join(info.isa), platform.machine(), str(CHECK_VERSION)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def cached_result(detector: WinClip) -> CheckResult | None:
    """The verdict stored for this model, weights, torch and CPU, if any."""
    return _cached(cache_key(detector))


def _cache_file() -> Path:
    return cache_dir() / "int8-check.json"


def _cached(key: str) -> CheckResult | None:
    try:
        data = json.loads(_cache_file().read_text())[key]
        return replace(CheckResult(**data), cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(key: str, result: CheckResult) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = {k: v for k, v in asdict(result).items() if k != "cached"}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes checking at once do not share a temp file
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:  # a read-only home: the check is simply redone next time
        pass


def resolve_candidate(detector: WinClip, runtime: Runtime,
                      step: Callable[[Callable[[], None]], None] = lambda work: work(),
                      use_cache: bool = True,
                      switch: Callable[[Callable[[], None]], None] | None = None) -> tuple[Runtime, CheckResult | None]:
    """If ``runtime`` has the int8 candidate: check (or recall the cached verdict), switch the detector
    to int8 when it passed (through ``switch``, default ``step``: the app waits there for batch runs in
    progress to end), and return the runtime now in use with its reason. Otherwise unchanged."""
    if runtime.candidate != "int8" or detector.backbone.device.type != "cpu":
        return runtime, None
    from .backbone import int8_unavailable

    where = runtime.reason.split(";")[0]  # "cpu (no CUDA device)" or "cpu (asked for)"
    problem = int8_unavailable(detector.backbone.visual, detector.backbone.dtype, detector.backbone.device)
    if problem:
        return Runtime("cpu", "fp32", f"{where}; fp32: int8 unavailable ({problem})"), None
    key = cache_key(detector)
    result = _cached(key) if use_cache else None
    if result is None:
        result = compare_int8(detector, step)
        if use_cache:
            _store(key, result)
    if result.passed:
        (switch or step)(lambda: detector.backbone.use_int8(True))
        return Runtime("cpu", "int8", f"{where}; int8 (linear layers of the image tower): {result.summary()}"), result
    return Runtime("cpu", "fp32", f"{where}; fp32: {result.summary()}, so int8 stays off"), result
