"""mmcoconut-shard (= python tools/make_shards.py): WebDataset shards for mmcoconut from one of three sources:

  mmcoconut-shard --aokvqa-dir data/aokvqa --coco-dir data/coco --split train   # official A-OKVQA
  mmcoconut-shard --json data/my_set.json --split train                          # seed json list
  mmcoconut-shard --synthetic 20000 --seed 0 --split train                       # built-in task
  mmcoconut-shard --synthetic 20000 --task chain --hops 3 --split train          # pointer chasing

Output: <out>/<split>-000000.tar ... (<key>.jpg + <key>.json), <out>/sizes.json, <out>/steps.json,
<out>/errors.jsonl.
--out may be remote: an fsspec URL (s3://bucket/shards/aokvqa, with mmcoconut[s3]) or 'pipe:CMD' with {} for the
file name ('pipe:aws s3 cp - s3://bucket/shards/aokvqa/{}'); each shard is uploaded when closed, sizes.json last.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmcoconut.data import chain, remote, sources
from mmcoconut.data.sharding import SPLIT_NAME, write_shards

N_ERRORS_SHOWN = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--aokvqa-dir", type=Path, metavar="DIR",
                     help="official A-OKVQA annotations: DIR/aokvqa_v1p0_{train,val,test}.json (needs --coco-dir)")
    src.add_argument("--json", type=Path, metavar="FILE",
                     help="json list [{image, question, steps, answer, ...}]; image paths relative to FILE's dir")
    src.add_argument("--synthetic", type=int, metavar="N", help="N samples of the built-in synthetic task")
    p.add_argument("--coco-dir", type=Path, metavar="DIR",
                   help="COCO-2017 root holding train2017/, val2017/, test2017/ (with --aokvqa-dir)")
    p.add_argument("--split", help="A-OKVQA: train|val|test (required); otherwise the shard name prefix "
                                   "(default: train)")
    p.add_argument("--seed", type=int, default=0, help="synthetic generator seed (default: 0)")
    p.add_argument("--task", choices=("shapes", "chain"), default="shapes",
                   help="synthetic task: shapes (the demo's, mmcoconut/data/synthetic.py) or chain (pointer chasing "
                        "with --hops dependent image reads, mmcoconut/data/chain.py); default shapes")
    p.add_argument("--hops", default="3", help="chain task: hops per question, K (1-4), a range 1-4 or a list 2,4 "
                                               "(mixed uniformly per sample); default 3")
    p.add_argument("--no-choices-in-question", action="store_true",
                   help="shapes task: leave the choice list out of the question text (the json keeps the choices "
                        "for scoring; 32 instead of 50 text tokens per sample: the demo)")

    p.add_argument("--chain-pointers", choices=chain.POINTER_KINDS, default="per-square",
                   help="chain task tiles: per-square (hop i reads square i, four permutations: no shortcut) or one "
                        "(one pointer colour per tile, any colour, read at every hop); default per-square")
    p.add_argument("--chain-steps", choices=chain.STEP_FORMATS, default="pointer",
                   help="chain task step text: pointer ('1 red blue': hop, tile, colour read) or colour (' blue': "
                        "only the colour reached, one token per hop); default pointer")
    p.add_argument("--out", help="output dir (default: shards/aokvqa, shards/<json stem> or shards/synthetic), "
                                 "or a remote one: an fsspec URL (s3://bucket/dir, needs mmcoconut[s3]) or a "
                                 "command reading each file from stdin, '{}' standing for its name "
                                 "('pipe:aws s3 cp - s3://bucket/dir/{}'); shards are uploaded as they are closed")
    p.add_argument("--image-size", type=int, default=224,
                   help="resize so the shorter side is this many pixels, aspect kept (0: keep size; default 224)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decode/encode processes (default: min(4, cpu count)); output is identical for any")
    p.add_argument("--max-errors", type=int, default=0,
                   help="exit with status 1 if more items than this were skipped (missing/corrupt image, malformed "
                        "or duplicate entry). Default 0 for every source: nothing is lost silently. The shards "
                        "are still written and every skip is listed in <out>/errors.jsonl; pass e.g. "
                        "--max-errors 50 to tolerate a few missing COCO images, -1 for no limit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(items, total, out_dir) for the chosen source; parser.error naming the path on bad input."""
    if args.aokvqa_dir is not None:
        if args.coco_dir is None:
            parser.error("--aokvqa-dir needs --coco-dir (the COCO-2017 image root)")
        if args.split not in sources.AOKVQA_SPLITS:
            parser.error(f"--aokvqa-dir needs --split one of {', '.join(sources.AOKVQA_SPLITS)} (got {args.split})")
        if not args.aokvqa_dir.is_dir():
            parser.error(f"--aokvqa-dir: directory not found: {args.aokvqa_dir}")
        if not args.coco_dir.is_dir():
            parser.error(f"--coco-dir: directory not found: {args.coco_dir}")
        ann_path, image_dir = sources.aokvqa_paths(args.aokvqa_dir, args.coco_dir, args.split)
        if not ann_path.is_file():
            parser.error(f"A-OKVQA annotations not found: {ann_path}")
        if not image_dir.is_dir():
            parser.error(f"COCO images for split {args.split!r} not found: {image_dir}")
        items = list(sources.aokvqa_records(args.aokvqa_dir, args.coco_dir, args.split))
        return items, len(items), args.out or Path("shards/aokvqa")
    if args.coco_dir is not None:
        parser.error("--coco-dir only goes with --aokvqa-dir")
    args.split = args.split or "train"
    if args.json is not None:
        if not args.json.is_file():
            parser.error(f"--json: file not found: {args.json}")
        items = list(sources.json_records(args.json))
        return items, len(items), args.out or Path("shards") / args.json.stem
    if args.synthetic < 1:
        parser.error(f"--synthetic needs a positive sample count, got {args.synthetic}")
    if args.task == "chain":
        try:
            items = chain.chain_records(args.synthetic, args.seed, chain.parse_hops(args.hops), args.chain_steps,
                                        args.chain_pointers)
        except ValueError as exc:
            parser.error(f"--hops: {exc}")
        return items, args.synthetic, args.out or Path("shards/chain")
    items = sources.synthetic_records(args.synthetic, args.seed, list_choices=not args.no_choices_in_question)
    return items, args.synthetic, args.out or Path("shards/synthetic")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.split is not None and not SPLIT_NAME.match(args.split):
        parser.error(f"--split must match {SPLIT_NAME.pattern} (it names the shard files), got {args.split!r}")
    if args.maxcount < 1:
        parser.error(f"--maxcount must be >= 1, got {args.maxcount}")
    if args.out is not None and remote.kind(args.out) != "local":
        try:
            remote.Target(args.out)  # a bad target fails before any work
        except ValueError as exc:
            parser.error(str(exc))
    try:
        items, total, out_dir = _resolve(args, parser)
    except ValueError as exc:  # e.g. the json file is not a list
        parser.error(str(exc))

    try:
        summary = write_shards(items, out_dir, args.split, maxcount=args.maxcount, image_size=args.image_size,
                               workers=args.workers, max_errors=args.max_errors, total=total,
                               progress=not args.no_progress)
    except OSError as exc:  # an upload that failed (remote --out)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for note in summary["warnings"]:
        print(f"warning: {note}", file=sys.stderr)
    print(f"{summary['split']}: wrote {summary['written']} samples in {summary['shards']} shards to "
          f"{summary['out_dir']}, skipped {summary['skipped']}, {summary['seconds']:.1f} s "
          f"({summary['samples_per_s']:.1f} samples/s)")
    for err in summary["errors"][:N_ERRORS_SHOWN]:
        print(f"  skipped {err['key']}: {err['reason']}")
    if summary["skipped"] > N_ERRORS_SHOWN:
        print(f"  ... {summary['skipped'] - N_ERRORS_SHOWN} more in {summary['errors_at']}")
    if not summary["ok"]:
        print(f"error: {summary['skipped']} skipped items > --max-errors {args.max_errors} "
              f"(see {summary['errors_at']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
