"""The precision self-check: a reduced precision (int8, bf16, fp16) is used by ``auto`` only after it
has matched fp32 with the weights actually loaded, on this machine.

int8 was measured here on random weights; real CLIP activations have outlier channels that per-token
int8 may handle worse, and bf16 keeps 8 bits of mantissa: nobody can promise either for every
checkpoint. So when ``auto`` names a candidate (``Runtime.candidate``), the app and CLI first score the
bundled example parts (the synthetic washers of ``examples/``, made in memory by ``winclip.synthetic``)
both ways, zero-shot, and switch only if every image score moves by at most ``MAX_SCORE_DIFF`` and every
map keeps a Spearman correlation of at least ``MIN_SPEARMAN`` with fp32's, and, on the CPU, only if its
fastest pass took at most ``MAX_TIME_RATIO`` of fp32's fastest (the passes are timed as they run);
otherwise they stay in fp32 and say why. The speed condition is there because native bf16 is not always
fast: on an Intel Xeon whose AMX the hypervisor hides (AVX512-BF16, AVX512-FP16), oneDNN's bf16 linear
ran at half fp32's rate and a bf16 query took 1.66x as long as an fp32 one, where a Zen 4 CPU, also with
AVX512-BF16 and no AMX, runs bf16 1.9x faster than fp32 (docs/performance.md). On a GPU the passes are timed and
reported, not gated. Verdicts are cached on disk per (model, weights, torch, CPU or GPU, candidate,
code) so later starts do not repeat them.

MuSc keeps fp32 under ``auto`` (``methods.musc_precision``): its scores are relative to the set (min-max
normalised, then averaged over each image's nearest neighbours), so they are not continuous in the
features and no check on a fixed set bounds their error on another. Measured on the tiny test model:
bf16 moved MuSc's scores by 0.0012-0.0022 on the example sets of ``compare_musc`` and by 0.0155 on
another 8-part set. MuSc's pass is the full image only (no windows), so fp32 costs it little.
``compare_musc`` measures the difference (benchmarks/gpu_check.py reports it per precision).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .detector import WinClip
from .hardware import Runtime, cpu_info
from .prompting import PromptEnsemble, build_ensemble
from .synthetic import EXAMPLE_QUERIES, EXAMPLE_SIZE, make_part

MAX_SCORE_DIFF = 0.01
MIN_SPEARMAN = 0.99
# bump when the int8 path's arithmetic changes: cached verdicts are then redone (2: compiled float steps,
# int8_epilogue; 3: the windows' attention fused with the quantisation, another summation order; 4: the
# speed condition, so verdicts stored without timings are redone)
CHECK_VERSION = 4
# on the CPU a candidate's fastest pass must take at most this fraction of fp32's fastest (at least 10% faster)
MAX_TIME_RATIO = 0.9
# MuSc's check: 8 normal example parts. MuSc min-max normalises raw scores within the set, so feature noise
# is divided by the set's spread, smallest when nothing is defective: the hardest set for a reduced precision
MUSC_SET = tuple((seed, "none") for seed in range(21, 29))


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    max_score_diff: float
    min_spearman: float
    images: int
    seconds: float  # fp32 and candidate passes together
    cached: bool = False
    precision: str = "int8"  # the candidate checked
    method: str = "winclip"  # "winclip" (zero-shot scores of each part) or "musc" (scores of a set)
    fp32_seconds: float = 0.0  # the fastest fp32 pass (encode + score of one image); 0.0: not timed
    candidate_seconds: float = 0.0  # the fastest pass in the candidate precision
    speed_gated: bool = False  # passing also needed candidate_seconds <= MAX_TIME_RATIO * fp32_seconds (CPU)

    @property
    def fast_enough(self) -> bool:
        return not self.speed_gated or self.candidate_seconds <= MAX_TIME_RATIO * self.fp32_seconds

    def summary(self) -> str:
        verdict = "passed" if self.passed else "failed"
        what = f"{self.precision} self-check" + (" for MuSc" if self.method == "musc" else "")
        speed = ""
        if self.fp32_seconds > 0:
            speed = (f", {_duration(self.candidate_seconds)} per image against fp32's {_duration(self.fp32_seconds)}"
                     + (f" (<= {MAX_TIME_RATIO}x)" if self.speed_gated else ""))
            if not self.fast_enough:
                speed += ": not faster than fp32 on this machine"
        return (f"{what} {verdict} on {self.images} example images ("
                + ("cached" if self.cached else f"{self.seconds:.1f} s") + f"): max |score - fp32| "
                f"{self.max_score_diff:.4f} (<= {MAX_SCORE_DIFF}), min map Spearman {self.min_spearman:.4f} "
                f"(>= {MIN_SPEARMAN}){speed}")


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two maps (ties broken by position; maps are continuous)."""
    ra = a.flatten().double().argsort().argsort().double()
    rb = b.flatten().double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def compare(detector: WinClip, precision: str = "int8",
            step: Callable[[Callable[[], None]], None] = lambda work: work()) -> CheckResult:
    """Score the example parts in fp32 and in ``precision`` (zero-shot, "washer" prompts) and compare.
    ``step`` runs each image's pair of passes (the app passes one that holds its inference lock, so
    requests interleave). Only this thread's passes change precision (``precision_for_this_thread``):
    requests served meanwhile by other threads keep the detector's setting. Each pass is timed; the fastest
    of each precision is compared (the first passes carry one-time costs), and on the CPU the candidate
    must be faster (``MAX_TIME_RATIO``)."""
    images = [make_part(seed, EXAMPLE_SIZE, defect).image for seed, defect in EXAMPLE_QUERIES]
    backbone = detector.backbone
    prototypes = detector.prototypes_for(_washer_prompts(detector))
    diffs, rhos, times = [], [], {"fp32": [], precision: []}
    start = time.perf_counter()

    def timed(p: str, pixels: torch.Tensor):
        with backbone.precision_for_this_thread(p):  # other threads (requests) keep what they had
            began = time.perf_counter()
            result = detector.score(detector.encode(pixels), prototypes)
            if backbone.device.type == "cuda":
                torch.cuda.synchronize(backbone.device)  # the pass has finished, not only been queued
            times[p].append(time.perf_counter() - began)
        return result

    def pair(image) -> None:
        pixels = detector.preprocess(image)[None]
        ref, low = timed("fp32", pixels), timed(precision, pixels)
        diffs.append(float((ref.image_scores - low.image_scores).abs().max()))
        rhos.append(spearman(ref.grid_maps, low.grid_maps))

    backbone.prepare(precision)  # quantising, compiling or casting take seconds: not inside ``step``
    for image in images:
        step(lambda image=image: pair(image))
    result = _verdict(diffs, rhos, len(images), time.perf_counter() - start, precision, "winclip")
    result = replace(result, fp32_seconds=min(times["fp32"]), candidate_seconds=min(times[precision]),
                     speed_gated=backbone.device.type == "cpu" and precision != "fp32")
    return replace(result, passed=result.passed and result.fast_enough)


