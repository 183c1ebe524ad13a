"""The GPU check: one command on a CUDA machine (at most ~8 minutes), one Markdown table out.

    python benchmarks/gpu_check.py --out docs/gpu_check.md       # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.md   # CPU smoke mode (the test suite runs it)

Steps, in order (each prints as it goes; a failed step is a row saying so, and the exit code is 1):
1. the CUDA tests (``pytest -k cuda``: the tests parametrised on the cuda device);
2. real-size weights (ViT-B-16-plus-240, seeded random init) saved to a .safetensors file, loaded onto
   cuda, every parameter and buffer checked to be there;
3. cuda fp32 / bf16 / fp16 against CPU fp32 on the example parts the precision self-check uses
   (max |score difference|, worst map Spearman), the same weights on both sides;
4. zero-shot and 4-shot query latency per precision (median of --runs after a warm-up);
5. batch inspection throughput over 64 images, and MuSc over 100 images (the first precision that
   passed step 3's limits, else fp32);
6. peak GPU memory.

Smoke mode runs the same code on the CPU with the tiny test model (fp32 and bf16, 8 batch images, 8 MuSc
images, no pytest step), so the script cannot rot unnoticed. Speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winclip import WinClip  # noqa: E402
from winclip.hardware import describe_cpu  # noqa: E402
from winclip.inspection import collect_inputs, inspect_stream  # noqa: E402
from winclip.loading import load_clip, misplaced  # noqa: E402
from winclip.precision_check import MAX_SCORE_DIFF, MIN_SPEARMAN, compare_musc, spearman  # noqa: E402
from winclip.synthetic import EXAMPLE_QUERIES, EXAMPLE_SIZE, make_part  # noqa: E402

TINY = str(ROOT / "tests" / "assets" / "winclip-tiny.json")


class Check:
    def __init__(self, device: str) -> None:
        self.device = device
        self.rows: list[tuple[str, str]] = []  # (what, result)
        self.failed = False

    def row(self, what: str, result: str, ok: bool = True) -> None:
        self.rows.append((what, result if ok else f"**FAILED** {result}"))
        self.failed |= not ok
        print(f"{what}: {result}" + ("" if ok else "  <- FAILED"), flush=True)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def timed(check: Check, fn, runs: int) -> float:
    fn()  # warm-up (kernels, caches)
    times = []
    for _ in range(runs):
        check.sync()
        start = time.perf_counter()
        fn()
        check.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_parts(folder: Path, n: int, size: int = 320) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"part_{i:03d}.png"
        make_part(1000 + i, size, ("none", "none", "none", "crack", "none", "spot")[i % 6]).image.save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, small counts (the suite's run)")
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU smoke mode", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    model = TINY if smoke else "ViT-B-16-plus-240"
    precisions = ["fp32", "bf16"] if smoke else ["fp32", "bf16", "fp16"]
    n_batch, n_musc, runs = (8, 8, 2) if smoke else (64, 100, args.runs)
    check = Check(device)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (smoke mode, CPU)"
    machine = f"GPU {gpu}; {describe_cpu()}; torch {torch.__version__}; Python {platform.python_version()}"
    print(machine, flush=True)
    start_all = time.perf_counter()

    if not smoke:  # 1. the CUDA tests
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider"], cwd=ROOT,
                           capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or ["no output"])[-1]
        check.row("CUDA tests (pytest -k cuda)", last, r.returncode == 0)

    with tempfile.TemporaryDirectory(prefix="winclip-gpu-check-") as work:
        work = Path(work)
        # 2. real-size weights from a file onto the device
        weights = work / "weights.safetensors"
        from safetensors.torch import save_file

        source = load_clip(model, None, "cpu", "fp32", seed=0).model
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
        del source
        t0 = time.perf_counter()
        det = WinClip.from_pretrained(model, str(weights), device, precision="fp32")
        check.sync()
        load_s = time.perf_counter() - t0
        wrong = misplaced(det.backbone.model, device)
        n_tensors = sum(1 for _ in det.backbone.model.state_dict())
        check.row("weights from a file", f"{weights.stat().st_size / 1e6:.0f} MB loaded in {load_s:.1f} s; "
                  f"{n_tensors - len(wrong)} of {n_tensors} tensors on {device}", not wrong)
        reference = WinClip.from_pretrained(model, str(weights), "cpu", precision="fp32")

        # 3. each precision against CPU fp32 on the example parts
        images = [make_part(seed, EXAMPLE_SIZE, defect).image for seed, defect in EXAMPLE_QUERIES]
        for d in (det, reference):
            d.set_prompts("washer")
        ref_out = [reference.forward(reference.preprocess(im)[None]) for im in images]
        passed = []
        for p in precisions:
            with det.backbone.precision_for_this_thread(p):
                outs = [det.forward(det.preprocess(im)[None]) for im in images]
            diff = max(float((a.image_scores.cpu() - b.image_scores).abs().max()) for a, b in zip(outs, ref_out))
            rho = min(spearman(a.grid_maps.cpu(), b.grid_maps) for a, b in zip(outs, ref_out))
            ok = diff <= MAX_SCORE_DIFF and rho >= MIN_SPEARMAN
            passed += [p] if ok else []
            check.row(f"{device} {p} vs cpu fp32, {len(images)} example parts",
                      f"max score diff {diff:.5f}, min map Spearman {rho:.4f} "
                      + ("(within the self-check's limits)" if ok else "(outside the self-check's limits: auto "
                                                                         "would keep fp32)"))
            musc = compare_musc(det, p) if p != "fp32" else None  # sets each pass's precision itself
            if musc is not None:
                check.row(f"{device} {p} MuSc on 8 normal parts", f"max score diff {musc.max_score_diff:.4f} "
                          "(MuSc keeps fp32 under auto)")

        # 4. latency per precision: zero-shot and 4-shot queries
        query = det.preprocess(images[2])[None]
        shots = [make_part(seed, EXAMPLE_SIZE).image for seed in (1, 2, 3, 4)]
        for p in precisions:
            with det.backbone.precision_for_this_thread(p):
                memory = det.memory_for(shots)
                zero = timed(check, lambda: det.score(det.encode(query), det.prototypes), runs)
                four = timed(check, lambda: det.score(det.encode(query), det.prototypes, references=memory), runs)
            check.row(f"{device} {p} query latency", f"zero-shot {zero * 1000:.1f} ms, 4-shot {four * 1000:.1f} ms "
                      f"(median of {runs})")

        # 5. batch throughput and MuSc, in the first precision that passed (else fp32)
        fast = next((p for p in reversed(precisions) if p in passed), "fp32")
        write_parts(work / "batch", n_batch)
        batch_inputs = collect_inputs([work / "batch"], work / "unpacked-batch")
        with det.backbone.precision_for_this_thread(fast):
            t0 = time.perf_counter()
            rows = list(inspect_stream(det, batch_inputs.items, det.prototypes, None, 0.5, 16, thumbnails=False))
            check.sync()
            seconds = time.perf_counter() - t0
        ok = len(rows) == n_batch and all(r.status == "ok" for r in rows)
        check.row(f"batch inspection, {n_batch} images ({fast}, batches of 16)",
                  f"{n_batch / seconds:.1f} images/s ({seconds:.1f} s, decoding included)", ok)
        write_parts(work / "musc", n_musc)
        musc_inputs = collect_inputs([work / "musc"], work / "unpacked-musc")
        t0 = time.perf_counter()
        rows = list(inspect_stream(det, musc_inputs.items, None, None, 0.5, 16, thumbnails=False, method="musc"))
        check.sync()
        seconds = time.perf_counter() - t0
        check.row(f"MuSc, {n_musc} images (fp32 backbone pass)", f"{seconds:.1f} s ({n_musc / seconds:.1f} images/s)",
                  len(rows) == n_musc and all(r.status == "ok" for r in rows))

    # 6. peak GPU memory
    if device == "cuda":
        check.row("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                  f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
    total = time.perf_counter() - start_all
    table = [f"GPU check ({'smoke mode, ' if smoke else ''}{model}, `python benchmarks/gpu_check.py"
             f"{' --smoke' if smoke else ''}`, {total:.0f} s in all)", "", machine, "",
             "| check | result |", "|---|---|"] + [f"| {what} | {result} |" for what, result in check.rows]
    text = "\n".join(table) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
