"""The recipe options of docs/studies/native-scoring: foreground-weighted epochs, per-volume
normalisation, the brain crop, post-processing chosen on validation patients, and a time budget for
the schedule."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run, train

from common import data, metrics
from common.cache import volume_stats
from common.loop import RunState, make_schedule, plan_budget


def test_tumour_share_draws_that_share_and_the_same_draws_for_an_epoch():
    tumour = np.array([0] * 90 + [5] * 10)
    sampler = data.TumourShare(tumour, 0.5, seed=0)
    sampler.set_epoch(3)
    first, again = list(sampler), list(sampler)
    sampler.set_epoch(4)
    assert first == again and first != list(sampler) and len(first) == 100
    share = np.mean([tumour[i] > 0 for e in range(20) for i in (sampler.set_epoch(e) or sampler)])
    assert 0.45 < share < 0.55  # of 2,000 draws; the data hold 10 % tumour slices


def test_tumour_share_needs_both_kinds_of_slice():
    with pytest.raises(data.UserError, match="--tumour-share"):
        data.TumourShare(np.zeros(5), 0.5, seed=0)


def test_volume_normalisation_keeps_the_contrast_between_slices_of_a_patient():
    rng = np.random.default_rng(0)
    bright = rng.integers(100, 200, (2, 8, 8, 3)).astype(np.uint8)
    images = np.concatenate([bright, bright // 4])  # one patient: two bright slices, two dark
    slices = [SimpleNamespace(patient="a")] * 4
    stats = volume_stats(slices, images)
    assert np.allclose(stats, stats[0])  # one row per patient, repeated
    x, _ = data.to_inputs(torch.from_numpy(images), torch.zeros(4, 8, 8, dtype=torch.uint8))
    v, _ = data.to_inputs(
        torch.from_numpy(images), torch.zeros(4, 8, 8, dtype=torch.uint8), stats=torch.from_numpy(stats)
    )
    assert abs(x[0].mean() - x[2].mean()) < 1e-4  # per slice: the dark slices look like the bright
    assert v[0].mean() > v[2].mean() + 0.5  # per volume: they stay dark
    assert abs(float(v.mean())) < 0.5 and torch.isfinite(v).all()


def test_the_brain_crop_is_one_square_around_the_flair_signal():
    images = np.zeros((3, 64, 48, 3), np.uint8)
    images[1, 10:30, 5:15, 1] = 200  # FLAIR signal in one slice, 20 x 10
    images[2, 20:40, 20:25, 1] = 100
    top, left, bottom, right = data.brain_box(list(images))
    assert bottom - top == right - left == 30  # rows 10..40, widened from columns 5..25
    assert top == 10 and left == 0
    assert data.brain_box([np.zeros((8, 8, 3), np.uint8)]) is None  # no signal: the whole slice
    cut = data.cut(np.ones((4, 4), np.uint8), (-1, -1, 3, 3))
    assert cut.shape == (4, 4) and cut[0].sum() == 0 and cut[1:, 1:].all()  # zero beyond the slice


def test_postprocessing_is_chosen_on_validation_and_simpler_wins_ties():
    rows = [{"dice": 0.5, "dice_lcc": 0.7, "dice_min8": 0.6, "dice_min32": 0.6, "dice_min128": 0.4}]
    assert metrics.choose_postprocess(rows) == "lcc"
    same = [{k: 0.5 for k in ("dice", "dice_lcc", "dice_min8", "dice_min32", "dice_min128")}]
    assert metrics.choose_postprocess(same) == "none"
    volume = np.zeros((3, 8, 8), bool)
    volume[0, :3, :3], volume[2, 6, 6] = True, True  # 9 voxels and 1
    kept = metrics.postprocessed(volume)
    assert kept["min8"].sum() == 9 and kept["lcc"].sum() == 9 and kept["min32"].sum() == 0


def test_a_budget_plans_the_epochs_that_fit_and_the_cosine_ends_there():
    state, args = RunState(), SimpleNamespace(schedule="cosine", epochs=50, warmup=0.0, budget=100.0)
    run = SimpleNamespace(state=state, args=args, main=False, accelerator=SimpleNamespace(num_processes=1))
    state.epoch = 1
    plan_budget(run, elapsed=30.0, epoch_s=20.0)  # 70 s left: 3 more epochs
    assert state.planned_epochs == 4
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = make_schedule(args, opt, steps_per_epoch=10, state=state)
    factors = [schedule.lr_lambdas[0](step) for step in (0, 20, 39, 40)]
    assert factors[0] == 1.0 and 0 < factors[2] < 0.01 and factors[3] == 0.0


@pytest.mark.slow
def test_a_run_with_every_option_is_scored_natively_and_evaluates_again_the_same(phantoms, tmp_path, env):
    out = tmp_path / "run"
    options = ["--tumour-share", "0.5", "--normalize", "volume", "--crop", "brain", "--budget", "600"]
    train("unet", "--data-dir", str(phantoms), *TINY, *options, "--output-dir", str(out), env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["scored_at"] == "native" and summary["postprocess"] in metrics.POSTPROCESS
    assert summary["normalize"] == "volume" and summary["crop"] == "brain"
    again = tmp_path / "eval"
    evaluate = ["--eval-only", "--checkpoint", str(out), "--data-dir", str(phantoms)]
    train("unet", *evaluate, "--output-dir", str(again), env=env)
    test = json.loads((again / "eval.json").read_text())["test"]
    assert test["dice"] == pytest.approx(summary["test"]["dice"], abs=1e-9)
    assert test["postprocess"] == summary["postprocess"]
    assert (out / "log.txt").read_text().count("test") >= 1


def test_the_cpu_preset_samples_tumour_and_older_runs_resume_without(tmp_path):
    from common import cli, rundir

    parser = cli.make_parser(Path("unet/train.py"), "U-Net")
    args = cli.parse(parser, ["--data-dir", str(tmp_path), "--preset", "cpu"])
    assert (args.tumour_share, args.epochs) == (0.5, 12)
    old = tmp_path / "old"  # a run from before the flag: its args.json does not name it
    (old / "last").mkdir(parents=True)
    saved = {k: v for k, v in vars(args).items() if k not in ("tumour_share", "given", "resume")}
    (old / "args.json").write_text(json.dumps({**saved, "epochs": 20}, default=str))
    resumed = rundir.starting_point(cli.parse(parser, ["--resume", str(old), "--preset", "cpu"]))
    assert (resumed.tumour_share, resumed.epochs) == (0, 20)


def preset_flags_older_runs_lack():
    """(flag, a committed run's args.json without it) for each flag configs/cpu.toml sets to other
    than its default for that run's model."""
    from common import cli, registry

    records = sorted((ROOT / "docs").glob("**/args.json"))
    out = []
    for model in registry.names():
        parser = registry.script(model).parser()
        preset = cli.parse(parser, ["--synthetic", "--preset", "cpu"])
        for flag in sorted(k for k in vars(preset) if parser.get_default(k) != getattr(preset, k)):
            older = [r for r in records if json.loads(r.read_text()).get("model") == model]
            older = next((r for r in older if flag not in json.loads(r.read_text())), None)
            if older is not None:
                out.append((flag, older.relative_to(ROOT)))
    return out


@pytest.mark.parametrize("flag, older", preset_flags_older_runs_lack(), ids=str)
def test_a_run_from_before_a_preset_flag_resumes_as_it_trained(tmp_path, flag, older):
    """A run whose args.json predates a flag the preset now sets resumes with the value it trained
    with (the flag's default: what the code did before the flag), not the preset's, whether resumed
    by --resume or by the same command again (as the studies' runners do)."""
    from common import cli, registry, rundir

    data = tmp_path / "kaggle_3m"  # the run's data folder, here (a fresh clone has none)
    data.mkdir()
    saved = {**json.loads((ROOT / older).read_text()), "data_dir": str(data)}
    parser = registry.script(saved["model"]).parser()
    run = tmp_path / "old"
    (run / "last").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(saved))
    for argv in (["--resume", str(run)], ["--output-dir", str(run)]):
        args = cli.parse(parser, [*argv, "--preset", "cpu", "--data-dir", str(data)])
        assert getattr(rundir.starting_point(args), flag) == parser.get_default(flag), argv


