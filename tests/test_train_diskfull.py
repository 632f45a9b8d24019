"""A real full disk (issue 13 item 8), with each engine: the run dir on a small tmpfs, mounted in a user + mount
namespace.

The first checkpoint fits, the second does not: the run must stop with one clear error naming the tag and the
free space (not torch's `enforce fail at inline_container.cc ... unexpected pos`), the partial dir must be gone,
the previous checkpoint complete; after making room, the same command resumes from it.
Skipped where unprivileged namespaces or tmpfs mounts are not allowed.
"""
import shutil
import subprocess
import sys
import tempfile

import pytest

from test_train_ds import DEEPSPEED, ROOT, TIMEOUT, _free_port, setup  # noqa: F401  (module fixture)

pytestmark = pytest.mark.multiproc


def _tmpfs_in_namespace() -> bool:
    if not shutil.which("unshare"):
        return False
    d = tempfile.mkdtemp()
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {d}"],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(d, ignore_errors=True)


CHECK = ("from mmcoconut.train.checkpoint.index import list_tags, check_complete; import sys; t = list_tags(sys.argv[1]); "
         "print('TAGS', t, [check_complete(sys.argv[1], x) for x in t])")


@pytest.mark.skipif(not _tmpfs_in_namespace(), reason="needs `unshare -rm` and a tmpfs mount in it")
@pytest.mark.parametrize("engine", ["deepspeed", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_disk_full_is_one_clear_error_and_the_previous_checkpoint_resumes(setup, engine):  # noqa: F811
    run = setup / f"runFull-{engine}"
    run.mkdir()
    common = (f"{setup / 'cfg.yaml'} --train.precision=fp32 --logging.run_dir={run} --train.num_epochs=1 "
              "--eval.val_every_epoch=false")
    if engine == "deepspeed":
        train = (f"{DEEPSPEED} --num_gpus 1 --master_port {_free_port()} --module mmcoconut.train {common} "
                 f"--deepspeed {setup / 'zero2_1.json'}")
    else:  # one process without a launcher
        train = (f"{sys.executable} -m mmcoconut.train {common} --train.engine=fsdp2 --train.micro_batch_size=2 "
                 "--train.gradient_accumulation_steps=4")
    script = f"""
mount -t tmpfs -o size=1200k tmpfs {run} || exit 99
{train}
echo "FIRST_RC=$?"
ls {run}
{sys.executable} -c "{CHECK}" {run}
mount -o remount,size=64m {run}
MMCOCONUT_TEST_FAULTS=stop_after_steps=4 {train}
echo "SECOND_RC=$?"
"""
    r = subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=2 * TIMEOUT, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu",
                                                 "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    out = r.stdout + r.stderr
    assert "FIRST_RC=1" in out, out[-5000:]
    err = [ln for ln in out.splitlines() if ln.startswith("error: checkpoint")]
    assert len(err) == 1, out[-5000:]
    assert "checkpoint step00000006 could not be written" in err[0] and "no space left on device" in err[0]
    assert " free there. The previous checkpoint step00000003 is intact" in err[0]
    assert "TAGS ['step00000003'] [None]" in out and "step00000006" not in out.split("FIRST_RC=1")[1].split(
        "TAGS")[0], out[-3000:]
    assert "resumed at step 3" in out and "SECOND_RC=0" in out, out[-3000:]
