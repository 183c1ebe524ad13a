"""Write the demo's example images (synthetic washers) to examples/. Deterministic; rerun to refresh."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from winclip.synthetic import make_part  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "examples"
SIZE = 320


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for i in range(3):
        make_part(i, SIZE).image.save(OUT / f"washer_good_{i + 1}.png", optimize=True)
    for seed, defect in ((11, "scratch"), (12, "spot"), (13, "crack")):
        make_part(seed, SIZE, defect).image.save(OUT / f"washer_query_{defect}.png", optimize=True)
    print(f"wrote {len(list(OUT.glob('*.png')))} images to {OUT}")


if __name__ == "__main__":
    main()
