"""Batch inspection on Ray Data: the same rows, files and metrics as ``inspection.iter_inspection``, scored by a
pool of actors on one machine or a cluster.

The driver lists the inputs (files, folders, zips: zips are extracted by the driver, so on a multi-machine
cluster ``workdir`` and every input path must be on storage all nodes see), prepares what the method scores
with once (prompt prototypes, the reference memory) and the threshold, and ships them to the actors. Each
actor loads the detector once and scores batches of items with ``inspection.inspect_stream``, the
single-process loop. Rows stream back in input order (``preserve_order``) into ``iter_inspection``, which writes
``results.csv`` row by row and then ``summary.json`` and ``report.html`` from all rows, so the labelled metrics
cover the whole set. Ray Data restarts a killed actor and retries its batches; each file keeps one row.

Whole-set methods (MuSc) are refused: their scoring compares every image with every other, so it cannot be
split into independent batches; run them with the single-process engine.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import methods
from .config import WinClipConfig
from .detector import ReferenceMemory, WinClip
from .inputs import Inputs, Item
from .inspection import Summary, finish_run, iter_inspection, resolve_threshold
from .methods import Method, Setup
from .rows import DEFAULT_OVERLAY_FORMAT, OverlayFiles, Row


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local Ray instance started for the run (or the one already running)
    workers: int = 1  # actors, each with its own detector
    gpus_per_worker: float = 0.0  # > 0: the actors run on CUDA
    cpus_per_worker: float | None = None  # Ray CPUs reserved per actor (default 1; its torch threads follow)
    batch_size: int = 8  # images per actor call


@dataclass
class RayStats:
    """Who scored what: rows per (node id, worker process id), filled while the rows arrive."""

    rows: Counter = field(default_factory=Counter)

    @property
    def nodes(self) -> Counter:
        out: Counter = Counter()
        for (node, _), n in self.rows.items():
            out[node] += n
        return out


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to load the driver's model: the same weights, device and precision."""

    model: str
    pretrained: str | None
    device: str
    precision: str
    config: WinClipConfig
    seed: int = 0

    @classmethod
    def of(cls, detector: WinClip, gpus: float) -> "ModelSpec":
        source = detector.source
        if source is None:
            raise ValueError("the detector was not loaded with WinClip.from_pretrained; Ray workers cannot load it")
        runtime = source.runtime
        device = "cuda" if gpus > 0 else "cpu"
        precision = runtime.precision if device == runtime.device.split(":")[0] else "fp32"
        return cls(source.model_ref or source.model_name, source.pretrained, device, precision, detector.config)


class _InspectActor:
    """One Ray actor: the detector loaded once, then batches of item indices -> pickled Rows."""

    def __init__(self, spec: ModelSpec, items: list[Item], method: Method, setup: Setup, threshold: float,
                 overlays: OverlayFiles | None, batch_size: int, threads: int) -> None:
        import ray
        import torch

        from .runtime import configure_process

        configure_process(spec.device)
        torch.set_num_threads(max(1, threads))
        self.detector = WinClip.from_pretrained(spec.model, spec.pretrained, spec.device, spec.config,
                                                spec.precision, seed=spec.seed)  # type: ignore[arg-type]
        self.setup = setup.to(self.detector.backbone.device)
        self.items, self.method, self.threshold = items, method, threshold
        self.overlays = overlays
        self.batch_size = batch_size
        self.where = (ray.get_runtime_context().get_node_id(), os.getpid())

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .inspection import inspect_stream

        items = [self.items[int(i)] for i in batch["index"]]
        rows = list(inspect_stream(self.detector, items, threshold=self.threshold, batch_size=self.batch_size,
                                   overlays=self.overlays, method=self.method, setup=self.setup))
        return {"index": batch["index"], "row": np.array([pickle.dumps(r) for r in rows], dtype=object),
                "node": np.array([self.where[0]] * len(rows)), "pid": np.array([self.where[1]] * len(rows))}


