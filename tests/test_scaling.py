"""The scaling model: its terms behave as its equations say, its calibration holds on the cells it
was fitted on, and the command writes a row per cell."""

import csv
import sys

import pytest
from conftest import ROOT, run, script_module

scaling = script_module(ROOT / "docs" / "studies" / "scaling" / "scaling.py")
Link, Setup = scaling.Link, scaling.Setup

LINK = Link("test", bandwidth=10e9, latency=1e-5)


def setup(**kw):
    """A rank with nothing but what the test sets, on 4 cores."""
    base = dict(gpu_s=0.01, cpu_s=0.0, data_s=0.0, worker_data_s=0.0, grad_bytes=100e6, link=LINK)
    return Setup(**{**base, "cores": 4, "threads": 1, "contention": 1.0, **kw})


def test_allreduce_is_the_ring_formula_and_free_on_one_gpu():
    assert scaling.allreduce_s(1, 100e6, LINK) == 0
    assert scaling.unhidden_allreduce_s(1, 100e6, LINK, backward_s=0) == 0
    for n in (2, 3, 4):
        assert scaling.allreduce_s(n, 100e6, LINK) == pytest.approx(
            2 * (n - 1) / n * 100e6 / 10e9 + 2 * (n - 1) * 1e-5
        )
    fast = Link("fast", bandwidth=20e9, latency=1e-5)
    assert scaling.allreduce_s(4, 100e6, fast) - 6e-5 == pytest.approx(
        (scaling.allreduce_s(4, 100e6, LINK) - 6e-5) / 2
    )


def test_a_long_backward_hides_all_but_the_last_bucket():
    total = scaling.allreduce_s(4, 100e6, LINK)
    buckets = -(-100e6 // scaling.DDP_BUCKET_BYTES)
    last = scaling.allreduce_s(4, 100e6 / buckets, LINK)
    assert scaling.unhidden_allreduce_s(4, 100e6, LINK, backward_s=10.0) == pytest.approx(last)
    assert scaling.unhidden_allreduce_s(4, 100e6, LINK, backward_s=0.0) == pytest.approx(
        total + 2 * 3 * 1e-5 * (buckets - 1)
    )


def test_a_step_is_data_bound_when_the_workers_supply_less_than_the_gpu_consumes():
    slow = setup(gpu_s=0.01, worker_data_s=0.05, cores=16)
    one = scaling.step_s(slow, 1, 1)
    assert one["bound"] == "data" and one["step_s"] == pytest.approx(0.05)
    assert scaling.step_s(slow, 1, 8)["bound"] == "compute"
    assert scaling.step_s(slow, 1, 8)["step_s"] == pytest.approx(0.01)
    few_cores = setup(gpu_s=0.01, worker_data_s=0.05, cores=4)  # 8 workers per rank, 1 core each
    assert scaling.step_s(few_cores, 4, 8)["bound"] == "data"


def test_without_workers_the_data_is_on_the_critical_path():
    s = setup(gpu_s=0.01, cpu_s=0.02, data_s=0.03)
    assert scaling.step_s(s, 1, 0)["step_s"] == pytest.approx(0.06)


def test_cpu_work_stretches_only_once_threads_outnumber_cores():
    s = setup(
        gpu_s=0.01, cpu_s=0.02, data_s=0.03, threads=2, cores=4, contention=1.5, link=Link("x", 1e30, 0)
    )
    assert scaling.step_s(s, 2, 0)["stretch"] == 1  # 2 ranks x 2 threads on 4 cores
    assert scaling.step_s(s, 4, 0)["stretch"] == pytest.approx(1 + 1.5 * (8 / 4 - 1))
    assert scaling.step_s(s, 4, 0)["step_s"] == pytest.approx(0.01 + 2.5 * 0.05)


def test_fixed_costs_split_validation_but_not_the_checkpoint_or_worker_starts():
    s = setup(val_s=4.0, checkpoint_s=1.0, worker_start_s=0.5)
    e = scaling.epoch_s(s, 4, 8, 640)
    assert e["fixed_s"] == pytest.approx(4.0 / 4 + 1.0 + 8 * 0.5)
    assert e["steps"] == 10 and e["epoch_s"] == pytest.approx(10 * e["step_s"] + e["fixed_s"])


def test_the_calibration_reproduces_the_one_gpu_cells_it_was_fitted_on():
    args = scaling.parser().parse_args([])
    rows = scaling.original_rows(scaling.fit_original(args), args)
    fitted = [r for r in rows if r["fitted"]]
    assert len(fitted) == 9 and all(abs(r["error_pct"]) < 5 for r in fitted), fitted


def test_the_command_writes_a_row_per_cell_and_the_plot(tmp_path, capsys):
    assert scaling.main(["--output-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    original = [r for r in rows if r["study"] == "original"]
    cells = {(m, w, n) for m, row in scaling.ORIGINAL_S.items() for w in row for n in (1, 2, 3, 4)}
    assert (
        len(original) == 36 and {(r["model"], int(r["workers"]), int(r["gpus"])) for r in original} == cells
    )
    h200 = [r for r in rows if r["study"] == "h200"]
    assert len(h200) == 3 * len(scaling.PIPELINES) * 2 * 4
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "Median absolute error" in capsys.readouterr().out


@pytest.mark.parametrize("flag", [["--no-such-flag"], ["--contention", "-1"], ["--node-cores", "x"]])
def test_a_bad_flag_is_one_error_line(flag, env):
    p = run([sys.executable, "docs/studies/scaling/scaling.py", *flag], env)
    assert p.returncode == 2 and p.stderr.startswith("error:"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
