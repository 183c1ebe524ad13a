"""Batch inspection on Ray Data: the rows of the single-process run, a two-node cluster, a killed worker, an
interrupted driver (tiny model, local Ray)."""

import csv
import json
import os
import shutil
import signal
import threading

import pytest

from winclip import cli
from winclip.distributed import RayOptions, RayStats, iter_inspection_on_ray, run_on_ray
from winclip.inputs import collect_inputs
from winclip.inspection import Summary, run_inspection
from winclip.synthetic import make_part

from conftest import TINY_CONFIG, tiny_detector

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray instances and clusters: seconds each

MODEL = ["--model", TINY_CONFIG, "--pretrained", "none", "--precision", "fp32"]


@pytest.fixture(autouse=True)
def _ray_down():
    yield
    ray.shutdown()


def parts(root, good: int, spot: int, size: int = 160):
    """root/good/*.png and root/spot/*.png; one image drawn per class, copied (decoding is what costs)."""
    for label, n, defect in (("good", good, "none"), ("spot", spot, "spot")):
        (root / label).mkdir(parents=True, exist_ok=True)
        first = root / label / "000.png"
        make_part(7 if defect == "none" else 41, size, defect).image.save(first)
        for i in range(1, n):
            shutil.copyfile(first, root / label / f"{i:03d}.png")
    return root


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    return {prefix: tree}


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def detector():
    det = tiny_detector()
    det.set_prompts("washer")
    return det


def test_cli_ray_rows_equal_the_single_process_rows(tmp_path, capsys):
    root = parts(tmp_path / "parts", 6, 4)
    make_part(3, 160).image.save(root / "good" / "extra.png")
    (root / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert cli.main(["inspect", "--images", str(root), "--out", str(tmp_path / "local"), "--json", *MODEL]) == 0
    local = json.loads(capsys.readouterr().out)
    assert cli.main(["inspect", "--images", str(root), "--out", str(tmp_path / "ray"), "--json", "--engine", "ray",
                     "--workers", "2", "--batch-size", "3", "--overlays", "--overlay-format", "png", *MODEL]) == 0
    distributed = json.loads(capsys.readouterr().out)
    a, b = read_csv(tmp_path / "local" / "results.csv"), read_csv(tmp_path / "ray" / "results.csv")
    assert [r["file"] for r in a] == [r["file"] for r in b] and len(a) == 12  # every file once, same order
    for x, y in zip(a, b):
        assert (x["status"], x["verdict"], x["error"], x["label"]) == (y["status"], y["verdict"], y["error"], y["label"])
        if x["score"]:
            assert abs(float(x["score"]) - float(y["score"])) <= 1e-6
    assert local["counts"] == distributed["counts"]
    assert flat(local["metrics"]) == pytest.approx(flat(distributed["metrics"]), abs=1e-6)
    assert distributed["settings"]["engine"]["name"] == "ray"
    assert (tmp_path / "ray" / "report.html").is_file()
    overlays = sorted(f.name for f in (tmp_path / "ray" / "overlays").iterdir())  # written by the actors, as asked
    assert len(overlays) == 11 and all(name.endswith(".png") for name in overlays)
    assert "--engine" in cli.build_parser()._subparsers._group_actions[0].choices["inspect"].format_help()


def test_two_node_cluster_scores_on_both_nodes(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head schedules, workers score
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        root = parts(tmp_path / "parts", 40, 24)
        inputs = collect_inputs([root], tmp_path / "w")
        det = detector()
        stats = RayStats()
        # both actors up before any batch goes out: Ray Data starts with the first one ready, and with another
        # test process beside this one (``-n 2``) the first actor scored all 64 rows before the second was up
        context = ray.data.DataContext.get_current()
        monkeypatch.setattr(context, "wait_for_min_actors_s", 120)
        summary, rows = run_on_ray(det, inputs, tmp_path / "out", prototypes=det.prototypes, stats=stats,
                                   ray_options=RayOptions(workers=2, batch_size=4))
        assert len(rows) == 64 and len({r.file for r in rows}) == 64
        assert len(stats.nodes) == 2 and all(n > 0 for n in stats.nodes.values()), stats.nodes
        assert summary.settings["engine"]["rows_per_node"] == dict(stats.nodes)
        assert "image" in summary.metrics  # labelled metrics over the whole set
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_killed_worker_is_replaced_and_every_file_keeps_one_row(tmp_path):
    root = parts(tmp_path / "parts", 60, 36, size=1200)  # large files: decoding keeps the worker busy
    inputs = collect_inputs([root], tmp_path / "w")
    det = detector()
    expected = {r.file: r.score for r in run_inspection(det, inputs, tmp_path / "local", det.prototypes, None,
                                                        0.5, 2)[1]}
    stats = RayStats()
    run = iter_inspection_on_ray(det, inputs, tmp_path / "out", prototypes=det.prototypes, threshold=0.5,
                                 stats=stats, ray_options=RayOptions(workers=1, batch_size=2))
    rows = [next(run)]
    (victim,) = {pid for _, pid in stats.rows}
    os.kill(victim, signal.SIGKILL)  # mid-run: most batches are still queued or in flight on this worker
    rest = list(run)
    assert isinstance(rest[-1], Summary)
    rows += rest[:-1]
    files = [r.file for r in rows]
    assert len(files) == len(set(files)) == len(inputs.items) == 96  # exactly one row per file
    assert all(abs(r.score - expected[r.file]) <= 1e-6 for r in rows)
    pids = {pid for _, pid in stats.rows}
    assert victim in pids and len(pids) == 2, pids  # a restarted worker scored the retried batches
    assert len(read_csv(tmp_path / "out" / "results.csv")) == 96


def test_an_interrupted_driver_keeps_the_rows_so_far(tmp_path):
    root = parts(tmp_path / "parts", 20, 12)
    inputs = collect_inputs([root], tmp_path / "w")
    det = detector()
    run = iter_inspection_on_ray(det, inputs, tmp_path / "out", prototypes=det.prototypes,
                                 ray_options=RayOptions(workers=1, batch_size=2))
    rows = [next(run) for _ in range(5)]
    run.close()  # what Ctrl-C does to the driver's loop
    # none of the run's Ray Data threads is left to call into Ray after a ray.shutdown(), which ends the
    # process at once with status 1, printing nothing
    left = [t.name for t in threading.enumerate() if t.name == "iter_threaded" or type(t).__name__ == "StreamingExecutor"]
    assert left == [], left
    written = read_csv(tmp_path / "out" / "results.csv")
    assert [r["file"] for r in written] == [r.file for r in rows]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_whole_set_methods_are_refused_with_the_reason(tmp_path, capsys):
    root = parts(tmp_path / "parts", 4, 2)
    assert cli.main(["inspect", "--images", str(root), "--out", str(tmp_path / "o"), "--engine", "ray",
                     "--method", "musc", *MODEL]) == 2
    assert "cannot be split across Ray workers" in capsys.readouterr().err
