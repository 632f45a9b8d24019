"""Score generated rows against the expected question set, and the reports printed from the scores.

`score_rows(rows, expected)` is the one scoring path of `python -m mmcoconut.eval`, the trainer's per-epoch
validation (both through `evaluate`) and mmcoconut-predict: official-format predictions, MC / DA over the whole
expected set (a question without a prediction scores 0, as in the official A-OKVQA scorer), the missing ones
counted by reason, and empty answers (no text after the answer marker) counted apart from fuzzy fallbacks. An
empty answer is predicted as "" (it scores 0) instead of being mapped to a choice by chance.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Optional, Sequence

from ..modeling.choices import map_to_choice
from .expected import Expected
from .metrics import evaluate_predictions


def _category(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "unknown"


def score_rows(rows: Sequence[dict], expected: Optional[Expected] = None) -> dict:
    """rows: generated rows (question_id, meta, answer, n_tokens[, key, n_latents]) and skipped rows
    ({"key", "skipped": reason}) gathered from every rank. expected=None: the generated and skipped rows
    themselves (what was read), as before expected sets existed."""
    gen, skipped = [], {}
    seen: set = set()
    for r in rows:
        if "skipped" in r:
            skipped.setdefault(r["key"], r["skipped"])
        elif r["question_id"] not in seen:  # deduplicated by question_id, first kept
            seen.add(r["question_id"])
            gen.append(r)
    if expected is None:
        expected = Expected(records={r["question_id"]: {**r["meta"], "question_id": r["question_id"]} for r in gen},
                            unknown=[(-1, reason, None) for reason in skipped.values()], source="generated rows")
    preds, fallback, empty = {}, 0, 0
    for r in gen:
        choices = r["meta"].get("choices")
        if not r["answer"].strip():
            empty += 1
            preds[r["question_id"]] = {"multiple_choice": "", "direct_answer": ""}
        elif choices:
            idx, fb = map_to_choice(r["answer"], choices)
            fallback += int(fb)
            preds[r["question_id"]] = {"multiple_choice": choices[idx], "direct_answer": choices[idx]}
        else:  # no choices (free-form seed data): the raw answer for both modes
            preds[r["question_id"]] = {"multiple_choice": r["answer"], "direct_answer": r["answer"]}
    skipped_qid = {expected.key_to_qid.get(k, k): why for k, why in skipped.items()}
    reasons = {}
    for q in expected.records:
        if q not in preds:
            reasons[q] = expected.missing_reason.get(q) or skipped_qid.get(q) or \
                "no generation: the question was not generated (not read by any rank)"
    all_reasons = list(reasons.values()) + [u[1] for u in expected.unknown]
    m = evaluate_predictions(list(expected.records.values()), preds)
    notes = [m["note"]] if m.get("note") else []
    for mode in ("mc", "da"):  # lost samples (no record) score 0 in the modes that count them
        lost = sum(1 for u in expected.unknown if u[2] is None or u[2][mode])
        if m[mode] is not None and lost:
            n = m[f"n_{mode}"]
            m[mode], m[f"n_{mode}"] = m[mode] * n / (n + lost), n + lost
    blind = sum(1 for u in expected.unknown if u[2] is None)
    if blind and m["da"] is not None:
        notes.append(f"DA counts {blind} lost samples of unknown difficulty as scorable (each 0): no "
                     "questions.jsonl names them; pass the annotation file (--annotations) for the official DA")
    cats = Counter(_category(r) for r in all_reasons)
    examples = {}
    for r in all_reasons:
        examples.setdefault(_category(r), r)
    n_gen = len(gen)
    return {"preds": preds, "mc": m["mc"], "da": m["da"], "n_mc": m["n_mc"], "n_da": m["n_da"],
            "n": expected.n_expected, "n_expected": expected.n_expected, "n_scored": len(expected.records) -
            len(reasons), "n_missing": len(all_reasons), "missing": dict(cats), "missing_examples": examples,
            "n_generated": n_gen, "fallback": fallback, "empty": empty,
            "answer_len": sum(r["n_tokens"] for r in gen) / n_gen if n_gen else 0.0,
            "latents": Counter(int(r.get("n_latents", 0)) for r in gen), "subset": expected.subset,
            "note": "; ".join(notes) or None, "rows": gen}


def latent_summary(counts: Counter) -> str:
    """'3' when every row had 3 latents, '1-3 (mean 2.1)' otherwise."""
    if not counts:
        return "0"
    lo, hi = min(counts), max(counts)
    if lo == hi:
        return str(lo)
    mean = sum(k * v for k, v in counts.items()) / sum(counts.values())
    return f"{lo}-{hi} (mean {mean:.1f})"


def _f(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def summary_line(view: str, r: dict) -> str:
    """One line per view: scores, the denominator and what is missing, empty answers, fallbacks, cost."""
    miss = ", ".join(f"{n} {c}" for c, n in sorted(r["missing"].items())) or "none missing"
    sub = f" (subset: first {r['subset']})" if r.get("subset") is not None else ""
    return (f"eval {view}: MC {_f(r['mc'])} DA {_f(r['da'])} | scored {r['n_scored']}/{r['n_expected']}{sub}, "
            f"{r['n_missing']} missing ({miss}) | {r['empty']} empty, {r['fallback']} fallback | "
            f"{r['answer_len']:.1f} tokens/answer, latents {r['latents_desc']} | {r['samples_per_s']:.1f} samples/s")


def format_table(results: dict) -> str:
    """Plain-text table: one line per view."""
    lines = [f"{'view':<8} {'MC':>7} {'DA':>7} {'ans_len':>8} {'latents':>8} {'samples/s':>10} {'expected':>8} "
             f"{'scored':>7} {'missing':>7} {'empty':>6} {'fallback':>8}"]
    for view, r in results.items():
        lines.append(f"{view:<8} {_f(r['mc']):>7} {_f(r['da']):>7} {_f(r['answer_len']):>8} "
                     f"{r['latents_desc'].split(' ')[0]:>8} {_f(r['samples_per_s'], '.1f'):>10} "
                     f"{r['n_expected']:>8} {r['n_scored']:>7} {r['n_missing']:>7} {r['empty']:>6} "
                     f"{r['fallback']:>8}")
    return "\n".join(lines)


def latent_use_gap(results: dict) -> Optional[dict]:
    """coconut - dummy (points) when both views were scored: how much the answers depend on the continuous
    thoughts (dummy = the same prompts with the latent inputs replaced)."""
    c, d = results.get("coconut"), results.get("dummy")
    if not c or not d:
        return None
    gap = {m: (c[m] - d[m] if c[m] is not None and d[m] is not None else None) for m in ("mc", "da")}
    return gap if gap["mc"] is not None or gap["da"] is not None else None


def predictions_from_generations(records: Sequence[Mapping], texts: Sequence[str]) -> tuple[dict, int]:
    """Official-format predictions ``{question_id: {"multiple_choice": c, "direct_answer": c}}`` from generated
    texts (one per record, in order), and the number of answers that needed the fuzzy fallback.

    ``records`` are shard/official dicts with ``question_id`` and ``choices``. DA uses the chosen choice's text
    (our model answers with a choice index).
    """
    if len(records) != len(texts):
        raise ValueError(f"predictions_from_generations: {len(records)} records but {len(texts)} texts")
    preds, n_fallback = {}, 0
    for rec, text in zip(records, texts):
        qid, choices = rec.get("question_id"), rec.get("choices")
        if qid is None or not choices:
            raise ValueError(f"record {rec.get('question_id', '?')!r} lacks 'question_id' or 'choices'")
        idx, fb = map_to_choice(text, choices)
        n_fallback += int(fb)
        preds[str(qid)] = {"multiple_choice": choices[idx], "direct_answer": choices[idx]}
    return preds, n_fallback
