"""The data pipelines and their rules, for the loop, the flags' checks and the tools (apart from
common/data.py, which imports torch: --help and flag errors stay fast)."""

PIPELINES = {
    "decode": "read and decode each TIFF per item (the original's design, a baseline); needs the TIFF folder",
    "cached": "one read of the decoded cache per batch",
    "device": "the whole uint8 cache on the training device; no DataLoader workers",
}
WORKERS = ("decode", "cached")  # the pipelines that can use DataLoader workers and pinned memory
