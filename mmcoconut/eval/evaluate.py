"""Four-view evaluation (nocot / cot / coconut / dummy) of an MMCoconut model on a shard set.

For every view: batched KV-cached generation (`model.generate`) over this rank's `EvalLoader` part, with a tqdm
bar on rank 0; coconut / dummy prompts get Coconut's per-sample latent count min(max_latent_stage, #steps, stage)
x c_thought (pad_latent_to_max false; max_latent_stage x c_thought when true) unless `n_latents` fixes one
count. The answer is the text after the last "### ". Rows are gathered (`all_gather_object`) and scored on
every rank against the expected question set (mmcoconut.eval.expected: the annotation file, or every sample the
shards declare; a `max_samples` subset is scored over that subset) by `scoring.score_rows`. Rank 0 prints one
summary line per view, the table and the latent-use gap (coconut - dummy), and writes `predictions_<view>.json`
(official format), `generations_<view>.jsonl`, `metrics.jsonl` records and `eval_results.json`.
`evaluate(...)` is also what the trainer's per-epoch validation calls.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from ..data.curriculum import cot_markers
from ..modeling.prompt import extract_answer
from .expected import Expected, expected_set
from .metrics import save_predictions
from .scoring import format_table, latent_summary, latent_use_gap, score_rows, summary_line

VIEWS = ("nocot", "cot", "coconut", "dummy")


def default_n_latents(cfg, stage: Optional[int] = None) -> int:
    """One latent count for every row: min(stage, max_latent_stage) * c_thought (default: the last stage).
    Evaluation itself uses the per-sample rule (pass `stage` to `evaluate`); this is the fixed-count override."""
    c = cfg.curriculum
    k = c.max_latent_stage if stage is None else min(int(stage), c.max_latent_stage)
    return max(0, k) * c.c_thought


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def _gather(obj, world_size: int) -> list:
    """Every rank's `obj` (list in rank order); a plain [obj] without a process group."""
    d = _dist()
    if world_size <= 1 or d is None:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate_view(model, tokenizer, image_processor, cfg, shards, view: str, n_latents: Optional[int] = None, *,
                  rank: int = 0, world_size: int = 1, batch_size: Optional[int] = None,
                  max_samples: Optional[int] = None, max_new_tokens: Optional[int] = None,
                  stage: Optional[int] = None, progress: bool = False) -> tuple[list[dict], float]:
    """Generate on this rank's part of `shards` in one view -> (rows, seconds spent).

    n_latents: one count for every coconut/dummy row; None: the per-sample rule at `stage` (default
    max_latent_stage). A row: question_id, key, meta (the shard json), text (decoded generation), answer,
    n_tokens, n_latents; a sample the loader could not build gives {"key", "skipped": reason}.
    """
    from ..data.eval_loader import EvalLoader

    loader = EvalLoader(shards, tokenizer, image_processor, cfg, view=view,
                        n_latents=n_latents if view in ("coconut", "dummy") else 0,
                        batch_size=batch_size or cfg.eval.batch_size, rank=rank, world_size=world_size,
                        n_image_tokens=model.n_image_tokens, max_samples=max_samples, stage=stage)
    device, dtype = _model_device(model), next(model.parameters()).dtype
    dummy = cfg.eval.dummy_latent if view == "dummy" else None
    d = _dist()
    if world_size > 1 and d is not None:
        d.barrier()  # time generation only, not other ranks' start-up skew (generate may sync ranks)
    rows, t0 = [], time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"eval {view}", unit="batch", disable=not progress or rank != 0,
               dynamic_ncols=True, leave=False)
    for batch in loader:
        rows += [{"key": k, "skipped": why} for k, why in batch.get("skipped", ())]
        pos = batch.get("position_ids")
        new = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             batch["pixel_values"].to(device, dtype),
                             position_ids=None if pos is None else pos.to(device),
                             max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens, dummy_latent=dummy)
        valid = batch.get("valid")
        valid = [True] * len(new) if valid is None else [bool(v) for v in valid]
        keys = batch.get("keys") or [None] * len(new)
        n_lat = batch["n_latents"].tolist() if "n_latents" in batch else [0] * len(new)
        for ids, meta, ok, key, nl in zip(new, batch["meta"], valid, keys, n_lat):
            if not ok:
                continue
            ids = [int(t) for t in ids]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            rows.append({"question_id": str(meta.get("question_id", key)), "key": key, "meta": meta, "text": text,
                         "answer": extract_answer(text), "n_tokens": len(ids), "n_latents": int(nl)})
        bar.update(1)
    bar.close()
    return rows, time.perf_counter() - t0


