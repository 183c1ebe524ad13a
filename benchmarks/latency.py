"""Latency, memory and accuracy guard of winclip on the real architecture with random weights.

    python benchmarks/latency.py                                # ViT-B-16-plus-240 on the CPU: fp32, int8, auto
                                                                # (+ bf16 where the CPU has native bf16)
    python benchmarks/latency.py --device cuda --precisions fp32 fp16 bf16 --throughput-batch 32
    python benchmarks/latency.py --compare-anomalib .venv-anomalib/bin/python
    python benchmarks/latency.py --compare-anomalib .venv-anomalib/bin/python --rounds 3  # speed-ups per round
    python benchmarks/latency.py --compare-anomalib .venv-anomalib/bin/python --paired 20  # alternating queries
    python benchmarks/latency.py --precisions fp32 bf16 --paired 20 --baseline ../before  # this checkout vs another

Speed does not depend on the weights' values, so random init (seeded) stands in for laion400m_e31.
Each precision is measured in its own process (as the app runs one); ``auto`` is resolved as the app
and CLI do (on a CPU without native bf16: the int8 self-check against fp32, then int8 or fp32), and
every row names the kernels it ran on. Prints the CPU model and instruction set, per-image latency
(median of --runs after --warmup) for zero-shot and K-shot queries,
reference-memory build time, prompt-prototype time, model load time (from a weights file), peak RSS,
and the accuracy guard of each fast precision against fp32 on real-size synthetic images:
max |score - fp32 score| and the worst per-image Spearman rank correlation of the maps.

``--paired N``: the speed-ups alone, measured so that the machine's drift cancels. Every precision and
anomalib load once, each in its own long-lived process, and take turns: one zero-shot query each per
cycle (never two at once; the order rotates every cycle), N cycles. Each cycle gives a ratio of
queries timed seconds apart; the median and quartiles of those ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from winclip import WinClip  # noqa: E402
from winclip.precision_check import spearman  # noqa: E402 - the self-check's own rank correlation
from winclip.runtime import configure_process  # noqa: E402
from winclip.synthetic import make_part  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, runs: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def app_peak_rss_mb(weights: Path, model: str, precision: str, images: list, tmp: Path) -> float:
    """Start app.py on loopback with these weights, send one 4-shot /detect and one /explain_prompts,
    and read the server process's peak RSS (VmHWM)."""
    from gradio_client import handle_file

    from load_test import client as new_client, detect_when_loaded, proc_mb, start_server

    paths = []
    for i, im in enumerate(images):
        paths.append(tmp / f"rss_{i}.png")
        im.save(paths[-1])
    server, url = start_server(model, str(weights), precision, timeout=300)
    try:
        client = new_client(url)
        detect_when_loaded(client, paths[0], paths[1:5])
        client.predict(handle_file(str(paths[0])), "bottle", "crack", api_name="/explain_prompts")
        return proc_mb(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(timeout=30)


def synthetic_inputs(n_guard: int, n_refs: int) -> tuple[list, list]:
    """Real-size (480 px) synthetic queries (the first is the timed query) and normal references."""
    queries = [make_part(200 + i, 480, ("scratch", "spot", "crack", "none")[i % 4]).image for i in range(n_guard)]
    return queries, [make_part(i, 480).image for i in range(n_refs)]


def device_sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def load(args: argparse.Namespace, precision: str, weights: Path) -> tuple[WinClip, dict]:
    """The model in this precision, ``auto`` resolved as the app does (its self-check, not cached here),
    and what that took: load_s, image_size, check_s (when checked), chosen, why, kernels."""
    from winclip.precision_check import resolve_candidate

    sync = device_sync(torch.device(args.device))
    start = time.perf_counter()
    # not strict: an explicit emulated bf16 is measured, with a warning
    det = WinClip.from_pretrained(args.model, str(weights), args.device, precision=precision)
    runtime = det.source.runtime
    sync()
    row = {"load_s": time.perf_counter() - start, "image_size": list(det.image_size)}
    if runtime.candidate:  # auto on a CPU without native bf16: int8 once it matched fp32
        runtime, check = resolve_candidate(det, runtime, use_cache=False)
        row["check_s"] = check.seconds if check else 0.0
    row["chosen"], row["why"], row["kernels"] = runtime.precision, runtime.reason, det.backbone.kernel_path()
    return det, row


def measure(args: argparse.Namespace, precision: str, weights: Path, out_dir: Path) -> dict:
    """One precision, in its own process (as the app runs one): timings, peak RSS, guard outputs saved
    to ``out_dir/guard_<precision>.pt`` for the parent to compare with fp32."""
    device = torch.device(args.device)
    sync = device_sync(device)
    guard_images, references = synthetic_inputs(args.guard_images, max(args.shots, default=0))
    det, row = load(args, precision, weights)
    start = time.perf_counter()
    det.set_prompts("bottle", ["crack"])
    row["prompts_s"] = time.perf_counter() - start
    query = det.preprocess(guard_images[0])[None]
    det.set_references([])
    row["zero_shot_s"] = timed(lambda: det.forward(query), args.runs, args.warmup, sync)
    for k in args.shots:
        start = time.perf_counter()
        det.set_references(references[:k])
        sync()
        row[f"memory_{k}_s"] = time.perf_counter() - start
        row[f"shot_{k}_s"] = timed(lambda: det.forward(query), args.runs, args.warmup, sync)
    if args.throughput_batch:
        det.set_references([])
        batch = query.repeat(args.throughput_batch, 1, 1, 1)
        t = timed(lambda: det.forward(batch), max(2, args.runs // 2), 1, sync)
        row["throughput_img_s"] = args.throughput_batch / t
    pixels = torch.stack([det.preprocess(im) for im in guard_images])
    outputs = {}
    for k in (0, 1):
        det.set_references(references[:k])
        out = det.forward(pixels)
        outputs[k] = (out.image_scores.cpu(), out.grid_maps.cpu())
    torch.save(outputs, out_dir / f"guard_{precision}.pt")
    row["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def serve(args: argparse.Namespace, precision: str, weights: Path) -> None:
    """``--serve``: one precision loaded (``auto`` resolved with its self-check) and warmed up; then each
    "go" line on stdin is answered with the seconds of one zero-shot query, as JSON lines."""
    sync = device_sync(torch.device(args.device))
    det, row = load(args, precision, weights)
    det.set_prompts("bottle", ["crack"])
    det.set_references([])
    query = det.preprocess(synthetic_inputs(1, 0)[0][0])[None]
    for _ in range(args.warmup):
        det.forward(query)
    print(json.dumps({"ready": precision, **row}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        sync()
        start = time.perf_counter()
        det.forward(query)
        sync()
        print(json.dumps({"s": time.perf_counter() - start}), flush=True)


def _reply(proc: subprocess.Popen, log: Path) -> dict:
    """The next JSON line a served process prints (other output skipped)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"a benchmark process ended early (exit {proc.wait()}):\n{tail}")


def paired(args: argparse.Namespace, tmp: str) -> dict:
    """Every precision and anomalib as long-lived processes taking turns, one zero-shot query each per
    cycle; speed-ups from queries timed seconds apart, so that the machine's drift cancels."""
    baseline = [f"{p}@baseline" for p in args.precisions] if args.baseline else []
    names = list(args.precisions) + baseline + (["anomalib"] if args.compare_anomalib else [])
    procs, logs, info = {}, {}, {}

    def start(name: str, command: list[str]) -> None:  # stderr to a log, shown if the process fails
        logs[name] = Path(tmp) / f"serve_{name}.log"
        with logs[name].open("w") as err:
            procs[name] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                           text=True)

    try:
        for precision in args.precisions:
            start(precision, [sys.executable, __file__, *sys.argv[1:], "--serve", precision, tmp])
        if args.baseline:  # the same served loop from another checkout (its own latency.py and winclip)
            other = Path(args.baseline).resolve() / "benchmarks" / "latency.py"
            argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--baseline" and sys.argv[i] != "--baseline"]
            for precision in args.precisions:
                start(f"{precision}@baseline", [sys.executable, str(other), *argv, "--serve", precision, tmp])
        for name in list(args.precisions) + baseline:  # every process loaded and warmed up before anything is timed
            info[name] = _reply(procs[name], logs[name])
            print(f"{name}: ready; chosen {info[name]['chosen']}; kernels: {info[name]['kernels']}", flush=True)
        if args.compare_anomalib:
            size = info[args.precisions[0]]["image_size"][0]
            start("anomalib", [args.compare_anomalib, str(ROOT / "benchmarks" / "anomalib_side.py"), "serve", tmp,
                               str(args.warmup), str(size)])
            _reply(procs["anomalib"], logs["anomalib"])
            print("anomalib 2.7.0 (open_clip 2.24, fp32): ready", flush=True)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for cycle in range(args.paired):
            order = names[cycle % len(names):] + names[: cycle % len(names)]
            for name in order:
                procs[name].stdin.write("go\n")
                procs[name].stdin.flush()
                seconds[name].append(_reply(procs[name], logs[name])["s"])
            line = ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names)
            if args.compare_anomalib:
                line += "; vs anomalib " + ", ".join(
                    f"{p} x{seconds['anomalib'][-1] / seconds[p][-1]:.2f}" for p in args.precisions)
            print(f"cycle {cycle + 1}: {line}", flush=True)
    finally:
        for proc in procs.values():
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()  # the served loop ends at end of input
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = {"cycles": args.paired, "seconds": seconds, "chosen": {p: info[p]["chosen"] for p in args.precisions},
               "kernels": {p: info[p]["kernels"] for p in args.precisions}}
    print(f"## {args.paired} cycles, one zero-shot query per process per cycle (order rotating)")
    for name in names:
        print(f"{name}: median {statistics.median(seconds[name]):.2f} s "
              f"({min(seconds[name]):.2f}-{max(seconds[name]):.2f})")
    if args.baseline:
        summary["this_over_baseline"] = {}
        for p in args.precisions:
            ratios = [a / b for a, b in zip(seconds[p], seconds[f"{p}@baseline"])]
            q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            summary["this_over_baseline"][p] = {"median": median, "q1": q1, "q3": q3, "ratios": ratios}
            print(f"{p}: this checkout's time / the baseline's ({args.baseline}), per cycle: median {median:.3f} "
                  f"(quartiles {q1:.3f}-{q3:.3f}, range {min(ratios):.3f}-{max(ratios):.3f})")
    if args.compare_anomalib:
        summary["speedup_vs_anomalib"] = {}
        for p in args.precisions:
            ratios = [a / b for a, b in zip(seconds["anomalib"], seconds[p])]
            q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
            summary["speedup_vs_anomalib"][p] = {"median": median, "q1": q1, "q3": q3,
                                                 "min": min(ratios), "max": max(ratios), "ratios": ratios}
            print(f"speed-up of winclip {p} over anomalib, zero-shot, per cycle: median x{median:.2f} "
                  f"(quartiles x{q1:.2f}-x{q3:.2f}, range x{min(ratios):.2f}-x{max(ratios):.2f})")
    return summary


def guard(fast: dict, reference: dict) -> tuple[float, float]:
    """max |score - fp32 score| and the worst per-image Spearman of the maps, zero- and 1-shot."""
    diffs, rhos = [], []
    for k, (scores, maps) in fast.items():
        ref_scores, ref_maps = reference[k]
        diffs.append((scores - ref_scores).abs().max().item())
        rhos += [spearman(a, b) for a, b in zip(maps, ref_maps)]
    return max(diffs), min(rhos)


def one_round(args: argparse.Namespace, tmp: str, weights: Path, app_rss: list[str]) -> dict:
    """Every precision in its own process, the app's RSS, then anomalib: one burst, figures of one round."""
    device = torch.device(args.device)
    figures: dict = {"runs": {}}
    size = None
    passthrough = sys.argv[1:]
    for precision in args.precisions:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--worker", precision, tmp],
                             check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        size = row.pop("image_size")
        if precision != "fp32" and "fp32" in args.precisions:
            row["guard_max_dscore"], row["guard_min_spearman"] = guard(
                torch.load(Path(tmp) / f"guard_{precision}.pt"), torch.load(Path(tmp) / "guard_fp32.pt"))
        figures["runs"][precision] = row
        shots = ", ".join(f"{k}-shot {row[f'shot_{k}_s'] * 1000:.0f} ms (memory {row[f'memory_{k}_s'] * 1000:.0f} ms)"
                          for k in args.shots)
        guard_txt = (f"; guard vs fp32: max|dscore| {row['guard_max_dscore']:.5f}, min Spearman "
                     f"{row['guard_min_spearman']:.4f}" if "guard_max_dscore" in row else "")
        tput = f", batch-{args.throughput_batch} {row['throughput_img_s']:.1f} img/s" if "throughput_img_s" in row else ""
        chosen = f" -> {row['chosen']}" if precision == "auto" else ""
        check = f"; self-check {row['check_s']:.1f} s" if "check_s" in row else ""
        print(f"{precision}{chosen}: zero-shot {row['zero_shot_s'] * 1000:.0f} ms/img, {shots}{tput}; prompts "
              f"{row['prompts_s']:.2f} s; load {row['load_s']:.1f} s{check}; peak RSS {row['peak_rss_mb']:.0f} MB"
              f"{guard_txt}\n    kernels: {row['kernels']}" + (f"\n    why: {row['why']}" if precision == "auto" else ""),
              flush=True)

    queries, references = synthetic_inputs(1, 4)
    for precision in [p for p in app_rss if p != "none"] if device.type == "cpu" else []:
        rss = app_peak_rss_mb(weights, args.model, precision, [*queries, *references], Path(tmp))
        figures.setdefault("app_peak_rss_mb", {})[precision] = rss
        print(f"app.py ({precision}) peak RSS after a 4-shot /detect and /explain_prompts: {rss:.0f} MB", flush=True)

    if args.compare_anomalib:
        out = subprocess.run(
            [args.compare_anomalib, str(ROOT / "benchmarks" / "anomalib_side.py"), "latency", tmp,
             str(args.runs), str(args.warmup), str(size[0])],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        theirs = json.loads(out)
        figures["anomalib"] = theirs
        print(f"anomalib 2.7.0 (open_clip 2.24, fp32): zero-shot {theirs['zero_shot_s'] * 1000:.0f} ms/img, "
              f"1-shot {theirs['shot_1_s'] * 1000:.0f} ms/img")
        for precision, row in figures["runs"].items():
            print(f"  speed-up of winclip {precision}: zero-shot x{theirs['zero_shot_s'] / row['zero_shot_s']:.2f}"
                  + (f", 1-shot x{theirs['shot_1_s'] / row['shot_1_s']:.2f}" if "shot_1_s" in row else ""), flush=True)
    return figures


def summarise(rounds: list[dict]) -> None:
    """Per precision: zero-shot seconds of every round, and the speed-up over the same round's anomalib."""
    print(f"## {len(rounds)} rounds (each: every precision in turn, then anomalib)")
    for precision in rounds[0]["runs"]:
        secs = [r["runs"][precision]["zero_shot_s"] for r in rounds]
        line = f"{precision}: zero-shot " + " / ".join(f"{t:.2f}" for t in secs) + f" s (median {statistics.median(secs):.2f})"
        if all("anomalib" in r for r in rounds):
            ups = [r["anomalib"]["zero_shot_s"] / r["runs"][precision]["zero_shot_s"] for r in rounds]
            line += "; vs anomalib " + " / ".join(f"x{u:.2f}" for u in ups) + f" (median x{statistics.median(ups):.2f})"
        print(line)
    if all("anomalib" in r for r in rounds):
        print("anomalib: zero-shot " + " / ".join(f"{r['anomalib']['zero_shot_s']:.2f}" for r in rounds) + " s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16-plus-240")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", nargs="+", help="default: CPU fp32 int8 auto (+ bf16 with native bf16); "
                   "CUDA fp32 fp16 bf16")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--guard-images", type=int, default=8, help="real-size images for the accuracy guard")
    p.add_argument("--throughput-batch", type=int, default=0, help="also time a batch of this size (GPU)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison (every precision, then "
                   "anomalib) this many times; speed-ups are taken within a round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--compare-anomalib", metavar="PYTHON", help="python of a venv with anomalib 2.7.0 + open_clip 2.24")
    p.add_argument("--app-rss", nargs="*", default=["auto"], metavar="PRECISION",
                   help="start app.py with these precisions and report its peak RSS (default auto; 'none', or the "
                   "flag alone, skips it)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="instead of the full benchmark: every precision and anomalib in long-lived processes taking "
                   "turns, one zero-shot query each per cycle, N cycles; speed-ups per cycle (drift cancels)")
    p.add_argument("--baseline", metavar="CHECKOUT",
                   help="with --paired: also serve each precision from another checkout of winclip (e.g. a git "
                   "worktree of the previous commit), taking turns with this one; prints this / baseline per cycle")
    p.add_argument("--worker", nargs=2, metavar=("PRECISION", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--serve", nargs=2, metavar=("PRECISION", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    configure_process(args.device)  # as the app and CLI do
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:  # child process: one precision, weights in DIR, row as JSON on the last line
        precision, out_dir = args.worker
        print(json.dumps(measure(args, precision, Path(out_dir) / "weights.pt", Path(out_dir))))
        return 0
    if args.serve:  # child process of --paired
        serve(args, args.serve[0], Path(args.serve[1]) / "weights.pt")
        return 0
    device = torch.device(args.device)
    from winclip.hardware import choose_runtime, cpu_info, describe_cpu

    if not args.precisions:
        args.precisions = (["fp32", "fp16", "bf16"] if device.type == "cuda" else
                           ["fp32", "int8", "auto"] + (["bf16"] if cpu_info().native_bf16 else []))

    cpu = describe_cpu()
    print(f"# {cpu}; auto would choose: {choose_runtime('auto', 'auto').reason}")
    print(f"# winclip latency: {args.model}, random weights, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU above'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; each precision in its own process")
    figures: dict = {"model": args.model, "device": str(device), "cpu": cpu, "threads": torch.get_num_threads(),
                     "runs": {}}

    from load_test import scratch_folder  # (the app-RSS run's server and client files go there too)

    with scratch_folder() as tmp:
        weights = Path(tmp) / "weights.pt"
        seed_model = WinClip.from_pretrained(args.model, pretrained=None, seed=0)
        torch.save(seed_model.backbone.model.state_dict(), weights)
        del seed_model
        if args.paired:
            figures["paired"] = paired(args, tmp)
            if args.json:
                Path(args.json).write_text(json.dumps(figures, indent=2))
            return 0
        rounds = []
        for index in range(args.rounds):
            if args.rounds > 1:
                print(f"## round {index + 1} of {args.rounds}", flush=True)
            rounds.append(one_round(args, tmp, weights, app_rss=args.app_rss if index == 0 else []))
    figures.update(rounds[0])
    if args.rounds > 1:
        figures["rounds"] = rounds
        summarise(rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
