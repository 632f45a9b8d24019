"""Shards over HTTP, pipe: and fsspec (memory://): specs, sizes.json, retries, skips, exact resume, eval.

A local http.server (tests/shard_server.py) serves a shard dir; its faults cut a response after some bytes
(the client sees a connection that breaks mid-shard) or stop and restart the whole server.
"""
import importlib.util
import json
import logging
import re
import shutil

import fsspec
import pytest

from mmcoconut.data.eval_loader import EvalLoader
from mmcoconut.data.pipeline import SkipCounter
from mmcoconut.data.shardlist import ShardReader, expand_shards, shard_sizes
from shard_server import ShardServer
from test_loader import _same, loader, make_cfg, write_shards


@pytest.fixture()
def served(tmp_path):
    """4 shards x 5 samples (q00000..q00019) + sizes.json, served over HTTP."""
    write_shards(tmp_path / "d", [5, 5, 5, 5])
    with ShardServer(tmp_path / "d") as srv:
        yield tmp_path / "d", srv


def remote_cfg(**kw):
    kw = {"shard_retries": 2, "shard_retry_wait": 0.05, "shard_timeout": 30.0, **kw}
    return make_cfg(**kw)


def keys(batches):
    return [k for b in batches for k in b["keys"]]


def test_url_specs_expand_like_local(served, tmp_path):
    d, srv = served
    u = srv.url
    names = [f"train-{i:06d}.tar" for i in range(4)]
    assert expand_shards(f"{u}/train-{{000000..000003}}.tar") == [f"{u}/{n}" for n in names]
    # HTTP cannot list: a prefix or a directory is resolved through its sizes.json
    assert expand_shards(f"{u}/train") == expand_shards(f"{u}/") == [f"{u}/{n}" for n in names]
    assert expand_shards(f"{u}/train-000002.tar") == [f"{u}/train-000002.tar"]
    pipes = expand_shards(f"pipe:cat {d}/train-{{000000..000001}}.tar")
    assert pipes == [f"pipe:cat {d}/{n}" for n in names[:2]]
    mixed = expand_shards(f"{u}/train-{{000000..000001}}.tar::pipe:cat {d}/train-000002.tar::{d}/train-000003.tar")
    assert len(mixed) == 4 and mixed[3] == f"{d}/train-000003.tar"
    assert shard_sizes(mixed) == shard_sizes(expand_shards(str(d))) == [5, 5, 5, 5]
    assert shard_sizes(pipes) == [5, 5]  # 'cat <dir>/sizes.json': the command with the shard name replaced
    with pytest.raises(FileNotFoundError, match=r"nope/train'.*brace pattern"):
        expand_shards(f"{u}/nope/train")
    with pytest.raises(ValueError, match="unknown URL scheme 'bogus'"):
        expand_shards("bogus://x/train-{0..1}.tar")


def test_fsspec_urls(tmp_path):
    """memory:// stands in for s3:// / gs:// (the same fsspec code path, no network)."""
    d = tmp_path / "d"
    write_shards(d, [3, 3])
    fs = fsspec.filesystem("memory")
    for p in d.iterdir():
        fs.put_file(str(p), f"/bkt/ds/{p.name}")
    try:
        base = "memory://bkt/ds"
        urls = expand_shards(base)
        assert [u.rsplit("/", 1)[1] for u in urls] == ["train-000000.tar", "train-000001.tar"]
        assert expand_shards(base + "/train") == urls and len(expand_shards(base + "/train-{000000..000001}.tar")) == 2
        assert shard_sizes(urls) == [3, 3]
        skips = SkipCounter()
        got = [r["__key__"] for r in ShardReader(skips).read(urls)]
        assert got == [f"q{i:05d}" for i in range(6)] and skips.total == 0
    finally:
        fs.rm("/bkt", recursive=True)


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_missing_fsspec_backend_names_the_extra():
    with pytest.raises(ValueError, match=r"pip install 'mmcoconut\[s3\]'.*pipe:aws s3 cp"):
        expand_shards("s3://bucket/shards/train-{000000..000003}.tar")


def test_missing_remote_sizes_json_is_one_clear_error(served, tiny_tokenizer, tiny_processor):
    d, srv = served
    (d / "sizes.json").unlink()
    spec = f"{srv.url}/train-{{000000..000003}}.tar"
    with pytest.raises(FileNotFoundError) as e:
        shard_sizes(expand_shards(spec))
    msg = str(e.value)
    assert f"{srv.url}/sizes.json is missing (HTTP 404" in msg and "data.samples_per_epoch" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError, match=r"sizes.json is missing.*samples_per_epoch"):
        loader(spec, tiny_tokenizer, tiny_processor, remote_cfg())
    with pytest.raises(FileNotFoundError, match=r"'cat .*sizes.json' exited with status 1"):
        shard_sizes(expand_shards(f"pipe:cat {d}/train-000000.tar"))
    L = loader(spec, tiny_tokenizer, tiny_processor, remote_cfg(samples_per_epoch=8))  # the documented way out
    assert len(list(L)) == len(L) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_http_and_pipe_streams_equal_local(served, tiny_tokenizer, tiny_processor, workers):
    d, srv = served
    cfg = remote_cfg(workers=workers)
    ref = list(loader(str(d / "train"), tiny_tokenizer, tiny_processor, cfg))
    for spec in (f"{srv.url}/train", f"pipe:cat {d}/train-{{000000..000003}}.tar"):
        got = list(loader(spec, tiny_tokenizer, tiny_processor, cfg))
        assert len(got) == len(ref) == 10
        for a, b in zip(got, ref):
            _same(a, b)


