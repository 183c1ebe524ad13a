"""Load and soak tests of app.py on loopback (bounded in count and time; nothing leaves this machine).

    python benchmarks/load_test.py load                # 100 /detect requests from 8 concurrent clients
    python benchmarks/load_test.py soak                # 200 sequential requests, server RSS growth
    python benchmarks/load_test.py load --requests 96 --bursts 3 --size 900 --same-query   # RSS per burst
    python benchmarks/load_test.py load --requests 50 --clients 4 --model ViT-B-16-plus-240 --pretrained W.bin
    python benchmarks/load_test.py click-during-batch --model ViT-B-16-plus-240 --precision int8 --size 1024

By default the server runs the tiny test model (tests/assets/winclip-tiny.json, random weights), so the
figures measure the server (queueing, uploads, caching, leaks), not the network. Each request uses a
fresh synthetic query (so no feature-cache hits) and 2 of 4 reference images. ``click-during-batch``
times one Detect click alone and then made 8 s into a Batch run of 24 images (``--size`` px), with what
the click's verdict says it waited for.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from winclip.synthetic import make_part  # noqa: E402

TINY = str(ROOT / "tests" / "assets" / "winclip-tiny.json")


@contextlib.contextmanager
def scratch_folder():
    """The run's temporary folder, which also takes what Gradio leaves behind: the servers' caches
    (GRADIO_TEMP_DIR, inherited by ``start_server``) and gradio_client's downloads and the empty folder it
    makes in the temp folder per downloaded file (thousands per load run), and the servers' own temporary
    files (TMPDIR). All removed at the end, once a stopped server's helper processes have stopped writing
    there (seen when a server was stopped during auto's precision check)."""
    tmp = tempfile.mkdtemp(prefix="winclip-bench-")
    try:
        with mock.patch.object(tempfile, "tempdir", tmp), \
                mock.patch.dict(os.environ, TMPDIR=tmp, GRADIO_TEMP_DIR=str(Path(tmp) / "gradio")):
            yield Path(tmp)
    finally:
        for _ in range(100):
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(tmp):
                break
            time.sleep(0.2)


def client(url: str):
    """A gradio_client Client that downloads into GRADIO_TEMP_DIR as it is now (see ``scratch_folder``)."""
    from gradio_client import Client

    folder = os.environ.get("GRADIO_TEMP_DIR")
    return Client(url, verbose=False, **({"download_files": folder} if folder else {}))


def proc_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory field of /proc/PID/status (VmRSS now, VmHWM peak) in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) / 1024


def detect_when_loaded(client, query: Path, references: list[Path], timeout: float = 600):
    """/detect, retried while the app answers that the model is still loading (it loads in the background)."""
    from gradio_client import handle_file

    deadline = time.time() + timeout
    while True:
        try:
            return client.predict(handle_file(str(query)), [handle_file(str(p)) for p in references], "bottle",
                                  "crack", api_name="/detect")
        except Exception as exc:  # noqa: BLE001 - "still loading" answers until the model is up
            if "loading" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)


