"""The end of a run: the best epoch evaluated once more on validation and once on the test
patients, with the 3-D metrics; then summary.json (what was trained, how fast, on what data) and
the results table."""

import statistics
from pathlib import Path

import torch

from common import files, report
from common.checkpoint import model_config
from common.evaluate import evaluate, postprocess_all
from common.inference import Averaged
from common.timing import device_name, gflops, peak_memory

# what decides speed, recorded in summary.json beside the figures
SPEED_FLAGS = (
    "data_pipeline",
    "num_workers",
    "channels_last",
    "compile",
    "sync_bn",
    "threads",
    "max_steps",
    "step_timing",
)


def final_report(run, build_model, stopped_by):
    """The best epoch once more on validation and once on test, with the 3-D metrics too; then
    summary.json and the results table."""
    args, accelerator, state, out = run.args, run.accelerator, run.state, run.out
    _, val_loader, test_loader = run.loaders
    accelerator.wait_for_everyone()
    results = {}
    if not args.no_eval:
        best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
        accelerator.unwrap_model(run.model).load_state_dict(best["model"])
        model = Averaged([accelerator.unwrap_model(run.model)], mirror=True) if args.tta else run.model
        if val_loader is not None:
            results["val"] = evaluate(model, val_loader, accelerator, args, run.d, volumes=True)
        if test_loader and not args.no_test:
            title = "testing" if run.main else None
            results["test"] = evaluate(model, test_loader, accelerator, args, run.d, title, volumes=True)
        if run.main:  # chosen on the validation patients, then applied to the test patients
            results = postprocess_all(args, results)
        if "val" in results:
            results = {f"val (epoch {state.best_epoch})": results.pop("val"), **results}
    summary = run_summary(run, build_model, stopped_by, results)
    if run.main:
        files.write_json(out / "summary.json", summary)
        if results:
            report.results_table(
                f"{args.model}: {run.n_params / 1e6:.2f} M parameters, {state.epoch} epochs, "
                f"{state.train_time_s:.0f} s training",
                results,
            )
        report.console.print(
            f"wrote {out}/: args.json split.json metrics.jsonl summary.json log.txt"
            + ("" if args.no_eval else " best.pt last/")
            + (" tensorboard/" if run.tracker else "")
        )
    return summary


def run_summary(run, build_model, stopped_by, results):
    args, accelerator, state = run.args, run.accelerator, run.state
    rows = files.read_jsonl(run.out / "metrics.jsonl") if run.main else []
    medians = (
        "images_per_s",
        "data_wait_share",
        "step_median_s",
        "step_data_median_s",
        "step_compute_median_s",
    )
    return {
        **model_config(args),
        "parameters": run.n_params,
        "gflops_per_image": gflops(build_model, args),
        **{k: getattr(args, k) for k in SPEED_FLAGS},
        "pin_memory": run.d.loaders["train"].pin_memory,
        "device": device_name(accelerator.device),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "batch_size_per_process": args.batch_size,
        "global_batch_size": args.batch_size * accelerator.num_processes,
        "epochs": state.epoch,
        "train_time_s": state.train_time_s,
        # medians over the last epochs that have each figure (a resumed run may mix synced and unsynced)
        **{
            k: statistics.median(v) if (v := [r[k] for r in rows[-3:] if r.get(k) is not None]) else None
            for k in medians
        },
        "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None),
        "peak_memory_of": peak_memory(accelerator.device)["peak_memory_of"],
        "stopped_by": stopped_by,
        "postprocess": next((r.get("postprocess") for r in results.values() if r), None),
        "best_epoch": state.best_epoch,
        "best_val": results.get(f"val (epoch {state.best_epoch})"),
        "test": results.get("test"),
        "split": {k: len(v) for k, v in run.d.parts.items()},
        "data": data_record(args, run.d),
        "made": provenance(),
    }


def provenance():
    """When and by what code a result was made: the date, the checkout's commit (with "+changes"
    when files differ from it; None outside git) and the versions the numbers depend on."""
    import platform
    import subprocess
    from datetime import datetime, timezone

    import accelerate
    import torchvision

    root = Path(__file__).resolve().parents[1]

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD").strip() or None
    if commit and git("status", "--porcelain", "--untracked-files=no").strip():
        commit += "+changes"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
    }


def data_record(args, d):
    """Where the run's data came from: tables keep runs on phantoms apart from runs on patients."""
    source = "phantoms" if args.synthetic else "pack" if Path(args.data_dir).is_file() else "folder"
    patients = len({s.patient for s in d.slices})
    return {"source": source, "path": str(args.data_dir), "patients": patients, "slices": len(d.slices)}