def compare_musc(detector: WinClip, precision: str,
                 step: Callable[[Callable[[], None]], None] = lambda work: work()) -> CheckResult:
    """MuSc on the example set (``MUSC_SET``) in fp32 and in ``precision``: its final image scores and
    its maps compared as in ``compare``. The set is encoded once per precision, inside one ``step``
    each, on the path inspection's MuSc takes (the packed path, where int8 runs), without windows
    (MuSc uses none)."""
    from .methods import musc_features
    from .musc import MuscConfig, quarter_layers, score_batch

    images = [make_part(seed, EXAMPLE_SIZE, defect).image for seed, defect in MUSC_SET]
    pixels = torch.stack([detector.preprocess(image) for image in images])  # (N, 3, H, W)
    config = MuscConfig(layers=quarter_layers(detector.backbone.n_blocks))
    backbone = detector.backbone
    outputs = {}
    start = time.perf_counter()

    def run(p: str) -> None:
        tokens, embeddings = musc_features(detector, pixels, config.layers, p)
        outputs[p] = score_batch({k: v.cpu() for k, v in tokens.items()}, embeddings.float().cpu(), detector.grid,
                                 detector.image_size, config)

    backbone.prepare(precision)
    step(lambda: run("fp32"))
    step(lambda: run(precision))
    ref, low = outputs["fp32"], outputs[precision]
    diffs = [float((ref.scores - low.scores).abs().max())]
    rhos = [spearman(a, b) for a, b in zip(ref.maps, low.maps)]
    return _verdict(diffs, rhos, len(images), time.perf_counter() - start, precision, "musc")


