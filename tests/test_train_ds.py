"""End-to-end DeepSpeed training on CPU: 2 processes over gloo, tiny models, synthetic shards.

Few launches, many assertions each (CI budget): run A (ZeRO-2 fp32, 2 epochs) serves loss-falls, checkpoints,
validation and stage records; resuming A's mid-epoch checkpoint serves exact resume; converting A's last
checkpoint serves elastic 2 -> 1; one ZeRO-3 fp16 run serves loss scaling, injected overflow and NaN skips and
`resume: auto` on an empty dir; the world-size mismatch is a quick failing launch.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmcoconut.train.tracking import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TIMEOUT = 600  # generous: the first run on a fresh machine compiles DeepSpeed ops (60-140 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str], env_extra=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N -m mmcoconut.train ...` with a hard timeout (the whole process group dies)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", MMCOCONUT_CPU_FP16="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/mmcoconut/torch_extensions"))
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(_free_port()), "--module", "mmcoconut.train",
           *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"training hung (> {timeout}s):\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


def ok(r):
    assert r.returncode == 0, r.stdout[-6000:]
    return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dirs):
    """Shards (64 train in 4 shards, 16 val), a run config, and test ds_configs with global batch 8."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    d = tmp_path_factory.mktemp("train")
    common = ["--image-size", "32", "--workers", "1", "--no-progress"]
    assert ms.main(["--synthetic", "64", "--seed", "0", "--out", str(d / "shards"), "--maxcount", "16", *common]) == 0
    assert ms.main(["--synthetic", "16", "--seed", "1", "--split", "val", "--out", str(d / "val"), "--maxcount", "8",
                    *common]) == 0
    cfg = {"model": {"lm_id": tiny_dirs["lm"], "vision_id": tiny_dirs["vision"], "image_tokens": "patches",
                     "vision_layer": -1, "freeze_vision": True, "new_token_init": "", "max_length": 256},
           "data": {"train_shards": str(d / "shards"), "val_shards": str(d / "val"), "num_workers": 0,
                    "shuffle_buffer": 16},
           "curriculum": {"c_thought": 1, "max_latent_stage": 2, "epochs_per_stage": 1, "reset_optimizer": True},
           "train": {"name": "t", "num_epochs": 2, "lr": 3.0e-3, "warmup_steps": 2, "log_every": 1},
           "checkpoint": {"save_dir": str(d / "runs"), "keep_last": 10, "save_every_steps": 3},
           "logging": {"report_to": "none"},
           "eval": {"val_samples": 8, "batch_size": 4, "max_new_tokens": 4, "val_every_epoch": False}}
    import yaml
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    base = json.loads((ROOT / "ds_configs" / "zero2_2gpu.json").read_text())
    for z in (2, 3):
        zo = json.loads((ROOT / "ds_configs" / f"zero{z}_2gpu.json").read_text())["zero_optimization"]
        for world, (micro, acc) in {1: (2, 4), 2: (2, 2)}.items():
            c = dict(base, train_batch_size=8, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=acc,
                     zero_optimization=zo)
            (d / f"zero{z}_{world}.json").write_text(json.dumps(c))
    return d


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


@pytest.fixture(scope="module")
def run_a(setup):
    """ZeRO-2 fp32, 2 ranks, 2 epochs x 8 optimizer steps, checkpoints every 3 steps, validation each epoch."""
    run, tx = setup / "runA", setup / "torch_ext"
    r = ok(launch(2, [str(setup / "cfg.yaml"), "--deepspeed", str(setup / "zero2_2.json"), "--train.precision=fp32",
                      f"--logging.run_dir={run}", "--eval.val_every_epoch=true"],
                  env_extra={"TORCH_EXTENSIONS_DIR": str(tx)}))
    # CPU settings that compile no DeepSpeed op (torch AdamW, gloo without the shm comm op): nothing was built
    assert not list(tx.rglob("*.so")) and "building DeepSpeed op" not in r.stdout, r.stdout[-3000:]
    return run


def test_zero2_trains_checkpoints_validates(run_a):
    losses = _losses(run_a)
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 0.5, losses
    recs = read_metrics(run_a)
    assert [r["stage"] for r in recs if r["kind"] == "stage"] == [1]
    val = [r for r in recs if r["kind"] == "val"]
    assert len(val) == 2 and all(v["val_loss"] is not None and v["n"] == 8 for v in val), val
    assert (run_a / "config.yaml").is_file() and (run_a / "latest").read_text().strip() == "epoch002"
    tags = json.loads((run_a / "checkpoints.json").read_text())
    assert tags == ["step00000003", "step00000006", "epoch001", "step00000009", "step00000012",
                    "step00000015", "epoch002"]
    assert not list((run_a / "epoch002").glob("*vision*"))  # frozen CLIP is not in the checkpoint files
    meta = json.loads((run_a / "epoch002" / "mmcoconut.json").read_text())
    assert (meta["world_size"], meta["zero_stage"], meta["step"]) == (2, 2, 16)


