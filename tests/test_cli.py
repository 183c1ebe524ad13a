import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from winclip.synthetic import make_part

from conftest import TINY_CONFIG, tiny_detector

ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "winclip", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_part(9, 200, "spot").image.save(d / "q.png")
    for i in range(2):
        make_part(i, 200).image.save(d / f"n{i}.png")
    torch.save(tiny_detector(seed=2).backbone.model.state_dict(), d / "tiny.pt")
    return d


@pytest.mark.slow
def test_predict_few_shot_with_weights_file(files):
    r = run("predict", "--image", str(files / "q.png"), "--object", "washer", "--normal", str(files / "n0.png"),
            str(files / "n1.png"), "--defect", "spot", "--model", TINY_CONFIG, "--pretrained", str(files / "tiny.pt"),
            "--save-map", str(files / "map.png"), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert 0 <= result["score"] <= 1 and result["shots"] == 2
    with Image.open(files / "map.png") as im:
        assert im.height == 200 and im.width > 200  # overlay + colour bar


@pytest.mark.slow
def test_predict_text_output(files):
    r = run("predict", "--image", str(files / "q.png"), "--model", TINY_CONFIG, "--pretrained", "none")
    assert r.returncode == 0, r.stderr
    assert "anomaly score" in r.stdout and "zero-shot" in r.stdout
    assert "random weights" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pretrained", "/no/such/weights.pt"], "weights file not found"),
        (["--image", "/no/such.png"], "file not found"),
        (["--object", "x1y2z3 " * 28], "tokens"),
    ],
)
@pytest.mark.slow
def test_errors_are_one_clear_line(files, args, message):
    base = {"--image": str(files / "q.png"), "--model": TINY_CONFIG, "--pretrained": "none"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    r = run("predict", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
