"""Pre-flight of `python -m mmcoconut.train`: every config problem is one `error:` line with exit code 2, before
any model is built or process group exists.

The model dirs are empty, so a run that got past pre-flight would fail differently (and the in-process runs
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
    (d / "lm").mkdir()
    (d / "vision").mkdir()
    shutil.copy(d / "s" / "train-000000.tar", d / "nosizes" / "train-000000.tar")
    for name, (glob_bs, micro, acc) in {"g32_w2": (32, 4, 4), "g32_w1": (32, 4, 8), "g64_m4": (64, 4, 4)}.items():
        base = json.loads((ROOT / "ds_configs" / "zero2_2gpu.json").read_text())
        base.update(train_batch_size=glob_bs, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=acc)
        (d / f"{name}.json").write_text(json.dumps(base))
    return d


def args_for(d, *over, ds="g32_w2"):
    return ["demo", "--deepspeed", str(d / f"{ds}.json"), f"--model.lm_id={d / 'lm'}",
            f"--model.vision_id={d / 'vision'}", f"--data.train_shards={d / 's' / 'train'}",
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
    "shards < ranks": (["--data.train_shards={d}/s/train-000000.tar"], 2, "1 shard(s) for 2 ranks"),
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


def _seed_json(root: Path, n: int = 8, bad_image: int | None = None) -> Path:
    """A seed-format json list (image paths relative to it) with n entries and their PNGs."""
    from PIL import Image
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        Image.new("RGB", (20, 24), (i * 30 % 256, 90, 40)).save(root / "imgs" / f"{i}.png")
        entries.append({"image": f"imgs/{'missing' if i == bad_image else i}.png", "question": f"Colour {i}?",
                        "steps": ["It is red.", "So red."], "answer": "red", "question_id": f"q{i}"})
    (root / "train.json").write_text(json.dumps(entries))
    return root / "train.json"


def test_json_given_as_shards_is_sharded_once_into_a_cache(shards, sentinel, capsys, monkeypatch, tmp_path):
    """The seed's train_path: a json list is sharded into <stem>.shards next to it, announced in one line, reused
    while the json is unchanged; a sharding that was killed leaves nothing the next run trusts."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    js = _seed_json(tmp_path)
    args = args_for(shards, f"--data.train_shards={js}", "--data.val_shards=", "--train.gradient_accumulation_steps=1",
                    ds="g32_w1")
    with pytest.raises(Reached):
        train_main.main(args)
    out = capsys.readouterr().out
    assert out.count("sharding it once into") == 1 and f"{tmp_path / 'train.shards'}/" in out, out
    cache = tmp_path / "train.shards"
    assert sorted(p.name for p in cache.glob("*.tar")) == ["train-000000.tar"]
    assert json.loads((cache / "sizes.json").read_text()) == {"train-000000.tar": 8}
    with pytest.raises(Reached):  # reused: no second sharding
        train_main.main(args)
    assert "sharding" not in capsys.readouterr().out
    # a killed sharding: its temporary dir (even with a fingerprint) is never trusted, and a cache whose json
    # changed since is rebuilt
    stale = tmp_path / ".train.shards.tmp-999999"
    shutil.copytree(cache, stale)
    js.write_text(json.dumps(json.loads(js.read_text())[:6]))
    with pytest.raises(Reached):
        train_main.main(args)
    assert "sharding it once" in capsys.readouterr().out and not stale.exists()
    assert json.loads((cache / "sizes.json").read_text()) == {"train-000000.tar": 6}
    shutil.rmtree(cache)  # killed between removing the old cache and renaming the new one: rebuilt
    with pytest.raises(Reached):
        train_main.main(args)
    assert "sharding it once" in capsys.readouterr().out and (cache / "mmcoconut-cache.json").is_file()
    assert len(sentinel) == 4


