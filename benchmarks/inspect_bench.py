"""Batch inspection: throughput against single-image latency, memory over a long run, report time.

    python benchmarks/inspect_bench.py throughput --images 24 --precision fp32     # real architecture
    python benchmarks/inspect_bench.py throughput --images 12 --size 3000 --overlays  # + overlay files, as the app
    python benchmarks/inspect_bench.py memory --images 500 --size 1024             # RSS over a long run
    python benchmarks/inspect_bench.py report --images 500                         # report.html time
    python benchmarks/inspect_bench.py app --images 24 --precision int8            # the Batch tab's rows: first, all

Random weights (speed and memory do not depend on their values). Every figure is printed with the
CPU model and its instruction set. ``throughput`` times ``predict`` one image at a time (median of the
same images, after a warm-up) and then ``inspect`` over the same files from disk, decoding and drawing
included. ``memory`` samples the process RSS after every file of one streaming run. ``app`` runs the app's
batch (``DetectionService.batch``, overlay files included) twice and prints when its first row came, how many
times rows arrived, and the total.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winclip.hardware import describe_cpu  # noqa: E402
from winclip.runtime import configure_process  # noqa: E402

TINY = str(ROOT / "tests" / "assets" / "winclip-tiny.json")


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    from winclip.synthetic import make_part

    paths = []
    for i in range(count):
        paths.append(folder / f"{i:04d}.png")
        if not paths[-1].exists():
            make_part(i, size, ("none", "crack", "spot", "scratch")[i % 4]).image.save(paths[-1], compress_level=1)
    return paths


def app_batch(model: str, args: argparse.Namespace) -> int:
    """The Batch tab's run as the app makes it off ZeroGPU: when do rows reach the page?"""
    import torch

    from winclip.inspection import Summary
    from winclip.requests import DetectOptions
    from winclip.service import DetectionService, Settings

    folder = Path(args.cache) / f"{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in make_images(folder, args.images, args.size)]
    print(f"# {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# model {args.model} ({args.precision}, random weights), {args.images} images of {args.size} px, "
          "the app's batch (batch 4, overlay files), two runs")
    service = DetectionService(Settings(model=model, pretrained=None, precision=args.precision))
    service.load()
    for run_number in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _, run = service.batch(paths, [], DetectOptions(object_name="washer"), Path(tmp), True)
            arrivals = [time.perf_counter() - t0 for r in run if not isinstance(r, Summary)]
            total = time.perf_counter() - t0
        print(f"run {run_number}: first row after {arrivals[0]:.1f} s, rows arrived at "
              f"{len({round(a, 2) for a in arrivals})} moments, all {len(arrivals)} after {total:.1f} s")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("throughput", "memory", "report", "app"))
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip model or config JSON (tiny: 'tiny')")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--overlays", action="store_true",
                   help="throughput: also write the overlay files (the Batch tab always does)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "winclip-inspect-bench"),
                   help="folder for the generated images (reused between runs)")
    args = p.parse_args()
    configure_process("cpu")
    import torch

    from winclip import WinClip
    from winclip.images import load_image
    from winclip.inspection import collect_inputs, run_inspection

    model = TINY if args.model == "tiny" else args.model
    if args.mode == "app":
        return app_batch(model, args)
    folder = Path(args.cache) / f"{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = make_images(folder, args.images, args.size)
    print(f"# {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# model {args.model} ({args.precision}, random weights), {args.images} images of {args.size} px, "
          f"batch {args.batch_size}")
    detector = WinClip.from_pretrained(model, pretrained=None, precision=args.precision)
    detector.set_prompts("washer")
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "throughput":
            images = [load_image(pth).image for pth in paths[: min(6, len(paths))]]
            detector.predict(images[0])  # warm-up
            single = []
            for image in images:
                t0 = time.perf_counter()
                detector.predict(image)
                single.append(time.perf_counter() - t0)
            latency = statistics.median(single)
            inputs = collect_inputs([folder], Path(tmp) / "w")
            inputs.items = inputs.items[: args.images]
            t0 = time.perf_counter()
            summary, rows = run_inspection(detector, inputs, Path(tmp) / "out", detector.prototypes, None, 0.5,
                                           args.batch_size, overlays=args.overlays)
            wall = time.perf_counter() - t0
            rate = len(rows) / wall
            print(f"single-image predict (decoded in memory): median {latency:.3f} s -> {1 / latency:.3f} images/s")
            written = sorted((Path(tmp) / "out" / "overlays").glob("*")) if args.overlays else []
            extra = (f", {len(written)} overlay files of {sum(f.stat().st_size for f in written) / 1e6:.1f} MB "
                     f"({written[0].suffix})" if written else "")
            print(f"inspect over {len(rows)} files from disk (decode, encode, score, thumbnails, CSV, report{extra}): "
                  f"{wall:.1f} s -> {rate:.3f} images/s = {rate * latency:.1%} of 1 / latency")
        elif args.mode == "memory":
            inputs = collect_inputs([folder], Path(tmp) / "w")
            inputs.items = inputs.items[: args.images]
            samples = []
            start = rss_mb()
            summary, rows = run_inspection(detector, inputs, Path(tmp) / "out", detector.prototypes, None, 0.5,
                                           args.batch_size, progress=lambda row: samples.append(rss_mb()))
            first = samples[min(len(samples) - 1, 2 * args.batch_size)]
            print(f"RSS before {start:.0f} MB; after the first batches {first:.0f} MB; max {max(samples):.0f} MB; "
                  f"end {samples[-1]:.0f} MB; growth over the run after the first batches "
                  f"{samples[-1] - first:+.0f} MB (max {max(samples) - first:+.0f}); peak RSS "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; {summary.timing}")
        else:
            from winclip.report import write_report

            inputs = collect_inputs([folder], Path(tmp) / "w")
            inputs.items = inputs.items[: args.images]
            summary, rows = run_inspection(detector, inputs, Path(tmp) / "out", detector.prototypes, None, 0.5,
                                           args.batch_size)
            t0 = time.perf_counter()
            path = write_report(Path(tmp) / "again.html", rows, summary)
            print(f"report.html for {len(rows)} images: {time.perf_counter() - t0:.2f} s, "
                  f"{path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
