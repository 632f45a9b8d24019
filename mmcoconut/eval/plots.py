"""Figures from a run's ``metrics.jsonl`` (schema: docs/internals.md); matplotlib (Agg) is an optional extra.

``plot_run(run_dir, out_dir=None) -> list of written PNG paths``:
- ``loss.png``: train loss over steps; stage boundaries (``stage`` records, or changes of ``stage`` in train
  records) as vertical lines;
- ``loss_scale.png``: loss scale over steps (log y); steps where ``skipped_steps`` grew are marked;
- ``val_accuracy.png``: validation MC per curriculum stage (last ``val`` record of each stage), one line per view;
- ``eval_views.png``: MC/DA bars per view from ``eval`` records (last record of each view).
A figure whose data is absent is skipped with a printed note.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

FIGURES = ("loss.png", "loss_scale.png", "val_accuracy.png", "eval_views.png")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl; blank lines are skipped, a bad line raises ValueError naming file and line."""
    recs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            recs.append(rec)
    return recs


def _num(x: Any) -> float | None:
    """A finite float, or None (missing, null, non-numeric, nan/inf)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _kind(recs: list[dict], kind: str) -> list[dict]:
    return [r for r in recs if r.get("kind") == kind]


def stage_boundaries(recs: list[dict]) -> list[tuple[float, Any]]:
    """(step, new stage) at each stage change: from ``stage`` records, else from train records' ``stage``."""
    marks = [(_num(r.get("step")), r.get("stage")) for r in _kind(recs, "stage")]
    marks = [(s, k) for s, k in marks if s is not None]
    if marks:
        return sorted(marks, key=lambda m: m[0])
    out, prev = [], None
    for r in _kind(recs, "train"):
        step, stage = _num(r.get("step")), r.get("stage")
        if step is None or stage is None:
            continue
        if prev is not None and stage != prev:
            out.append((step, stage))
        prev = stage
    return out


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib, an optional extra: pip install 'mmcoconut[plots]' "
                           "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _stage_lines(ax, bounds):
    for i, (step, stage) in enumerate(bounds):
        ax.axvline(step, color="gray", ls="--", lw=0.8, label="stage change" if i == 0 else None)
        ax.annotate(f"stage {stage}", (step, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7, color="gray")


def _save(plt, fig, ax, path) -> None:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_loss(plt, recs, path):
    pts = [(_num(r.get("step")), _num(r.get("loss"))) for r in _kind(recs, "train")]
    pts = sorted((s, v) for s, v in pts if s is not None and v is not None)
    if not pts:
        return "no train records with step and loss"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label="train loss")
    _stage_lines(ax, stage_boundaries(recs))
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    return _save(plt, fig, ax, path)


def _plot_loss_scale(plt, recs, path):
    train = sorted((r for r in _kind(recs, "train") if _num(r.get("step")) is not None), key=lambda r: r["step"])
    pts, skipped, prev = [], [], None
    for r in train:
        step, scale, sk = _num(r["step"]), _num(r.get("loss_scale")), _num(r.get("skipped_steps"))
        if scale is not None and scale > 0:
            pts.append((step, scale))
            # skipped_steps is cumulative: mark the records at which it grew (first record: if > 0).
            if sk is not None and sk > (prev if prev is not None else 0):
                skipped.append((step, scale))
        if sk is not None:
            prev = sk
    if not pts:
        return "no positive loss_scale in train records (bf16/fp32 run?)"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label="loss scale")
    if skipped:
        ax.scatter([p[0] for p in skipped], [p[1] for p in skipped], color="red", marker="x", zorder=3,
                   label="skipped step(s)")
    ax.set_yscale("log")
    _stage_lines(ax, stage_boundaries(recs))
    ax.set(xlabel="step", ylabel="loss scale", title="Loss scale")
    return _save(plt, fig, ax, path)


def _plot_val(plt, recs, path):
    last: dict[str, dict] = {}   # view -> {stage: (step, mc)}, keeping the latest step per stage
    for r in _kind(recs, "val"):
        stage, mc, step = _num(r.get("stage")), _num(r.get("mc")), _num(r.get("step"))
        if stage is None or mc is None:
            continue
        per = last.setdefault(str(r.get("view", "?")), {})
        step = step if step is not None else -math.inf
        if stage not in per or step >= per[stage][0]:
            per[stage] = (step, mc)
    if not last:
        return "no val records with stage and mc"
    fig, ax = plt.subplots(figsize=(6, 4))
    for view in sorted(last):
        stages = sorted(last[view])
        ax.plot(stages, [last[view][s][1] for s in stages], marker="o", label=view)
    ax.set(xlabel="stage", ylabel="MC accuracy (%)", title="Validation MC accuracy per stage")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(plt, fig, ax, path)


def _plot_eval(plt, recs, path):
    views: dict[str, dict] = {}
    for r in _kind(recs, "eval"):
        views[str(r.get("view", "?"))] = r   # last record per view wins
    if not views:
        return "no eval records"
    names = sorted(views)
    mc = [_num(views[v].get("mc")) for v in names]
    da = [_num(views[v].get("da")) for v in names]
    if all(x is None for x in mc + da):
        return "eval records have neither mc nor da"
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 4))
    w = 0.38
    for off, vals, label in ((-w / 2, mc, "MC"), (w / 2, da, "DA")):
        xs = [i + off for i, v in enumerate(vals) if v is not None]
        ys = [v for v in vals if v is not None]
        if ys:
            bars = ax.bar(xs, ys, width=w, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="accuracy (%)", title="Evaluation by view")
    return _save(plt, fig, ax, path)


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[str]:
    """Write the figures of ``run_dir/metrics.jsonl`` to ``out_dir`` (default: run_dir); return their paths."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    recs = read_metrics(metrics)
    plt = _import_pyplot()
    out_dir = str(out_dir if out_dir is not None else run_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, fn in zip(FIGURES, (_plot_loss, _plot_loss_scale, _plot_val, _plot_eval)):
        path = os.path.join(out_dir, name)
        why = fn(plt, recs, path)
        if why:
            print(f"note: skipping {name}: {why}")
        else:
            written.append(path)
    return written
