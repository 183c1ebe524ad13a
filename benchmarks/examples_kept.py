"""A click on an example after a busy spell: does the server still have what it prepared at start?

    python benchmarks/examples_kept.py [--others 34] [--precision int8]

Real architecture (ViT-B-16-plus-240, random weights), the service as app.py runs it: the start prompts
and the examples prepared, then ``--others`` clicks with a new query, a new reference and a new object name
each (more than the caches hold: 32 images, 8 reference sets, 16 prompt sets), then each example clicked
as the page sends it. Prints each example click's server time and its stages, with the CPU and its
instruction set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winclip.hardware import describe_cpu  # noqa: E402
from winclip.runtime import configure_process  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--others", type=int, default=34, help="clicks with new images and object names in between")
    p.add_argument("--precision", default="int8")
    args = p.parse_args()
    configure_process("cpu")
    import numpy as np
    import torch
    from PIL import Image

    import app
    from winclip.service import DetectionService, DetectOptions, Settings

    print(f"# {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.precision}")
    service = DetectionService(Settings(model="ViT-B-16-plus-240", pretrained=None, precision=args.precision))
    assert service.load(), service.error
    demo = app.build_demo(service)
    t0 = time.perf_counter()
    service.prepare(*demo.winclip_prepare).join()
    print(f"prepared ({demo.winclip_prepare[1]}) in {time.perf_counter() - t0:.1f} s")
    requests = demo.winclip_prepare[0][1:]  # the examples, as the page sends them
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="winclip-bench-") as folder:
        others = []
        for i in range(args.others):
            others.append(Path(folder) / f"other{i}.png")
            Image.fromarray(rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)).save(others[-1])
        t0 = time.perf_counter()
        for i, other in enumerate(others):
            service.detect(str(other), [str(others[i - 1])] if i else [], DetectOptions(object_name=f"part {i}"))
        print(f"{args.others} other clicks (a new query, reference and object name each) in "
              f"{time.perf_counter() - t0:.1f} s")
    for query, refs, options in requests:
        result = service.detect(query, refs, options)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result.steps.items() if v >= 0.005)
        print(f"example {Path(query).name}: {result.seconds:.2f} s on the server ({stages})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
