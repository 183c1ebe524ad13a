"""Parity and speed of winclip.musc against the official MuSc scoring functions, on the same token tensors.

    python benchmarks/parity_musc.py --musc-repo /path/to/MuSc-checkout [--images 12] [--speed-images 100]

The official code is imported from the checkout you give (its ``models/modules/_LNAMD.py``, ``_MSM.py``,
``_RsCIN.py``; they need numpy, torch and tqdm only) and run beside ours; nothing of it is copied here.
Tokens come from our backbone on the real architecture (ViT-B-16-plus-240, random weights from a seed, fp32,
240 px -> 15 x 15 patches) over generated parts: blocks 3, 6, 9, 12, with a class token prepended for their
functions. Compared: per (block, r) patch scores, the final maps, the upsampled-max image scores and the
RsCIN scores. Speed: the mutual scoring alone, theirs (every ordered pair) vs ours (each pair once), for
``--speed-images`` images at 15 x 15 patches, 4 blocks x 3 values of r, same process, same tensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winclip.hardware import describe_cpu  # noqa: E402
from winclip.runtime import configure_process  # noqa: E402


def official(repo: Path):
    sys.path.insert(0, str(repo))
    from models.modules._LNAMD import LNAMD  # type: ignore[import-not-found]
    from models.modules._MSM import MSM  # type: ignore[import-not-found]
    from models.modules._RsCIN import RsCIN  # type: ignore[import-not-found]

    return LNAMD, MSM, RsCIN


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--musc-repo", required=True, help="a checkout of the official MuSc code")
    p.add_argument("--images", type=int, default=12, help="images for the parity check")
    p.add_argument("--speed-images", type=int, default=100, help="images for the mutual-scoring timing (0: skip)")
    p.add_argument("--memory-images", type=int, default=200, help="images for the memory check (0: skip)")
    p.add_argument("--tolerance", type=float, default=1e-5)
    args = p.parse_args()
    configure_process("cpu")
    LNAMD, MSM, RsCIN = official(Path(args.musc_repo))
    from winclip import WinClip
    from winclip.musc import MuscConfig, image_scores, lnamd, mutual_scores, rescore
    from winclip.synthetic import make_part

    print(f"# {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    detector = WinClip.from_pretrained("ViT-B-16-plus-240", pretrained=None, precision="fp32", seed=0)
    cfg = MuscConfig()
    pixels = torch.stack([detector.preprocess(make_part(i, 480, ("none", "crack", "spot")[i % 3]).image)
                          for i in range(args.images)])
    feats = detector.encode(pixels, layers=cfg.layers)
    grid = detector.grid
    tokens = {k: v.float() for k, v in feats.layer_tokens.items()}  # (N, P, D)
    with_cls = [torch.cat([torch.zeros_like(t[:, :1]), t], dim=1) for t in tokens.values()]  # their layout
    worst = {}
    to_exact = {"ours": 0.0, "theirs": 0.0}
    per_r, their_per_r = [], []
    for r in cfg.radii:
        theirs_z = LNAMD(device="cpu", r=r, feature_dim=with_cls[0].shape[-1], feature_layer=[1, 2, 3, 4])._embed(
            with_cls)
        theirs_z = theirs_z / theirs_z.norm(dim=-1, keepdim=True)  # (N, P, layer, C), as their pipeline does
        layer_maps, their_layer_maps = [], []
        for li, layer in enumerate(cfg.layers):
            ours_z = lnamd(tokens[layer], grid, r)
            worst[f"LNAMD r={r} block {layer + 1}"] = float((ours_z - theirs_z[:, :, li]).abs().max())
            ours = mutual_scores(ours_z, cfg.topmin)
            theirs = MSM(Z=theirs_z[:, :, li].contiguous(), device="cpu", topmin_min=0, topmin_max=0.3).float()
            exact = mutual_scores(ours_z.double(), cfg.topmin).float()  # float64: the rounding of neither
            worst[f"MSM r={r} block {layer + 1}"] = float((ours - theirs).abs().max())
            to_exact["ours"] = max(to_exact["ours"], float((ours - exact).abs().max()))
            to_exact["theirs"] = max(to_exact["theirs"], float((theirs - exact).abs().max()))
            layer_maps.append(ours)
            their_layer_maps.append(theirs.double())
        per_r.append(torch.stack(layer_maps).mean(0))
        their_per_r.append(torch.stack(their_layer_maps).mean(0))  # their pipeline: mean over layers, then r
    ours_maps = torch.stack(per_r).mean(0).reshape(-1, *grid)
    their_maps = torch.stack(their_per_r).mean(0).reshape(-1, *grid)
    worst["final map"] = float((ours_maps.double() - their_maps).abs().max())
    ours_raw = image_scores(ours_maps, detector.image_size)
    theirs_up = torch.nn.functional.interpolate(their_maps[:, None], size=detector.image_size[0],
                                                mode="bilinear", align_corners=True)
    theirs_raw = theirs_up.reshape(len(their_maps), -1).numpy().max(-1)  # their ac_score
    worst["image score (upsampled max)"] = float(np.abs(ours_raw.numpy() - theirs_raw).max())
    cls = torch.nn.functional.normalize(feats.image_embeddings, dim=-1)
    ours_final = rescore(ours_raw, feats.image_embeddings, cfg.rescore_k).numpy()
    theirs_final = RsCIN(theirs_raw, [c.numpy() for c in cls], k_list=list(cfg.rescore_k))
    worst["RsCIN score"] = float(np.abs(ours_final - theirs_final).max())
    print(f"parity on {args.images} images ({grid[0]}x{grid[1]} patches, fp32):")
    for name, value in worst.items():
        print(f"  max |ours - theirs| {name}: {value:.2e}")
    print(f"  MSM against a float64 computation of the same distances: ours {to_exact['ours']:.2e}, official "
          f"{to_exact['theirs']:.2e} (the official distances expand |a-b|^2 = |a|^2 + |b|^2 - 2ab in fp32, whose "
          "rounding the square root magnifies for near-identical patches; ours recompute nearest distances below 0.1 as |a-b|)")
    final = ("final map", "image score (upsampled max)", "RsCIN score")
    ok = max(worst[k] for k in final) <= args.tolerance
    print(("PARITY OK" if ok else "PARITY FAILED") + f": maps, image scores and re-scored scores within "
          f"{args.tolerance:g} (per-block patch scores differ by up to "
          f"{max(v for k, v in worst.items() if k.startswith('MSM')):.1e}, the official code's own rounding)")
    if args.speed_images:
        n = args.speed_images
        z = torch.nn.functional.normalize(torch.randn(n, grid[0] * grid[1], tokens[cfg.layers[0]].shape[-1],
                                                      generator=torch.Generator().manual_seed(0)), dim=-1)
        runs = len(cfg.layers) * len(cfg.radii)
        t0 = time.perf_counter()
        theirs = MSM(Z=z, device="cpu", topmin_min=0, topmin_max=0.3)
        t_theirs = (time.perf_counter() - t0) * runs
        t0 = time.perf_counter()
        ours = mutual_scores(z, cfg.topmin)
        t_ours = (time.perf_counter() - t0) * runs
        print(f"mutual scoring, {n} images x {grid[0] * grid[1]} patches x {z.shape[-1]} channels, x{runs} "
              f"(blocks x r; one measured, times {runs}): official {t_theirs:.1f} s, ours {t_ours:.1f} s "
              f"-> {t_ours / t_theirs:.2f}x its time (max |diff| {float((ours - theirs.float()).abs().max()):.1e})")
        sample = pixels[:8]
        detector.encode(sample[:1], layers=cfg.layers)  # warm-up
        t0 = time.perf_counter()
        detector.encode(sample, layers=cfg.layers)
        per_image = (time.perf_counter() - t0) / len(sample)
        print(f"backbone pass (fp32, measured on {len(sample)} images): {per_image:.2f} s per image -> "
              f"{per_image * n:.0f} s for {n} images (scaled)")
    if args.memory_images:
        def rss_mb() -> float:
            status = Path("/proc/self/status").read_text()
            return int(next(x.split()[1] for x in status.splitlines() if x.startswith("VmRSS"))) / 1024

        n, width = args.memory_images, tokens[cfg.layers[0]].shape[-1]
        del feats, tokens, with_cls
        before = rss_mb()
        gen = torch.Generator().manual_seed(1)
        from winclip.musc import BlockTokens, score_batch

        store = BlockTokens(cfg.layers, n)  # as inspect/evaluate collect them: batch by batch into one store
        for start in range(0, n, 8):
            b = min(8, n - start)
            store.add({layer: torch.randn(b, grid[0] * grid[1], width, generator=gen) for layer in cfg.layers},
                      torch.randn(b, 640, generator=gen))
        layer_tokens, embeddings = store.tensors()
        stored = rss_mb()

        import threading

        peak, done = [stored], threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak.append(rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        score_batch(layer_tokens, embeddings, grid, detector.image_size, cfg)
        done.set()
        sampler.join()
        print(f"memory at N = {n} (fp32 block tokens of 4 blocks kept for the set, as inspect/evaluate do): RSS "
              f"{before:.0f} MB -> {stored:.0f} MB with the tokens (+{stored - before:.0f}) -> at most "
              f"{max(peak):.0f} MB while scoring (+{max(peak) - before:.0f} over the start; sampled every 50 ms); "
              f"{time.perf_counter() - t0:.1f} s for the whole scoring (4 blocks x 3 r)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
