"""ZeroGPU rules, checked with a stand-in `spaces` module: which handlers are wrapped, where the model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys, threading, types
records = {"wrapped": []}
spaces = types.ModuleType("spaces")
def GPU(duration=60):
    def wrap(fn):
        records["wrapped"].append([fn.__name__, duration])
        return fn
    return wrap
spaces.GPU = GPU
sys.modules["spaces"] = spaces
from winclip.service import DetectionService
original = DetectionService.load
def load(self):
    records["load_thread"] = threading.current_thread().name
    return original(self)
DetectionService.load = load
import app
demo, host = app.prepare(["--pretrained", "none"])
records["zero_gpu"] = app.on_zero_gpu()
print(json.dumps(records))
"""


def run_app_prepare(env_extra: dict) -> dict:
    code = SCRIPT
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WINCLIP_", "SPACES_"))}
    env.update({"WINCLIP_MODEL": TINY_CONFIG, "WINCLIP_DEVICE": "cpu", **env_extra})
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_zero_gpu_loads_in_the_main_thread_and_wraps_every_gpu_handler():
    rec = run_app_prepare({"SPACES_ZERO_GPU": "true"})
    assert rec["zero_gpu"] is True
    assert rec["load_thread"] == "MainThread"
    wrapped = dict(rec["wrapped"])
    assert set(wrapped) == {"detect", "explain", "inspect", "measure", "prewarm"} and all(seconds > 0 for seconds in wrapped.values())


def test_elsewhere_the_model_loads_in_the_background():
    rec = run_app_prepare({})
    assert rec["zero_gpu"] is False
    assert rec["load_thread"] == "winclip-load"
