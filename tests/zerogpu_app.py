"""Start app.py as a ZeroGPU Space would (``SPACES_ZERO_GPU=1``, the real ``spaces`` package), on a
machine without a GPU (see zerogpu_stub.py), and report what ZeroGPU packed for the GPU.

    python tests/zerogpu_app.py PORT REPORT.json [app.py arguments]
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import spaces  # noqa: E402,F401 - before torch initialises anything, as on a Space

from zerogpu_stub import install_cpu_shim  # noqa: E402

install_cpu_shim()

import app  # noqa: E402
from spaces.zero.torch import patching  # noqa: E402

from winclip.loading import misplaced  # noqa: E402


def main() -> None:
    port, report = int(sys.argv[1]), Path(sys.argv[2])
    demo, _ = app.prepare(sys.argv[3:])
    service = app_service(demo)
    model = service.detector.backbone.model if service.detector is not None else None
    file_bytes = None
    if model is not None:
        file_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size=app.MAX_FILE_SIZE, css=app.CSS)  # ZeroGPU packs the "cuda" tensors here, before serving
    packed = sum(pack.total_size for pack in patching.tensor_packs)
    report.write_text(json.dumps({
        "error": service.error, "zero_gpu": app.on_zero_gpu(), "packed_bytes": packed,
        "model_bytes": file_bytes, "packed_tensors": len(patching.cuda_aliases),
        "device": str(service.detector.backbone.device) if model is not None else None,
        "misplaced": misplaced(model, "cuda") if model is not None else None,
        "examples_prepared": bool(service.preparing or service.prepared),  # not on ZeroGPU: it would spend quota
    }))
    while True:
        time.sleep(3600)


def app_service(demo):
    return demo.winclip_service


if __name__ == "__main__":
    main()
