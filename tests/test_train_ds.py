"""End-to-end training on CPU with each engine (DeepSpeed, FSDP2): 2 processes over gloo, tiny models, synthetic
shards. Tests that take `run_a` run once per engine.

Few launches, many assertions each (CI budget): run A (DeepSpeed ZeRO-2 fp32 | FSDP2 fp32, 2 epochs, a NaN loss
injected on rank 0 in steps 3 and 11) serves loss-falls, checkpoints, validation, stage and non-finite records, and
the two engines' agreement (same losses within 1e-5); resuming A's mid-epoch and epoch-end checkpoints serves exact
resume across skipped NaN windows; A's last checkpoint on one rank serves elastic 2 -> 1 (DeepSpeed through its
universal copy, FSDP2 resharding on load; with an allowed config change); SIGKILL mid-run serves exact resume after
a kill; one fp16 run per engine serves loss scaling, injected overflow and NaN skips and `resume: auto` on an empty
dir; SIGTERM to launch.sh mid-epoch (while a second run is refused) serves preemption -> checkpoint -> exact resume;
the DeepSpeed runner (or torchrun) killed under a direct launch serves launcher death -> checkpoint, exit 75;
the world-size mismatch and config drift are quick failing launches.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmcoconut.train.tracking import read_metrics

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENGINES = ["deepspeed", "fsdp2"]
TIMEOUT = 600  # generous: the first run on a fresh machine compiles DeepSpeed ops (60-140 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str], env_extra=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N -m mmcoconut.train ...` (or torchrun for --train.engine=fsdp2) with a hard timeout
    (the whole process group dies)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", MMCOCONUT_CPU_FP16="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/mmcoconut/torch_extensions"))
    if "--train.engine=fsdp2" in args:
        cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), "-m",
               "mmcoconut.train", *args]
    else:
        cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(_free_port()), "--module",
               "mmcoconut.train", *args]
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


def synthetic_shards(out, n: int, seed: int, maxcount: int, split: str = "train") -> None:
    """Synthetic shards through tools/make_shards.py (the documented script): 32 px images, one worker."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    assert ms.main(["--synthetic", str(n), "--seed", str(seed), "--split", split, "--out", str(out), "--maxcount",
                    str(maxcount), "--image-size", "32", "--workers", "1", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dirs):
    """Shards (64 train in 4 shards, 16 val), a run config, and test ds_configs with global batch 8."""
    d = tmp_path_factory.mktemp("train")
    synthetic_shards(d / "shards", 64, seed=0, maxcount=16)
    synthetic_shards(d / "val", 16, seed=1, maxcount=8, split="val")
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


