"""Real s3:// through s3fs against a local moto S3 server: make_shards' writer to s3, then specs, sizes.json and
reading. Runs where `pip install 'mmcoconut[s3]' 'moto[server]'` is installed (skipped otherwise: the same code
path is covered by memory:// in test_remote.py)."""
import socket

import pytest

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture()
def s3(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bkt")
    yield
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


class Skips:  # SkipCounter's handler interface (pipeline.py imports torch; this test needs only s3fs + moto)
    total = 0

    def handler(self, exn, n=1) -> bool:  # n: samples the given-up shard still held
        self.total += n
        return True


def test_shards_written_to_and_read_from_s3(s3, tmp_path):
    from mmcoconut.data.sharding import write_shards
    from mmcoconut.data.shardlist import ShardReader, expand_shards, shard_sizes
    from mmcoconut.data.sources import synthetic_records

    kw = dict(maxcount=4, image_size=32, progress=False)
    assert write_shards(synthetic_records(10, 0), "s3://bkt/syn", "train", **kw)["written"] == 10
    assert write_shards(synthetic_records(3, 1), "s3://bkt/syn", "val", **kw)["written"] == 3
    local = write_shards(synthetic_records(10, 0), tmp_path / "syn", "train", **kw)
    assert local["shards"] == 3
    urls = expand_shards("s3://bkt/syn/train")
    assert urls == [f"s3://bkt/syn/train-{i:06d}.tar" for i in range(3)]
    assert expand_shards("s3://bkt/syn/") == urls + ["s3://bkt/syn/val-000000.tar"]
    assert shard_sizes(expand_shards("s3://bkt/syn/train-{000000..000002}.tar::s3://bkt/syn/val")) == [4, 4, 2, 3]
    fs = s3fs.S3FileSystem()
    assert fs.cat_file("bkt/syn/train-000001.tar") == (tmp_path / "syn" / "train-000001.tar").read_bytes()
    skips = Skips()
    got = [r["__key__"] for r in ShardReader(skips, retries=2, wait=0.05).read(urls + ["s3://bkt/syn/nope-0.tar"])]
    assert len(got) == 10 == len(set(got)) and skips.total == 1  # the missing object: skipped, not retried
    with pytest.raises(FileNotFoundError, match=r"s3://bkt/other/sizes.json is missing.*samples_per_epoch"):
        shard_sizes(["s3://bkt/other/train-000000.tar"])
    assert write_shards(synthetic_records(5, 0), "s3://bkt/syn", "train", **kw)["shards"] == 2  # rerun, smaller
    s3fs.S3FileSystem.clear_instance_cache()
    assert expand_shards("s3://bkt/syn/train") == urls[:2]
