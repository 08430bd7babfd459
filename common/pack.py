"""Packs: the decoded cache as a portable file, to stage the data onto compute nodes (written by
`python -m tools.pack pack`, read wherever --data-dir names one)."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from common.errors import UserError, discard

# Packs: the decoded cache as a portable file, to stage data onto compute nodes. `F` is a small JSON
# manifest (slices, image size, each part's size and sha256); the data are one compressed .npz
# (lossless: the uint8 arrays themselves) cut into parts F.part1, F.part2, ... of at most --part-size.
PACK_FORMAT = "lgg-seg pack 1"


def write(out, slices, images, masks, size, part_size=0):
    """The pack of `slices` and their cached arrays: manifest `out`, parts beside it, each written
    to a temporary name and renamed; returns the paths written (manifest first, written last)."""
    index = json.dumps([[s.patient, s.n] for s in slices])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, masks=masks, index=np.array(index))
    blob = buffer.getbuffer()
    step = part_size or len(blob)
    chunks = [blob[k : k + step] for k in range(0, len(blob), step)]
    out = Path(out)
    parts = [out.with_name(f"{out.name}.part{k + 1}") for k in range(len(chunks))]
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; name the pack's manifest file (e.g. {out / 'lgg.pack'})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot make its folder ({e.strerror or e})") from e
    try:
        for path, chunk in zip(parts, chunks):
            put(path, lambda tmp, chunk=chunk: tmp.write_bytes(chunk))
    except UserError:  # a full disk part-way: no parts without their manifest left behind
        for path in parts:
            discard(path)
        raise
    manifest = {
        "format": PACK_FORMAT,
        "image_size": size,
        "slices": len(slices),
        "patients": len({s.patient for s in slices}),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "parts": [
            {"name": p.name, "bytes": len(c), "sha256": hashlib.sha256(c).hexdigest()}
            for p, c in zip(parts, chunks)
        ],
    }
    put(out, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    return [out, *parts]


def put(path, write):
    """write(tmp), renamed to path; a failed write (a full disk) is one line and leaves no temporary
    (common.files.replace, which this layer cannot import, does the same for every other file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as e:
        discard(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e


def pack_manifest(path):
    if not path.is_file():
        raise UserError(f"--data-dir {path}: no such pack manifest")
    try:
        manifest = json.loads(path.read_text()) if path.stat().st_size < 1 << 20 else {}
    except (ValueError, UnicodeDecodeError):
        manifest = {}
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise UserError(
            f"--data-dir {path}: a file, but not a pack manifest of this repository "
            "(give the kaggle_3m folder, or the manifest that `python -m tools.pack pack` wrote)"
        )
    if missing := damaged_fields(manifest):
        raise UserError(
            f"--data-dir {path}: a damaged pack manifest ({missing} missing or wrong): copy it again"
        )
    return manifest


def damaged_fields(manifest):
    """The first field of a manifest that is not as `write` writes it, or None."""
    fields = {"image_size": int, "slices": int, "patients": int, "sha256": str, "parts": list}
    for key, kind in fields.items():
        if not isinstance(manifest.get(key), kind):
            return key
    part = {"name": str, "bytes": int, "sha256": str}
    for k, p in enumerate(manifest["parts"], 1):
        if not isinstance(p, dict) or any(not isinstance(p.get(key), kind) for key, kind in part.items()):
            return f"part {k}"
    return None if manifest["parts"] else "parts"


def read_pack(path, manifest):
    """The .npz bytes of a pack, checked part by part; a missing, truncated or altered part is a UserError."""
    blob = bytearray()
    for part in manifest["parts"]:
        f = path.with_name(part["name"])
        if not f.is_file():
            raise UserError(f"--data-dir {path}: part {f} is missing")
        chunk = f.read_bytes()
        if len(chunk) != part["bytes"] or hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise UserError(
                f"--data-dir {path}: part {f} is damaged ({len(chunk)} bytes, expected {part['bytes']}, "
                "or another checksum): copy it again"
            )
        blob += chunk
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise UserError(
            f"--data-dir {path}: the parts do not add up to the packed data (checksum): copy them again"
        )
    return bytes(blob)
