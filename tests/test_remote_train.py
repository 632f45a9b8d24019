"""2-rank DeepSpeed training from shards served over HTTP (plus one pipe:cat shard): a shard whose stream breaks
is retried, given up on, counted as the samples it still held, and the run goes on (within data.max_skip_fraction);
resuming a checkpoint taken after that skip, with the server healthy again, repeats the interrupted run's losses
exactly. Two launches (CI budget)."""
import json
import re
import shutil

import pytest
import torch

from mmcoconut.train.tracking import read_metrics

from shard_server import ShardServer
from test_train_ds import _losses, launch, ok, setup  # noqa: F401  (setup: module fixture, shards + configs)

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def server(setup):  # noqa: F811
    with ShardServer(setup / "shards") as srv:
        yield srv


def _shard_failures(ckpt) -> list:
    client = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return [f for r in client["ranks"] for w in r["loader"]["shard_failures"] for f in w]


def test_two_ranks_from_http_skip_then_exact_resume(setup, server):  # noqa: F811
    d = setup / "shards"
    spec = f"{server.url}/train-{{000000..000002}}.tar::pipe:cat {d}/train-000003.tar"
    args = [str(setup / "cfg.yaml"), "--deepspeed", str(setup / "zero2_2.json"), "--train.precision=fp32",
            f"--data.train_shards={spec}", "--data.shard_retries=1", "--data.shard_retry_wait=0.2",
            "--train.num_epochs=1", "--checkpoint.save_every_steps=3", "--data.max_skip_fraction=0.5"]
    # the server "dies" in the middle of train-000001.tar for 4 responses, then serves it whole again: each rank's
    # pre-flight probe (data/probe.py: the first 8 samples, no retry, no warning) meets one cut, then the rank that
    # reads the shard in training meets two (its attempt and its one retry) and gives up on it
    server.cut["train-000001.tar"] = ((d / "train-000001.tar").stat().st_size * 2 // 5, 4)
    run = setup / "runHTTP"
    r = ok(launch(2, args + [f"--logging.run_dir={run}"]))
    assert "train-000001.tar" not in server.cut and server.hits["train-000001.tar"] >= 4
    assert "retry 1/1" in r.stdout and "gave up after 2 attempts" in r.stdout, r.stdout[-4000:]
    assert "connection closed after" in r.stdout
    fails = _shard_failures(run / "step00000003")
    assert len(fails) == 1 and fails[0][2] < 16, fails  # recorded before the step-3 checkpoint, partly read
    lost = json.loads((d / "sizes.json").read_text())["train-000001.tar"] - fails[0][2]  # its unread samples
    assert re.search(rf"its {lost} unread sample\(s\) \(sizes.json\) count as skipped \[unreadable_shard; {lost} "
                     "skipped for this reason so far]", r.stdout), r.stdout[-4000:]
    last = read_metrics(run, "train")[-1]
    assert last["skipped_unreadable_shard"] == lost, last  # the lost samples reach metrics.jsonl (skip accounting)
    a = _losses(run)
    assert sorted(a) == list(range(1, 9))  # 8 steps: the rank that lost samples cycled its shards (equal batches)

    resumed = setup / "runHTTP_resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("metrics.jsonl"))
    hits = server.hits["train-000001.tar"]
    r = ok(launch(2, args + [f"--logging.run_dir={resumed}", "--checkpoint.resume=step00000003"]))
    assert "resumed at step 3" in r.stdout and "gave up" not in r.stdout
    assert server.hits["train-000001.tar"] > hits  # re-opened (healthy now) and stopped where the first run did
    b = _losses(resumed)
    assert sorted(b) == list(range(4, 9))
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])
