"""radio-data: make-shards | inspect | sample-data."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from radio_scale.data.shards import DataError


PIPE_HELP = "run 'pipe:' lines found inside .txt list files (through a shell); refused by default"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radio-data", description="Create and check webdataset shards for radio_scale.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-shards", help="image folder (labels = sub-folder names) or tars -> shards + manifest.json")
    m.add_argument("src", help="an image folder, or a shard spec (path, glob, {a..b} pattern, list file) to re-shard")
    m.add_argument("out", help="output directory (new or empty)")
    m.add_argument("--samples-per-shard", type=int, default=1000)
    m.add_argument("--max-shard-bytes", type=int, default=1_000_000_000)
    m.add_argument("--seed", type=int, default=0, help="shuffle seed for the file order of a folder")
    m.add_argument("--no-shuffle", action="store_true", help="keep a folder's sorted file order")
    m.add_argument("--allow-pipe-in-lists", action="store_true", help=PIPE_HELP)

    i = sub.add_parser("inspect", help="counts, image size histogram and bad samples by reason")
    i.add_argument("shards", help="shard spec (path, directory, glob, {a..b} pattern, list file, 'bundled[:set]')")
    i.add_argument("--image-key", default="jpg;jpeg;png;webp")
    i.add_argument("--label-key", default="cls")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--allow-pipe-in-lists", action="store_true", help=PIPE_HELP)

    s = sub.add_parser("sample-data", help="write the bundled offline dataset (scikit-image / scikit-learn images)")
    s.add_argument("out", nargs="?", default=None, help="directory (default: $RADIO_DATA_DIR or ~/.cache/radio_scale/bundled)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the radio-data command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-shards":
            from radio_scale.data.make_shards import make_shards

            manifest = make_shards(args.src, args.out, samples_per_shard=args.samples_per_shard,
                                   max_shard_bytes=args.max_shard_bytes, seed=None if args.no_shuffle else args.seed,
                                   allow_pipe_in_lists=args.allow_pipe_in_lists)
            print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shards to {args.out}"
                  + (f" ({len(manifest['labels'])} labels)" if manifest["labels"] else ""))
            if manifest["skipped"] or manifest["shard_errors"]:
                print(f"skipped: {manifest['skipped']}  shard errors: {manifest['shard_errors']}")
        elif args.command == "inspect":
            from radio_scale.data.inspect_shards import format_report, inspect_shards

            report = inspect_shards(args.shards, image_key=args.image_key, label_key=args.label_key or None,
                                    allow_pipe_in_lists=args.allow_pipe_in_lists)
            print(json.dumps(report, indent=1) if args.json else format_report(report))
        elif args.command == "sample-data":
            from radio_scale.data.bundled import default_root, ensure_bundled_data, read_manifest

            root = Path(args.out).expanduser() if args.out else default_root()
            existed = read_manifest(root) is not None if root.exists() else False
            root = ensure_bundled_data(root)
            sets = read_manifest(root)["sets"]
            print(("already present: " if existed else "wrote ") + str(root))
            for name, s in sets.items():
                print(f"  {name:>14}: {s['count']} samples in {len(s['shards'])} shards"
                      + (f", {len(s['labels'])} labels" if s["labels"] else ""))
    except DataError as exn:
        print(f"radio-data: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
