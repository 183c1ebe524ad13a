"""ZeroGPU on a machine without a GPU: the real `spaces` package, a loopback stand-in for its device API,
and a CPU shim for the two things only a GPU can do (CUDA initialisation, the host-to-device copy).

Everything else is ZeroGPU's own code: its fake-CUDA mode in the main process (tensors moved to "cuda"
are recorded, then packed to disk at launch), the fork of a worker per GPU call, the pickling of
arguments and results through its queues, and its quota messages. The shim is installed in the main
process before the app is built; it acts only inside a worker, where ZeroGPU would initialise CUDA.

Device API (``SPACES_ZERO_DEVICE_API_URL``, see ``spaces.zero.api``): POST /startup-report, /schedule
(a GPU, or 429 with the quota left), /allow, /release. ``DeviceApi.left`` is the visitor's quota in
seconds (None: unlimited); every requested duration is recorded.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class DeviceApi:
    def __init__(self, left: float | None = None, wait_seconds: int = 3600) -> None:
        self.left = left
        self.wait_seconds = wait_seconds
        self.durations: list[int] = []  # durationSeconds of every /schedule
        self.refused: list[int] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/schedule":
                    duration = int(query.get("durationSeconds", 60))
                    api.durations.append(duration)
                    if api.left is not None and duration > api.left:
                        api.refused.append(duration)
                        auth = {"X-Authenticated": "regular"} if "token" in query else {}
                        self._json(429, {"left": int(api.left), "wait": api.wait_seconds},
                                   {**auth, "X-Approve-Result": "quota-exceeded"})
                        return
                    self._json(200, {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-emulated",
                                     "allowToken": uuid.uuid4().hex})
                    return
                self._json(200, {})  # /startup-report, /allow, /release

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "DeviceApi":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def visitor_token(user: str = "visitor") -> str:
    """An X-IP-Token as a logged-in visitor's browser sends it (ZeroGPU reads its payload only)."""
    payload = base64.urlsafe_b64encode(json.dumps({"user": user}).encode()).decode().rstrip("=")
    return f"e30.{payload}.sig"


class _CudaOnCpu:
    """``torch`` as ZeroGPU's packing module sees it in a worker: tensors asked for on "cuda" stay on the CPU."""

    def __init__(self, real) -> None:
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def tensor(self, *args, device=None, **kwargs):
        return self._real.tensor(*args, **kwargs)

    def empty(self, *args, device=None, **kwargs):
        return self._real.empty(*args, **kwargs)


def install_cpu_shim() -> None:
    """Replace ZeroGPU's CUDA initialisation in its workers by one that keeps the weights on the CPU:
    the host-to-device copy becomes a CPU copy. Call after ``import spaces`` with SPACES_ZERO_GPU set."""
    import torch

    import spaces.zero.torch as zero_torch
    from spaces.zero.torch import packing

    def page_aligned(tensor, *args, **kwargs):  # pinned memory is page-aligned; ZeroGPU reads into it with O_DIRECT
        if not tensor.is_contiguous():
            return tensor
        size = tensor.numel() * tensor.element_size()
        raw = torch.empty(size + 4096, dtype=torch.uint8)
        offset = (-raw.data_ptr()) % 4096
        out = raw[offset : offset + size].view(tensor.dtype).view(tensor.shape)
        return out.copy_(tensor)

    def init(nvidia_uuid: str) -> None:  # runs in the forked worker only
        os.environ["CUDA_VISIBLE_DEVICES"] = nvidia_uuid
        torch.Tensor.cuda = lambda self, *args, **kwargs: self.clone()  # the host-to-device copy
        torch.Tensor.pin_memory = page_aligned
        torch.cuda.synchronize = lambda *args, **kwargs: None
        packing.torch = _CudaOnCpu(torch)
        os.environ["WINCLIP_ZEROGPU_WORKER"] = str(os.getpid())

    zero_torch.init = init
