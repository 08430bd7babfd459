"""python -m tools.export: a checkpoint becomes an ONNX or TorchScript
file that gives the model's logits to 1e-4, for any batch size; what cannot be exported, or exports
wrong, is one `error:` line and leaves no file."""

import json
import shutil
import sys
from argparse import Namespace

import pytest
import torch
import torch.nn as nn
from conftest import run

from common import registry
from common.inference import load_model
from tools import export

ATOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
FORMATS = ["torchscript", "onnx"]


def checkpoint(folder, name):
    """A run folder with the best.pt of a tiny `name`. Its convolutions are re-drawn at He's scale:
    at PyTorch's default scale SegNet's 26 layers shrink the logits to one constant, which any
    file, right or wrong, would match."""
    torch.manual_seed(0)
    config = {"model": name, "width": 0.125, "image_size": 64}
    model = registry.build(config)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight)
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": config}, folder / "best.pt")
    return folder


def logits(path, fmt, x):
    """The exported file's logits for x, run as a user of the file would run it."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path))(x)


def assert_same_logits(folder, fmt, x):
    model, _ = load_model(folder, "cpu")
    with torch.no_grad():
        want = model(x)
    got = logits(folder / export.FORMATS[fmt], fmt, x)
    assert got.shape == (len(x), 1, 64, 64)
    assert want.std() > 1e-2  # logits that vary over the batch: a wrong file could not match them
    assert (got - want).abs().max().item() <= ATOL


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", registry.names())
@pytest.mark.slow
def test_every_model_exports_to_a_file_that_gives_its_logits(tmp_path, name, fmt, capsys):
    folder = checkpoint(tmp_path / name, name)
    assert export.main(["--checkpoint", str(folder), "--format", fmt]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    # 3 slices: the file was made on a batch of 2 and checked on 4, so the batch size is free
    assert_same_logits(folder, fmt, torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5)))


@pytest.mark.slow
def test_the_check_runs_on_real_slices_with_data_dir(tmp_path, phantoms, capsys):
    folder = checkpoint(tmp_path / "unet", "unet")
    cache = tmp_path / "cache"
    args = ["--checkpoint", str(folder / "best.pt"), "--format", "onnx", "--data-dir", str(phantoms)]
    assert export.main([*args, "--cache-dir", str(cache)]) == 0
    assert f"checked on 4 slices of {phantoms}" in capsys.readouterr().out
    x, _ = export.check_batch(Namespace(data_dir=phantoms, cache_dir=cache, batch_size=4), 3, 64)
    assert_same_logits(folder, "onnx", x)


def test_a_file_whose_logits_differ_is_refused_and_not_written(tmp_path, monkeypatch, capsys):
    folder = checkpoint(tmp_path / "segnet", "segnet")
    wrong = export.run_torchscript
    monkeypatch.setattr(export, "run_torchscript", lambda path, x: wrong(path, x) + 1e-3)
    assert export.main(["--checkpoint", str(folder), "--format", "torchscript"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the torchscript segnet's logits differ")
    assert "max-unpooling" in err[0]  # why SegNet, unlike the others, can fail this on real slices
    assert [p.name for p in folder.iterdir()] == ["best.pt"]  # no file, no temporary one


def test_a_model_the_exporter_refuses_is_named_with_the_reason(tmp_path, monkeypatch, capsys):
    folder = checkpoint(tmp_path / "fcn", "fcn")

    def refuse(*args, **kwargs):
        raise RuntimeError("aten::weird_op is not supported\n(a long exporter report)")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert export.main(["--checkpoint", str(folder), "--format", "onnx"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: fcn cannot be exported to ONNX: aten::weird_op is not supported"]
    assert [p.name for p in folder.iterdir()] == ["best.pt"]


def unreadable(folder):
    folder.mkdir()
    (folder / "best.pt").write_text("not a checkpoint")
    return folder


@pytest.mark.parametrize(
    "make, flags, says",
    [
        (lambda d: d / "nowhere.pt", ["--format", "onnx"], "no such file"),
        (lambda d: d.mkdir() or d, ["--format", "onnx"], "no best.pt in it"),
        (unreadable, ["--format", "torchscript"], "not a checkpoint of this repository"),
        (lambda d: checkpoint(d / "run", "unet"), ["--format", "tflite"], "invalid choice: 'tflite'"),
        (
            lambda d: checkpoint(d / "run", "unet"),
            ["--format", "onnx", "--image-size", "50"],
            "multiple of 32",
        ),
        (lambda d: checkpoint(d / "run", "unet"), ["--format", "onnx", "--output", "."], "is a folder"),
    ],
    ids=["missing file", "run folder without best.pt", "unreadable", "format", "image size", "output"],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, make, flags, says):
    ckpt = make(tmp_path / "x")
    assert export.main(["--checkpoint", str(ckpt), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_onnx_without_its_packages_names_the_pip_command(tmp_path, monkeypatch, capsys):
    folder = checkpoint(tmp_path / "unet", "unet")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    assert export.main(["--checkpoint", str(folder), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install onnx onnxscript onnxruntime" in err[0]
    assert [p.name for p in folder.iterdir()] == ["best.pt"]


def test_the_command_runs_as_a_user_runs_it(tmp_path, env):
    folder = checkpoint(tmp_path / "unet", "unet")
    out = tmp_path / "exported" / "unet.pt"
    p = run(
        [
            sys.executable,
            "-m",
            "tools.export",
            "--checkpoint",
            str(folder),
            "--format",
            "torchscript",
            "--output",
            str(out),
        ],
        env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"wrote {out}" in p.stdout and out.is_file()
    p = run(
        [sys.executable, "-m", "tools.export", "--checkpoint", str(tmp_path / "none"), "--format", "onnx"],
        env,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: --checkpoint {tmp_path / 'none'}: no such file"
    ]


def test_a_disk_without_room_for_the_model_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    """TorchScript's writer aborts the process from C++ on a full disk, leaving a hidden temporary."""
    folder = checkpoint(tmp_path / "unet", "unet")
    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: full)
    assert export.main(["--checkpoint", str(folder), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MiB needed, 0 MiB free there" in err[0], err
    assert [p.name for p in folder.iterdir()] == ["best.pt"]


@pytest.mark.parametrize(
    "flags, says",
    [
        ({}, "each slice's channels z-scored on their own"),
        ({"normalize": "volume"}, "clipped to its patient volume's 10th-99th percentile"),
        ({"crop": "brain"}, "cut to one square around the FLAIR signal"),
    ],
)
def test_the_exported_files_inputs_are_the_models_own_preprocessing(tmp_path, capsys, flags, says):
    """A --normalize volume or --crop brain model fed per-slice z-scored whole slices is far off: the
    file says what its model was trained on, beside it and in the command's output."""
    folder = checkpoint(tmp_path / "unet", "unet")
    ckpt = torch.load(folder / "best.pt", weights_only=True)
    ckpt["config"].update(flags)
    torch.save(ckpt, folder / "best.pt")
    assert export.main(["--checkpoint", str(folder), "--format", "torchscript"]) == 0
    assert says in " ".join(capsys.readouterr().out.split())
    sidecar = json.loads((folder / (export.FORMATS["torchscript"] + ".json")).read_text())
    assert says in sidecar["inputs"] and sidecar["image_size"] == 64
    assert sidecar["normalize"] == flags.get("normalize", "slice") and sidecar["crop"] == flags.get(
        "crop", "none"
    )


@pytest.mark.parametrize("key, other", [("normalize", "volume"), ("crop", "brain"), ("image_size", 96)])
def test_an_ensemble_of_models_that_take_other_inputs_is_refused(tmp_path, key, other):
    """Members fed one member's preprocessing (18 % of pixels flipped for a volume- and a
    slice-normalised pair): predict refuses to average them."""
    from common.errors import UserError
    from tools.predict import load_models

    a, b = checkpoint(tmp_path / "a", "unet"), checkpoint(tmp_path / "b", "unet")
    ckpt = torch.load(b / "best.pt", weights_only=True)
    ckpt["config"][key] = other
    torch.save(ckpt, b / "best.pt")
    args = Namespace(checkpoint=[a, b], ensemble=True, tta=False)
    with pytest.raises(UserError, match=f"must take the same inputs.*{other}"):
        load_models(args, "cpu")
    assert len(load_models(Namespace(checkpoint=[a, a], ensemble=True, tta=False), "cpu")) == 1


def test_sigterm_during_an_export_leaves_no_hidden_temporary(tmp_path, monkeypatch, capsys):
    import os
    import signal

    folder = checkpoint(tmp_path / "unet", "unet")

    def slow_export(model, name, example, path):  # half a file written, then a scheduler's SIGTERM
        path.write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export, "export_torchscript", slow_export)
    assert export.main(["--checkpoint", str(folder), "--format", "torchscript"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "error: stopped by SIGTERM; nothing half-written is left\n"
    assert sorted(f.name for f in folder.iterdir()) == ["best.pt"]
