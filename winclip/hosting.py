"""The model a server holds: loaded once, its status in words, and ``auto``'s precision check.

``DetectionService`` (winclip.service) is a ``ModelHost`` with request handlers on top.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterator

from .config import WinClipConfig
from .detector import WinClip
from .loading import WeightsError
from .settings import Settings, env

log = logging.getLogger(__name__)


_DONE = object()
# Background work (the examples' preparation, auto's check in the background) takes the model only after this
# many seconds in which no click held it or waited for it: a step of it takes up to ~4 s (fp32, 2 cores), and
# a person clicking again within this long does not wait for one. Before, a script calling back to back on a
# fresh server waited for one per call (2-core Xeon, docs/click-latency.md: an int8 repeat 1.99 s, 0.49 s of
# it waiting; fp32 3.94 s, 2.50 s waiting; after: 0.87 and 0.81 s).
QUIET_S = 5.0


class Stopped(Exception):
    """Background work ends here: the server is stopping (``ModelHost.stop_background``)."""


class ModelHost:
    """The model, loaded once (in the background, so a first download shows in the UI), its status in words,
    and auto's precision check (in a thread after the load, or inside the first GPU call on ZeroGPU)."""

    def __init__(self, settings: Settings | None = None, base_config: WinClipConfig = WinClipConfig(),
                 check_in_background: bool = True) -> None:
        self.settings = settings or Settings.from_env()
        # auto's precision check: in a thread after the load, or (False: ZeroGPU, where only GPU calls see
        # a GPU) on the first request through ``settle_precision``
        self.check_in_background = check_in_background
        self._settled = False
        self._verdict_seen = None  # check_pending: the cached verdict, once one exists
        self.base_config = base_config
        self.detector: WinClip | None = None
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.loading = False
        self.load_wait = float(env("WINCLIP_LOAD_WAIT"))
        self._load_done = threading.Event()  # set when a load has finished, loaded or failed
        self._lock = threading.RLock()  # the model's caches are not thread-safe: model work holds it
        self._clicks_waiting = 0  # interactive requests waiting for the model: a batch run lets them in first
        self._last_click = float("-inf")  # time.monotonic() when a click last let go of the model
        self._warming = False  # an upload's warm-up holds the model: a click waiting for it says so
        self._stopping = threading.Event()  # the server is stopping: background work takes no further step
        self.quiet_s = QUIET_S
        self._count_lock = threading.Lock()
        self.checking = False  # auto's precision check is running (in the background, after the load)
        self.int8_check: threading.Thread | None = None  # that check's thread
        self._loader: threading.Thread | None = None  # ``start_loading``'s thread
        self.preparing = ""  # what ``prepare_in_background`` is preparing, while it is under way
        self.prepared = ""  # what it prepared, in words (the status line's end)

    @contextlib.contextmanager
    def model_for_a_click(self, warm_up: bool = False):
        """Hold the model for an interactive request (a click, a warm-up, a re-score): a batch run waiting
        between two of its batches lets it in first (``between_clicks``). ``warm_up``: an upload's warm-up,
        which a click waiting meanwhile names as such (``_warming``)."""
        with self._count_lock:
            self._clicks_waiting += 1
        waiting = True
        try:
            with self._lock:
                with self._count_lock:
                    self._clicks_waiting -= 1
                waiting = False
                self._warming = warm_up
                try:
                    yield
                finally:
                    self._warming = False
                    self._last_click = time.monotonic()  # before the lock is let go: ``_turn`` sees it
        finally:
            if waiting:
                with self._count_lock:
                    self._clicks_waiting -= 1

    @contextlib.contextmanager
    def _turn(self, quiet: float = 0.0):
        """Hold the model for work nobody is waiting on, once no click waits for it and none has held it for
        ``quiet`` seconds (checked again once the lock is held: a click may have taken it meanwhile)."""
        def free() -> bool:
            return not self._clicks_waiting and time.monotonic() - self._last_click >= quiet

        while True:
            while not free() and not self._stopping.is_set():
                time.sleep(0.01)
            self._lock.acquire()
            if self._stopping.is_set():
                self._lock.release()
                raise Stopped
            if free():
                break
            self._lock.release()
        try:
            yield
        finally:
            self._lock.release()

    def between_clicks(self, steps: Iterator[Any], quiet: float = 0.0) -> Iterator[Any]:
        """``steps`` (a batch run's rows) advanced one at a time holding the model, each once no interactive
        request waits for it (``model_for_a_click``): a click during a long batch waits for one batch of
        it, not for the run. ``quiet``: each step also waits until no click has held the model for that
        long (background work: see ``QUIET_S``)."""
        try:
            while True:
                try:
                    with self._turn(quiet):
                        item = next(steps, _DONE)
                except Stopped:
                    return
                if item is _DONE:
                    return
                yield item
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()

    def stop_background(self, timeout: float = 60.0, grace: float = 1.0) -> bool:
        """What a stopping server does first: background work (the examples' preparation, a batch between
        its batches, auto's check) takes no further step, and the step under way finishes. True once no
        background thread runs model code: False when a step is still running after ``timeout``, or, ``grace``
        s on, the model is still loading or auto's check still does what it does without the model's lock
        (quantising and compiling, up to ~45 s from scratch). Model code still running while the interpreter
        shut down ended the process with "terminate called without an active exception" (SIGABRT): on False
        the caller leaves without a shutdown (``app.main``)."""
        self._stopping.set()
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        for thread in (self._loader, self.int8_check):
            if thread is not None and thread is not threading.current_thread():
                thread.join(grace)  # auto's check, between two steps, sees the stop at once
                if thread.is_alive():
                    return False
        return True

    def prepare_in_background(self, steps: Callable[[], Iterator[Any]], what: str) -> threading.Thread | None:
        """Model work done ahead of any request (e.g. the examples' features), in a thread: it waits for the
        load, then runs ``steps()`` one item at a time, every click let in first and each step only after
        ``quiet_s`` without a click (``between_clicks``), in the precision requests get meanwhile; auto's check
        waits for it. The status line says when ``what`` is prepared, or why not. Once per host: None when it
        is under way or done."""
        if self.preparing or self.prepared:
            return None
        self.preparing = what

        def run() -> None:
            try:
                while self.loading:  # auto's check, if any, waits for this preparation (``_check_candidate``)
                    time.sleep(0.2)
                if self.detector is None:
                    return  # nothing loaded: the status says why
                start = time.perf_counter()
                for _ in self.between_clicks(steps(), self.quiet_s):
                    pass
                self.prepared = (f"{what} not prepared: the server stopped" if self._stopping.is_set() else
                                 f"{what} prepared in {time.perf_counter() - start:.1f} s")
            except Exception as exc:  # never takes the server down: requests do the work themselves
                log.exception("preparing %s failed", what)
                self.prepared = f"{what} not prepared ({type(exc).__name__}: {exc})"
            finally:
                self.preparing = ""

        thread = threading.Thread(target=run, name="winclip-prepare", daemon=True)
        thread.start()
        return thread

    @property
    def random_weights(self) -> bool:
        return self.settings.pretrained is None

    def start_loading(self) -> threading.Thread:
        """Load in the background so the UI is up (and says what is happening) during a first download."""
        self.loading = True
        self._load_done.clear()
        thread = self._loader = threading.Thread(target=self.load, name="winclip-load", daemon=True)
        thread.start()
        return thread

    def load(self) -> bool:
        """Load the model once; on failure keep serving and report ``error``."""
        if self.detector is not None:
            return True
        self.loading = True
        start = time.perf_counter()
        try:
            self.detector = WinClip.from_pretrained(
                self.settings.model, self.settings.pretrained, self.settings.device, self.base_config,
                self.settings.precision, strict=True,  # type: ignore[arg-type]  # strict: refuses emulated CPU bf16
            )
            runtime = self.detector.source.runtime
            # set before the load is seen to end: the page's status poll sees no gap between the two
            self.checking = bool(runtime.candidate and self.check_in_background)
        except (WeightsError, ValueError, RuntimeError, OSError) as exc:
            self.error = str(exc)
            log.error("model not loaded: %s", exc)
            return False
        finally:
            self.loading = False
            self._load_done.set()
        self.error = None
        self.load_seconds = time.perf_counter() - start
        if self.checking:
            self.int8_check = threading.Thread(target=self._check_candidate, args=(runtime,),
                                               name="winclip-precision-check", daemon=True)
            self.int8_check.start()
        return True

    def _check_candidate(self, runtime) -> None:
        """The model already answers in fp32; compare auto's candidate (int8, bf16 or fp16) with it on the
        example parts, one image at a time under the inference lock (requests interleave), and switch only
        if it matches (MuSc keeps fp32 under auto; a batch run keeps the precision it started in). After a
        preparation asked for before the load ended: the first clicks after a start (the examples) find it
        done, not slowed by the check's quantising and compiling, which take the CPU beside them."""
        from .precision_check import resolve_candidate

        detector = self.detector
        while self.preparing and not self._stopping.is_set():
            time.sleep(0.05)
        try:
            if self._stopping.is_set():  # not even begun: its quantising and compiling would outlive the server
                return

            def step(work: Callable[[], None]) -> None:
                # in the background each image's pair of passes waits for a quiet moment, as the preparation's
                # steps do; on ZeroGPU the check runs inside a request (``settle_precision``): at once
                with self._turn(self.quiet_s) if self.check_in_background else self._lock:
                    work()

            new_runtime, check = resolve_candidate(detector, runtime, step)
            with self._lock:
                detector.source = replace(detector.source, runtime=new_runtime)
            log.info("%s", new_runtime.reason)
        except Stopped:  # the server is stopping: no verdict, nothing to say
            pass
        except Exception as exc:  # the check must never take the server down: stay in fp32
            with self._lock:
                detector.backbone.use_precision("fp32")
                detector.source = replace(detector.source, runtime=replace(
                    runtime, candidate="", reason=f"{runtime.reason.split(';')[0]}; fp32: the "
                    f"{runtime.candidate} check failed to run ({type(exc).__name__}: {exc})"))
            log.exception("precision check failed to run")
        finally:
            self.checking = False

    def check_pending(self) -> bool:
        """auto's precision check has yet to run on this machine (no cached verdict)."""
        from .precision_check import cached_result

        detector = self.detector
        if detector is None or detector.source is None or self._settled or not detector.source.runtime.candidate:
            return False
        if self._verdict_seen is None:  # read from disk until a verdict is there, then never again
            self._verdict_seen = cached_result(detector)
        return self._verdict_seen is None

    def settle_precision(self) -> None:
        """Run auto's precision check now, once per process (ZeroGPU: inside the first GPU call of each
        worker, the verdict coming from the disk cache after the first). Never raises: fp32 stays."""
        detector = self.detector
        if self.check_in_background or self._settled or detector is None or detector.source is None:
            return
        runtime = detector.source.runtime
        if runtime.candidate:
            self._check_candidate(runtime)
        self._settled = True

    def status(self) -> str:
        s = self.settings
        if self.detector is None:
            if self.loading:
                return f"Loading {s.model} / {s.pretrained} (the first run downloads the weights)…"
            return f"Model not loaded: {self.error or 'call load()'}"
        dtype = str(self.detector.backbone.dtype).removeprefix("torch.")
        runtime = self.detector.source.runtime if self.detector.source else None
        device = runtime.device if runtime else s.device
        precision = runtime.precision if runtime else dtype
        candidate = runtime.candidate if runtime else ""
        then = f" (then {runtime.fallback} if it fails)" if runtime and runtime.fallback else ""
        after = f" after preparing {self.preparing}" if self.preparing else ""
        checking = (f" · checking {candidate}{then} against fp32 in the background{after} (answers stay fp32 until "
                    "one passes)" if self.checking and candidate else "")
        if not self.check_in_background and candidate and runtime.precision == "fp32":  # ZeroGPU: GPU calls check
            from .precision_check import cached_result

            verdict = cached_result(self.detector)
            checking = (f" · GPU calls use {candidate if verdict.passed else 'fp32'}: {verdict.summary()}" if verdict
                        else f" · the first GPU call checks {candidate} against fp32")
        return (f"{s.model} · weights {s.pretrained or 'RANDOM (tests only)'} · {device} · {precision}"
                + (f" ({runtime.reason})" if runtime else "") + checking + " · "
                f"input {self.detector.image_size[0]}px · grid {self.detector.grid[0]}x{self.detector.grid[1]}"
                + (f" · loaded in {self.load_seconds:.1f} s" if self.load_seconds else "")
                + f" · kernels: {self.detector.backbone.kernel_path()}"
                + (f" · {self.prepared}" if self.prepared else ""))

    def wait_for_model(self, timeout: float | None = None) -> bool:
        """Block while a load is under way (at most ``timeout`` s, default ``load_wait``); True when loaded.
        A request waiting here counts as a click for background work (``_turn``): the examples' preparation,
        which starts when the load ends, lets it in first."""
        if self.detector is None and self.loading:
            with self._count_lock:
                self._clicks_waiting += 1
            try:
                self._load_done.wait(self.load_wait if timeout is None else timeout)
            finally:
                self._last_click = time.monotonic()
                with self._count_lock:
                    self._clicks_waiting -= 1
        return self.detector is not None

    def require(self) -> WinClip:
        """The loaded model; waits for a load under way; ValueError saying why there is none."""
        if self.detector is None:
            self.wait_for_model()  # a request during the load waits for it instead of failing
        if self.detector is None:
            if self.loading:
                raise ValueError(f"The model is still loading after {self.load_wait:.0f} s (the first run downloads "
                                 "the weights); try again shortly.")
            raise ValueError(f"The model is not loaded, so nothing can be scored. {self.error or ''}".strip())
        return self.detector
