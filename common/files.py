"""Every file the project writes, written whole or not at all (to a temporary name, then renamed),
and every file it reads back, checked: a damaged one is one line naming it."""

import json
import os
from pathlib import Path

from common.errors import UserError, discard
from common.report import console


def tmp_name(path):
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def read_json(path, kind=dict):
    """A JSON file the project wrote: a `kind` (an object), or one line naming the file when it is
    missing, empty, damaged or of another shape."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path} is missing") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = "empty" if path.is_file() and not path.stat().st_size else f"damaged: {e}"
        raise UserError(f"{path} is {why}; restore it, or remove the folder it is in") from e
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged: a JSON {type(value).__name__}, not an object")
    return value


def read_csv(path, columns=()):
    """The rows of a CSV the project wrote, each a dict of strings; one line naming the file when it
    is missing, not text, or lacks one of `columns` (a row missing a cell: also one line)."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError as e:
        raise UserError(f"{path} is missing") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} is damaged ({e}): restore it, or make it again") from e
    lacking = [c for c in columns if not rows or c not in rows[0]]
    if lacking or any(None in r.values() or None in r for r in rows):
        said = f"no column {lacking[0]}" if lacking else "a row is cut short"
        raise UserError(f"{path} is damaged or of another kind ({said}): restore it, or make it again")
    return rows


def write_csv(path, rows, fields=None):
    """Rows (dicts) as a CSV, whole or not at all; columns `fields`, or every key in first-seen order."""
    import csv

    fields = fields or list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    replace(Path(path), write)


def write_json(path, obj):
    replace(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_text(path, text):
    replace(Path(path), lambda tmp: tmp.write_text(text))


def save_torch(obj, path):
    import torch  # here only: the tools that write tables need none

    replace(Path(path), lambda tmp: torch.save(obj, tmp))


def save_figure(fig, path, dpi):
    """A matplotlib figure, its format told by the name (the temporary name has none)."""
    path = Path(path)
    replace(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix[1:]))


def replace(path, write):
    """write(tmp), then tmp renamed to path: the old file stays whole until the new one is. A failed
    write (a full disk) leaves no hidden temporary file and says so in one line; every result the
    project writes goes through here (tests/test_writes.py)."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        discard(tmp)
        kept = " (the previous one is intact)" if path.exists() else ""
        raise UserError(f"cannot write {path}{kept}: {getattr(e, 'strerror', None) or e}") from e
    except BaseException:
        discard(tmp)
        raise


def append_jsonl(path, row):
    """One line more of an append-only log (metrics.jsonl): a crash mid-write tears only its last line,
    which read_jsonl drops."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    """The rows of an append-only log; a torn last line (a crash mid-write) is dropped and said, a
    damaged line before it is an error naming the file."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    rows = []
    for k, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(lines) - 1:
                console.print(f"note: {path}: its last line is torn (a write cut short): left out")
                break
            raise UserError(
                f"{path}: line {k + 1} is not a row ({e}): restore the file or remove the run"
            ) from e
        rows.append(row)
    return rows
