"""The package installs as a wheel and runs from any directory, prompt data included."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from winclip.prompting import default_lists, prompt_data
from winclip.synthetic import make_part

from conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # subprocesses and servers: seconds each


def test_prompt_data_is_package_data_and_the_top_level_folder_is_the_same_files():
    assert len(default_lists()["templates"]) == 22
    assert prompt_data("defect_words.json").is_file()
    top = ROOT / "prompts"
    assert top.resolve() == (ROOT / "winclip" / "prompts").resolve()  # one copy, not two


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "winclip", src / "winclip", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (built,) = out.glob("winclip-*.whl")
    return built


def test_wheel_holds_the_prompt_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("normal_states.txt", "anomalous_states.txt", "templates.txt", "defect_words.json"):
        assert f"winclip/prompts/{data}" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_wheel_runs_predict_from_another_directory(wheel, tmp_path):
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # the dependencies come from the interpreter running the tests (a venv's site-packages, which
    # --system-site-packages would skip for the base interpreter's); the wheel installs into the new venv
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    make_part(4, 160, "crack").image.save(work / "q.png")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("WINCLIP_")}
    where = subprocess.run([str(python), "-c", "import winclip; print(winclip.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert str(venv) in where.stdout, (where.stdout, where.stderr)  # the installed copy, not the checkout
    for command in ([str(venv / "bin" / "winclip")], [str(python), "-m", "winclip"]):
        r = subprocess.run([*command, "predict", "--image", "q.png", "--object", "washer", "--model", TINY_CONFIG,
                            "--pretrained", "none", "--json"], cwd=work, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert 0.0 <= json.loads(r.stdout.splitlines()[-1])["score"] <= 1.0