def _verdict(diffs: list[float], rhos: list[float], images: int, seconds: float, precision: str,
             method: str) -> CheckResult:
    max_diff, min_rho = max(diffs), min(rhos)
    finite = all(x == x for x in diffs + rhos)  # NaN (a broken path) fails
    return CheckResult(finite and max_diff <= MAX_SCORE_DIFF and min_rho >= MIN_SPEARMAN, max_diff, min_rho,
                       images, seconds, precision=precision, method=method)


def _washer_prompts(detector: WinClip) -> PromptEnsemble:
    return build_ensemble("washer", (), None, None, None, detector.config.max_defect_words)


def cache_dir() -> Path:
    from .settings import env

    if env("WINCLIP_CACHE"):
        return Path(env("WINCLIP_CACHE"))
    try:
        home_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    except RuntimeError:  # no home directory (some containers): the check is then redone per process
        import tempfile

        home_cache = tempfile.gettempdir()
    return Path(home_cache) / "winclip"


def cache_key(detector: WinClip, precision: str = "int8") -> str:
    """Model, weights (file identity or tag), torch, CPU or GPU, candidate and check version: a verdict
    holds for these."""
    source = detector.source
    weights = "random" if source is None or source.pretrained is None else str(source.pretrained)
    path = Path(weights)
    if path.is_file():
        stat = path.stat()
        weights = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    info = cpu_info()
    parts = [source.model_name if source else "?", weights, torch.__version__, info.model,
             ",".join(info.isa), platform.machine(), str(CHECK_VERSION)]
    if precision != "int8":  # keys of int8's verdicts stay as they were
        parts += [precision, _device_name(detector)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _device_name(detector: WinClip) -> str:
    """'cpu', or 'cuda sm90' (the GPU's architecture: a ZeroGPU Space's main process and its GPU workers
    name the same GPU differently, a MIG slice or not, but agree on its compute capability)."""
    device = detector.backbone.device
    if device.type != "cuda":
        return device.type
    try:
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda sm{major}{minor}"
    except (RuntimeError, AssertionError):  # pragma: no cover - a CUDA device that cannot be queried
        return "cuda"


def cached_result(detector: WinClip, precision: str | None = None) -> CheckResult | None:
    """The verdict stored for this model, weights, torch, machine and candidate, if any."""
    if precision is None:
        runtime = detector.source.runtime if detector.source else None
        result = _cached(cache_key(detector, (runtime.candidate if runtime else "") or "int8"))
        if runtime is not None and runtime.fallback and result is not None and not result.passed:
            return _cached(cache_key(detector, runtime.fallback))  # the candidate failed: the fallback's verdict
        return result
    return _cached(cache_key(detector, precision))


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
                      use_cache: bool = True) -> tuple[Runtime, CheckResult | None]:
    """If ``runtime`` names a candidate (int8, bf16, fp16): check it (or recall the cached verdict), and its
    fallback if it stays off; switch the detector to the first that passed (through ``step``; a batch run in
    progress keeps the precision it started in, see ``DetectionService.batch``), and return the runtime now
    in use with its reason, which says why each checked candidate stayed off (MuSc keeps fp32, see above).
    Otherwise unchanged."""
    if not runtime.candidate:
        return runtime, None
    backbone = detector.backbone
    where = runtime.reason.split(";")[0]  # "cpu (no CUDA device)", "cuda (asked for)", ...
    off: list[str] = []  # why each candidate checked so far stays off, in the order they were checked
    result: CheckResult | None = None
    for candidate in filter(None, (runtime.candidate, runtime.fallback)):
        result = None
        if candidate == "int8":
            from .kernels import int8_unavailable

            problem = ("int8 is a CPU path" if backbone.device.type != "cpu" else
                       int8_unavailable(backbone.visual, backbone.dtype, backbone.device))
            if problem:
                off.append(f"int8 unavailable ({problem})")
                continue
        key = cache_key(detector, candidate)
        result = _cached(key) if use_cache else None
        if result is None:
            result = compare(detector, candidate, step)
            if use_cache:
                _store(key, result)
        if not result.passed:
            off.append(f"{result.summary()}, so {candidate} stays off")
            continue
        step(partial(backbone.use_precision, candidate))
        what = "linear layers of the image tower" if candidate == "int8" else "image tower"
        reason = "; ".join([f"{where}; {candidate} ({what}): {result.summary()}",
                            "MuSc fp32 (its scores are relative to the set)", *off])
        return Runtime(runtime.device, candidate, reason, candidate), result
    return Runtime(runtime.device, "fp32", f"{where}; fp32: " + "; ".join(off), candidate), result
