"""A small local server that speaks the Hugging Face Hub's file-download protocol (loopback only).

huggingface_hub's own client (``hf_hub_download``) talks to it through ``HF_ENDPOINT`` /
``huggingface_hub.constants.ENDPOINT``: HEAD ``/{repo}/resolve/{revision}/{file}`` answers the commit,
ETag and size; GET answers the bytes. ``mode`` makes it misbehave: "404" (no such file), "500",
"slow" (waits ``delay`` seconds before answering), "truncated" (sends half the announced bytes).
"""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    def __init__(self, files: dict[tuple[str, str], bytes]) -> None:
        self.files = dict(files)
        self.mode = "ok"
        self.delay = 0.0
        self.requests: list[tuple[str, str]] = []  # (method, path)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _lookup(self):
                path = unquote(self.path.split("?")[0]).lstrip("/")
                if "/resolve/" not in path:
                    return None
                repo, rest = path.split("/resolve/", 1)
                _revision, _, filename = rest.partition("/")
                return hub.files.get((repo, filename))

            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                if hub.mode == "slow":
                    time.sleep(hub.delay)
                if hub.mode == "500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = self._lookup()
                if data is None or hub.mode == "404":
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Error-Message", "Entry not found")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    sent = data[: len(data) // 2] if hub.mode == "truncated" else data
                    self.wfile.write(sent)
                    if hub.mode == "truncated":
                        self.close_connection = True

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