def engine_args(setup, engine: str, world: int, zero: int = 2) -> list[str]:
    """The same batch (global 8, micro 2) for either engine: DeepSpeed's test ds_config, or FSDP2's run-config keys."""
    if engine == "fsdp2":
        return ["--train.engine=fsdp2", "--train.micro_batch_size=2", "--train.global_batch_size=8"]
    return ["--deepspeed", str(setup / f"zero{zero}_{world}.json")]


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts each rank in a session of its own: killpg misses them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += parents.get(tree[-1], [])
    return tree


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by init, maybe later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def copy_run(src, dst):
    """A run dir as a killed run leaves it (metrics.jsonl dropped: the resumed run's records are compared)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("metrics.jsonl", "latest_universal", "*_universal"))


# rank 0's micro-batches 5 and 21 (accumulation 2: optimizer steps 3 and 11) get a NaN loss, in every run of A
NAN_FAULTS = "nan_batches=5,21;nan_ranks=0"
NAN = {"MMCOCONUT_TEST_FAULTS": NAN_FAULTS}


def _same_losses(a: dict, b: dict, steps) -> None:
    assert sorted(b) == list(steps), sorted(b)
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])


@pytest.fixture(scope="module")
def run_a_of(setup):
    """engine -> run A's dir (launched once per module): ZeRO-2 fp32 | FSDP2 fp32, 2 ranks, 2 epochs x 8 optimizer
    steps, checkpoints every 3 steps, validation each epoch."""
    runs = {}

    def get(engine: str):
        if engine not in runs:
            run, tx = setup / f"runA-{engine}", setup / f"torch_ext-{engine}"
            r = ok(launch(2, [str(setup / "cfg.yaml"), *engine_args(setup, engine, 2), "--train.precision=fp32",
                              f"--logging.run_dir={run}", "--eval.val_every_epoch=true",
                              "--checkpoint.export_final=true"],
                          env_extra={"TORCH_EXTENSIONS_DIR": str(tx), **NAN}))
            # CPU settings that compile no DeepSpeed op (torch AdamW, gloo without the shm comm op): nothing built
            assert not list(tx.rglob("*.so")) and "building DeepSpeed op" not in r.stdout, r.stdout[-3000:]
            runs[engine] = run
        return runs[engine]
    return get


BOTH = pytest.mark.parametrize("engine", ENGINES)
# engine-independent code paths proven with DeepSpeed in the default suite: FSDP2's repeat is a slow test
BOTH_FSDP2_SLOW = pytest.mark.parametrize("engine", ["deepspeed", pytest.param("fsdp2", marks=pytest.mark.slow)])


@BOTH
def test_trains_checkpoints_validates(run_a_of, engine):
    run_a = run_a_of(engine)
    losses = _losses(run_a)
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1] - 0.5, losses
    recs = read_metrics(run_a)
    assert [r["stage"] for r in recs if r["kind"] == "stage"] == [1]
    val = [r for r in recs if r["kind"] == "val"]
    assert len(val) == 2 and all(v["val_loss"] is not None and v["n"] == 8 for v in val), val
    # the NaN windows: skipped by DeepSpeed on both ranks (rank 1's losses were finite), nothing else lost
    nan = read_metrics(run_a, "nonfinite")
    assert [(r["step"], r["batches"], r["total"]) for r in nan] == [(3, 1, 1), (11, 1, 2)], nan
    train = {r["step"]: r for r in read_metrics(run_a, "train")}
    assert [train[s]["skipped_steps"] for s in (2, 3, 10, 11, 16)] == [0, 1, 1, 2, 2]
    assert all(r["loss"] is not None and r["skipped_samples"] == 0 for r in train.values())
    assert (run_a / "config.yaml").is_file() and (run_a / "latest").read_text().strip() == "epoch002"
    tags = json.loads((run_a / "checkpoints.json").read_text())
    assert tags == ["step00000003", "step00000006", "epoch001", "step00000009", "step00000012",
                    "step00000015", "epoch002"]
    assert not list((run_a / "epoch002").glob("*vision*"))  # frozen CLIP is not in the checkpoint files
    meta = json.loads((run_a / "epoch002" / "mmcoconut.json").read_text())
    assert (meta["engine"], meta["world_size"], meta["zero_stage"], meta["step"]) == \
        (engine, 2, 2 if engine == "deepspeed" else None, 16)
    # mmcoconut-export of the last checkpoint (DeepSpeed's files or FSDP2's DCP) = the live engine's export_final
    out = run_a.parent / f"export-{engine}"
    r = subprocess.run([sys.executable, "-m", "mmcoconut.cli.export", str(run_a), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "epoch002 ->" in r.stdout, r.stdout + r.stderr
    from safetensors.torch import load_file
    a, b = load_file(out / "model.safetensors"), load_file(run_a / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sorted(a)[:5]
    if engine == "fsdp2":  # the same run under DeepSpeed ZeRO-2: the same losses (fp32, within 1e-5 relative)
        ds = run_a_of("deepspeed")
        _same_losses(_losses(ds), losses, range(1, 17))
        assert [r["val_loss"] for r in read_metrics(ds, "val")] == pytest.approx([r["val_loss"] for r in val],
                                                                                 rel=1e-5)


@BOTH_FSDP2_SLOW
def test_exact_resume_mid_epoch(setup, run_a_of, engine):
    """Resume A's step-6 checkpoint (mid-epoch 0, after a skipped NaN window) in a fresh 2-rank run: steps 7..16
    (another NaN window at 11) repeat A's losses bitwise. A harmless config change passes with a note."""
    run_a = run_a_of(engine)
    run = setup / f"runA_resumed-{engine}"
    copy_run(run_a, run)
    r = ok(launch(2, [str(setup / "cfg.yaml"), *engine_args(setup, engine, 2),
                      "--train.precision=fp32", f"--logging.run_dir={run}", "--checkpoint.resume=step00000006",
                      "--checkpoint.keep_last=20"], env_extra=NAN))
    assert "resumed at step 6" in r.stdout
    assert "note: resuming" in r.stdout and "checkpoint.keep_last 10 -> 20" in r.stdout
    a, b = _losses(run_a), _losses(run)
    assert sorted(b) == list(range(7, 17)) and all(a[s] == b[s] for s in b), (a, b)


