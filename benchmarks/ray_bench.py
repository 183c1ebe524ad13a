"""Batch inspection on Ray against the single process, on the real architecture with random weights.

    python benchmarks/ray_bench.py [--images 64] [--precision fp32] [--two-nodes]

Writes ``--images`` generated parts (480 px, a quarter with drawn defects) to a temporary folder, then scores
them (1) in this process with ``run_inspection`` and (2) on a local Ray instance with one actor that gets
every CPU (``--cpus-per-worker``, default all): images/s of each, Ray's share of the single-process figure,
and the largest score difference. ``--two-nodes`` also starts a local Ray cluster of two worker nodes
(``ray.cluster_utils.Cluster``, ``--cpus-per-node`` each) with one actor per node and prints the rows each
node scored. Prints the CPU model and instruction set first; speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winclip.runtime import configure_process  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16-plus-240")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--cpus-per-worker", type=float, default=float(os.cpu_count() or 1))
    p.add_argument("--two-nodes", action="store_true")
    p.add_argument("--cpus-per-node", type=float, default=1.0)
    args = p.parse_args()
    configure_process("cpu")
    import ray
    import torch

    from winclip import WinClip
    from winclip.distributed import RayOptions, RayStats, run_on_ray
    from winclip.hardware import describe_cpu
    from winclip.inputs import collect_inputs
    from winclip.inspection import run_inspection
    from winclip.synthetic import make_part

    print(f"# {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; ray {ray.__version__}")
    print(f"# {args.model}, random weights, {args.precision}, {args.images} images of 480 px, batch {args.batch_size}")
    with tempfile.TemporaryDirectory(prefix="winclip-ray-bench-") as tmp:
        folder = Path(tmp) / "parts"
        folder.mkdir()
        for i in range(args.images):
            make_part(i, 480, "scratch" if i % 4 == 3 else "none").image.save(folder / f"{i:04d}.png")
        det = WinClip.from_pretrained(args.model, None, "cpu", precision=args.precision)
        det.set_prompts("washer")
        inputs = collect_inputs([folder], Path(tmp) / "work")
        start = time.perf_counter()
        _, local = run_inspection(det, inputs, Path(tmp) / "local", det.prototypes, None, 0.5, args.batch_size)
        local_s = time.perf_counter() - start
        print(f"single process: {len(local)} rows in {local_s:.1f} s = {len(local) / local_s:.3f} images/s")
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            start = time.perf_counter()
            stats = RayStats()
            _, remote = run_on_ray(det, inputs, Path(tmp) / "ray", prototypes=det.prototypes, threshold=0.5,
                                   stats=stats, ray_options=RayOptions(workers=1, batch_size=args.batch_size,
                                                                       cpus_per_worker=args.cpus_per_worker))
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
        diff = max(abs(a.score - b.score) for a, b in zip(local, remote))
        same = [a.file for a in local] == [b.file for b in remote]
        print(f"ray, 1 worker ({args.cpus_per_worker:g} CPUs), start-up and model load included: {ray_s:.1f} s = "
              f"{len(remote) / ray_s:.3f} images/s = {local_s / ray_s:.1%} of the single process; same files in "
              f"the same order: {same}; max |score difference| {diff:.2e}")
        if args.two_nodes:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            try:
                for _ in range(2):
                    cluster.add_node(num_cpus=args.cpus_per_node)
                cluster.wait_for_nodes()
                ray.init(address=cluster.address, log_to_driver=False)
                start = time.perf_counter()
                stats = RayStats()
                _, rows = run_on_ray(det, inputs, Path(tmp) / "cluster", prototypes=det.prototypes, threshold=0.5,
                                     stats=stats, ray_options=RayOptions(workers=2, batch_size=args.batch_size,
                                                                         cpus_per_worker=args.cpus_per_node))
                seconds = time.perf_counter() - start
                diff = max(abs(a.score - b.score) for a, b in zip(local, rows))
                print(f"two-node cluster, one {args.cpus_per_node:g}-CPU actor per node: {len(rows)} rows in "
                      f"{seconds:.1f} s; rows per node {sorted(stats.nodes.values())}; max |score difference| "
                      f"{diff:.2e}")
            finally:
                ray.shutdown()
                cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