def test_resuming_an_ended_budget_run_for_more_epochs_is_refused_not_silent(phantoms, tmp_path, env):
    """Its cosine ended where the budget did: --epochs more would train nothing, and say nothing."""
    out = tmp_path / "run"
    flags = ["--data-dir", str(phantoms), *TINY, "--epochs", "3", "--budget", "0.5"]
    train("unet", *flags, "--output-dir", str(out), env=env)
    planned = len((out / "metrics.jsonl").read_text().splitlines())
    p = run([sys.executable, "unet/train.py", "--resume", str(out), "--epochs", "5"], env)
    assert p.returncode == 2 and p.stderr.startswith(
        f"error: --epochs 5: this --budget run's cosine ended at epoch {planned}"
    )


def test_a_runs_last_epoch_as_a_checkpoint_is_its_last_state_with_its_split(phantoms, tmp_path, env):
    """docs/studies/per-model/last.py: the weights of last/ (not best.pt's), the run's flags and split,
    so --eval-only scores the epoch a contest fold keeps."""
    from accelerate.utils import load_state_dict

    from common.checkpoint import load_checkpoint

    out = tmp_path / "run"
    train("unet", "--data-dir", str(phantoms), *TINY, "--epochs", "2", "--output-dir", str(out), env=env)
    best = torch.load(out / "best.pt", weights_only=True)  # a best epoch other than the last: zeros
    torch.save({**best, "model": {k: torch.zeros_like(v) for k, v in best["model"].items()}}, out / "best.pt")
    p = run([sys.executable, "docs/studies/per-model/last.py", str(out), str(tmp_path / "last.pt")], env)
    assert p.returncode == 0, p.stderr
    last, best = load_checkpoint(tmp_path / "last.pt", "unet"), load_checkpoint(out / "best.pt", "unet")
    weights = load_state_dict(str(out / "last" / "model.safetensors"))
    assert (
        all(torch.equal(last["model"][k], weights[k]) for k in weights)
        and last["model"].keys() == weights.keys()
    )
    assert last["config"] == best["config"] and last["split"] == json.loads((out / "split.json").read_text())
    assert last["epoch"] == 2
