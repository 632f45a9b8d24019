"""tools/make_shards.py and mmcoconut.data.{sources,sharding,synthetic} on fabricated data (CPU, tmp dirs)."""
from __future__ import annotations

import io
import os
import json
import re
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_shards  # noqa: E402
from mmcoconut.data import synthetic  # noqa: E402
from mmcoconut.modeling.prompt import choices_suffix  # noqa: E402
from mmcoconut.data.sharding import write_shards  # noqa: E402
from mmcoconut.data.sources import synthetic_records  # noqa: E402

OFFICIAL_FIELDS = ("split", "image_id", "question_id", "choices", "correct_choice_idx", "direct_answers",
                   "difficult_direct_answer", "rationales")


def save_jpeg(path: Path, size=(64, 48), colour=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def official_entry(i: int, split: str = "train") -> dict:
    entry = {"split": split, "image_id": 1000 + i, "question_id": f"q{i}XyZ",
             "question": f"What is the café sign number {i} for?", "choices": ["cat", "dog", "horse", "cow"],
             "correct_choice_idx": i % 4, "direct_answers": [f"answer {j}" for j in range(10)],
             "difficult_direct_answer": i == 2, "rationales": [f"Step {i}.{j} ünïcode." for j in range(3)]}
    if split == "test":
        for field in ("correct_choice_idx", "direct_answers", "rationales"):
            del entry[field]
    return entry


@pytest.fixture()
def aokvqa(tmp_path):
    """5 train records: images 0-2 fine (different shapes), 3 missing, 4 truncated; 2 test records."""
    ann, coco = tmp_path / "aokvqa", tmp_path / "coco"
    ann.mkdir()
    train = [official_entry(i) for i in range(5)]
    sizes = {0: (640, 480), 1: (300, 500), 2: (100, 80)}
    for i, size in sizes.items():
        save_jpeg(coco / "train2017" / f"{1000 + i:012d}.jpg", size)
    good = save_jpeg(tmp_path / "tmp.jpg", (400, 300))
    (coco / "train2017" / f"{1004:012d}.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (ann / "aokvqa_v1p0_train.json").write_text(json.dumps(train), encoding="utf-8")
    test = [official_entry(i, "test") for i in range(2)]
    for e in test:
        save_jpeg(coco / "test2017" / f"{e['image_id']:012d}.jpg")
    (ann / "aokvqa_v1p0_test.json").write_text(json.dumps(test), encoding="utf-8")
    return {"ann": ann, "coco": coco, "train": train, "test": test, "out": tmp_path / "shards"}


def read_shards(out: Path, split: str) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob(f"{split}-*.tar"))]
    samples = []
    for s in wds.WebDataset(urls, shardshuffle=False):
        rec = json.loads(s["json"].decode("utf-8"))
        samples.append({"key": s["__key__"], "json": rec, "json_bytes": s["json"], "shard": Path(s["__url__"]).name,
                        "image": Image.open(io.BytesIO(s["jpg"]))})
    return samples


def run(*argv) -> int:
    return make_shards.main([*map(str, argv), "--no-progress"])


def official_args(d, split="train"):
    return ["--aokvqa-dir", d["ann"], "--coco-dir", d["coco"], "--split", split, "--out", d["out"]]


def test_official_train(aokvqa):
    assert run(*official_args(aokvqa)) == 1  # 2 skipped > default --max-errors 0
    samples = read_shards(aokvqa["out"], "train")
    assert [s["key"] for s in samples] == ["q0XyZ", "q1XyZ", "q2XyZ"]
    for s, entry in zip(samples, aokvqa["train"]):
        rec = s["json"]
        for field in OFFICIAL_FIELDS:
            assert rec[field] == entry[field], field
        assert rec["raw_question"] == entry["question"]
        assert rec["question"] == entry["question"] + " The choices are 0: cat, 1: dog, 2: horse, 3: cow"
        assert rec["steps"] == entry["rationales"]
        assert rec["answer"] == str(entry["correct_choice_idx"])
        assert rec["source"] == "aokvqa"
        assert "café" in s["json_bytes"].decode("utf-8")  # UTF-8, not \u escapes
        assert s["image"].mode == "RGB" and min(s["image"].size) == 224
    assert samples[0]["image"].size == (299, 224) and samples[1]["image"].size == (224, 373)  # aspect kept

    errors = [json.loads(line) for line in (aokvqa["out"] / "errors.jsonl").read_text().splitlines()]
    assert [(e["split"], e["key"], e["source"]) for e in errors] == [("train", "q3XyZ", "aokvqa"),
                                                                      ("train", "q4XyZ", "aokvqa")]
    assert errors[0]["reason"].startswith("missing image") and "000000001003.jpg" in errors[0]["reason"]
    assert errors[1]["reason"].startswith("unreadable image") and "000000001004.jpg" in errors[1]["reason"]
    assert json.loads((aokvqa["out"] / "sizes.json").read_text()) == {"train-000000.tar": 3}