def test_sharding_under_the_trainers_signal_handlers_neither_hangs_nor_stops_the_run(tmp_path):
    """The trainer installs its stop-signal handlers before pre-flight; the process pool that shards a seed json
    must not inherit them (its terminate() hung, and each worker's SIGTERM reached the trainer's wakeup pipe as a
    stop request: exit 75 at the first step, or 143 for the next sharding)."""
    for d in ("a", "b", "c"):
        _seed_json(tmp_path / d)
    code = ("import faulthandler, sys, time\n"
            "faulthandler.dump_traceback_later(240, exit=True)\n"  # a hang shows where, not just a timeout
            "from mmcoconut.train.signals import stop_request\n"
            "from mmcoconut.data.json_cache import shards_for_json\n"
            "s = stop_request()\n"
            "for d in sys.argv[1:]:\n"
            "    shards_for_json(d + '/train.json', 'train', 'data.train_shards')\n"
            "    time.sleep(1)\n"
            "print('stop requested:', s.requested)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code] + [str(tmp_path / d) for d in ("a", "b", "c")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "stop requested: False" in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])
    assert all((tmp_path / d / "train.shards" / "train-000000.tar").is_file() for d in ("a", "b", "c"))


def test_json_that_cannot_be_sharded_names_the_console_script(shards, sentinel, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    js = _seed_json(tmp_path, bad_image=3)
    line = one_error(capsys, train_main.main(args_for(shards, f"--data.train_shards={js}", ds="g32_w1")))
    assert "1 of 8 entries could not be sharded (first: q3: missing image" in line
    assert "mmcoconut-shard --json" in line and "make_shards" not in line
    assert not (tmp_path / "train.shards").exists() and not list(tmp_path.glob(".train.shards.tmp-*"))
    from mmcoconut.data.shardlist import expand_shards
    with pytest.raises(FileNotFoundError, match="mmcoconut-shard --json x.json"):
        expand_shards("x.json")  # the loaders and mmcoconut-eval name the console script too
    assert sentinel == []


def test_all_bad_samples_are_one_early_error_naming_shard_and_reason(shards, sentinel, capsys, monkeypatch,
                                                                      tmp_path):
    """Shards whose every json is broken (or has no steps): one error before anything is built, not a traceback
    after minutes ('1001 samples in a row failed')."""
    import webdataset as wds
    monkeypatch.setenv("WORLD_SIZE", "1")
    for name, member in (("badjson", b"{not json"), ("nosteps", json.dumps({"question": "q?"}).encode())):
        d = tmp_path / name
        d.mkdir()
        with wds.TarWriter(str(d / "train-000000.tar")) as tw:
            for i in range(40):
                tw.write({"__key__": f"k{i:03d}", "jpg": b"\xff\xd8junk", "json": member})
        (d / "sizes.json").write_text(json.dumps({"train-000000.tar": 40}))
        line = one_error(capsys, train_main.main(args_for(shards, f"--data.train_shards={d}", "--data.val_shards=",
                                                          "--data.samples_per_epoch=40", ds="g32_w1")))
        assert f"every sample read (8, from the first 1 shard(s)) fails: {d}/train-000000.tar: sample 'k000'" in line
        assert ("bad_json: JSONDecodeError" if name == "badjson" else "no_steps:") in line, line
    assert sentinel == []


def test_one_shard_for_one_rank_and_two_workers_lowers_the_workers(shards, sentinel, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(Reached):
        train_main.main(args_for(shards, f"--data.train_shards={shards}/s/train-000000.tar", "--data.num_workers=2",
                                 "--train.gradient_accumulation_steps=1", ds="g32_w1"))
    out = capsys.readouterr().out
    assert "note: data.num_workers 2 -> 1: 1 shard(s) for 1 rank(s) x 2 workers" in out, out
    assert len(sentinel) == 1


def test_model_paths_are_recorded_absolute_and_a_missing_one_is_one_error(shards, sentinel, capsys, monkeypatch,
                                                                          tmp_path):
    from mmcoconut.config import load_config
    from mmcoconut.train.preflight import check_config
    monkeypatch.chdir(shards)
    cfg = load_config("demo", args_for(shards, "--model.lm_id=lm", "--model.vision_id=./vision")[3:])
    check_config(cfg)
    assert (cfg.model.lm_id, cfg.model.vision_id) == (str(shards / "lm"), str(shards / "vision"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    for key, value in (("model.vision_id", "models/tiny/vision"), ("model.init_from", "ckpts/run7"),
                       ("model.lm_id", "/nonexistent/lm")):
        line = one_error(capsys, train_main.main(args_for(shards, f"--{key}={value}", ds="g32_w1")))
        assert f"error: {key}" in line and f"{value}: no such file or directory" in line, line
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
    """The seed project's flat config (train_path: a .json that is not there) under the DeepSpeed launcher: every
    rank prints the one error line; nothing is loaded and there is no traceback."""
    seed = {"name": "seed", "model_id": "gpt2", "train_path": "data/train.json",
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
    errors = [ln for ln in out.splitlines() if "error: data.train_shards=data/train.json: no such file" in ln]
    assert r.returncode != 0 and len(errors) == 2, out[-4000:]
    assert "Traceback" not in out, out[-4000:]


def test_seed_json_cache_never_deletes_a_foreign_dir_and_names_a_torn_json(tmp_path):
    """A `<stem>.shards` dir that mmcoconut did not make (no fingerprint) is refused, not replaced; a json that does
    not parse is one error naming the key and the file."""
    from mmcoconut.data.json_cache import shards_for_json
    js = _seed_json(tmp_path)
    (tmp_path / "train.shards").mkdir()
    (tmp_path / "train.shards" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"data.train_shards=.*train.json: .*train.shards exists and is not "):
        shards_for_json(js, "train", "data.train_shards")
    assert (tmp_path / "train.shards" / "mine.txt").read_text() == "keep"
    torn = tmp_path / "torn.json"
    torn.write_text('[{"image": "a.png",,}]')
    with pytest.raises(ValueError, match=r"data.val_shards=.*torn.json: not a valid json list of entries"):
        shards_for_json(torn, "val", "data.val_shards")
