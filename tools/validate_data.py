#!/usr/bin/env python
"""Verify preprocessed datasets completely: checksums of .bin and .idx, the index
structure, every token id against the tokenizer's vocabulary, every image decodable at
its size, each kind's layout. Prints one line per bad file or document
(prefix, document, sequence, problem); exit code 1 when anything is bad, 0 otherwise.

  python tools/validate_data.py data/laion data/mmc4 --tokenizer-model llama/tokenizer.model --workers 16
  python tools/validate_data.py ~/.cache/megatron_emu/synthetic-*/pairs      # tiny tokenizer: no flag needed
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_emu.cli import ToolParser  # noqa: E402


def parse_args(argv):
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                   example="python tools/validate_data.py data/syn_pairs   # written by tools/preprocess_data.py")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX", help="dataset prefixes (<prefix>.bin/.idx/.json)")
    p.add_argument("--tokenizer-model", default="",
                   help="sentencepiece .model the data was written with (default: the tiny tokenizer, "
                        "accepted only when the dataset's .json names it)")
    p.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0))),
                   help="processes checking documents (default: the CPUs available)")
    p.add_argument("--max-lines", type=int, default=1000, help="print at most this many problems per dataset")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _tokenizer(args):
    from megatron_emu.data.tokenizer import EmuTokenizer, build_tiny_tokenizer

    return EmuTokenizer(args.tokenizer_model or build_tiny_tokenizer())


def _check_default_tokenizer(args, tokenizer) -> None:
    """Without --tokenizer-model, every dataset must say it was written with the tiny one."""
    if args.tokenizer_model:
        return
    from megatron_emu.data.indexed import read_meta

    for prefix in args.prefixes:
        try:
            fingerprint = read_meta(prefix)["tokenizer"]
        except (ValueError, KeyError):
            continue  # reported per dataset
        if fingerprint != tokenizer.fingerprint:
            raise ValueError(f"{prefix}.json: written with tokenizer {fingerprint}, not the tiny one: "
                             "give --tokenizer-model")


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_emu.data.validate import validate_dataset

    tokenizer = _tokenizer(args)
    _check_default_tokenizer(args, tokenizer)
    bad_datasets = 0
    for prefix in args.prefixes:
        problems, counts = validate_dataset(prefix, tokenizer.base_vocab_size, tokenizer.fingerprint,
                                            workers=args.workers, progress=not args.no_progress)
        for p in problems[: args.max_lines]:
            print(p.line(), flush=True)
        if len(problems) > args.max_lines:
            print(f"{prefix}: ... and {len(problems) - args.max_lines} more problems")
        bad_documents = len({p.document for p in problems if p.document is not None})
        print(json.dumps({"prefix": prefix, "ok": not problems, "problems": len(problems),
                          "bad_documents": bad_documents, **counts}), flush=True)
        bad_datasets += bool(problems)
    return 1 if bad_datasets else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        sys.exit(f"error: {e}")