def test_official_max_errors_maxcount_and_test_split(aokvqa):
    out = aokvqa["out"]
    assert run(*official_args(aokvqa), "--max-errors", 2, "--maxcount", 2, "--image-size", 32) == 0
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert [min(s["image"].size) for s in read_shards(out, "train")] == [32, 32, 32]

    assert run(*official_args(aokvqa, "test")) == 0  # test split: no answers or rationales
    test = read_shards(out, "test")
    assert [s["key"] for s in test] == ["q0XyZ", "q1XyZ"]
    for s, entry in zip(test, aokvqa["test"]):
        assert s["json"]["answer"] == "" and s["json"]["steps"] == []
        assert "correct_choice_idx" not in s["json"] and s["json"]["choices"] == entry["choices"]
    # sizes.json and errors.jsonl merge the splits
    assert json.loads((out / "sizes.json").read_text()) == {
        "test-000000.tar": 2, "train-000000.tar": 2, "train-000001.tar": 1}
    longest = {}  # steps.json: longest step list per shard (read by the training pre-flight)
    for split in ("train", "test"):
        for s in read_shards(out, split):
            longest[s["shard"]] = max(longest.get(s["shard"], 0), len(s["json"]["steps"]))
    assert json.loads((out / "steps.json").read_text()) == longest and longest["test-000000.tar"] == 0
    assert longest["train-000000.tar"] > 0
    assert len((out / "errors.jsonl").read_text().splitlines()) == 2

    # a rerun with bigger shards replaces the split's old shards
    assert run(*official_args(aokvqa), "--max-errors", -1) == 0
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"]
    assert json.loads((out / "sizes.json").read_text())["train-000000.tar"] == 3


def test_argparse_errors_name_the_path(aokvqa, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    for argv in (["--aokvqa-dir", missing, "--coco-dir", aokvqa["coco"], "--split", "train"],
                 ["--aokvqa-dir", aokvqa["ann"], "--coco-dir", missing, "--split", "train"],
                 ["--aokvqa-dir", aokvqa["ann"], "--coco-dir", aokvqa["coco"], "--split", "val"],
                 ["--json", missing / "x.json"]):
        with pytest.raises(SystemExit) as exc:
            run(*argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "nowhere" in err or "aokvqa_v1p0_val.json" in err


def test_json_seed_format(tmp_path):
    data = tmp_path / "data"
    save_jpeg(data / "imgs" / "a.jpg", (50, 100))
    save_jpeg(tmp_path / "elsewhere" / "b.png", (120, 60))
    entries = [
        {"image": "imgs/a.jpg", "question": "Q0?", "steps": ["s1", "s2"], "answer": "yes", "extra": {"k": [1]}},
        {"image": str(tmp_path / "elsewhere" / "b.png"), "question": "Q1?", "steps": [], "answer": 3, "id": 7},
        {"image": "imgs/a.jpg", "question": "Q2?", "steps": "not a list", "answer": "x"},  # malformed
        {"image": "imgs/a.jpg", "question": "Q3?", "steps": ["s"], "answer": "y", "question_id": "a.b/c"},
        {"image": "imgs/a.jpg", "question": "Q4?", "steps": ["s"], "answer": "z", "question_id": "7"},  # dup
    ]
    (data / "mine.json").write_text(json.dumps(entries), encoding="utf-8")
    out = tmp_path / "out"
    assert run("--json", data / "mine.json", "--out", out, "--workers", 2, "--max-errors", 2) == 0
    samples = read_shards(out, "train")
    assert [s["key"] for s in samples] == ["mine-00000000", "7", "a_b_c"]  # '.' and '/' sanitised in keys
    recs = [s["json"] for s in samples]
    assert recs[0]["extra"] == {"k": [1]} and recs[0]["steps"] == ["s1", "s2"] and recs[0]["source"] == "json"
    assert recs[1]["answer"] == "3" and recs[1]["question_id"] == "7" and recs[1]["id"] == 7
    assert recs[2]["question_id"] == "a.b/c"  # verbatim in the json
    assert [min(s["image"].size) for s in samples] == [224, 224, 224]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["key"] for e in errors] == ["mine-00000002", "7"]
    assert "steps" in errors[0]["reason"] and "duplicate" in errors[1]["reason"]


SYN_QUESTION = re.compile(r"Find the (\w+) shape\. Which colour is the shape (one kind|two kinds|three kinds) "
                          r"after it\?")
CYCLE = ["circle", "square", "triangle", "diamond"]  # the kind order the task defines


def expected_answer(rec: dict) -> tuple[str, dict]:
    """Recompute the answer from the scene and the question text alone."""
    colour, hops = SYN_QUESTION.fullmatch(rec["raw_question"]).groups()
    scene = rec["scene"]
    (anchor,) = [s for s in scene if s["colour"] == colour]
    n = ["one kind", "two kinds", "three kinds"].index(hops) + 1
    (target,) = [s for s in scene if s["kind"] == CYCLE[(CYCLE.index(anchor["kind"]) + n) % 4]]
    return target["colour"], target


def test_synthetic_records_are_consistent():
    for index in range(200):
        rec = synthetic.make_record(index, seed=3)
        answer, target = expected_answer(rec)
        assert rec["choices"][rec["correct_choice_idx"]] == rec["answer"] == answer == rec["direct_answers"][0]
        scene_colours = {s["colour"] for s in rec["scene"]}
        anchor_colour = rec["raw_question"].split()[2]
        # the three other scene colours + one colour not in the scene: text alone cannot beat 25 %
        assert len(set(rec["choices"])) == 4 and anchor_colour not in rec["choices"]
        assert len(set(rec["choices"]) - scene_colours) == 1
        assert rec["answer"] in scene_colours
        assert rec["question"] == rec["raw_question"] + choices_suffix(rec["choices"])
        assert rec["steps"] == rec["rationales"] and len(rec["steps"]) == 3
        assert rec["steps"][-1] == f"The {target['kind']} {target['colour']}."
        quadrants = {(s["x"], s["y"]) for s in rec["scene"]}
        assert quadrants == {(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)}
        assert len(scene_colours) == len({s["kind"] for s in rec["scene"]}) == 4
    img = synthetic.draw_image(rec, size=64)
    assert img.size == (64, 64) and img.mode == "RGB"
    centre = img.getpixel((int(target["x"] * 64), int(target["y"] * 64)))
    assert max(abs(a - b) for a, b in zip(centre, synthetic.COLOURS[target["colour"]])) < 40
    texts = synthetic.synthetic_texts(5, seed=0)
    assert len(texts) == 5 and texts == synthetic.synthetic_texts(5, seed=0)


def test_synthetic_shards_deterministic(tmp_path):
    def shard(out, seed, workers):
        summary = write_shards(synthetic_records(12, seed), out, "train", maxcount=5, image_size=48,
                               workers=workers, progress=False)
        assert summary["written"] == 12 and summary["shards"] == 3 and summary["ok"]
        return sorted(out.glob("train-*.tar"))

    a = shard(tmp_path / "a", 1, workers=1)
    b = shard(tmp_path / "b", 1, workers=2)
    shard(tmp_path / "c", 2, workers=1)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]  # byte-identical tars for any workers
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {
        "train-000000.tar": 5, "train-000001.tar": 5, "train-000002.tar": 2}
    sa, sc = read_shards(tmp_path / "a", "train"), read_shards(tmp_path / "c", "train")
    assert [s["key"] for s in sa][:2] == ["syn1-0000000", "syn1-0000001"]
    assert [s["json_bytes"] for s in sa] != [s["json_bytes"] for s in sc]
    pixels = [s["image"].convert("RGB").tobytes() for s in sa]
    assert len(set(pixels)) == len(pixels) and all(s["image"].size == (48, 48) for s in sa)


