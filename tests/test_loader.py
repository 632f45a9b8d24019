"""WebDataset loaders: rank/worker coverage, equal batch counts, exact resume, errors, skips, eval padding."""
import io
import json
import logging

import pytest
import torch
import webdataset as wds
from PIL import Image

from mmcoconut.config import Config
from mmcoconut.data.eval_loader import EvalLoader
from mmcoconut.data.loader import StreamingLoader
from mmcoconut.data.shardlist import expand_shards


def write_shards(root, sizes, prefix="train", bad=None, start=0):
    """Shards `<root>/<prefix>-%06d.tar` with `sizes[i]` samples each + sizes.json. bad: {key: (ext, bytes)}."""
    root.mkdir(parents=True, exist_ok=True)
    bad, i, counts = bad or {}, start, {}
    for s, n in enumerate(sizes):
        name = f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as tw:
            for _ in range(n):
                key = f"q{i:05d}"
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), ((i * 37) % 256, (i * 11) % 256, 90)).save(buf, "JPEG")
                steps = ["The cube is left of the ball.", "The ball is red."][: 1 + i % 2]
                meta = {"question": f"What color is the cube? The choices are 0: red, 1: blue {i}", "steps": steps,
                        "answer": str(i % 2), "question_id": key, "choices": ["red", "blue"]}
                rec = {"__key__": key, "jpg": buf.getvalue(), "json": json.dumps(meta).encode()}
                if key in bad:
                    rec[bad[key][0]] = bad[key][1]
                tw.write(rec)
                i += 1
        counts[name] = n
    (root / "sizes.json").write_text(json.dumps(counts))
    return str(root / prefix)


def make_cfg(workers=0, **data):
    cfg = Config()
    cfg.data.num_workers = workers
    cfg.data.shuffle_buffer = 4
    for k, v in data.items():
        setattr(cfg.data, k, v)
    cfg.curriculum.c_thought, cfg.curriculum.max_latent_stage = 2, 2
    return cfg


def loader(spec, tok, proc, cfg, rank=0, world=1, micro=2, seed=3):
    return StreamingLoader(spec, tok, proc, cfg, rank=rank, world_size=world, micro_batch_size=micro,
                           n_image_tokens=1, seed=seed)


