"""The prompt format a model was trained with (whether its questions list their choices) is part of the model: the
trainer's pre-flight reads it from the shards, the run config and the export record it, and evaluation, answer(),
mmcoconut-ask and mmcoconut-predict all build it (choices only map the answer for a model that never saw them)."""
import io
import json

import pytest
import torch
from PIL import Image

from mmcoconut.modeling.prompt import choices_suffix, format_question


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """The same 6 synthetic samples written with the choice list in the question (True) and without (False)."""
    from mmcoconut.cli.shard import main
    out = {}
    for listed in (True, False):
        d = tmp_path_factory.mktemp(f"listed_{listed}")
        args = ["--synthetic", "6", "--seed", "3", "--split", "val", "--out", str(d), "--maxcount", "3",
                "--image-size", "32", "--workers", "1", "--no-progress"]
        assert main(args + ([] if listed else ["--no-choices-in-question"])) == 0
        out[listed] = str(d / "val")
    return out


def test_format_question_adds_or_removes_the_list_once():
    q, ch = "Which colour?", ["red", "blue"]
    listed = q + choices_suffix(ch)
    assert format_question(q, ch, True) == format_question(listed, ch, True) == listed
    assert format_question(q, ch, False) == format_question(listed, ch, False) == q
    assert format_question(listed, ch, None) == listed and format_question(q, None, True) == q


def _model(cfg):
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok).eval()
    from conftest import scale_tiny_weights
    scale_tiny_weights(model)  # visible logits
    return model, tok, build_image_processor(cfg.model)


def _shard_samples(spec: str):
    import webdataset as wds
    from mmcoconut.data.shardlist import expand_shards
    for url in expand_shards(spec):
        for s in wds.WebDataset(url, shardshuffle=False):
            yield json.loads(s["json"]), Image.open(io.BytesIO(s["jpg"])).convert("RGB")


@pytest.mark.parametrize("listed", [True, False])
def test_answer_text_equals_the_evaluation_generation(shard_sets, eval_cfg_factory, tmp_path, listed):
    """A model trained on shards with / without the list: pre-flight records the format, the export ships it, and
    for every sample the export's answer(question, choices=...) writes exactly what evaluation generates, on shards
    of either format. (Before: answer() always wrote the list, a prompt the unlisted model never saw.)"""
    from mmcoconut.eval.evaluate import generate_view
    from mmcoconut.export.hf_export import save_export
    from mmcoconut.modeling import MMCoconutConfig, MMCoconutForConditionalGeneration, MMCoconutProcessor
    from mmcoconut.train.preflight import check_config

    cfg = eval_cfg_factory({"data.train_shards": shard_sets[listed], "data.val_shards": shard_sets[listed],
                            "eval.max_new_tokens": 8})
    assert cfg.data.choices_in_question is None
    check_config(cfg)  # the trainer's pre-flight reads the format from the samples
    assert cfg.data.choices_in_question is listed
    model, tok, ip = _model(cfg)
    out = save_export(model, tok, cfg, tmp_path / "export", image_processor=ip)
    assert MMCoconutConfig.from_pretrained(out).choices_in_question is listed
    assert MMCoconutProcessor.from_pretrained(out).choices_in_question is listed
    hf = MMCoconutForConditionalGeneration.from_pretrained(out)
    for view in ("coconut", "cot"):
        for shards in shard_sets.values():  # evaluation builds the model's format from shards of either format
            rows, _ = generate_view(model, tok, ip, cfg, shards, view, n_latents=cfg.curriculum.max_latent_stage)
            by_id = {r["question_id"]: r["text"] for r in rows}
            samples = list(_shard_samples(shards))
            assert len(by_id) == len(samples) == 6
            metas, images = zip(*samples)
            got = hf.answer(list(images), [m["raw_question"] for m in metas], choices=[m["choices"] for m in metas],
                            view=view)  # batched = one by one (test_hf.py)
            assert [g["text"] for g in got] == [by_id[m["question_id"]] for m in metas], (listed, view)
            assert all(g["choice"] in m["choices"] for g, m in zip(got, metas))


def test_mixed_formats_are_one_error(shard_sets, eval_cfg_factory):
    from mmcoconut.config import ConfigError
    from mmcoconut.train.preflight import check_config
    mixed = f"{shard_sets[True]}::{shard_sets[False]}"
    with pytest.raises(ConfigError, match="list their choices in the question and .* do not; set "
                                          "data.choices_in_question"):
        check_config(eval_cfg_factory({"data.train_shards": mixed, "data.val_shards": ""}))
    cfg = eval_cfg_factory({"data.train_shards": mixed, "data.val_shards": "", "data.choices_in_question": False})
    check_config(cfg)  # set in the config: one format built for every sample
    assert cfg.data.choices_in_question is False


def test_row_builder_builds_the_configured_format(shard_sets, eval_cfg_factory, tiny_tokenizer, tiny_processor):
    from mmcoconut.data.pipeline import RowBuilder, SkipCounter
    for flag in (True, False):
        cfg = eval_cfg_factory({"data.choices_in_question": flag})
        rb = RowBuilder(tiny_tokenizer, tiny_processor, cfg, 1, SkipCounter())
        for meta, _ in _shard_samples(shard_sets[True]):
            raw = {"json": json.dumps(meta).encode()}
            want = meta["raw_question"] + (choices_suffix(meta["choices"]) if flag else "")
            assert rb.parse(raw)["question"] == want