def test_synthetic_cli(tmp_path):
    out = tmp_path / "syn"
    assert run("--synthetic", 6, "--seed", 5, "--split", "val", "--out", out, "--workers", 1) == 0
    samples = read_shards(out, "val")
    assert [s["json"] for s in samples] == [synthetic.make_record(i, 5) for i in range(6)]
    assert (out / "errors.jsonl").read_text() == ""


def test_synthetic_question_without_choice_list(tmp_path):
    """--no-choices-in-question: the same samples, the question text without the choice list (json keeps it)."""
    for i in range(5):
        full, short = synthetic.make_record(i, 3), synthetic.make_record(i, 3, list_choices=False)
        assert short["question"] == full["raw_question"] and full["question"].startswith(short["question"] + " ")
        assert {k: v for k, v in short.items() if k != "question"} == {k: v for k, v in full.items() if k != "question"}
    assert make_shards.main(["--synthetic", "3", "--seed", "3", "--split", "val", "--out", str(tmp_path), "--maxcount",
                             "3", "--image-size", "32", "--workers", "1", "--no-progress",
                             "--no-choices-in-question"]) == 0
    recs = [json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / "val-000000.tar"), shardshuffle=False)]
    assert [r["question"] for r in recs] == [synthetic.make_record(i, 3)["raw_question"] for i in range(3)]


def test_pool_workers_never_run_the_callers_stop_signal_handlers(tmp_path):
    """A process with the trainer's stop-signal handlers (it shards a seed json at start) creates pools and
    terminates them at once, before the workers started: every worker dies on terminate() (no hang) and no worker's
    SIGTERM reaches the caller's wakeup pipe as a stop request. Plain Pool(): both happened."""
    import subprocess

    code = ("import faulthandler, time\n"
            "faulthandler.dump_traceback_later(120, exit=True)\n"
            "from mmcoconut.train.signals import stop_request\n"
            "from mmcoconut.data import sharding\n"
            "s = stop_request()\n"
            "for _ in range(30):\n"
            "    with sharding._pool(2):\n"
            "        pass\n"
            "time.sleep(0.5)\n"
            "print('stop requested:', s.requested)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and "stop requested: False" in p.stdout, (p.returncode, p.stdout, p.stderr[-3000:])
