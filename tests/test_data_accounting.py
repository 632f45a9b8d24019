"""Skipped samples: reasons, exact per-batch counts across resume, no_steps in train and val, the step log's
records and the max_skip_fraction stop."""
import io
import json

import pytest
import webdataset as wds
from PIL import Image

from mmcoconut.config import Config
from mmcoconut.data.eval_loader import EvalLoader
from mmcoconut.data.loader import StreamingLoader
from mmcoconut.data.pipeline import SKIP_REASONS, SkipCounter
from mmcoconut.train.checkpoint.states import TrainState
from mmcoconut.train.errors import TrainError
from mmcoconut.train.step import StepBook, StepRecord


def shards(root, n=24, per=6, no_steps=(), empty_steps=(), bad_image=()):
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    for s in range(0, n, per):
        name = f"train-{s // per:06d}.tar"
        with wds.TarWriter(str(root / name)) as tw:
            for i in range(s, s + per):
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), (i * 9 % 256, 40, 90)).save(buf, "JPEG")
                meta = {"question": f"What color is the cube? The choices are 0: red, 1: blue {i}",
                        "steps": ["The cube is red."], "answer": "0"}
                if i in no_steps:
                    del meta["steps"]
                if i in empty_steps:
                    meta["steps"] = []
                tw.write({"__key__": f"q{i:05d}", "jpg": b"junk" if i in bad_image else buf.getvalue(),
                          "json": json.dumps(meta).encode()})
        counts[name] = per
    (root / "sizes.json").write_text(json.dumps(counts))
    return str(root / "train")


def cfg_for(workers=0, no_cot=False):
    cfg = Config()
    cfg.data.num_workers, cfg.data.shuffle_buffer, cfg.data.samples_per_epoch = workers, 4, 16
    cfg.curriculum.no_cot = no_cot
    return cfg


def test_skip_reasons_are_fixed_and_counted():
    s = SkipCounter()
    s.skip("no_steps", "sample 'a'")
    s.handler(OSError("truncated tar"))
    assert s.as_dict() == {"unreadable_shard": 1, "bad_json": 0, "bad_image": 0, "too_long": 0, "no_steps": 1}
    assert s.take() == {"no_steps": 1, "unreadable_shard": 1} and s.take() == {} and s.total == 2
    with pytest.raises(ValueError, match="unknown skip reason"):
        s.skip("whatever", "x")


@pytest.mark.parametrize("workers", [0, 2])
def test_no_steps_skipped_in_train_counted_exactly_across_resume(tmp_path, tiny_tokenizer, tiny_processor,
                                                                  workers):
    spec = shards(tmp_path, no_steps={1, 8, 13}, empty_steps={4}, bad_image={10})

    def fresh():
        L = StreamingLoader(spec, tiny_tokenizer, tiny_processor, cfg_for(workers), rank=0, world_size=1,
                            micro_batch_size=2, n_image_tokens=1, seed=5)
        L.set_epoch(0)
        return L

    ref = fresh()
    full = list(ref)
    assert not {"q00001", "q00004", "q00008", "q00013", "q00010"} & {k for b in full for k in b["keys"]}
    assert ref.skip_counts["no_steps"] >= 1 and set(ref.skip_counts) == set(SKIP_REASONS)
    head_loader = fresh()
    it = iter(head_loader)
    [next(it) for _ in range(3)]
    sd = head_loader.state_dict()
    rest = fresh()
    rest.load_state_dict(sd)
    list(rest)
    assert rest.skip_counts == ref.skip_counts  # consumed-batch counts: nothing counted twice on resume
    assert sum(len(b["keys"]) for b in full) == 16
    cot_free = StreamingLoader(spec, tiny_tokenizer, tiny_processor, cfg_for(0, no_cot=True), rank=0, world_size=1,
                               micro_batch_size=2, n_image_tokens=1, seed=5)
    list(cot_free)
    assert cot_free.skip_counts["no_steps"] == 0  # answers only: steps are not needed


def test_no_steps_skipped_in_val_loss(tmp_path, tiny_tokenizer, tiny_processor):
    spec = shards(tmp_path, n=6, per=6, no_steps={2, 3})
    L = EvalLoader(spec, tiny_tokenizer, tiny_processor, cfg_for(), view="train", n_latents=None, batch_size=3,
                   rank=0, world_size=1, n_image_tokens=1, with_labels=True, stage=0)
    rows = [(k, v) for b in L for k, v in zip(b["keys"], b["valid"]) if v]
    assert [k for k, _ in rows] == ["q00000", "q00001", "q00004", "q00005"]
    assert L.skips.as_dict()["no_steps"] == 2


class _Tracker:
    def __init__(self):
        self.recs = []

    def log(self, kind, **f):
        self.recs.append(dict(f, kind=kind))