def start_server(model: str, pretrained: str, precision: str, timeout: float, **extra_env: str):
    """app.py on a free loopback port (``extra_env`` added to its environment); (process, url) once it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, WINCLIP_MODEL=model, WINCLIP_PRETRAINED=pretrained, WINCLIP_PRECISION=precision,
               GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", **extra_env)
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while True:
        try:
            client(url)
            return server, url
        except Exception:  # noqa: BLE001 - not up yet; bounded by the deadline
            if time.time() > deadline or server.poll() is not None:
                server.terminate()
                raise SystemExit("app.py did not start") from None
            time.sleep(0.5)


def percentiles(values: list[float]) -> str:
    if not values:
        return "no successful requests"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return (f"p50 {q[49] * 1000:.0f} ms, p90 {q[89] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms")


def click_during_batch(args: argparse.Namespace) -> int:
    """One Detect click alone (the query's features cached: the second of two), then the same click made 8 s
    into a Batch run of 24 images: how long it took, and what its verdict says it waited for."""
    from gradio_client import handle_file

    from winclip.hardware import describe_cpu

    with scratch_folder() as tmp:
        files = []
        for i in range(24):
            files.append(Path(tmp) / f"part{i:02d}.png")
            make_part(i, args.size, ("none", "crack", "spot", "scratch")[i % 4]).image.save(files[-1])
        query = files[0]
        server, url = start_server(args.model, args.pretrained, args.precision, timeout=600)
        try:
            detect_when_loaded(client(url), query, [])
            c = client(url)

            def click() -> tuple[float, str]:
                t0 = time.perf_counter()
                verdict = c.predict(handle_file(str(query)), [], "washer", "", api_name="/detect")[1]
                return time.perf_counter() - t0, verdict.split("This click took", 1)[-1].strip()

            click()  # the prompts for "washer" encoded
            alone, said_alone = click()
            start = time.perf_counter()
            job = client(url).submit([handle_file(str(f)) for f in files], [], "washer", "", api_name="/inspect")
            time.sleep(8)
            during, said = click()
            running = not job.done()
            job.result()
            total = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"# {describe_cpu()}; {args.model} ({args.precision}), Batch of 24 images of {args.size} px")
    print(f"click alone: {alone:.2f} s (took {said_alone})")
    print(f"click 8 s into the batch: {during:.2f} s, batch still running then: {running} (took {said})")
    print(f"batch: {total:.1f} s from its upload to its last row")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("load", "soak", "click-during-batch"))
    p.add_argument("--requests", type=int, help="default: 100 (load), 200 (soak)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (load)")
    p.add_argument("--model", default=TINY)
    p.add_argument("--pretrained", default="none")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--size", type=int, default=480, help="query side in pixels")
    p.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    p.add_argument("--bursts", type=int, default=1, help="send --requests this many times, RSS after each")
    p.add_argument("--same-query", action="store_true", help="one query and one reference for every request")
    args = p.parse_args()
    if args.mode == "click-during-batch":
        return click_during_batch(args)
    n_requests = args.requests or (100 if args.mode == "load" else 200)
    clients = args.clients if args.mode == "load" else 1

    from gradio_client import handle_file

    with scratch_folder() as tmp:
        refs = []
        for i in range(4):
            refs.append(Path(tmp) / f"good{i}.png")
            make_part(i, args.size).image.save(refs[-1])
        queries = []
        for i in range(min(n_requests, 50)):  # distinct queries, reused cyclically beyond 50
            queries.append(Path(tmp) / f"q{i}.png")
            make_part(1000 + i, args.size, ("scratch", "spot", "crack", "none")[i % 4]).image.save(queries[-1])
        server, url = start_server(args.model, args.pretrained, args.precision, timeout=600)
        try:
            detect_when_loaded(client(url), queries[0], [])
            rss_start = proc_mb(server.pid)
            latencies, failures, lock, images = [], [], threading.Lock(), [0]
            start = time.perf_counter()
            local = threading.local()

            def one(i: int) -> None:
                if time.perf_counter() - start > args.max_seconds:
                    with lock:
                        failures.append("not sent: time limit")
                    return
                if not hasattr(local, "client"):
                    local.client = client(url)
                t0 = time.perf_counter()
                try:
                    label, _, heat, mask, gallery = local.client.predict(
                        handle_file(str(queries[i % len(queries)])),
                        [handle_file(str(r)) for r in dict.fromkeys([refs[i % len(refs)], refs[(i + 1) % len(refs)]])],
                        "washer", "crack", api_name="/detect")
                    assert 0.0 <= label["confidences"][0]["confidence"] <= 1.0
                    elapsed = time.perf_counter() - t0
                    for path in [heat, mask, *(g["image"] for g in gallery)]:  # every image complete and decodable
                        with Image.open(path) as im:
                            im.load()
                    with lock:
                        latencies.append(elapsed)
                        images[0] += 2 + len(gallery)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        failures.append(f"{type(exc).__name__}: {str(exc)[:120]}")

            if args.same_query:
                queries[:] = queries[:1]
                refs[:] = refs[:1]
            rss_bursts = []
            for _ in range(args.bursts):
                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(one, range(n_requests)))
                rss_bursts.append(proc_mb(server.pid))
            wall = time.perf_counter() - start
            rss_end = rss_bursts[-1]
        finally:
            server.terminate()
            server.wait(timeout=30)
    n_requests *= args.bursts
    print(f"{args.mode}: {len(latencies)}/{n_requests} served, {len(failures)} failed, {clients} clients, "
          f"{wall:.1f} s wall, {len(latencies) / wall:.2f} req/s")
    print(f"latency (client side, incl. upload and queueing): {percentiles(latencies)}; {images[0]} result images "
          "downloaded, each decoded in full")
    print(f"server RSS: {rss_start:.0f} MB after warm-up -> {rss_end:.0f} MB at the end "
          f"(growth {rss_end - rss_start:+.0f} MB)")
    if args.bursts > 1:
        steps = [b - a for a, b in zip([rss_start] + rss_bursts[:-1], rss_bursts)]
        print("server RSS after each burst: " + " -> ".join(f"{v:.0f}" for v in [rss_start] + rss_bursts)
              + " MB (per burst " + ", ".join(f"{d:+.0f}" for d in steps) + ")")
    for reason in sorted(set(failures))[:10]:
        print(f"  failure: {reason} (x{failures.count(reason)})")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
