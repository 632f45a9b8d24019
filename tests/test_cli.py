"""Command lines: launch.sh / demo.sh --help, mmcoconut-ask, mmcoconut-predict on json inputs, and a seed trainer's
flat config (every key) run as `python -m mmcoconut.train seed.yaml` without a launcher, from another directory,
initialised from an export (load_model_path) and exporting from the live engine at the end (export_final)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHOICES = ["red", "blue", "green", "yellow"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_dirs):
    """An export of a tiny model with the run-config defaults (pooled image token), as a seed config builds it."""
    from mmcoconut.config import load_config
    from mmcoconut.factory import build_model, build_tokenizer
    from mmcoconut.export.hf_export import save_export
    cfg = load_config(data={"model": {"lm_id": tiny_dirs["lm"], "vision_id": tiny_dirs["vision"]},
                            "curriculum": {"c_thought": 1, "max_latent_stage": 1}, "eval": {"max_new_tokens": 8}})
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok).eval()
    return save_export(model, tok, cfg, tmp_path_factory.mktemp("cli") / "export")


def _img(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (36, 40, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    return path


@pytest.mark.parametrize("script", ["launch.sh", "tools/demo.sh"])
def test_shell_scripts_print_usage_and_start_nothing(script, tmp_path):
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    for name in ("deepspeed", "python"):  # anything they would start fails loudly instead
        (tmp_path / name).write_text("#!/bin/sh\necho STARTED >&2\nexit 99\n")
        (tmp_path / name).chmod(0o755)
    p = subprocess.run(["bash", str(ROOT / script), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0 and "STARTED" not in p.stderr, p.stderr
    assert "NGPU" in p.stdout if script == "launch.sh" else "four-view" in p.stdout


def test_ask_prints_the_answer_and_json(export_dir, tmp_path, capsys):
    from mmcoconut.cli.ask import main
    from mmcoconut.modeling import MMCoconutForConditionalGeneration
    img = _img(tmp_path / "cat.png")
    args = ["--model", str(export_dir), "--image", str(img), "--question", "What color is the cube?",
            "--choices", "red | blue|green|yellow"]
    assert main(args + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = MMCoconutForConditionalGeneration.from_pretrained(export_dir).answer(str(img), "What color is the cube?",
                                                                               choices=CHOICES)
    assert got == ref
    assert main(args + ["--show-steps", "--view", "cot"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith(tuple(f"{i}: {c}" for i, c in enumerate(CHOICES)))
    assert main(["--model", str(export_dir), "--image", str(tmp_path / "nope.png"), "--question", "q"]) == 2
    assert main(["--model", str(tmp_path), "--image", str(img), "--question", "q"]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_ask_on_a_run_dir_from_another_directory(tiny_dirs, tmp_path, capsys, monkeypatch):
    """A run that recorded relative model paths (models/tiny/lm, as the demo config gives them; runs from before
    paths were recorded absolute): mmcoconut-ask --model <run dir> works from any directory (the run dir's parents
    are tried), and a path found nowhere is one error naming the key and the path."""
    import shutil
    from mmcoconut.cli.ask import main
    from mmcoconut.config import load_config
    from mmcoconut.factory import build_model, build_tokenizer
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    for k in ("lm", "vision"):
        shutil.copytree(tiny_dirs[k], work / "models" / "tiny" / k)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(data={"model": {"lm_id": "models/tiny/lm", "vision_id": "models/tiny/vision"},
                            "curriculum": {"c_thought": 1, "max_latent_stage": 1}, "eval": {"max_new_tokens": 4}})
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok)
    tag = work / "runs" / "demo" / "epoch001"  # a ZeRO-0 checkpoint: the module weights in the model-states file
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "client": {"config": cfg.to_dict()}}, tag / "mp_rank_00_model_states.pt")
    (tag.parent / "latest").write_text("epoch001")
    monkeypatch.chdir(elsewhere)
    img = _img(elsewhere / "cat.png")
    args = ["--model", str(work / "runs" / "demo"), "--image", str(img), "--question", "What color?", "--json"]
    assert main(args) == 0, capsys.readouterr().err
    assert "answer" in json.loads(capsys.readouterr().out)
    shutil.move(work / "models", tmp_path / "gone")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model.lm_id") and "models/tiny/lm: no such file or directory" in err[-1], err


def test_predict_on_seed_json_and_official_aokvqa_json(export_dir, tmp_path, capsys):
    from mmcoconut.cli.predict import main
    from mmcoconut.modeling.choices import map_to_choice
    from mmcoconut.modeling import MMCoconutForConditionalGeneration
    from mmcoconut.modeling.prompt import choices_suffix
    (tmp_path / "imgs").mkdir()
    seed = [{"image": f"imgs/{i}.png", "question": f"What color is shape {i}?" + choices_suffix(CHOICES),
             "steps": ["It is red."], "answer": "0", "choices": CHOICES, "correct_choice_idx": 0,
             "question_id": f"q{i}"} for i in range(3)]
    for i in range(3):
        _img(tmp_path / "imgs" / f"{i}.png", i)
    seed.append({"question": "no image"})  # malformed: skipped and reported, not fatal
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    assert main([str(export_dir), str(tmp_path / "seed.json"), str(tmp_path / "p1.json"), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    preds = json.loads((tmp_path / "p1.json").read_text())
    assert sorted(preds) == ["q0", "q1", "q2"] and "skipped 1" in out and "MC" in out
    hf = MMCoconutForConditionalGeneration.from_pretrained(export_dir)
    for i in range(3):  # the stored question is the prompt (no second choice list), the answer mapped to a choice
        r = hf.answer(str(tmp_path / "imgs" / f"{i}.png"), seed[i]["question"])
        want = CHOICES[map_to_choice(r["answer"], CHOICES)[0]] if r["answer"].strip() else ""  # empty: scores 0
        assert preds[f"q{i}"]["multiple_choice"] == want

    coco = tmp_path / "val2017"
    coco.mkdir()
    official = [{"question_id": f"a{i}", "image_id": i + 1, "question": "What color?", "choices": CHOICES,
                 "correct_choice_idx": 1, "direct_answers": ["blue"] * 10, "difficult_direct_answer": False,
                 "rationales": ["r"]} for i in range(2)]
    for e in official:
        _img(coco / f"{e['image_id']:012d}.jpg", e["image_id"])
    (tmp_path / "aokvqa_v1p0_val.json").write_text(json.dumps(official))
    assert main([str(export_dir), str(tmp_path / "aokvqa_v1p0_val.json"), str(tmp_path / "p2.json"),
                 "--images", str(coco), "--view", "nocot"]) == 0
    assert sorted(json.loads((tmp_path / "p2.json").read_text())) == ["a0", "a1"]
    assert "DA" in capsys.readouterr().out
    assert main([str(export_dir), str(tmp_path / "aokvqa_v1p0_val.json"), str(tmp_path / "p3.json")]) == 2
    assert "--images" in capsys.readouterr().err


@pytest.mark.multiproc
@pytest.mark.parametrize("ds_config", ["zero2_1gpu", pytest.param("zero3_1gpu", marks=pytest.mark.slow)])
def test_seed_flat_config_runs_as_one_process_without_a_launcher(export_dir, tiny_dirs, tmp_path, ds_config):
    """Every key of the upstream seed config (tests/test_config.py UPSTREAM_SEED) plus clip_id, batch_size_eval,
    load_model_path; no launcher env, cwd outside the repo; two optimizer steps; the final export equals the
    checkpoint's consolidated weights."""
    from test_config import UPSTREAM_SEED

    from mmcoconut.modeling import MMCoconutForConditionalGeneration
    from mmcoconut.export.hf_export import load_checkpoint
    sys.path.insert(0, str(ROOT / "tools"))
    import make_shards
    common = ["--image-size", "32", "--workers", "1", "--no-progress"]  # 2 shards each: the 2 default workers
    assert make_shards.main(["--synthetic", "8", "--seed", "0", "--out", str(tmp_path / "shards"), "--maxcount", "4",
                             *common]) == 0
    assert make_shards.main(["--synthetic", "2", "--seed", "1", "--split", "val", "--out", str(tmp_path / "shards"),
                             "--maxcount", "1", *common]) == 0
    values = {"save_path": str(tmp_path / "runs"), "name": "seedrun", "c_thought": 1, "epochs_per_stage": 1,
              "max_latent_stage": 1, "model_id": tiny_dirs["lm"], "clip_id": tiny_dirs["vision"],
              "load_model_path": str(export_dir), "resume": 0, "train_path": str(tmp_path / "shards" / "train"),
              "val_path": str(tmp_path / "shards" / "val"), "batch_size_training": 2, "batch_size_eval": 2,
              "gradient_accumulation_steps": 2, "num_epochs": 1, "lr": 1e-3}
    lines = []
    for line in UPSTREAM_SEED.splitlines():
        key = line.split(":")[0]
        lines.append(f"{key}: {json.dumps(values[key])}" if key in values else line)
    (tmp_path / "seed.yaml").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "mmcoconut.train", "seed.yaml", "--deepspeed", ds_config,
                        "--checkpoint.export_final=true", "--eval.max_new_tokens=4"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "running as a single process" in out and "mpi4py" not in out
    assert "init: " in out and str(export_dir) in out
    assert "accumulation 2" in out and "2 steps/epoch" in out
    run = tmp_path / "runs" / "seedrun"
    hf = MMCoconutForConditionalGeneration.from_pretrained(run / "export")
    model, *_ = load_checkpoint(run)
    exported, ckpt = hf.model.state_dict(), model.state_dict()
    assert exported.keys() == ckpt.keys()
    assert all(torch.equal(exported[k], ckpt[k]) for k in ckpt)
    init = MMCoconutForConditionalGeneration.from_pretrained(export_dir).model.state_dict()
    assert not torch.equal(exported["projector.0.weight"], init["projector.0.weight"])  # it trained
    assert all(torch.equal(exported[k], init[k]) for k in init if k.startswith("vision."))  # frozen tower