def _rec(step, samples=8, skips=None, bad=0, last=False):
    v = {"loss_sum": 2.0 * (8 - bad), "n_finite": 8 - bad, "n_bad": bad, "samples": samples, "tokens": 100,
         "stop": 0, "save_due": 0, "grad_norm": 1.5, **{f"skip_{r}": (skips or {}).get(r, 0) for r in SKIP_REASONS}}
    info = dict(step=step, epoch=0, stage=0, lr=1e-3, loss_scale=None, skipped_steps=0, last=last, time=float(step))
    return StepRecord(v, info)


def test_step_log_records_skips_and_stops_on_the_fraction():
    cfg = Config()
    cfg.train.log_every, cfg.data.max_skip_fraction = 2, 0.05
    state, tr = TrainState(), _Tracker()
    log = StepBook(cfg, state, tr)
    log.take([_rec(1, skips={"no_steps": 1}), _rec(2, skips={"no_steps": 2, "bad_image": 1}, bad=1)])
    train = [r for r in tr.recs if r["kind"] == "train"]
    assert len(train) == 1 and train[0]["step"] == 2 and train[0]["skipped_no_steps"] == 2
    assert train[0]["skipped_bad_image"] == 1 and train[0]["skipped_samples"] == 3 and train[0]["nonfinite_steps"] == 1
    assert train[0]["loss"] == pytest.approx(2.0) and train[0]["grad_norm"] == 1.5
    assert state.samples == 16 and state.skips == {"bad_image": 1, "no_steps": 2} and state.nonfinite == 1
    assert [r["kind"] for r in tr.recs].count("nonfinite") == 1
    with pytest.raises(TrainError, match=r"data: 3 of 27 training samples \(11.1 %\).*no_steps 2.*"
                                         r"max_skip_fraction=0.05"):
        log.take([_rec(3, skips={"no_steps": 2, "bad_image": 1}, last=True)])  # epoch end: checked at any size


def test_step_log_agreed_decisions_and_nonfinite_limit():
    cfg = Config()
    cfg.train.max_nonfinite_steps = 2
    log = StepBook(cfg, TrainState(), _Tracker())
    r = _rec(1)
    r.values["stop"], r.values["save_due"] = 1, 1
    log.take([r])
    assert log.stop_seen and log.save_due
    log.take([_rec(2, bad=1)])
    with pytest.raises(TrainError, match=r"2 optimizer steps in a row had a NaN/inf loss"):
        log.take([_rec(3, bad=2)])


def test_stepsync_lag_flush_and_poison():
    import math

    import torch

    from mmcoconut.train.step import FIELDS, StepSync

    sync = StepSync("cpu", world=1, lag=1)
    for step, losses in enumerate(([1.0, 3.0], [2.0, float("nan")], [4.0, 4.0]), 1):
        sync.begin()
        for v in losses:
            sync.add(torch.tensor(v), 2, torch.ones(2, 5))
        vec = sync.reduce(stop=step == 2, save_due=False, skips={"bad_json": step})
        assert sync.poison(vec).item() == 1.0 if step != 2 else math.isnan(sync.poison(vec).item())
        sync.push(vec, torch.tensor(0.5 * step), info={"step": step})
        got = sync.ready()
        assert [r.info["step"] for r in got] == ([] if step == 1 else [step - 1])  # one step late
    last = sync.ready(flush=True)
    assert [r.info["step"] for r in last] == [3] and sync.reads == 3 and sync.ready(flush=True) == []
    v = last[0].values
    assert set(v) == set(FIELDS) and v["loss_sum"] == 8.0 and v["n_finite"] == 2 and v["tokens"] == 20
    assert v["samples"] == 4 and v["skip_bad_json"] == 3 and v["grad_norm"] == 1.5 and v["stop"] == 0


def test_a_lost_shard_counts_as_the_samples_it_held_and_stops_the_run(tmp_path, tiny_tokenizer, tiny_processor):
    """1 of 6 shards disappears after the start: the loader counts its 6 samples (sizes.json) each time it meets it,
    not 1, so the trainer's guard (step.py StepBook, data.max_skip_fraction) sees the real loss and stops the run."""
    spec = shards(tmp_path, n=36, per=6)
    loaders = []
    for samples_per_epoch in (None, 36):  # from sizes.json, or set (sizes.json still read for the count)
        cfg = cfg_for(0)
        cfg.data.samples_per_epoch, cfg.data.shard_retries = samples_per_epoch, 0
        loaders.append(StreamingLoader(spec, tiny_tokenizer, tiny_processor, cfg, rank=0, world_size=1,
                                       micro_batch_size=2, n_image_tokens=1, seed=5))
    (tmp_path / "train-000003.tar").unlink()
    for loader in loaders:
        loader.set_epoch(0)
        batches = list(loader)
        lost = loader.skip_counts["unreadable_shard"]
        assert len(batches) == 18 and lost >= 6 and lost % 6 == 0, lost
    state, tr = TrainState(), _Tracker()
    log = StepBook(cfg, state, tr)
    with pytest.raises(TrainError, match=rf"data: {lost} of {36 + lost} training samples .*unreadable_shard {lost}"):
        log.take([_rec(18, samples=36, skips=dict(loader.skip_counts), last=True)])
