"""Figures from a fabricated metrics.jsonl."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from mmcoconut.eval.plots import plot_run, read_metrics, stage_boundaries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fabricated():
    recs, skipped = [], 0
    for step in range(1, 31):
        stage = step // 10
        if step % 10 == 0:
            recs.append({"kind": "stage", "step": step, "epoch": stage, "stage": stage})
        if step in (3, 4, 17):
            skipped += 1
        recs.append({"kind": "train", "step": step, "epoch": stage, "stage": stage, "loss": 3.0 / step,
                     "lr": 1e-4, "grad_norm": 1.0, "loss_scale": 2.0 ** (16 - skipped), "skipped_steps": skipped,
                     "samples_per_s": 10.0, "tokens_per_s": 1000.0, "time": float(step)})
        if step % 10 == 9:
            for view, mc in (("coconut", 30 + step), ("cot", 25 + step)):
                recs.append({"kind": "val", "step": step, "epoch": stage, "stage": stage, "view": view,
                             "val_loss": 1.0, "mc": mc, "da": mc - 5, "n": 8})
    for view, mc, da in (("coconut", 55.0, 40.0), ("cot", 50.0, None), ("nocot", 45.0, 30.0)):
        recs.append({"kind": "eval", "view": view, "mc": mc, "da": da, "answer_len": 2.0,
                     "samples_per_s": 5.0, "n": 8, "fallback": 0})
    return recs


def write(path, recs, extra=""):
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n" + extra)


def test_plot_run_writes_pngs(tmp_path):
    write(tmp_path / "metrics.jsonl", fabricated())
    out = tmp_path / "plots"
    paths = plot_run(tmp_path, out)
    names = sorted(Path(p).name for p in paths)
    assert names == ["eval_views.png", "loss.png", "loss_scale.png", "val_accuracy.png"]
    for p in paths:
        assert Path(p).stat().st_size > 0 and Path(p).read_bytes()[:4] == b"\x89PNG"


def test_missing_data_is_skipped_with_note(tmp_path, capsys):
    train_only = [r for r in fabricated() if r["kind"] == "train"]
    for r in train_only:
        r["loss_scale"] = None           # bf16 run: no loss scale
    write(tmp_path / "metrics.jsonl", train_only)
    paths = plot_run(tmp_path)
    assert [Path(p).name for p in paths] == ["loss.png"]
    out = capsys.readouterr().out
    assert "skipping loss_scale.png" in out and "skipping val_accuracy.png" in out
    # stage changes derived from train records when no "stage" records exist
    assert [s for s, _ in stage_boundaries(train_only)] == [10, 20, 30]


def test_bad_line_names_file_and_line(tmp_path):
    write(tmp_path / "metrics.jsonl", fabricated()[:3], extra="{not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:4: invalid JSON"):
        read_metrics(tmp_path / "metrics.jsonl")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "metrics.jsonl:4" in r.stderr


def test_cli_writes_to_out(tmp_path):
    write(tmp_path / "metrics.jsonl", fabricated())
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "loss.png").stat().st_size > 0
