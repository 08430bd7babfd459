"""Evaluation, exact under DDP and scored at native resolution: of the loaders during training,
and of a checkpoint or an ensemble (--eval-only)."""

import time

import torch

from common import files, metrics, report
from common.checkpoint import model_config
from common.errors import UserError
from common.inference import Averaged
from common.loss import loss_from_terms, loss_terms
from common.prepare import load_data, make_accelerator, network_inputs
from common.resolve import checkpoints, members_split
from common.rundir import make_run_dir, split_record


def native_counts(cache, logits, at):
    """Per-slice confusion counts of the slices at cache indices `at` (numpy), their logits resized
    back to each slice's own geometry and compared with the masks as released; and those logits."""
    native = metrics.native_logits(logits, cache.shapes[at], cache.boxes[at], cache.native_size)
    truth = torch.from_numpy(cache.native_masks(at)).to(native.device)
    return metrics.confusion(native, truth, torch.from_numpy(cache.shapes[at].prod(1))), native


@torch.no_grad()
def evaluate(model, loader, accelerator, args, d, title=None, volumes=False):
    """Metrics of the whole loader, exact under DDP (gather_for_metrics drops the padding). Slice and
    patient metrics from per-slice counts; with volumes, also the 3-D ones (largest-component Dice,
    HD95) from the gathered predicted masks, computed on the main process only."""
    model.eval()
    started = time.perf_counter()
    counts, terms, index, preds = [], [], [], []
    cache = d.cache
    with report.bar(accelerator.is_main_process and title is not None) as bar:
        for images, masks, idx in bar.track(loader, description=title or ""):
            x, y = network_inputs(args, d, images, masks, idx)
            logits = model(x)
            counted, native = native_counts(cache, logits, idx.cpu().numpy())  # against the released masks
            out = (counted, loss_terms(logits, y), idx) + ((native > 0,) if volumes else ())
            out = accelerator.gather_for_metrics(out)
            counts.append(out[0]), terms.append(out[1]), index.append(out[2])
            if volumes:
                preds.append(out[3].cpu())
    index = torch.cat(index).cpu()
    order = torch.argsort(index)  # slice order: patient, then slice number
    index, counts, terms = index[order].numpy(), torch.cat(counts).cpu()[order], torch.cat(terms).cpu()
    patients = [d.slices[i].patient for i in index]
    result = {
        **metrics.summarize(counts, patients),
        "loss": loss_from_terms(terms, args.loss).item(),
        "slices": len(counts),
        "patients": len(set(patients)),
        "scored_at": metrics.SCORED_AT,
    }
    if volumes and accelerator.is_main_process:
        pred, truth = torch.cat(preds)[order].numpy(), cache.native_masks(index)
        result.update(metrics.volume_metrics(pred, truth, patients, cache.shapes[index].prod(1)))
    result["eval_time_s"] = time.perf_counter() - started  # the 3-D metrics included; .cpu() synchronised
    return result


def postprocess_all(args, results):
    """--postprocess on every set of `results`; auto: chosen on "val" (none without it)."""
    chosen = args.postprocess
    if chosen == "auto":
        chosen = metrics.choose_postprocess(results["val"]["per_patient"]) if "val" in results else "none"
    return {name: metrics.with_postprocess(r, chosen) for name, r in results.items()}


def evaluate_checkpoint(args, build_model):
    """--eval-only: the checkpoint's network (or the ensemble of a folder of runs, --tta: with
    mirrored slices) on the validation and test sets of its split."""
    paths, ckpts = checkpoints(args.checkpoint, args.model)  # as its flags were resolved from
    accelerator = make_accelerator(args)
    nets = []
    for path, ckpt in zip(paths, ckpts):
        nets.append(build_model(args))
        try:
            nets[-1].load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"--checkpoint {path}: weights do not fit the model ({e})") from e
    model = Averaged(nets, mirror=args.tta) if len(nets) > 1 or args.tta else nets[0]
    record, same_val = members_split(args, paths, ckpts, say=accelerator.is_main_process)
    d = load_data(args, accelerator, record)
    d.loaders["val"] = d.loaders["val"] if same_val else None
    d.loaders["test"] = None if args.no_test else d.loaders["test"]
    out = make_run_dir(args, accelerator, tag="-eval")  # before the work: a folder we cannot write fails now
    if accelerator.is_main_process:
        report.console.keep(out / "log.txt")
    model = accelerator.prepare(model)
    main = accelerator.is_main_process
    results = {
        name: evaluate(
            model,
            accelerator.prepare(dl),
            accelerator,
            args,
            d,
            f"evaluating {name}" if main else None,
            volumes=True,
        )
        for name, dl in d.loaders.items()
        if dl is not None and name != "train"
    }
    if main:
        results = postprocess_all(args, results)
        files.write_json(
            out / "eval.json",
            {
                "checkpoint": str(args.checkpoint),
                "members": [str(p) for p in paths],
                "tta": args.tta,
                **model_config(args),
                "split": split_record(args, d),
                "split_notes": d.notes,
                **results,
            },
        )
        what = f"{len(paths)} members" if len(paths) > 1 else str(args.checkpoint)
        report.results_table(f"{args.model} from {what}{' with TTA' if args.tta else ''}", results)
        report.console.print(f"wrote {out / 'eval.json'}")
    accelerator.end_training()
    return results