def _append_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def evaluate(model, tokenizer, image_processor, cfg, shards, views: Optional[Sequence[str]] = None,
             out_dir: Optional[str] = None, rank: int = 0, world_size: int = 1, *, n_latents: Optional[int] = None,
             max_samples: Optional[int] = None, batch_size: Optional[int] = None, extra: Optional[dict] = None,
             metrics_path: Optional[str] = None, verbose: bool = True, stage: Optional[int] = None,
             annotations: Optional[str] = None, progress: Optional[bool] = None) -> dict:
    """Evaluate `views` (default cfg.eval.views) on `shards`; returns {view: {mc, da, n (= n_expected),
    n_expected, n_scored, n_missing, missing {reason: count}, empty, fallback, answer_len, samples_per_s,
    n_latents, latents_desc, subset, note}} on every rank (identical).

    n_latents: one latent count for every coconut/dummy row; None (default): Coconut's per-sample count at
    `stage` (default max_latent_stage). annotations: official annotation file = the expected set (default
    cfg.eval.annotations; else the shards). Rank 0 writes into `out_dir` (None: nothing written):
    predictions_<view>.json, generations_<view>.jsonl, metrics.jsonl (appended; `metrics_path` to append
    elsewhere, e.g. the run dir's), eval_results.json; with `verbose` it prints a summary line per view, the
    table and the latent-use gap; `progress` (default: verbose) shows a tqdm bar per view.
    `extra` is merged into each metrics.jsonl record (e.g. step/epoch from the trainer). Every rank must call it.
    """
    views = list(views or cfg.eval.views)
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ValueError(f"unknown eval views {bad}; choose from {list(VIEWS)}")
    expected: Expected = expected_set(shards, max_samples, annotations or cfg.eval.annotations)
    progress = verbose if progress is None else progress
    was_training = model.training
    model.eval()
    results, notes = {}, list(expected.notes)
    try:
        for view in views:
            rows, secs = generate_view(model, tokenizer, image_processor, cfg, shards, view, n_latents, rank=rank,
                                       world_size=world_size, max_samples=max_samples, batch_size=batch_size,
                                       stage=stage, progress=progress)
            parts = _gather((rows, secs), world_size)
            all_rows = [r for part, _ in parts for r in part]
            secs = max(s for _, s in parts)
            s = score_rows(all_rows, expected)
            lat = s["latents"]
            res = {k: s[k] for k in ("mc", "da", "n", "n_expected", "n_scored", "n_missing", "missing", "empty",
                                     "fallback", "answer_len", "n_mc", "n_da", "subset")}
            res.update(samples_per_s=s["n_generated"] / secs if secs > 0 else 0.0, latents_desc=latent_summary(lat),
                       n_latents=(next(iter(lat)) if len(lat) == 1 else
                                  sum(k * v for k, v in lat.items()) / max(1, sum(lat.values()))),
                       missing_examples=s["missing_examples"])
            if s["note"]:
                res["note"] = s["note"]
                notes += [n for n in s["note"].split("; ") if n not in notes]
            results[view] = res
            if rank == 0 and verbose:
                print(summary_line(view, res), flush=True)
            if rank == 0 and out_dir is not None:
                out = Path(out_dir)
                save_predictions(out / f"predictions_{view}.json", s["preds"])
                with open(out / f"generations_{view}.jsonl", "w", encoding="utf-8") as f:
                    for r in s["rows"]:
                        f.write(json.dumps({"question_id": r["question_id"], "text": r["text"],
                                            "answer": r["answer"], "n_tokens": r["n_tokens"],
                                            "n_latents": r["n_latents"]}) + "\n")
    finally:
        model.train(was_training)
    gap = latent_use_gap(results)
    if rank == 0:
        if verbose:
            print(format_table(results), flush=True)
            if gap is not None and cot_markers(cfg.curriculum):  # a model trained with latents
                fmt = lambda v: "n/a" if v is None else f"{v:+.2f} points"  # noqa: E731
                print(f"latent-use gap (coconut - dummy, {cfg.eval.dummy_latent} latents): MC {fmt(gap['mc'])}, "
                      f"DA {fmt(gap['da'])}", flush=True)
            for note in notes:
                print(f"note: {note}", flush=True)
        if out_dir is not None:
            out = Path(out_dir)
            keys = ("mc", "da", "answer_len", "samples_per_s", "n", "n_expected", "n_scored", "n_missing",
                    "missing", "empty", "fallback", "n_latents", "subset")
            recs = [{"kind": "eval", "view": v, **{k: r[k] for k in keys}, "time": time.time(), **(extra or {})}
                    for v, r in results.items()]
            _append_jsonl(Path(metrics_path) if metrics_path else out / "metrics.jsonl", recs)
            summary = {"views": results, "latent_use_gap": gap, "shards": str(shards), "world_size": world_size,
                       "expected": {"source": expected.source, "n_expected": expected.n_expected,
                                    "subset": expected.subset},
                       "n_latents": n_latents if n_latents is not None else next(
                           (results[v]["n_latents"] for v in ("coconut", "dummy") if v in results), 0),
                       "latents": "fixed" if n_latents is not None else "per sample", "stage": stage,
                       "notes": notes, "table": format_table(results), **(extra or {})}
            (out / "eval_results.json").write_text(json.dumps(summary, indent=1))
    return results
