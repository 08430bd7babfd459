"""The speed commands run end to end on tiny phantoms (their figures are for docs/studies/speed, not
asserted)."""

import csv
import json
import sys

import pytest
from conftest import run

from common.timing import default_threads


def test_bench_data_compares_every_pipeline(tmp_path, env):
    p = run(
        [
            sys.executable,
            "-m",
            "tools.bench",
            "data",
            "--synthetic",
            "--phantoms",
            "2",
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--batches",
            "3",
            "--workers",
            "0",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "data.csv")))
    assert [(r["pipeline"], r["workers"]) for r in rows] == [
        ("decode", "0"),
        ("decode", "1"),
        ("cached", "0"),
        ("cached", "1"),
        ("device", "0"),
    ]
    assert float(rows[0]["vs_decode_0"]) == 1.0 and all(float(r["images_per_s"]) > 0 for r in rows)


@pytest.mark.slow
def test_bench_step_reports_the_loop_against_bare_compute(tmp_path, env):
    p = run(
        [
            sys.executable,
            "-m",
            "tools.bench",
            "step",
            "--synthetic",
            "--phantoms",
            "3",
            "--image-size",
            "64",
            "--width",
            "0.125",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--batches",
            "2",
            "--models",
            "segnet",
            "--pipelines",
            "cached",
            "--output-dir",
            str(tmp_path),
        ],
        env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (row,) = csv.DictReader(open(tmp_path / "step.csv"))
    assert float(row["efficiency"]) == float(row["images_per_s"]) / float(row["bare_images_per_s"])
    assert float(row["gflops_per_image"]) > 0


@pytest.mark.slow
def test_sweep_runs_the_grid_through_the_launcher_and_plots(tmp_path, env):
    p = run(
        [
            sys.executable,
            "-m",
            "tools.sweep",
            "unet",
            "--processes",
            "1",
            "2",
            "--workers",
            "0",
            "--pipelines",
            "cached",
            "--steps",
            "2",
            "--output-dir",
            str(tmp_path),
            "--",
            "--synthetic",
            "--image-size",
            "64",
            "--width",
            "0.125",
            "--batch-size",
            "4",
        ],
        env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep-unet.csv")))
    assert [int(r["processes"]) for r in rows] == [1, 2]
    assert [int(r["global_batch"]) for r in rows] == [4, 8]
    # automatic: the cores this process may use (one per pytest-xdist worker), shared out
    assert [int(r["threads"]) for r in rows] == [default_threads(1), default_threads(2)]
    summary = json.loads((tmp_path / "runs" / "unet-p2-cached-w0-no-t0" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["best_val"] is None  # --no-eval
    p = run(
        [
            sys.executable,
            "-m",
            "tools.results",
            "--sweep",
            str(tmp_path / "sweep-unet.csv"),
            "--output-dir",
            str(tmp_path / "fig"),
        ],
        env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("sweep-time-unet.png", "sweep-breakdown.png", "sweep-scaling.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 0


@pytest.mark.slow
def test_the_gpu_command_runs_end_to_end_on_a_cpu(tmp_path, env):
    """What a lent GPU runs once (suite, then training in the time left), at a tiny size."""
    p = run(
        [
            sys.executable,
            "-m",
            "tools.bench",
            "gpu",
            "--synthetic",
            "--phantoms",
            "3",
            "--image-size",
            "64",
            "--width",
            "0.125",
            "--train-width",
            "0.125",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--batches",
            "2",
            "--models",
            "unet",
            "--compile-models",
            "--budget",
            "45",  # all of it kept for the end (tools.bench: 45 s): the training run's one epoch
            "--output-dir",
            str(tmp_path),
        ],
        env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "suite.csv")))
    assert [r["setting"] for r in rows] == [
        "bare fp32",
        "bare bf16+cl",
        "fp32 decode",
        "fp32 device",
        "bf16+cl device",
    ]
    summary = json.loads((tmp_path / "unet-train" / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["channels_last"] and summary["test"] is not None
    for name in ("suite.md", "results.md", "curves-unet.png", "suite-speedup.png"):
        assert (tmp_path / name).exists()
