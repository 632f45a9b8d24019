"""mmcoconut-predict MODEL INPUT OUT.json [--images DIR] [--view coconut] [--stage K | --n-latents N]
[--batch-size B] [--max-samples N] [--annotations FILE] [--device D]

Predictions in the official A-OKVQA format {question_id: {multiple_choice, direct_answer}} (the chosen choice's
text for both), and MC/DA when the input has answers, over the whole expected question set (every sample the
shards declare, every entry of a json input, or the --annotations file): a question without a prediction (lost
shard, unreadable image, malformed entry) scores 0, as in the official scorer. No DeepSpeed needed. MODEL: an export or a DeepSpeed
checkpoint. INPUT, one of:
  shards                 a shard dir, brace pattern or '::' list (the evaluation path, mmcoconut-eval's numbers)
  seed json list         [{image, question, steps, answer, ...}], image paths relative to the json file
  official A-OKVQA json  aokvqa_v1p0_<split>.json with --images DIR (the COCO split dir: DIR/<image_id:012>.jpg)
Every prompt is built in the model's training format: the question lists its choices (" The choices are 0: ...")
only when the model was trained that way (data.choices_in_question), whatever the input stores; images are read
from the files as they are (shards hold them resized to --image-size).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

VIEWS = ("coconut", "cot", "nocot", "dummy")


def json_kind(path: Path):
    """(entries, "aokvqa" | "seed") of a json input; ValueError naming the file otherwise."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise ValueError(f"{path}: expected a non-empty json list of question objects")
    first = entries[0]
    if "image" in first:
        return entries, "seed"
    if "image_id" in first and "choices" in first:
        return entries, "aokvqa"
    raise ValueError(f"{path}: entries have neither 'image' (seed format) nor 'image_id' + 'choices' (A-OKVQA)")


def json_items(path: Path, images: Path | None):
    """(items, skipped): WorkItems of the json input (mmcoconut.data.sources readers), malformed entries skipped."""
    from mmcoconut.data import sources

    entries, kind = json_kind(path)
    if kind == "seed":
        items = list(sources.json_records(path))
    else:
        if images is None or not images.is_dir():
            raise ValueError(f"{path} is an official A-OKVQA file: give the COCO image dir with --images DIR")
        items = []
        for i, e in enumerate(entries):
            reason = sources._check_aokvqa(e)  # the shard writer's own validation
            if reason:
                items.append(sources.WorkItem(f"entry-{i}", {}, None, reason))
            else:
                items.append(sources.WorkItem(e["question_id"], sources.aokvqa_record(e),
                                              sources.FileImage(str(images / f"{e['image_id']:012d}.jpg"))))
    ok = [it for it in items if it.error is None]
    return ok, [(it.key, it.error) for it in items if it.error is not None]


def predict_json(hf, items, view: str, n_latents, batch_size: int):
    """Rows for eval.evaluate.score_rows: the stored question in the model's prompt format, images from files."""
    rows, skipped = [], []
    for i in range(0, len(items), batch_size):
        batch, images = [], []
        for it in items[i:i + batch_size]:
            try:
                images.append(it.image(0))
                batch.append(it)
            except OSError as e:
                skipped.append((it.key, f"image: {e}"))
        if not batch:
            continue
        res = hf.answer(images, [it.record["question"] for it in batch], [it.record.get("choices") for it in batch],
                        view=view, n_latents=n_latents, batch_size=batch_size)
        for it, r in zip(batch, res):
            rows.append({"question_id": str(it.record.get("question_id", it.key)), "meta": it.record,
                         "key": it.key, "text": r["text"], "answer": r["answer"], "n_tokens": r["n_tokens"],
                         "n_latents": r.get("n_latents", 0)})
    return rows, skipped


def _json_expected(items, skipped, max_samples):
    """The expected set of a json input: every entry read (malformed ones count as missing, scored 0)."""
    from mmcoconut.eval.expected import Expected

    exp = Expected(source="json input", subset=max_samples)
    for it in items:
        q = str(it.record.get("question_id", it.key))
        exp.records[q] = dict(it.record, question_id=q)
        exp.key_to_qid[it.key] = q
    exp.unknown = [(-1, f"malformed: {key}: {why}", None) for key, why in skipped]
    return exp


def main(argv=None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ap = argparse.ArgumentParser(prog="mmcoconut-predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="export dir or DeepSpeed checkpoint")
    ap.add_argument("input", help="shards, a seed json list, or an official A-OKVQA json (with --images)")
    ap.add_argument("out", help="predictions json {question_id: {multiple_choice, direct_answer}}")
    ap.add_argument("--images", type=Path, default=None, help="COCO image dir for an official A-OKVQA json")
    ap.add_argument("--view", default="coconut", choices=VIEWS)
    ap.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size of the model's config")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--stage", type=int, default=None, help="shards: per-sample latents at stage K (default: the last)")
    g.add_argument("--n-latents", type=int, default=None, help="one latent count for every prompt")
    ap.add_argument("--annotations", default=None, help="official annotation json: the expected question set")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    import time

    import torch

    from mmcoconut.config import ConfigError
    from mmcoconut.eval.evaluate import default_n_latents, generate_view
    from mmcoconut.eval.expected import expected_set
    from mmcoconut.eval.metrics import save_predictions
    from mmcoconut.eval.scoring import latent_summary, score_rows
    from mmcoconut.export.hf_export import load_any, to_hf

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    inp = Path(args.input)
    try:
        items = skipped = None
        if inp.suffix == ".json" and inp.is_file():
            items, skipped = json_items(inp, args.images)
            items = items[:args.max_samples] if args.max_samples else items
            expected = _json_expected(items, skipped, args.max_samples)
        else:
            expected = expected_set(args.input, args.max_samples, args.annotations)
        model, tok, improc, cfg, _ = load_any(args.model, device=device)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bs = args.batch_size or cfg.eval.batch_size
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    if items is None:
        rows, secs = generate_view(model, tok, improc, cfg, args.input, args.view, args.n_latents, batch_size=bs,
                                   max_samples=args.max_samples, stage=args.stage, progress=True)
    else:  # a json input has no step counts to apply the per-sample rule to: one count for every prompt
        n_lat = default_n_latents(cfg, args.stage) if args.n_latents is None else args.n_latents
        rows, more = predict_json(to_hf(model, tok, improc, cfg), items, args.view, n_lat, bs)
        rows += [{"key": key, "skipped": f"unreadable: {why}"} for key, why in more]  # named as missing
        skipped += more
        secs = time.perf_counter() - t0
    s = score_rows(rows, expected)
    save_predictions(args.out, s["preds"])
    print(f"predict: {s['n_generated']} generated of {s['n_expected']} expected ({s['n_missing']} missing: "
          f"{s['missing'] or 'none'}), view {args.view}, latents {latent_summary(s['latents'])}, "
          f"{s['n_generated'] / max(secs, 1e-9):.1f} samples/s, {s['empty']} empty, {s['fallback']} fuzzy "
          f"fallbacks -> {args.out}")
    for key, reason in (skipped or [])[:5]:
        print(f"  skipped {key}: {reason}")
    if skipped:
        print(f"skipped {len(skipped)} malformed entries or unreadable images (each scores 0)")
    if s["mc"] is not None or s["da"] is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"MC {fmt(s['mc'])} (n={s['n_mc']})  DA {fmt(s['da'])} (n={s['n_da']})")
    if s["note"]:
        print(f"note: {s['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
