"""Coconut curriculum sequences, label masks and the latent-aligning collators (hand-computed expectations)."""
import pytest
import torch

from mmcoconut.config import CurriculumConfig
from mmcoconut.data.collate import Collator, GenerationCollator
from mmcoconut.data.curriculum import (OverlongError, SharedStage, build_example, build_prompt, sample_rng,
                                       stage_for_epoch)
from mmcoconut.modeling.tokens import SpecialIds

X = -100
N_IMG = 2


@pytest.fixture(scope="module")
def parts(tiny_tokenizer):
    enc = lambda s: tiny_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    ids = SpecialIds.from_tokenizer(tiny_tokenizer)
    q = "What color is the cube? The choices are 0: red, 1: blue"
    steps = ["The cube is left of the ball.", "The ball is red.", "So the answer is red."]
    return dict(ids=ids, Q=enc(q + "\n"), S=[enc(s + "\n") for s in steps], A=enc("### 0") + [ids.eos],
                sample={"question": q, "steps": steps, "answer": "0"})


def build(parts, tok, stage, view="train", rng=None, sample=None, **cur):
    cur = CurriculumConfig(**{"c_thought": 2, "max_latent_stage": 2, **cur})
    return build_example(dict(sample or parts["sample"]), tok, parts["ids"], view=view, stage=stage, cur=cur,
                         n_image_tokens=N_IMG, rng=rng, max_length=256, key="k1")


def expect(parts, n_lat, steps_from, markers=True, steps=None):
    ids = parts["ids"]
    prefix = [ids.image] * N_IMG + parts["Q"] + ([ids.start] + [ids.latent] * n_lat + [ids.end] if markers else [])
    target = sum((steps if steps is not None else parts["S"])[steps_from:], []) + parts["A"]
    return prefix + target, [X] * len(prefix) + target


@pytest.mark.parametrize("stage,n_lat,skip", [(0, 0, 0), (1, 2, 1), (2, 4, 2)])
def test_stage_k_sequence_and_labels(parts, tiny_tokenizer, stage, n_lat, skip):
    ex = build(parts, tiny_tokenizer, stage)
    ids, labels = expect(parts, n_lat, skip)
    assert ex["input_ids"] == ids and ex["labels"] == labels and ex["n_latents"] == n_lat


def test_stage_beyond_max(parts, tiny_tokenizer):
    # stage 3 > max_latent_stage 2: all 3 steps skipped, min(3, 2) * c_thought latents
    ex = build(parts, tiny_tokenizer, 3)
    assert (ex["input_ids"], ex["labels"]) == expect(parts, 4, 3)
    one = dict(parts["sample"], steps=parts["sample"]["steps"][:1])
    ex = build(parts, tiny_tokenizer, 3, sample=one)  # one step: min(1, 2) * 2
    assert (ex["input_ids"], ex["labels"]) == expect(parts, 2, 1, steps=parts["S"][:1])
    ex = build(parts, tiny_tokenizer, 3, sample=one, pad_latent_to_max=True)  # padded to max_latent_stage * 2
    assert (ex["input_ids"], ex["labels"]) == expect(parts, 4, 1, steps=parts["S"][:1])


def test_cot_nocot_and_eval_views(parts, tiny_tokenizer):
    assert tuple(build(parts, tiny_tokenizer, 2, coconut=False).values())[:2] == expect(parts, 0, 0, markers=False)
    assert tuple(build(parts, tiny_tokenizer, 2, no_cot=True).values())[:2] == expect(parts, 0, 3, markers=False)
    # cot view of a coconut-trained model = its stage-0 sequence (START END, no latents); plain CoT: no markers
    assert tuple(build(parts, tiny_tokenizer, 1, view="cot").values())[:2] == expect(parts, 0, 0)
    assert tuple(build(parts, tiny_tokenizer, 1, view="cot", coconut=False).values())[:2] == \
        expect(parts, 0, 0, markers=False)
    assert tuple(build(parts, tiny_tokenizer, 1, view="nocot").values())[:2] == expect(parts, 0, 3, markers=False)
    for view in ("coconut", "dummy"):
        assert tuple(build(parts, tiny_tokenizer, 1, view=view).values())[:2] == expect(parts, 2, 1)


def test_uniform_prob_draw_is_keyed(parts, tiny_tokenizer):
    got = [build(parts, tiny_tokenizer, 0, rng=sample_rng(7, e, "k1"), uniform_prob=1.0)["n_latents"]
           for e in range(12)]
    want = []
    for e in range(12):
        r = sample_rng(7, e, "k1")
        assert r.random() < 1.0
        k = r.choice(range(4))
        want.append(k * 2 if k <= 2 else 4)
    assert got == want and len(set(got)) > 1
    assert build(parts, tiny_tokenizer, 0, rng=sample_rng(7, 3, "k1"), uniform_prob=1.0)["n_latents"] == want[3]