def test_exact_resume_mid_epoch(setup, run_a):
    """Resume A's step-6 checkpoint (mid-epoch 0) in a fresh 2-rank run: steps 7..16 repeat A's losses."""
    run = setup / "runA_resumed"
    shutil.copytree(run_a, run, ignore=shutil.ignore_patterns("metrics.jsonl"))
    r = ok(launch(2, [str(setup / "cfg.yaml"), "--deepspeed", str(setup / "zero2_2.json"),
                      "--train.precision=fp32", f"--logging.run_dir={run}", "--checkpoint.resume=step00000006"]))
    assert "resumed at step 6" in r.stdout
    a, b = _losses(run_a), _losses(run)
    assert sorted(b) == list(range(7, 17))
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])


def test_elastic_resume_2_to_1(setup, run_a):
    """A's last checkpoint (2 ranks) -> universal -> 1 rank (same global batch, accumulation 4), one more epoch."""
    run = setup / "runA_elastic"
    shutil.copytree(run_a, run, ignore=shutil.ignore_patterns("metrics.jsonl"))
    conv = subprocess.run([sys.executable, "-m", "mmcoconut.train.universal", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    assert (run / "epoch002_universal" / "zero").is_dir()
    r = ok(launch(1, [str(setup / "cfg.yaml"), "--deepspeed", str(setup / "zero2_1.json"), "--train.precision=fp32",
                      f"--logging.run_dir={run}", "--train.num_epochs=3", "--checkpoint.keep_last=2"]))
    assert "(universal)" in r.stdout and "accumulation 4" in r.stdout
    a, b = _losses(run_a), _losses(run)
    assert sorted(b) == list(range(17, 25))
    assert b[17] < a[1] - 0.5 and abs(b[17] - a[16]) < 0.5, (a, b)  # weights came back, not a fresh start
    assert json.loads((run / "checkpoints.json").read_text()) == ["step00000021", "epoch003"]  # keep_last=2
    assert not (run / "step00000003").exists() and not (run / "epoch002_universal").exists()


def test_zero3_fp16_overflow_nan_and_auto_fresh_start(setup):
    """ZeRO-3 fp16, 7 steps: an injected overflow at step 3 is skipped by DeepSpeed and halves the loss scale
    (hysteresis 1); a NaN loss on micro-batch 5 is skipped by the loop; resume=auto on an empty dir is fresh."""
    run = setup / "runZ3"
    r = ok(launch(2, [str(setup / "cfg.yaml"), "--deepspeed", str(setup / "zero3_2.json"), "--train.precision=fp16",
                      "--train.hysteresis=1", "--train.initial_scale_power=10", "--train.num_epochs=1",
                      "--train.max_steps_per_epoch=7",
                      "--checkpoint.save_every_steps=0", f"--logging.run_dir={run}", "--checkpoint.resume=auto"],
                  env_extra={"MMCOCONUT_DEBUG_OVERFLOW_STEPS": "3", "MMCOCONUT_DEBUG_NAN_BATCHES": "5"}))
    assert "resume:" not in r.stdout and "ZeRO-3, fp16" in r.stdout
    recs = {rec["step"]: rec for rec in read_metrics(run, "train")}
    assert sorted(recs) == list(range(1, 8))  # 7 steps although micro-batch 5 was dropped (spare batches)
    assert recs[2]["skipped_steps"] == 0 and recs[3]["skipped_steps"] == 1 and recs[7]["skipped_steps"] == 1
    assert recs[3]["loss_scale"] == recs[2]["loss_scale"] / 2 == 512
    assert all(rec["loss"] is not None for rec in recs.values())
    assert recs[7]["loss"] < recs[1]["loss"] - 0.3, recs
    nan = read_metrics(run, "nonfinite")
    assert len(nan) == 1 and nan[0]["loss"] is None and nan[0]["total"] == 1
    assert json.loads((run / "checkpoints.json").read_text()) == ["epoch001"]


def test_ds_config_world_size_mismatch_is_one_clear_error(setup):
    r = launch(2, [str(setup / "cfg.yaml"), "--deepspeed", "ds_configs/zero2_1gpu.json",
                   f"--logging.run_dir={setup / 'runX'}"], timeout=120)
    assert r.returncode != 0
    assert "ds_configs/zero2_1gpu.json does not fit 2 process(es)" in r.stdout
    assert "use " in r.stdout and "zero2_2gpu.json" in r.stdout
    assert "Traceback" not in r.stdout
