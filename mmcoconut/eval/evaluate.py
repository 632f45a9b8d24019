"""Four-view evaluation (nocot / cot / coconut / dummy) of an MMCoconut model on a shard set.

For every view: batched KV-cached generation (`model.generate`) over this rank's `EvalLoader` part, the answer is
the text after the last "### ", mapped to a choice (`map_to_choice`); rows are gathered on rank 0
(`all_gather_object`), which writes `predictions_<view>.json` (official format), scores MC/DA with the official
metrics, appends `{"kind": "eval", ...}` to `metrics.jsonl` and writes `eval_results.json`.
`evaluate(...)` is also what the trainer's per-epoch validation calls.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..prompt import ANSWER_MARK, extract_answer  # noqa: F401 (re-exported: the answer format lives in prompt.py)
from .choices import map_to_choice
from .metrics import evaluate_predictions, save_predictions

VIEWS = ("nocot", "cot", "coconut", "dummy")


def default_n_latents(cfg, stage: Optional[int] = None) -> int:
    """Latents in the coconut/dummy prompt: min(stage, max_latent_stage) * c_thought (default: the last stage)."""
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
def generate_view(model, tokenizer, image_processor, cfg, shards, view: str, n_latents: int, *, rank: int = 0,
                  world_size: int = 1, batch_size: Optional[int] = None, max_samples: Optional[int] = None,
                  max_new_tokens: Optional[int] = None) -> tuple[list[dict], float]:
    """Generate on this rank's part of `shards` in one view -> (rows of valid samples, seconds spent).

    A row: question_id, meta (the shard json), text (decoded generation), answer, n_tokens.
    """
    from ..data.loader import EvalLoader

    loader = EvalLoader(shards, tokenizer, image_processor, cfg, view=view,
                        n_latents=n_latents if view in ("coconut", "dummy") else 0,
                        batch_size=batch_size or cfg.eval.batch_size, rank=rank, world_size=world_size,
                        n_image_tokens=model.n_image_tokens, max_samples=max_samples)
    device, dtype = _model_device(model), next(model.parameters()).dtype
    dummy = cfg.eval.dummy_latent if view == "dummy" else None
    d = _dist()
    if world_size > 1 and d is not None:
        d.barrier()  # time generation only, not other ranks' start-up skew (generate may sync ranks)
    rows, t0 = [], time.perf_counter()
    for batch in loader:
        pos = batch.get("position_ids")
        new = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             batch["pixel_values"].to(device, dtype),
                             position_ids=None if pos is None else pos.to(device),
                             max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens, dummy_latent=dummy)
        valid = batch.get("valid")
        valid = [True] * len(new) if valid is None else [bool(v) for v in valid]
        keys = batch.get("keys") or [None] * len(new)
        for ids, meta, ok, key in zip(new, batch["meta"], valid, keys):
            if not ok:
                continue
            ids = [int(t) for t in ids]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            rows.append({"question_id": str(meta.get("question_id", key)), "meta": meta, "text": text,
                         "answer": extract_answer(text), "n_tokens": len(ids)})
    return rows, time.perf_counter() - t0


def score_rows(rows: Sequence[dict]) -> dict:
    """Official predictions + metrics from gathered rows (deduplicated by question_id, first kept)."""
    seen, uniq = set(), []
    for r in rows:
        if r["question_id"] not in seen:
            seen.add(r["question_id"])
            uniq.append(r)
    preds, fallback = {}, 0
    for r in uniq:
        choices = r["meta"].get("choices")
        if choices:
            idx, fb = map_to_choice(r["answer"], choices)
            fallback += int(fb)
            preds[r["question_id"]] = {"multiple_choice": choices[idx], "direct_answer": choices[idx]}
        else:  # no choices (free-form seed data): the raw answer for both modes
            preds[r["question_id"]] = {"multiple_choice": r["answer"], "direct_answer": r["answer"]}
    m = evaluate_predictions([{**r["meta"], "question_id": r["question_id"]} for r in uniq], preds)
    n = len(uniq)
    return {"preds": preds, "mc": m["mc"], "da": m["da"], "n": n, "n_mc": m["n_mc"], "n_da": m["n_da"],
            "fallback": fallback, "answer_len": sum(r["n_tokens"] for r in uniq) / n if n else 0.0,
            "note": m.get("note"), "rows": uniq}


def format_table(results: dict) -> str:
    """Plain-text table: one line per view."""
    def f(v, spec=".2f"):
        return "n/a" if v is None else format(v, spec)
    lines = [f"{'view':<8} {'MC':>7} {'DA':>7} {'ans_len':>8} {'samples/s':>10} {'n':>6} {'fallback':>8}"]
    for view, r in results.items():
        lines.append(f"{view:<8} {f(r['mc']):>7} {f(r['da']):>7} {f(r['answer_len']):>8} "
                     f"{f(r['samples_per_s']):>10} {r['n']:>6} {r['fallback']:>8}")
    return "\n".join(lines)


def _append_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def evaluate(model, tokenizer, image_processor, cfg, shards, views: Optional[Sequence[str]] = None,
             out_dir: Optional[str] = None, rank: int = 0, world_size: int = 1, *, n_latents: Optional[int] = None,
             max_samples: Optional[int] = None, batch_size: Optional[int] = None, extra: Optional[dict] = None,
             metrics_path: Optional[str] = None, verbose: bool = True) -> dict:
    """Evaluate `views` (default cfg.eval.views) on `shards`; returns {view: {mc, da, answer_len, samples_per_s,
    n, fallback, n_latents, note}} on every rank (identical). Rank 0 writes into `out_dir` (None: nothing written):
    predictions_<view>.json, generations_<view>.jsonl, metrics.jsonl (appended; `metrics_path` to append
    elsewhere, e.g. the run dir's), eval_results.json.
    `extra` is merged into each metrics.jsonl record (e.g. step/epoch from the trainer). Every rank must call it.
    """
    views = list(views or cfg.eval.views)
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise ValueError(f"unknown eval views {bad}; choose from {list(VIEWS)}")
    n_lat = default_n_latents(cfg) if n_latents is None else int(n_latents)
    was_training = model.training
    model.eval()
    results, notes = {}, []
    try:
        for view in views:
            rows, secs = generate_view(model, tokenizer, image_processor, cfg, shards, view, n_lat, rank=rank,
                                       world_size=world_size, max_samples=max_samples, batch_size=batch_size)
            parts = _gather((rows, secs), world_size)
            all_rows = [r for part, _ in parts for r in part]
            secs = max(s for _, s in parts)
            s = score_rows(all_rows)
            res = {"mc": s["mc"], "da": s["da"], "answer_len": s["answer_len"],
                   "samples_per_s": s["n"] / secs if secs > 0 else 0.0, "n": s["n"], "fallback": s["fallback"],
                   "n_mc": s["n_mc"], "n_da": s["n_da"], "n_latents": n_lat if view in ("coconut", "dummy") else 0}
            if s["note"]:
                res["note"] = s["note"]
                if s["note"] not in notes:
                    notes.append(s["note"])
            results[view] = res
            if rank == 0 and out_dir is not None:
                out = Path(out_dir)
                save_predictions(out / f"predictions_{view}.json", s["preds"])
                with open(out / f"generations_{view}.jsonl", "w", encoding="utf-8") as f:
                    for r in s["rows"]:
                        f.write(json.dumps({"question_id": r["question_id"], "text": r["text"],
                                            "answer": r["answer"], "n_tokens": r["n_tokens"]}) + "\n")
    finally:
        model.train(was_training)
    if rank == 0:
        if verbose:
            print(format_table(results), flush=True)
            for note in notes:
                print(f"note: {note}", flush=True)
        if out_dir is not None:
            out = Path(out_dir)
            recs = [{"kind": "eval", "view": v, "mc": r["mc"], "da": r["da"], "answer_len": r["answer_len"],
                     "samples_per_s": r["samples_per_s"], "n": r["n"], "fallback": r["fallback"],
                     "n_latents": r["n_latents"], "time": time.time(), **(extra or {})}
                    for v, r in results.items()]
            _append_jsonl(Path(metrics_path) if metrics_path else out / "metrics.jsonl", recs)
            summary = {"views": results, "n_latents": n_lat, "shards": str(shards), "world_size": world_size,
                       "notes": notes, "table": format_table(results), **(extra or {})}
            (out / "eval_results.json").write_text(json.dumps(summary, indent=1))
    return results
