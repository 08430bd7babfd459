"""Pack the decoded data set into a portable file, to stage it onto compute nodes, or check a pack
and unpack it into the cache. A pack is a small JSON manifest OUT and the parts OUT.part1, ...
(each of at most --part-size MiB, with its sha256); --data-dir takes the manifest as it takes a
kaggle_3m folder.

    python -m tools.pack pack --data-dir data/kaggle_3m --out lgg.pack --part-size 48
    python -m tools.pack unpack lgg.pack
"""

import argparse
import sys

from common.cli import Parser, default_cache_dir
from common.errors import UserError, contract
from common.ranges import amount, image_size, pathname


def parser():
    p = Parser(
        prog="python -m tools.pack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    a = sub.add_parser("pack", help="write a pack: manifest OUT and parts OUT.part1, ...")
    a.add_argument("--data-dir", type=pathname, required=True, help="a kaggle_3m folder")
    a.add_argument("--out", type=pathname, required=True)
    a.add_argument(
        "--part-size", type=amount("one part", "MiB"), default=0, help="MiB per part at most (0: one part)"
    )
    a.add_argument(
        "--image-size",
        type=image_size(),
        default=256,
        help="256: the slices as released, losslessly",
    )
    b = sub.add_parser("unpack", help="check a pack and unpack it into the cache, where runs find it")
    b.add_argument("pack", type=pathname)
    b.add_argument("--image-size", type=image_size(), default=256)
    for s in (a, b):
        s.add_argument("--cache-dir", type=pathname, default=default_cache_dir())
        s.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def write_pack(data_dir, out, cache_dir, size=256, part_size=0, progress=True):
    """The pack of a kaggle_3m folder; returns the paths written (manifest first)."""
    from common import pack
    from common.cache import open_dataset

    slices, cache = open_dataset(data_dir, cache_dir, size, progress)
    other = [i for i, shape in enumerate(cache.shapes) if tuple(shape) != (size, size)]
    if other:  # a pack holds the slices at one size: theirs would be lost, and "native" scores wrong
        h, w = cache.shapes[other[0]]
        raise UserError(
            f"--image-size {size}: {len(other)} slices of {data_dir} are not {size}x{size} "
            f"({slices[other[0]].image.name} is {w}x{h}): a pack keeps slices at their own size only; "
            "train from the folder instead"
        )
    return pack.write(out, slices, cache.images, cache.masks, size, part_size)


def run(args):
    from common.cache import load_pack, open_dataset  # numpy and torch: not for --help

    if args.command == "unpack":
        slices, cache = load_pack(args.pack, args.cache_dir, args.image_size, progress=True)
        print(f"unpacked into {args.cache_dir}: {counts(slices, cache)}")
        return
    written = write_pack(
        args.data_dir, args.out, args.cache_dir, args.image_size, int(args.part_size * 2**20)
    )
    print("wrote " + ", ".join(f"{w} ({w.stat().st_size / 2**20:.1f} MiB)" for w in written))
    print(counts(*open_dataset(args.data_dir, args.cache_dir, args.image_size)))


def counts(slices, cache):
    patients, with_tumour = len({s.patient for s in slices}), int((cache.tumour > 0).sum())
    return f"{patients} patients, {len(slices)} slices, {with_tumour} with tumour"


def main(argv=None):
    return contract(lambda argv: run(parser().parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