def test_shard_specs(tmp_path):
    spec = write_shards(tmp_path / "d", [2, 2, 2])
    write_shards(tmp_path / "d", [1], prefix="val")
    assert len(expand_shards(spec)) == 3 and len(expand_shards(str(tmp_path / "d"))) == 4
    assert expand_shards(f"{tmp_path}/d/train-{{000000..000001}}.tar") == expand_shards(spec)[:2]
    assert len(expand_shards(f"{spec}::{tmp_path}/d/val")) == 4
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_shards(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        (tmp_path / "d" / "sizes.json").unlink()
        loader(spec, None, None, make_cfg())


def test_disjoint_cover_ranks_x_workers(tmp_path, tiny_tokenizer, tiny_processor):
    spec = write_shards(tmp_path, [3, 3, 3, 3])
    cfg = make_cfg(workers=2)
    seen = []
    for rank in range(2):
        L = loader(spec, tiny_tokenizer, tiny_processor, cfg, rank=rank, world=2, micro=3)
        L.set_epoch(1)
        batches = list(L)
        assert len(batches) == len(L) == 2
        seen += [k for b in batches for k in b["keys"]]
    assert sorted(seen) == [f"q{i:05d}" for i in range(12)]


def test_equal_batches_uneven_shards(tmp_path, tiny_tokenizer, tiny_processor):
    spec = write_shards(tmp_path, [5, 2])
    cfg = make_cfg(samples_per_epoch=12)
    counts = [len(list(loader(spec, tiny_tokenizer, tiny_processor, cfg, rank=r, world=2))) for r in range(2)]
    assert counts == [3, 3]


def _same(a, b):
    assert a["keys"] == b["keys"]
    for k in ("input_ids", "attention_mask", "labels", "position_ids", "pixel_values", "n_latents"):
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(tmp_path, tiny_tokenizer, tiny_processor, workers):
    spec = write_shards(tmp_path, [5, 5, 5, 5], bad={"q00007": ("jpg", b"garbage")})
    cfg = make_cfg(workers=workers)
    cfg.curriculum.uniform_prob = 0.5

    def fresh():
        L = loader(spec, tiny_tokenizer, tiny_processor, cfg)
        L.set_epoch(2)
        L.set_stage(1)
        return L

    ref = list(fresh())
    assert len(ref) == 10
    for k, other_rank in ((3, False), (4, True)):
        L = fresh()
        it = iter(L)
        head = [next(it) for _ in range(k)]
        sd = L.state_dict()
        assert sd["batches_consumed"] == k and sd["epoch"] == 2 and sd["stage"] == 1
        if other_rank:  # e.g. rank 0's state applied on another rank: no raw positions -> cheap row skip
            sd = {key: sd[key] for key in ("epoch", "stage", "batches_consumed", "seed")}
        R = loader(spec, tiny_tokenizer, tiny_processor, cfg, seed=99)
        R.load_state_dict(sd)
        R.set_epoch(2)  # same epoch: keeps the position
        rest = list(R)
        assert len(head) + len(rest) == len(ref)
        for a, b in zip(head + rest, ref):
            _same(a, b)


def test_too_few_shards(tmp_path, tiny_tokenizer, tiny_processor):
    spec = write_shards(tmp_path, [4, 4, 4])
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 ranks x 2 workers.*maxcount.*resampled"):
        loader(spec, tiny_tokenizer, tiny_processor, make_cfg(workers=2), world=2)
    L = loader(spec, tiny_tokenizer, tiny_processor, make_cfg(workers=2, resampled=True), world=2)
    assert len(list(L)) == len(L) == 3


def test_corrupt_samples_skipped_and_counted(tmp_path, tiny_tokenizer, tiny_processor, caplog):
    spec = write_shards(tmp_path, [4, 4], bad={"q00002": ("jpg", b"not a jpeg"), "q00005": ("json", b"{oops")})
    cfg = make_cfg(shuffle_buffer=0, samples_per_epoch=6)
    L = loader(spec, tiny_tokenizer, tiny_processor, cfg, micro=6)
    with caplog.at_level(logging.WARNING):
        (batch,) = list(L)
    assert L.skipped == 2 and L.skips.as_dict() == {"unreadable_shard": 0, "bad_json": 1, "bad_image": 1,
                                                    "too_long": 0, "no_steps": 0}
    assert L.skip_counts == dict(L.skips.as_dict()) and L.state_dict()["skips"]["bad_image"] == 1
    assert "q00002" not in batch["keys"] and "q00005" not in batch["keys"] and len(batch["keys"]) == 6
    assert "'q00002'" in caplog.text and "train-000000.tar" in caplog.text


def test_overlong(tmp_path, tiny_tokenizer, tiny_processor):
    spec = write_shards(tmp_path, [4])
    cfg = make_cfg()
    cfg.model.max_length = 8
    with pytest.raises(ValueError, match=r"sample 'q0000\d'.*max_length=8"):
        list(loader(spec, tiny_tokenizer, tiny_processor, cfg))
    cfg.data.overlong, cfg.data.samples_per_epoch = "skip", 2
    from mmcoconut.data.curriculum import build_example
    from mmcoconut.modeling.tokens import SpecialIds
    one_step = {"question": "What color is the cube? The choices are 0: red, 1: blue 0", "answer": "0",
                "steps": ["The cube is left of the ball."]}
    cfg.model.max_length = len(build_example(one_step, tiny_tokenizer, SpecialIds.from_tokenizer(tiny_tokenizer),
                                             view="train", stage=0, cur=cfg.curriculum, n_image_tokens=1, rng=None,
                                             max_length=999, key="x")["input_ids"])  # 2-step samples are longer
    L = loader(spec, tiny_tokenizer, tiny_processor, cfg)
    (b,) = list(L)
    assert L.skips.as_dict()["too_long"] >= 1 and all(int(k[-1]) % 2 == 0 for k in b["keys"])


def test_stage_reaches_workers(tmp_path, tiny_tokenizer, tiny_processor):
    spec = write_shards(tmp_path, [4, 4])
    L = loader(spec, tiny_tokenizer, tiny_processor, make_cfg(workers=2))
    L.set_stage(0)
    assert all((b["n_latents"] == 0).all() for b in L)
    L.set_epoch(1)
    L.set_stage(1)
    assert all((b["n_latents"] == 2).all() for b in L)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loader_split_and_padding(tmp_path, tiny_tokenizer, tiny_processor, workers):
    spec = write_shards(tmp_path, [5], prefix="val")
    cfg = make_cfg(workers=workers)
    got, lens = [], []
    for rank in range(2):
        E = EvalLoader(spec, tiny_tokenizer, tiny_processor, cfg, view="coconut", n_latents=4, batch_size=2,
                       rank=rank, world_size=2, n_image_tokens=1)
        batches = list(E)
        lens.append(len(batches))
        for b in batches:
            assert (b["n_latents"] == 4).all() and b["pixel_values"].shape[0] == 2
            assert all(m["question_id"] == k for m, k in zip(b["meta"], b["keys"]))
            got += [k for k, v in zip(b["keys"], b["valid"]) if v]
    assert lens == [2, 2] and sorted(got) == [f"q{i:05d}" for i in range(5)]
    E = EvalLoader(spec, tiny_tokenizer, tiny_processor, cfg, view="cot", n_latents=None, batch_size=4, rank=0,
                   world_size=1, n_image_tokens=1, max_samples=3, with_labels=True)
    (b,) = list(E)
    assert b["valid"] == [True, True, True, False] and "labels" in b


def test_fast_clip_preprocess_matches_processor(tiny_processor):
    import numpy as np
    from transformers import CLIPImageProcessor
    from mmcoconut.data.pipeline import FastClipPreprocess
    rng = np.random.default_rng(0)
    for proc in (tiny_processor, CLIPImageProcessor()):
        fast = FastClipPreprocess.build(proc)
        assert fast is not None
        for w, h in ((224, 224), (640, 480), (33, 70)):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ref = proc(images=img, return_tensors="pt")["pixel_values"][0]
            assert torch.allclose(fast(img), ref, atol=1e-5)
    assert FastClipPreprocess.build(CLIPImageProcessor(do_center_crop=False)) is None


def test_raw_json_shard_spec_says_how_to_shard():
    # a raw json list given as shards (outside the trainer, which shards it itself): the error names the console
    # script that shards it
    with pytest.raises(FileNotFoundError, match=r"mmcoconut-shard --json data/aokvqa_train.json"):
        expand_shards("data/aokvqa_train.json")
