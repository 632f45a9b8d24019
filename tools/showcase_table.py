#!/usr/bin/env python
"""The four views at the end of every curriculum stage of a run, as one table (and the no-CoT baseline).

  python tools/showcase_table.py RUN_DIR SHARDS [--baseline NOCOT_RUN_DIR] [--out FILE.md] [--max-samples N]

For each stage, the last epoch checkpoint of that stage (`epochNNN` tags in RUN_DIR) is evaluated in the views
nocot / cot / coconut / dummy with `mmcoconut.eval.evaluate` (coconut / dummy: Coconut's per-sample latent
count at that stage); the table gives MC, the latent-use gap (coconut - dummy) and the generated tokens per
answer. --baseline adds the last checkpoint of an answer-only run (curriculum.no_cot) in the nocot view.
Results also go to <RUN_DIR>/eval-<tag>/ (predictions, generations, eval_results.json).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VIEWS = ("nocot", "cot", "coconut", "dummy")


def stage_checkpoints(run_dir: Path, cfg) -> list[tuple[int, str]]:
    """(stage, tag) of the last epoch checkpoint of each stage, in stage order."""
    from mmcoconut.data.curriculum import stage_for_epoch
    from mmcoconut.export.hf_export import find_checkpoint

    root, _ = find_checkpoint(str(run_dir), None)
    last: dict[int, tuple[int, str]] = {}
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"epoch(\d+)", d.name)
        if m and d.is_dir():
            epoch = int(m.group(1)) - 1  # tag epochNNN is saved after epoch NNN - 1
            stage = stage_for_epoch(cfg.curriculum, epoch)
            if stage not in last or last[stage][0] < epoch:
                last[stage] = (epoch, d.name)
    return [(s, last[s][1]) for s in sorted(last)]


def evaluate_tag(run_dir: Path, tag: str, shards: str, views, stage, max_samples, batch_size) -> dict:
    from mmcoconut.eval.evaluate import evaluate
    from mmcoconut.export.hf_export import load_any

    model, tok, improc, cfg, info = load_any(str(run_dir), tag=tag)
    print(f"\n== {info['checkpoint']} (stage {stage})", flush=True)
    return evaluate(model, tok, improc, cfg, shards, views, str(Path(info["root"]) / f"eval-{tag}"), stage=stage,
                    max_samples=max_samples, batch_size=batch_size, extra={"checkpoint": info["checkpoint"]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("shards")
    ap.add_argument("--baseline", type=Path, default=None, help="run dir of the answer-only (no_cot) run")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    import torch

    from mmcoconut.export.hf_export import load_any

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        *_, cfg, _ = load_any(str(args.run_dir))
        tags = stage_checkpoints(args.run_dir, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for stage, tag in tags:
        res = evaluate_tag(args.run_dir, tag, args.shards, VIEWS, stage, args.max_samples, args.batch_size)
        rows.append((f"{stage}", tag, res))
    lines = ["| stage | checkpoint | nocot | cot | coconut | dummy | coconut - dummy | tokens cot / coconut |",
             "|---|---|---|---|---|---|---|---|"]
    for stage, tag, r in rows:
        gap = r["coconut"]["mc"] - r["dummy"]["mc"]
        lines.append(f"| {stage} | {tag} | {r['nocot']['mc']:.1f} | {r['cot']['mc']:.1f} | {r['coconut']['mc']:.1f} | "
                     f"{r['dummy']['mc']:.1f} | {gap:+.1f} | {r['cot']['answer_len']:.1f} / "
                     f"{r['coconut']['answer_len']:.1f} |")
    if args.baseline is not None:
        try:
            res = evaluate_tag(args.baseline, None, args.shards, ["nocot"], 0, args.max_samples, args.batch_size)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: --baseline: {e}", file=sys.stderr)
            return 2
        lines.append(f"| no-CoT run | {args.baseline.name} | {res['nocot']['mc']:.1f} | | | | | "
                     f"{res['nocot']['answer_len']:.1f} (answer only) |")
    table = "\n".join(lines)
    print("\nMC (%) per stage-end checkpoint, " + f"{rows[-1][2]['coconut']['n_expected'] if rows else 0} val "
          "questions, chance 25 %:\n" + table, flush=True)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