def test_pipe_failures_are_errors_not_hangs(served, caplog):
    d, _ = served
    tar = d / "train-000000.tar"
    skips = SkipCounter()
    reader = ShardReader(skips, retries=0, timeout=0.5)
    cases = {f"pipe:head -c 6000 {tar}; exit 3": "OSError: command exited with status 3",
             f"pipe:sleep 60; cat {tar}": "TimeoutError: command gave no output for 0.5 s",
             f"pipe:head -c 6000 {tar}": "ReadError: "}  # exit 0, the tar cut short
    for url, msg in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got = list(reader.read([url]))
        assert f"shard {url}: gave up after 1 attempt" in caplog.text and msg in caplog.text, caplog.text
        assert len(got) < 5
    assert skips.total == 3


def test_break_mid_shard_is_retried_without_loss_or_repeat(served, tiny_tokenizer, tiny_processor, caplog):
    d, srv = served
    cfg = remote_cfg()
    ref = list(loader(str(d / "train"), tiny_tokenizer, tiny_processor, cfg))
    srv.cut["train-000002.tar"] = (5000, 2)  # two responses break after 5000 bytes, the third is whole
    L = loader(f"{srv.url}/train", tiny_tokenizer, tiny_processor, cfg)
    with caplog.at_level(logging.WARNING):
        got = list(L)
    assert srv.hits["train-000002.tar"] == 3 and "train-000002.tar" not in srv.cut
    assert "retry 1/2" in caplog.text and "retry 2/2" in caplog.text and L.skipped == 0
    for a, b in zip(got, ref):
        _same(a, b)


def test_server_killed_mid_shard_comes_back(served, tiny_tokenizer, tiny_processor):
    """The whole server dies while a shard streams and restarts 0.3 s later: the backoff outlasts it."""
    d, srv = served
    ref = list(loader(str(d / "train"), tiny_tokenizer, tiny_processor, remote_cfg()))
    srv.cut["train-000001.tar"], srv.restart_after_cut = (9000, 1), 0.3
    L = loader(f"{srv.url}/train", tiny_tokenizer, tiny_processor,
               remote_cfg(shard_retries=10, shard_retry_wait=0.2))  # retries span ~200 s: a slow box is fine
    got = list(L)
    assert srv.restarts == 1 and L.skipped == 0
    assert keys(got) == keys(ref)


def test_dead_shard_skipped_counted_equal_batches(served, tiny_tokenizer, tiny_processor, caplog):
    d, srv = served
    srv.cut["train-000003.tar"] = (6000, None)  # never readable whole
    spec, cfg = f"{srv.url}/train", remote_cfg(samples_per_epoch=16)
    counts, seen, skipped = [], [], 0
    with caplog.at_level(logging.WARNING):
        for rank in range(2):
            L = loader(spec, tiny_tokenizer, tiny_processor, cfg, rank=rank, world=2)
            batches = list(L)
            counts.append(len(batches))
            seen += keys(batches)
            skipped += L.skipped
    assert counts == [4, 4]  # the rank that lost a shard cycles its shards to make up
    assert len(seen) == 16 and not set(seen) >= {f"q{i:05d}" for i in range(15, 20)}  # never read whole
    text = caplog.text
    give_ups = text.count("train-000003.tar: gave up after 3 attempts")
    assert give_ups >= 1 and srv.hits["train-000003.tar"] == 3 * give_ups  # 1 + 2 retries per give-up
    assert "connection closed" in text
    # each give-up counts the samples the shard still held (its sizes.json count minus those read), not 1
    lost = [5 - int(n) for n in re.findall(r"train-000003.tar: gave up after 3 attempts, (\d+) samples read", text)]
    assert skipped == sum(lost) and all(n >= 1 for n in lost)
    assert f"its {lost[0]} unread sample(s) (sizes.json) count as skipped" in text


