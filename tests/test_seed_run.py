"""The seed's own configs run as written (docs/seed-compatibility.md): the seed's batch (batch_size_training x ranks
x accumulation) without an explicit ds_config, logged with how it was derived; a seed config without coconut/cot
keys is the seed's CoT-only mode (stage 0 only); a missing load_model_path is one error before anything is built.
(The seed's json train_path and the worker fit: tests/test_preflight.py.)"""
import yaml
import pytest

from mmcoconut.cli import train as train_main
from mmcoconut.config import load_config
from mmcoconut.data.curriculum import stage_for_epoch
import test_preflight
from test_preflight import Reached, one_error

shards, sentinel = test_preflight.shards, test_preflight.sentinel  # fixtures shared with the pre-flight tests


def seed_yaml(tmp_path, d, **over):
    seed = {"name": "seedrun", "model_id": str(d / "lm"), "clip_id": str(d / "vision"), "bf16": False,
            "train_path": str(d / "s" / "train"), "val_path": str(d / "s" / "val"), "save_path": str(tmp_path / "ck"),
            "batch_size_training": 4, "num_epochs": 2, "lr": 1e-4, "coconut": True, "c_thought": 1,
            "max_latent_stage": 1, **over}
    seed = {k: v for k, v in seed.items() if v is not None}
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump(seed))
    return str(tmp_path / "seed.yaml")


@pytest.fixture
def reach_train(monkeypatch):
    """Run main() up to the trainer; `got` receives (cfg, the resolved ds_config) as the trainer would."""
    import mmcoconut.train.engines as engines
    import mmcoconut.train.trainer as trainer
    got = []

    def run(cfg, spec, *rest):
        got.append((cfg, spec.ds_config))
        raise Reached()
    monkeypatch.setattr(engines, "init_distributed", lambda *a, **k: None)
    monkeypatch.setattr(trainer, "run", run)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    return got


@pytest.mark.parametrize("acc, ds, glob, accum", [(None, None, 8, 1), (2, None, 16, 2), (None, "g32_w2", 32, 4)])
def test_seed_batch_is_the_seeds_global_batch_and_the_log_says_how(shards, reach_train, capsys, monkeypatch,
                                                                   tmp_path, acc, ds, glob, accum):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = [seed_yaml(tmp_path, shards, gradient_accumulation_steps=acc), "--logging.report_to=none"]
    args += ["--deepspeed", str(shards / f"{ds}.json")] if ds else []
    with pytest.raises(Reached):
        train_main.main(args)
    (_, got), = reach_train
    assert (got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"], got["train_batch_size"]) == \
        (4, accum, glob)
    out = capsys.readouterr().out
    assert f"note: batch: global batch {glob} = batch_size_training 4 x 2 rank(s) x gradient_accumulation_steps " \
           f"{accum}" in out, out
    assert ("from the ds_config" in out) == bool(ds) and ("the seed's batch" in out) == (not ds)


def test_seed_config_without_coconut_or_cot_is_the_seeds_cot_only_mode(shards, reach_train, capsys, monkeypatch,
                                                                       tmp_path):
    cfg = load_config(seed_yaml(tmp_path, shards, coconut=None, max_latent_stage=3, num_epochs=6))
    assert cfg.curriculum.coconut is False
    assert {stage_for_epoch(cfg.curriculum, e) for e in range(6)} == {0}
    assert any("CoT-only mode" in n for n in cfg.notes)
    for over, coconut in (({"coconut": False, "cot": True}, False), ({"coconut": True, "cot": False}, True),
                          ({"coconut": None, "cot": False}, True)):  # upstream gsm_cot / gsm_coconut; cot: false
        assert load_config(seed_yaml(tmp_path, shards, **over)).curriculum.coconut is coconut
    assert load_config("demo").curriculum.coconut is True  # sectioned configs keep mmcoconut's default
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Reached):
        train_main.main([seed_yaml(tmp_path, shards, coconut=None), "--logging.report_to=none"])
    assert "CoT-only mode: curriculum.coconut=false (stage 0 only" in capsys.readouterr().out
    assert reach_train[0][0].curriculum.coconut is False


def test_missing_load_model_path_is_one_error_before_the_model_is_built(shards, sentinel, capsys, monkeypatch,
                                                                        tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = train_main.main([seed_yaml(tmp_path, shards, load_model_path=str(tmp_path / "no" / "ckpt"))])
    line = one_error(capsys, rc)
    assert line == f"error: model.init_from (seed key load_model_path): {tmp_path / 'no' / 'ckpt'}: no such file " \
                   "or directory"
    assert sentinel == []