def ray_rows(detector: WinClip, items: Sequence[Item], method: Method, setup: Setup, threshold: float,
             overlays: OverlayFiles | None, options: RayOptions, stats: RayStats | None = None) -> Iterator[Row]:
    """Score ``items`` on Ray, one Row per item in input order, streamed as the actors finish them."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=options.address, ignore_reinit_error=True, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the cluster at {options.address}" if options.address else "a local Ray instance"
            raise ValueError(f"could not start or reach {where}: {exc}") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in input order, as the single-process run writes them
    context.enable_progress_bars = False
    cpus = options.cpus_per_worker or 1.0
    spec = ModelSpec.of(detector, options.gpus_per_worker)
    dataset = ray.data.from_items([{"index": i} for i in range(len(items))],
                                  override_num_blocks=max(1, -(-len(items) // options.batch_size)))
    scored = dataset.map_batches(
        _InspectActor, batch_size=options.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.workers), num_cpus=cpus,
        num_gpus=options.gpus_per_worker or None,
        fn_constructor_kwargs={"spec": spec, "items": list(items), "method": method, "setup": setup.to("cpu"),
                               "threshold": threshold, "overlays": overlays,
                               "batch_size": options.batch_size, "threads": max(1, int(cpus))})
    before = set(threading.enumerate())
    batches = iter(scored.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for batch in batches:
            for blob, node, pid in zip(batch["row"], batch["node"], batch["pid"]):
                if stats is not None:
                    stats.rows[(str(node), int(pid))] += 1
                yield pickle.loads(blob)
    finally:
        batches.close()  # an interrupted run: stop the executor now, not when the iterator is collected
        _wait_for_ray_data_threads(before)


def _wait_for_ray_data_threads(before: set, timeout: float = 120.0) -> None:
    """Wait for the run's Ray Data threads (its executor, its batch fetchers; not those running before it) to
    end. Closing the iterator asks them to stop, but a thread still waiting for a batch in flight would call
    into Ray after a following ``ray.shutdown()``, which ends the whole process at once with status 1 and
    prints nothing (the driver log says "... already shutdown"). A fetcher stops once the generator that
    consumes it is finalized, which a reference cycle can put off until the cyclic collector runs: on Python
    3.10 the fetchers of a closed run waited in a loop until this wait's timeout (120 s), so collect first."""
    def ours() -> list[threading.Thread]:
        return [t for t in set(threading.enumerate()) - before
                if type(t).__name__ == "StreamingExecutor" or t.name == "iter_threaded"]

    deadline = time.monotonic() + timeout
    if ours():
        gc.collect()
    for thread in ours():
        thread.join(max(0.0, deadline - time.monotonic()))


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'winclip[ray]' (or 'ray[data]')") from None
    return ray


def iter_inspection_on_ray(
    detector: WinClip, inputs: Inputs, out_dir: Path, prototypes=None, references: ReferenceMemory | None = None,
    threshold: float | str = "auto", overlays: bool = False, settings: dict | None = None,
    method: str | Method = "winclip", options: Any = None, ray_options: RayOptions = RayOptions(),
    stats: RayStats | None = None, stop: Callable[[], bool] | None = None,
    overlay_format: str = DEFAULT_OVERLAY_FORMAT,
) -> Iterator[Row | Summary]:
    """``iter_inspection`` with the scoring on Ray: each Row as it arrives (results.csv written row by row),
    then the Summary once summary.json and report.html are written. ``stats`` counts rows per node and
    worker process; summary.json's settings get an ``engine`` entry with the same."""
    m = methods.get(method)
    if m.whole_set:
        raise ValueError(f"{m.title} scores the set as a whole, which cannot be split across Ray workers; run it "
                         "without --engine ray")
    if ray_options.workers < 1 or ray_options.batch_size < 1 or ray_options.gpus_per_worker < 0:
        raise ValueError("--workers and --batch-size must be >= 1 and --gpus-per-worker >= 0")
    setup = m.setup(detector, prototypes, references, options)
    chosen = resolve_threshold(detector, threshold, setup, m)
    stats = stats if stats is not None else RayStats()
    settings = dict(settings or {})

    def score(items: Sequence[Item], value: float, overlays: OverlayFiles | None) -> Iterator[Row]:
        yield from ray_rows(detector, items, m, setup, value, overlays, ray_options, stats)
        settings["engine"] = {"name": "ray", "workers": ray_options.workers, "gpus_per_worker":
                              ray_options.gpus_per_worker, "rows_per_node": dict(stats.nodes),
                              "worker_processes": len({pid for _, pid in stats.rows})}

    yield from iter_inspection(detector, inputs, out_dir, threshold=chosen["value"], overlays=overlays,
                               settings=settings, method=m, chosen=chosen, score=score, stop=stop,
                               overlay_format=overlay_format)


def run_on_ray(detector: WinClip, inputs: Inputs, out_dir: Path, progress: Callable[[Row], None] | None = None,
               **kwargs: Any) -> tuple[Summary, list[Row]]:
    """The whole run on Ray (see ``iter_inspection_on_ray``); ``progress(row)`` after each file."""
    return finish_run(iter_inspection_on_ray(detector, inputs, out_dir, **kwargs), progress)
