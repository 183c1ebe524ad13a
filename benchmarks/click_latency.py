"""What a Detect click costs in the running app, end to end through its HTTP API (gradio_client), with
the real architecture and random weights (speed does not depend on their values).

    python benchmarks/click_latency.py                      # fp32 and int8, 4 references and a query of 900 px
    python benchmarks/click_latency.py --precisions fp32 --size 900 --repeats 5

Per precision, in a fresh app.py process: the first /detect (nothing cached: query and references are
encoded), then the same request again (everything cached: scoring, drawing, image encoding and transfer)
and with only the threshold moved. Prints client-side seconds (what the user waits), the server's own
detect time and where it went (from the verdict line: reading the images, waiting for other requests,
text prompts, encoding the query and the references, scoring, drawing), and the rest of the click
(upload, queue, output files and transfer: client minus server), with the CPU model and instruction set.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from winclip import WinClip  # noqa: E402
from winclip.hardware import describe_cpu  # noqa: E402
from winclip.synthetic import make_part  # noqa: E402


def server_time(verdict: str) -> tuple[float, dict[str, float]]:
    """(seconds, {stage: seconds}) from the verdict's 'This click took **X s** on the server: a 1.2 s, ...'."""
    match = re.search(r"This click took \*\*([\d.]+) s\*\* on the server(?:: (.*?))?\.(?:\s|$)", verdict)
    if not match:
        return float("nan"), {}
    parts = {name.strip(): float(sec) for name, sec in re.findall(r"([a-z0-9 ]+?) ([\d.]+) s", match.group(2) or "")}
    return float(match.group(1)), parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16-plus-240")
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    p.add_argument("--size", type=int, default=900, help="query and reference side in pixels")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from gradio_client import Client, handle_file

    from load_test import start_server

    print(f"# {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# app.py /detect via gradio_client: {args.model} (random weights), query + {args.shots} references of "
          f"{args.size} px; each precision in a fresh server; median of {args.repeats} for the repeats")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        weights = tmp_path / "weights.pt"
        torch.save(WinClip.from_pretrained(args.model, pretrained=None, seed=0).backbone.model.state_dict(), weights)
        query = tmp_path / "query.png"
        make_part(7, args.size, "scratch").image.save(query)
        refs = []
        for i in range(args.shots):
            refs.append(tmp_path / f"good{i}.png")
            make_part(i, args.size).image.save(refs[-1])
        for precision in args.precisions:
            server, url = start_server(args.model, str(weights), precision, timeout=300)
            try:
                client = Client(url, verbose=False)

                def click(threshold: float = 0.5) -> tuple[float, float, dict[str, float]]:
                    start = time.perf_counter()
                    while True:
                        try:
                            out = client.predict(handle_file(str(query)), [handle_file(str(r)) for r in refs],
                                                 "washer", "crack", 2, 3, True, threshold, api_name="/detect")
                            break
                        except Exception as exc:  # noqa: BLE001 - the model may still be loading
                            if "loading" not in str(exc).lower():
                                raise
                            time.sleep(1)
                    return (time.perf_counter() - start, *server_time(out[1]))

                first = click()
                repeats = [click() for _ in range(args.repeats)]
                moved = [click(0.3 + 0.1 * (i % 3)) for i in range(args.repeats)]
                med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
                for name, (client_s, server_s, parts) in (("first click", first),
                                                          ("same request again", repeats[len(repeats) // 2])):
                    where = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
                    print(f"{precision}: {name}: {client_s:.2f} s at the client = server {server_s:.2f} s ({where or '-'}) "
                          f"+ {client_s - server_s:.2f} s outside it (upload, queue, output files, transfer)", flush=True)
                print(f"{precision}: medians of {args.repeats}: same request again {med(repeats, 0):.2f} s (server "
                      f"{med(repeats, 1):.2f} s); threshold moved through the API {med(moved, 0):.2f} s (server "
                      f"{med(moved, 1):.2f} s; in the app a threshold move redraws without the model)", flush=True)
            finally:
                server.terminate()
                server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
