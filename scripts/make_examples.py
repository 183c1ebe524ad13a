"""Write the demo's example images (synthetic washers) to examples/. Deterministic; rerun to refresh."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from winclip.synthetic import EXAMPLE_GOOD_SEEDS, EXAMPLE_QUERIES, EXAMPLE_SIZE, make_part  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "examples"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for i, seed in enumerate(EXAMPLE_GOOD_SEEDS):
        make_part(seed, EXAMPLE_SIZE).image.save(OUT / f"washer_good_{i + 1}.png", optimize=True)
    for seed, defect in EXAMPLE_QUERIES:
        make_part(seed, EXAMPLE_SIZE, defect).image.save(OUT / f"washer_query_{defect}.png", optimize=True)
    print(f"wrote {len(list(OUT.glob('*.png')))} images to {OUT}")


if __name__ == "__main__":
    main()
