"""Pre-flight of `python -m mmcoconut.train`: every config problem is one `error:` line with exit code 2, before
any model is built or process group exists.

The model dirs do not exist, so a run that got past pre-flight would fail differently (and the in-process runs
replace init_distributed / train with a sentinel that records the call)."""
import re
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmcoconut.cli import train as train_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 synthetic samples (3 steps each) in 4 train shards of 16 and one val shard, with sizes/steps.json."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    d = tmp_path_factory.mktemp("pf")
    common = ["--image-size", "16", "--workers", "1", "--no-progress", "--out", str(d / "s")]
    assert ms.main(["--synthetic", "64", "--seed", "0", "--maxcount", "16", *common]) == 0
    assert ms.main(["--synthetic", "8", "--seed", "1", "--split", "val", *common]) == 0
    (d / "nosizes").mkdir()
    shutil.copy(d / "s" / "train-000000.tar", d / "nosizes" / "train-000000.tar")
    for name, (glob_bs, micro, acc) in {"g32_w2": (32, 4, 4), "g32_w1": (32, 4, 8), "g64_m4": (64, 4, 4)}.items():
        base = json.loads((ROOT / "ds_configs" / "zero2_2gpu.json").read_text())
        base.update(train_batch_size=glob_bs, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=acc)
        (d / f"{name}.json").write_text(json.dumps(base))
    return d


def args_for(d, *over, ds="g32_w2"):
    return ["demo", "--deepspeed", str(d / f"{ds}.json"), "--model.lm_id=/nonexistent/lm",
            "--model.vision_id=/nonexistent/vision", f"--data.train_shards={d / 's' / 'train'}",
            f"--data.val_shards={d / 's' / 'val'}", "--data.num_workers=1", f"--logging.run_dir={d / 'run'}",
            "--logging.report_to=none", "--train.precision=fp32", "--train.micro_batch_size=4", *over]


class Reached(Exception):
    pass


@pytest.fixture
def sentinel(monkeypatch):
    """Replace what runs after pre-flight; `calls` records whether it was reached."""
    import mmcoconut.train.engines as engines
    import mmcoconut.train.trainer as trainer
    calls = []

    def reached(*a, **k):
        calls.append(a)
        raise Reached()
    monkeypatch.setattr(engines, "init_distributed", reached)
    monkeypatch.setattr(trainer, "run", reached)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    return calls


def one_error(capsys, rc) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if "real_accelerator.py" not in ln]  # DeepSpeed's import-time log line
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


CASES = {
    "negative lr": (["--train.lr=-1e-4"], 1, "train.lr must be > 0, got -0.0001"),
    "zero lr": (["--lr=0"], 1, "train.lr must be > 0"),
    "empty train spec": (["--data.train_shards="], 1, "data.train_shards is empty"),
    "missing shard dir": (["--data.train_shards=/nonexistent/shards"], 1, "data.train_shards: shard spec"),
    "missing val": (["--data.val_shards=/nonexistent/val"], 1, "data.val_shards: shard spec"),
    "no sizes.json": (["--data.train_shards={d}/nosizes"], 1, "no sample count for shard"),
    "fewer samples than one batch per rank": (["--data.samples_per_epoch=4"], 2, "not one batch per rank"),
    "no optimizer step per epoch": (["--data.samples_per_epoch=16"], 2, "not one optimizer step per epoch"),
    "shards < ranks x workers": (["--data.num_workers=4"], 2, "4 shards for 2 ranks x 4 workers"),
    "stage beyond the longest step list": (["--curriculum.max_latent_stage=4", "--train.num_epochs=5",
                                            "--curriculum.stage0_epochs=1"], 2,
                                           "reaches stage 4 (curriculum.max_latent_stage=4, train.num_epochs=5) "
                                           "but the longest step list in data.train_shards has 3 step(s)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_error_is_one_line_before_anything_is_built(shards, sentinel, capsys, monkeypatch, case):
    over, world, expect = CASES[case]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    rc = train_main.main(args_for(shards, *[o.format(d=shards) for o in over], ds=f"g32_w{world}"))
    assert expect in one_error(capsys, rc)
    assert sentinel == []


def test_json_given_as_shards_names_the_command(shards, sentinel, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    rc = train_main.main(args_for(shards, "--data.train_shards=data/seed_train.json",
                                  "--data.val_shards=data/seed_val.json", ds="g32_w1"))
    line = one_error(capsys, rc)
    assert ("python tools/make_shards.py --json data/seed_train.json --split train --out shards/seed_train, then "
            "use --data.train_shards=shards/seed_train/train") in line
    assert ("python tools/make_shards.py --json data/seed_val.json --split val --out shards/seed_val, then use "
            "--data.val_shards=shards/seed_val/val") in line
    assert sentinel == []


def test_world_size_mismatch_hint_says_whether_the_global_batch_is_kept(shards, sentinel, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = one_error(capsys, train_main.main(args_for(shards, ds="g32_w1")))
    assert "does not fit 2 process(es)" in line and "zero2_2gpu.json (same global batch 32)" in line
    line = one_error(capsys, train_main.main(args_for(shards, ds="g64_m4")))  # 64 != 4 x 4 x 2
    assert "same global batch" not in line
    assert "set gradient_accumulation_steps 8 in" in line and "(global batch 64 kept)" in line
    assert re.search(r"zero2_2gpu.json \(global batch \d+, not 64\)", line), line
    assert sentinel == []


def test_a_good_config_passes(shards, sentinel, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Reached):
        train_main.main(args_for(shards))
    assert len(sentinel) == 1
    from mmcoconut.config import load_config
    from mmcoconut.train.preflight import check_config, longest_steps
    cfg = load_config("demo", args_for(shards)[3:])
    data = check_config(cfg)
    assert data["samples"] == 64 and len(data["urls"]) == 4 and longest_steps(data["urls"]) == 3
    (shards / "s" / "steps.json").rename(shards / "steps.json.away")  # unknown: the stage check is skipped
    try:
        assert longest_steps(data["urls"]) is None
        check_config(load_config("demo", args_for(shards, "--curriculum.max_latent_stage=4", "--train.num_epochs=5",
                                                  "--curriculum.stage0_epochs=1")[3:]))
    finally:
        (shards / "steps.json.away").rename(shards / "s" / "steps.json")


@pytest.mark.multiproc
def test_two_ranks_seed_config_with_json_fail_fast_without_traceback(shards, tmp_path):
    """The seed project's flat config (train_path: a .json) under the DeepSpeed launcher: every rank prints the
    one error line; nothing is loaded (the model dir does not exist) and there is no traceback."""
    seed = {"name": "seed", "model_id": "/nonexistent/gpt2", "train_path": "data/train.json",
            "val_path": "data/val.json", "save_path": str(tmp_path / "ck"), "lr": 1e-4, "num_epochs": 1}
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump(seed))
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module",
           "mmcoconut.train", str(tmp_path / "seed.yaml"), "--deepspeed", "ds_configs/zero2_2gpu.json"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    errors = [ln for ln in out.splitlines() if "error: data.train_shards=data/train.json is a json file" in ln]
    assert r.returncode != 0 and len(errors) == 2, out[-4000:]
    assert "--json data/val.json --split val" in errors[0]
    assert "Traceback" not in out and "/nonexistent/gpt2" not in out, out[-4000:]