def test_prompts(parts, tiny_tokenizer):
    ids, cur = parts["ids"], CurriculumConfig(c_thought=2, max_latent_stage=2)
    kw = dict(cur=cur, n_image_tokens=N_IMG, max_length=256, key="k1")
    head = [ids.image] * N_IMG + parts["Q"]
    p = build_prompt(dict(parts["sample"]), tiny_tokenizer, ids, view="coconut", stage=5, **kw)
    assert p["input_ids"] == head + [ids.start] + [ids.latent] * 4 + [ids.end] and p["n_latents"] == 4
    p = build_prompt(dict(parts["sample"]), tiny_tokenizer, ids, view="dummy", stage=1, n_latents=6, **kw)
    assert p["input_ids"] == head + [ids.start] + [ids.latent] * 6 + [ids.end]
    assert build_prompt(dict(parts["sample"]), tiny_tokenizer, ids, view="nocot", stage=2, **kw)["input_ids"] == head
    p = build_prompt(dict(parts["sample"]), tiny_tokenizer, ids, view="cot", stage=2, **kw)
    assert p["input_ids"] == head + [ids.start, ids.end] and p["n_latents"] == 0
    kw["cur"] = CurriculumConfig(coconut=False)
    assert build_prompt(dict(parts["sample"]), tiny_tokenizer, ids, view="cot", stage=2, **kw)["input_ids"] == head


def test_overlong_names_key(parts, tiny_tokenizer):
    with pytest.raises(OverlongError, match="'q-77'.*max_length=10") as e:
        build_example(dict(parts["sample"]), tiny_tokenizer, parts["ids"], view="train", stage=0,
                      cur=CurriculumConfig(), n_image_tokens=N_IMG, rng=None, max_length=10, key="q-77")
    assert isinstance(e.value, ValueError)


def test_tokenized_once(parts, tiny_tokenizer):
    sample = dict(parts["sample"])
    build_example(sample, tiny_tokenizer, parts["ids"], view="cot", stage=0, cur=CurriculumConfig(),
                  n_image_tokens=0, rng=None, max_length=256, key="k")
    sample["_tok"]["answer"] = [1, 2]  # the cache, not the text, is used from now on
    ex = build_example(sample, tiny_tokenizer, parts["ids"], view="nocot", stage=0, cur=CurriculumConfig(),
                       n_image_tokens=0, rng=None, max_length=256, key="k")
    assert ex["input_ids"][-2:] == [1, 2]


def test_shared_stage_pickles_into_processes():
    import multiprocessing as mp
    s = SharedStage(1)
    s.set(3)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_report_stage, args=(s, q))
    p.start()
    assert q.get(timeout=20) == 3
    p.join()


def _report_stage(s, q):
    q.put(s.get())


def _row(ids, prefix_len, n_lat, tail, key):
    toks = [ids.image] + [5] * prefix_len + ([ids.start] + [ids.latent] * n_lat + [ids.end] if n_lat >= 0 else [])
    toks += [6] * tail
    return {"input_ids": toks, "labels": [X] * (len(toks) - tail) + [6] * tail, "n_latents": max(n_lat, 0),
            "pixel_values": torch.zeros(3, 4, 4), "key": key, "meta": {"k": key}}


def test_collator_aligns_first_latent(parts):
    ids = parts["ids"]
    rows = [_row(ids, 3, 2, 4, "a"), _row(ids, 6, 4, 1, "b"), _row(ids, 2, -1, 9, "c")]  # c: no latents
    b = Collator(ids, ids.pad)(rows)
    col = [r.index(ids.latent) for r in b["input_ids"][:2].tolist()]
    assert col == [1 + 6 + 1] * 2  # row a left-padded by 3
    assert b["input_ids"][0, :3].tolist() == [ids.pad] * 3 and b["attention_mask"][0, :3].tolist() == [0] * 3
    assert b["input_ids"][2, 0].item() == ids.image  # no latents: no left pad
    T = b["input_ids"].shape[1]
    assert T == max(3 + len(rows[0]["input_ids"]), len(rows[1]["input_ids"]), len(rows[2]["input_ids"]))
    m = b["attention_mask"]
    assert ((b["labels"] != X) <= (m == 1)).all() and (b["input_ids"][m == 0] == ids.pad).all()
    assert b["position_ids"][0].tolist()[:5] == [0, 0, 0, 0, 1]
    assert torch.equal(b["position_ids"], (m.cumsum(1) - 1).clamp_min(0))
    assert m.sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    assert b["keys"] == ["a", "b", "c"] and b["n_latents"].tolist() == [2, 4, 0]
    assert b["pixel_values"].shape == (3, 3, 4, 4)


def test_generation_collator_left_pads(parts):
    ids = parts["ids"]
    rows = [dict(_row(ids, 3, 2, 0, "a"), valid=True), dict(_row(ids, 7, 2, 0, "b"), valid=False)]
    b = GenerationCollator(ids, ids.pad)(rows)
    assert (b["input_ids"][:, -1] == ids.end).all() and b["attention_mask"][0, :4].sum() == 0
    assert b["valid"] == [True, False] and b["meta"] == [{"k": "a"}, {"k": "b"}]
    assert b["position_ids"][0, -1].item() == len(rows[0]["input_ids"]) - 1


@pytest.mark.parametrize("cur,stages", [
    (dict(epochs_per_stage=2, max_latent_stage=2), [0, 0, 1, 1, 2, 2, 2]),  # upstream: epoch // epochs_per_stage
    (dict(epochs_per_stage=1, stage0_epochs=3, max_latent_stage=2), [0, 0, 0, 1, 2, 2, 2]),
    (dict(epochs_per_stage=2, stage0_epochs=1, max_latent_stage=3), [0, 1, 1, 2, 2, 3, 3]),
    (dict(epochs_per_stage=1, coconut=False), [0] * 7),
    (dict(epochs_per_stage=1, no_cot=True), [0] * 7),
])
def test_stage_for_epoch(cur, stages):
    assert [stage_for_epoch(CurriculumConfig(**cur), e) for e in range(7)] == stages