def test_resume_replays_a_skipped_shard(served, tiny_tokenizer, tiny_processor):
    """A shard given up on before the checkpoint is read again healthy after the resume: the loader state's
    shard_failures make the resumed stream stop it at the same sample, so the continuation is exact."""
    d, srv = served
    spec, cfg = f"{srv.url}/train", remote_cfg(workers=2, shard_retries=1)
    srv.cut["train-000000.tar"] = (7000, 2)  # both attempts break: skipped once, whole again afterwards

    def fresh():
        L = loader(spec, tiny_tokenizer, tiny_processor, cfg)
        L.set_epoch(1)
        return L

    F = fresh()
    it, got, k = iter(F), [], None
    for b in it:
        got.append(b)
        if k is None and any(F.state_dict()["shard_failures"]):
            k, sd = len(got), F.state_dict()
    assert k is not None and k < len(got) - 2, "the failure must precede the checkpoint"
    ((p, i, n),) = [f for w in sd["shard_failures"] for f in w]
    assert n < 5  # read only partly
    assert "train-000000.tar" not in srv.cut and F.skipped == 5 - n  # the unread rest of the shard

    R = fresh()
    R.load_state_dict(sd)
    rest = list(R)
    assert len(rest) == len(got) - k and R.skipped == 0
    for a, b in zip(rest, got[k:]):
        _same(a, b)
    C = fresh()  # control: without the record the healthy shard is read whole and the samples differ
    C.load_state_dict(dict(sd, shard_failures=None))
    assert keys(list(C)) != keys(got[k:])


def test_resampled_http_fewer_shards_than_workers(served, tiny_tokenizer, tiny_processor):
    d, srv = served
    spec = f"{srv.url}/train-000001.tar"
    with pytest.raises(ValueError, match=r"1 shard\(s\) for 2 ranks x 2 workers.*data.resampled=true"):
        loader(spec, tiny_tokenizer, tiny_processor, remote_cfg(workers=2), world=2)
    cfg = remote_cfg(workers=2, resampled=True, samples_per_epoch=8)
    got = [keys(loader(spec, tiny_tokenizer, tiny_processor, cfg, rank=r, world=2)) for r in range(2)]
    assert [len(g) for g in got] == [4, 4] and set(got[0] + got[1]) <= {f"q{i:05d}" for i in range(5, 10)}


def test_eval_loader_over_http_and_pipe(served, tiny_tokenizer, tiny_processor):
    d, srv = served
    (d / "val").mkdir()
    for i in range(2):
        shutil.copy(d / f"train-{i:06d}.tar", d / "val" / f"val-{i:06d}.tar")  # no sizes.json: counted
    for spec in (f"{srv.url}/val/val-{{000000..000001}}.tar", f"pipe:cat {d}/val/val-{{000000..000001}}.tar"):
        seen = []
        for rank in range(2):
            E = EvalLoader(spec, tiny_tokenizer, tiny_processor, remote_cfg(), view="coconut", n_latents=2,
                           batch_size=2, rank=rank, world_size=2, n_image_tokens=1)
            seen += [k for b in E for k, v in zip(b["keys"], b["valid"]) if v]
        assert sorted(seen) == [f"q{i:05d}" for i in range(10)]


# ---------------------------------------------------------------- tools/make_shards.py --out <remote>
def test_make_shards_to_fsspec_and_pipe_targets(tmp_path, capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import make_shards

    def run(out, n, split="train", seed=0):
        return make_shards.main(["--synthetic", str(n), "--seed", str(seed), "--split", split, "--out", out,
                                 "--maxcount", "4", "--image-size", "32", "--workers", "1", "--no-progress"])

    assert run(str(tmp_path / "local"), 10) == 0
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    fs = fsspec.filesystem("memory")
    try:  # fsspec (memory:// here, s3:// / gs:// for users): byte-identical shards, sizes.json merged like local
        assert run("memory://bkt/syn", 10) == 0 and run("memory://bkt/syn", 3, "val", 1) == 0
        for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
            assert fs.cat_file(f"/bkt/syn/{name}") == local[name]
        sizes = json.loads(fs.cat_file("/bkt/syn/sizes.json"))
        assert sizes == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2, "val-000000.tar": 3}
        assert run("memory://bkt/syn", 5) == 0  # a smaller rerun replaces the split: no stale third shard
        assert not fs.exists("/bkt/syn/train-000002.tar")
        assert shard_sizes(expand_shards("memory://bkt/syn/train")) == [4, 1]
        assert shard_sizes(expand_shards("memory://bkt/syn/val")) == [3]
    finally:
        fs.rm("/bkt", recursive=True)
    capsys.readouterr()
    up = tmp_path / "up"
    up.mkdir()
    assert run(f"pipe:cat > {up}/{{}}", 10) == 0  # write-only: each file through the command
    assert {p.name: p.read_bytes() for p in up.iterdir()} == local
    assert "write-only pipe: target" in capsys.readouterr().err
    assert run("pipe:false {}", 2) == 1
    assert "uploading train-000000.tar: 'false train-000000.tar' exited with status 1" in capsys.readouterr().err
    for bad, msg in (("https://host/d", "pipe:curl -sf -T - https://host/d/{}"), ("pipe:aws s3 cp - s3://b/d", "'{}'")):
        with pytest.raises(SystemExit):
            run(bad, 2)
        assert msg in capsys.readouterr().err
