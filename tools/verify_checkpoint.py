#!/usr/bin/env python
"""Verify a checkpoint's files against the checksums recorded when they were written.

  python tools/verify_checkpoint.py CKPT [--all] [--jobs N]

CKPT: one iteration directory (iter_0000100), or a --save root: its latest iteration, or
with --all every iteration in it. Every file listed in checksums.json is read once and
hashed (xxh3_64); a file that differs is named, with the tensor whose bytes differ.
Exit status: 0 all match (a checkpoint saved without checksums is reported and passes),
1 a file differs or is missing, 2 CKPT is not a checkpoint.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from megatron_emu.cli import ToolParser  # noqa: E402
from megatron_emu.training.checkpoint_files import iteration_dir, list_iterations, read_latest  # noqa: E402
from megatron_emu.training.checksums import read_checksums, total_bytes, verify_directory  # noqa: E402


def iteration_dirs(path: str, every: bool) -> list[str]:
    if os.path.exists(os.path.join(path, ".metadata")):
        return [path]
    iterations = list_iterations(path) if every else [read_latest(path)] if os.path.isdir(path) else []
    if not iterations or iterations == [None]:
        raise ValueError(f"{path}: not a checkpoint (no .metadata, no iter_* directories or latest_checkpointed_iteration.txt)")
    return [iteration_dir(path, i) for i in iterations]


def main(argv=None) -> int:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                   example="python tools/verify_checkpoint.py runs/tiny/checkpoints   # README command 1's")
    p.add_argument("checkpoint")
    p.add_argument("--all", action="store_true", help="every iteration under a --save root, not only the latest")
    p.add_argument("--jobs", type=int, default=2, help="files verified at once (default 2)")
    args = p.parse_args(argv)
    try:
        directories = iteration_dirs(args.checkpoint, args.all)
        records = {d: read_checksums(d) for d in directories}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start, failed, unverified = time.perf_counter(), 0, 0
    total = sum(total_bytes(r) for r in records.values() if r)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify") as bar:
        for directory, record in records.items():
            if record is None:
                tqdm.write(f"warning: {directory}: no checksums.json (saved before checksums existed): not verified")
                unverified += 1
                continue
            errors = verify_directory(directory, record, bar.update, args.jobs)
            failed += bool(errors)
            for error in errors:
                tqdm.write(f"error: {error}", file=sys.stderr)
            if not errors:
                tqdm.write(f"{directory}: {len(record['files'])} files match their checksums")
    seconds = time.perf_counter() - start
    verified = len(directories) - failed - unverified
    print(f"{verified} checkpoint(s) verified, {failed} corrupted, {unverified} without checksums; "
          f"{total / 1e9:.2f} GB read in {seconds:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