@BOTH_FSDP2_SLOW
def test_exact_resume_from_epoch_end_after_nan(setup, run_a_of, engine):
    """Issue 13: a skipped NaN window used to leave a partial accumulation across the epoch boundary, and
    resuming from the epoch checkpoint then differed on every later step. Steps 9..16 must repeat A's."""
    run_a = run_a_of(engine)
    run = setup / f"runA_epoch-{engine}"
    copy_run(run_a, run)
    (run / "latest").write_bytes(b"\xff\xfe\x00garbled")  # issue 26.7: crashed every restart (UnicodeDecodeError)
    r = ok(launch(2, [str(setup / "cfg.yaml"), *engine_args(setup, engine, 2),
                      "--train.precision=fp32", f"--logging.run_dir={run}", "--checkpoint.resume=epoch001"],
                  env_extra=NAN))
    assert "resumed at step 8" in r.stdout and f"{run / 'latest'} was garbled (UnicodeDecodeError" in r.stdout
    a, b = _losses(run_a), _losses(run)
    assert sorted(b) == list(range(9, 17)) and all(a[s] == b[s] for s in b), (a, b)
    assert [x["step"] for x in read_metrics(run, "nonfinite")] == [11]


@BOTH_FSDP2_SLOW
def test_config_drift_refused_before_any_model_is_built(setup, run_a_of, engine):
    run_a = run_a_of(engine)
    run = setup / f"runA_drift-{engine}"
    copy_run(run_a, run)
    codes = setup / f"codes-drift-{engine}"
    codes.mkdir(exist_ok=True)
    r = launch(2, [str(setup / "cfg.yaml"), *engine_args(setup, engine, 2), "--train.precision=fp32",
                   f"--logging.run_dir={run}", "--curriculum.c_thought=3", "--train.num_epochs=3"], timeout=240,
               env_extra={"MMCOCONUT_EXIT_CODE_DIR": str(codes)})
    # each rank exits 2; DeepSpeed's launcher passes it on, bare torchrun reports any failed rank as 1 (and prints
    # its own traceback: launch.sh passes the ranks' codes on instead, test_launch_signals.py)
    assert r.returncode == (2 if engine == "deepspeed" else 1), r.stdout[-3000:]
    assert sorted(f.read_text().strip() for f in codes.iterdir()) == ["2", "2"]
    err = [ln for ln in r.stdout.splitlines() if ln.startswith("error:")]
    assert err and "curriculum.c_thought 1 -> 3" in err[0] and "allow_config_change=curriculum.c_thought" in err[0]
    assert "num_epochs" not in err[0] and "train: world" not in r.stdout
    assert not re.search(r'File "[^"]*/mmcoconut/', r.stdout), r.stdout[-3000:]  # no traceback from our code
    assert engine == "fsdp2" or "Traceback" not in r.stdout
    assert (run / "config.yaml").read_text() == (run_a / "config.yaml").read_text()  # untouched


@BOTH_FSDP2_SLOW
def test_elastic_resume_2_to_1(setup, run_a_of, engine):
    """A's last checkpoint (2 ranks) -> 1 rank (same global batch, accumulation 4), one more epoch: DeepSpeed through
    its universal copy (converted first), FSDP2's DCP checkpoint resharded on load."""
    run_a = run_a_of(engine)
    run = setup / f"runA_elastic-{engine}"
    copy_run(run_a, run)
    if engine == "deepspeed":
        conv = subprocess.run([sys.executable, "-m", "mmcoconut.cli.universal", str(run)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert conv.returncode == 0, conv.stdout + conv.stderr
        assert (run / "epoch002_universal" / "zero").is_dir()
    r = ok(launch(1, [str(setup / "cfg.yaml"), *engine_args(setup, engine, 1), "--train.precision=fp32",
                      f"--logging.run_dir={run}", "--train.num_epochs=3", "--checkpoint.keep_last=2",
                      "--curriculum.max_latent_stage=3", "--checkpoint.allow_config_change=max_latent_stage"]))
    assert ("(universal)" in r.stdout) == (engine == "deepspeed") and "accumulation 4" in r.stdout
    assert "allowed changes (checkpoint.allow_config_change): curriculum.max_latent_stage 2 -> 3" in r.stdout
    assert list((run / "config_history").glob("config-*.yaml"))  # the old config.yaml was kept, not overwritten
    a, b = _losses(run_a), _losses(run)
    assert sorted(b) == list(range(17, 25))
    assert b[17] < a[1] - 0.5 and abs(b[17] - a[16]) < 0.5, (a, b)  # weights came back, not a fresh start
    assert json.loads((run / "checkpoints.json").read_text()) == ["step00000021", "epoch003"]  # keep_last=2
    assert not (run / "step00000003").exists() and not (run / "epoch002_universal").exists()


@pytest.mark.slow
def test_fsdp2_resume_1_to_2(setup):
    """FSDP2: a checkpoint of 1 rank resumes on 2 (DCP reshards; the global batch stays 8)."""
    run = setup / "runF12"
    args = [str(setup / "cfg.yaml"), *engine_args(setup, "fsdp2", 1), "--train.precision=fp32",
            f"--logging.run_dir={run}", "--train.max_steps_per_epoch=3"]
    ok(launch(1, [*args, "--train.num_epochs=1"]))
    r = ok(launch(2, [*args, "--train.num_epochs=2"]))
    assert "resumed at step 3" in r.stdout and "world 2, micro 2, accumulation 2" in r.stdout
    b = _losses(run)
    assert sorted(b) == list(range(1, 7)) and abs(b[4] - b[3]) < 0.5 and b[6] < b[1], b


@pytest.mark.parametrize("engine", ["deepspeed", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_fp16_overflow_nan_and_auto_fresh_start(setup, engine):
    """fp16, 7 steps (DeepSpeed: ZeRO-3, hysteresis 1; FSDP2: ShardedGradScaler): an injected overflow at step 3
    is skipped and halves the loss scale; a NaN loss on micro-batch 9 (step 5) makes the whole window skipped
    (the scale halves again, as for a non-finite gradient); resume=auto on an empty dir is fresh."""
    run = setup / f"runFP16-{engine}"
    knobs = ["--train.hysteresis=1"] if engine == "deepspeed" else []
    r = ok(launch(2, [str(setup / "cfg.yaml"), *engine_args(setup, engine, 2, zero=3), "--train.precision=fp16",
                      *knobs, "--train.initial_scale_power=10", "--train.num_epochs=1",
                      "--train.max_steps_per_epoch=7",
                      "--checkpoint.save_every_steps=0", f"--logging.run_dir={run}", "--checkpoint.resume=auto"],
                  env_extra={"MMCOCONUT_TEST_FAULTS": "overflow_steps=3;nan_batches=9"}))
    assert "resume:" not in r.stdout and ("ZeRO-3, fp16" if engine == "deepspeed" else "FSDP2, fp16") in r.stdout
    recs = {rec["step"]: rec for rec in read_metrics(run, "train")}
    assert sorted(recs) == list(range(1, 8))
    assert [recs[s]["skipped_steps"] for s in (2, 3, 4, 5, 7)] == [0, 1, 1, 2, 2]
    assert recs[3]["loss_scale"] == recs[2]["loss_scale"] / 2 == 512 and recs[5]["loss_scale"] == 256
    assert all(rec["loss"] is not None for rec in recs.values())  # the NaN micro-batch is left out of the mean
    assert recs[7]["loss"] < recs[1]["loss"] - 0.3, recs
    nan = read_metrics(run, "nonfinite")
    assert [(x["step"], x["batches"], x["total"]) for x in nan] == [(5, 2, 1)]  # both ranks' micro-batch 9
    assert json.loads((run / "checkpoints.json").read_text()) == ["epoch001"]


@pytest.mark.parametrize("engine", [pytest.param("deepspeed", marks=pytest.mark.slow), "fsdp2"])
def test_sigkill_mid_run_then_exact_resume(setup, run_a_of, engine):
    """SIGKILL to every process of a run paused after step 4 (its last checkpoint: step 3): the same command
    again takes over the dead run's lock, resumes at step 3 and repeats run A's losses bitwise. (DeepSpeed's
    resume from a mid-epoch checkpoint is proven by test_exact_resume_mid_epoch in the default suite.)"""
    run_a = run_a_of(engine)
    run, pause = setup / f"runK-{engine}", setup / f"pauseK-{engine}"
    pause.touch()
    args = [str(setup / "cfg.yaml"), *engine_args(setup, engine, 2), "--train.precision=fp32",
            f"--logging.run_dir={run}"]  # (no validation: it is RNG-neutral)
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               MMCOCONUT_TEST_FAULTS=f"{NAN_FAULTS};pause_at_step=4;pause_file={pause}")
    cmd = ([TORCHRUN, "--nproc_per_node", "2"] if engine == "fsdp2" else [DEEPSPEED, "--num_gpus", "2"]) + \
        ["--master_port", str(_free_port()), "-m" if engine == "fsdp2" else "--module", "mmcoconut.train", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while not all(Path(f"{pause}.reached.{r}").exists() for r in (0, 1)):
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-4000:] if p.poll() else "slow"
            time.sleep(0.5)
    finally:
        for pid in process_tree(p.pid):  # every process of the run at once, no cleanup anywhere
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.communicate()
    assert json.loads((run / "checkpoints.json").read_text())[-1] == "step00000003"
    r = ok(launch(2, args, env_extra=NAN))
    assert "resumed at step 3" in r.stdout and "taking over the lock of a run that is gone" in r.stdout
    a, b = _losses(run_a), _losses(run)
    assert sorted(b) == list(range(1, 17)) and all(a[s] == b[s] for s in b), (a, b)


@pytest.mark.slow  # a 2-rank launch for one error line (28 s); the resolver's unit tests cover the message
def test_ds_config_world_size_mismatch_is_one_clear_error(setup):
    r = launch(2, [str(setup / "cfg.yaml"), "--deepspeed", "ds_configs/zero2_1gpu.json",
                   f"--logging.run_dir={setup / 'runX'}"], timeout=120)
    assert r.returncode != 0
    assert "ds_configs/zero2_1gpu.json does not fit 2 process(es)" in r.stdout
    assert "use " in r.stdout and "zero2_2gpu.json" in r.stdout
    assert "Traceback" not in r.stdout


@BOTH_FSDP2_SLOW  # (34-44 s each here; DeepSpeed's runner watched by a thread, torchrun's death signal: slow)
def test_launcher_run_directly_dies_and_the_ranks_stop_with_a_checkpoint(setup, tmp_path, engine):
    """Issue 26.9: `deepspeed --num_gpus 2 -m mmcoconut.train ...` run directly and its runner SIGTERMed: the runner
    dies alone (no handler), and its per-node launcher and the ranks used to train on as orphans. The ranks must
    notice (launcher_watch.py), stop at a step boundary, save a complete checkpoint and exit 75; nothing is left.
    FSDP2: torchrun SIGKILLed (a SIGTERM it forwards itself), the ranks get their parent's death signal."""
    from mmcoconut.train.checkpoint.index import check_complete

    run, pause, codes = setup / f"runR-{engine}", setup / f"pauseR-{engine}", tmp_path / "codes"
    pause.touch()
    codes.mkdir()
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               MMCOCONUT_EXIT_CODE_DIR=str(codes), MMCOCONUT_TEST_FAULTS=f"pause_at_step=2;pause_file={pause}")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/mmcoconut/torch_extensions"))
    launcher = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m"] if engine == "fsdp2" \
        else [DEEPSPEED, "--num_gpus", "2", "--master_port", str(_free_port()), "--module"]
    cmd = [*launcher, "mmcoconut.train", str(setup / "cfg.yaml"), *engine_args(setup, engine, 2),
           "--train.precision=fp32", "--train.num_epochs=1", "--checkpoint.save_every_steps=0",
           f"--logging.run_dir={run}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    tree = []
    try:
        deadline = time.time() + TIMEOUT
        while not all(Path(f"{pause}.reached.{r}").exists() for r in (0, 1)):
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-4000:] if p.poll() else "slow"
            time.sleep(0.5)
        tree = process_tree(p.pid)  # DeepSpeed: runner, per-node launcher, 2 ranks; torchrun, 2 ranks
        p.send_signal(signal.SIGKILL if engine == "fsdp2" else signal.SIGTERM)  # the top process only
        p.wait(timeout=30)
        time.sleep(3)  # the ranks check their launch once a second (paused, they are idle meanwhile)
        pause.unlink()
        out, _ = p.communicate(timeout=300)  # EOF: every process that shares the runner's stdout has exited
    finally:
        for pid in process_tree(p.pid) + tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    left = [pid for pid in tree if _running(pid)]
    for _ in range(20):  # DeepSpeed's per-node launcher exits (with the ranks' 75) after its 1 s poll of them
        left = [pid for pid in left if _running(pid)]
        if not left:
            break
        time.sleep(0.5)
    assert len(tree) >= 3 and not left, (tree, left, out[-3000:])
    assert sorted(x.read_text().strip() for x in codes.iterdir()) == ["75", "75"], out[-4000:]
    who = f"DeepSpeed's runner (pid {p.pid})" if engine == "deepspeed" else f"the launcher (pid {p.pid})"
    gone = f"{who} is gone"
    assert f"train: {gone} (pid " in out, out[-4000:]  # a rank noticed (rank 0 may learn it from the step's collective)
    stopped = re.findall(rf"train: stopped at step (\d+) \(epoch 0\): ({re.escape(gone)}|a stop signal reached another "
                         "rank). Checkpoint", out)
    assert stopped, out[-4000:]
    tag = f"step{int(stopped[0][0]):08d}"
    assert json.loads((run / "checkpoints.json").read_text())[-1] == tag and check_complete(run, tag) is None


@BOTH_FSDP2_SLOW
def test_sigterm_to_launch_sh_checkpoints_and_resumes_exactly_second_run_refused(setup, run_a_of, engine):
    """Preemption as a scheduler does it: SIGTERM to launch.sh mid-epoch. Both ranks stop at the same step
    boundary, save, exit 75 (through torchrun too) and leave nothing running; a second run on the busy run dir is
    refused naming the holder; resuming gives exactly run A's losses (NaN windows included). The stop lands at the
    first step boundary whose decision sees the signal: step 5 under DeepSpeed ZeRO-2 (its step vector is read a step
    late), step 4 under FSDP2 (read before the step's last backward)."""
    run_a = run_a_of(engine)
    run, pause = setup / f"runS-{engine}", setup / f"pause-{engine}"
    pause.touch()
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               NGPU="0", NPROC="2", CONFIG=str(setup / "cfg.yaml"), DS_CONFIG=str(setup / "zero2_2.json"),
               MASTER_PORT=str(_free_port()), DEEPSPEED=DEEPSPEED, TORCHRUN=TORCHRUN, ENGINE=engine,
               MMCOCONUT_TEST_FAULTS=f"{NAN_FAULTS};pause_at_step=3;pause_file={pause}")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/mmcoconut/torch_extensions"))
    args = ["--train.precision=fp32", f"--logging.run_dir={run}", "--eval.val_every_epoch=true"]
    fsdp2_batch = engine_args(setup, engine, 2)[1:] if engine == "fsdp2" else []  # (launch.sh adds the engine)
    p = subprocess.Popen(["bash", str(ROOT / "launch.sh"), *args, *fsdp2_batch], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while not all(Path(f"{pause}.reached.{r}").exists() for r in (0, 1)):
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-4000:] if p.poll() else "slow"
            time.sleep(0.5)
        second = launch(1, [str(setup / "cfg.yaml"), "--deepspeed", str(setup / "zero2_1.json"),
                            "--train.precision=fp32", f"--logging.run_dir={run}", "--checkpoint.resume=none"],
                        timeout=300)
        assert second.returncode == 2, second.stdout[-3000:]
        err = [ln for ln in second.stdout.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and f"run dir {run} is in use by another training run (host " in err[0], err
        assert ", pid " in err[0] and ", started 20" in err[0] and "train: world" not in second.stdout
        p.send_signal(signal.SIGTERM)
        time.sleep(1)
        pause.unlink()
        out, _ = p.communicate(timeout=TIMEOUT)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    stop = 5 if engine == "deepspeed" else 4  # (docstring) paused after step 3, signalled while paused
    assert p.returncode == 75, out[-6000:]
    assert f"train: stopped at step {stop} (epoch 0): SIGTERM received" in out, out[-4000:]
    assert "run the same command again to resume" in out
    assert json.loads((run / "checkpoints.json").read_text())[-1] == f"step{stop:08d}"
    fwd = re.findall(r"launch\.sh: SIGTERM -> training processes ([\d ]+)\(", out)  # (tqdm shares the line)
    assert len(fwd) == 1, out[-4000:]
    ranks = [int(x) for x in fwd[0].split()]
    assert len(ranks) == 2 and not [pid for pid in ranks if Path(f"/proc/{pid}").exists()], ranks
    assert not (run / "run.lock").read_text().strip()  # released on the way out
    r = ok(launch(2, [str(setup / "cfg.yaml"), *engine_args(setup, engine, 2), *args], env_extra=NAN))
    assert f"resumed at step {stop}" in r.stdout
    _same_losses(_losses(run_a), _losses(run), range(1, 17))  # the stopped part and the resumed part


@pytest.mark.slow  # both engines (85-90 s each): make test-all
@BOTH
def test_two_nodes_stop_by_a_signal_on_one_and_resume_exactly(setup, run_a_of, engine):
    """Two "nodes" on this machine over loopback, one rank each, each started by launch.sh as a user would on its
    node (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; DeepSpeed: HOSTFILE, its launcher with --no_ssh; FSDP2:
    torchrun --nnodes 2 --node_rank N). SIGTERM to node 1's launch.sh after step 3: both nodes save the same step
    and exit 75; the same two commands again resume and repeat run A's losses (2 ranks on one node) bitwise."""
    run_a = run_a_of(engine)
    run, pause = setup / f"runN-{engine}", setup / f"pauseN-{engine}"
    (setup / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    args = ["--train.precision=fp32", f"--logging.run_dir={run}",  # (no validation: it is RNG-neutral)
            *(engine_args(setup, engine, 2)[1:] if engine == "fsdp2" else [])]
    port = str(_free_port())

    def node(rank: int, faults: str):
        env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS="1", NGPU="0", NPROC="1", NNODES="2", NODE_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CONFIG=str(setup / "cfg.yaml"),
                   DS_CONFIG=str(setup / "zero2_2.json"), HOSTFILE=str(setup / "hostfile"), DEEPSPEED=DEEPSPEED,
                   TORCHRUN=TORCHRUN, ENGINE=engine, MMCOCONUT_TEST_FAULTS=faults)
        return subprocess.Popen(["bash", str(ROOT / "launch.sh"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def finish(nodes):
        outs = []
        for p in nodes:
            try:
                outs.append(p.communicate(timeout=TIMEOUT)[0])
            except BaseException:
                for q in nodes:
                    os.killpg(q.pid, signal.SIGKILL)
                raise
        return outs

    pause.touch()
    nodes = [node(r, f"{NAN_FAULTS};pause_at_step=3;pause_file={pause}") for r in (0, 1)]
    deadline = time.time() + TIMEOUT
    while not all(Path(f"{pause}.reached.{r}").exists() for r in (0, 1)):
        if any(p.poll() is not None for p in nodes) or time.time() > deadline:
            outs = finish(nodes)
            pytest.fail("a node ended before step 3:\n" + "\n".join(o[-3000:] for o in outs))
        time.sleep(0.5)
    nodes[1].send_signal(signal.SIGTERM)
    time.sleep(1)
    pause.unlink()
    outs = finish(nodes)
    assert [p.returncode for p in nodes] == [75, 75], "\n".join(o[-3000:] for o in outs)
    stopped = re.findall(r"train: stopped at step (\d+) \(epoch 0\): a stop signal reached another rank", outs[0])
    assert stopped and "SIGTERM received" in outs[1], outs[0][-3000:]  # rank 0 (node 0) was not signalled
    tag = f"step{int(stopped[0]):08d}"
    assert json.loads((run / "checkpoints.json").read_text())[-1] == tag
    outs = finish([node(r, NAN_FAULTS) for r in (0, 1)])
    assert f"resumed at step {int(stopped[0])}" in outs[0], outs[0][-3000:]
    a, b = _losses(run_a), _losses(run)
    assert sorted(b) == list(range(1, 17)) and all(a[s] == b[s] for s in b), (a, b)

SYNC_PROBE = r'''
import collections, json, os, sys
import torch
from torch.overrides import TorchFunctionMode
import mmcoconut.train
from mmcoconut.cli.train import main

TORCH, TRAIN = os.path.dirname(torch.__file__), os.path.dirname(mmcoconut.train.__file__)
SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.numpy, torch.Tensor.cpu}
counts = collections.Counter()


class CountHostSyncs(TorchFunctionMode):
    """Device->host reads issued by mmcoconut/train code (the first caller frame outside torch)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            f = sys._getframe(1)
            while f is not None and f.f_code.co_filename.startswith(TORCH):
                f = f.f_back
            if f is not None and f.f_code.co_filename.startswith(TRAIN):
                counts[f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}:{func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


with CountHostSyncs():
    rc = main(sys.argv[1:])
print("SYNCS " + json.dumps(dict(counts)), flush=True)
sys.exit(rc)
'''


def test_at_most_one_host_sync_per_optimizer_step(setup):
    """Issue 12 item 6: the loop reads the device once per optimizer step (a step late), not per micro-batch.
    One rank, accumulation 4, 8 steps, checkpoints by steps and by time (early reads there, still once per step)."""
    run = setup / "runSync"
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/mmcoconut/torch_extensions"))
    r = subprocess.run([sys.executable, "-c", SYNC_PROBE, str(setup / "cfg.yaml"), "--deepspeed",
                        str(setup / "zero2_1.json"), "--train.precision=fp32", f"--logging.run_dir={run}",
                        "--train.num_epochs=1", "--checkpoint.save_every_minutes=0.0005"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("SYNCS ")]
    assert r.returncode == 0 and line, (r.stdout[-3000:], r.stderr[-3000:])
    counts = json.loads(line[0][len("SYNCS "):])
    steps = len(read_metrics(run, "train"))
    assert steps == 8 and "accumulation 4" in r.stdout
    assert counts == {"step.py:ready:tolist": steps}, counts  # 32 micro-batches, 8 reads
    # save_every_minutes=0.03 s: every step is flagged by rank 0's clock; a flag is acted on once read (a step
    # late, or at once when a checkpoint flushes the reads): steps 2, 3 (also save_every_steps), 5, 6, epoch end
    assert json.loads((run / "checkpoints.json").read_text()) == ["step00000002", "step00000003", "step00000005",
                                                                   "step00000006", "epoch001"]
