"""Config: YAML + overrides, clear errors, shipped configs, and the seed's flat config loading unchanged."""
import pytest

from mmcoconut.config import Config, ConfigError, config_from_dict, load_config

SEED_CONFIG = """\
name: run_1_aokvqa_baseline
model_id: gpt2
project: coconut_aokvqa_guna
seed: 42
train_path: data/Datasets/A-OKVQA/aokvqa_train.json
val_path: data/Datasets/A-OKVQA/aokvqa_validation.json
save_path: checkpoints
coconut: true
num_epochs: 25
epochs_per_stage: 2
c_thought: 2
max_latent_stage: 8
pad_latent_to_max: true
uniform_prob: 0.1
batch_size_training: 3
lr: 5e-5
resume: 0
"""


def test_seed_flat_config_maps_onto_sections(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_CONFIG)
    cfg = load_config(str(path))
    assert cfg.train.name == "run_1_aokvqa_baseline"
    assert cfg.model.lm_id == "gpt2"
    assert cfg.logging.project == "coconut_aokvqa_guna"
    assert cfg.train.seed == 42
    assert cfg.data.train_shards == "data/Datasets/A-OKVQA/aokvqa_train.json"
    assert cfg.data.val_shards == "data/Datasets/A-OKVQA/aokvqa_validation.json"
    assert cfg.checkpoint.save_dir == "checkpoints"
    assert cfg.curriculum.coconut is True
    assert cfg.train.num_epochs == 25
    assert (cfg.curriculum.epochs_per_stage, cfg.curriculum.c_thought, cfg.curriculum.max_latent_stage) == (2, 2, 8)
    assert cfg.curriculum.pad_latent_to_max is True and cfg.curriculum.uniform_prob == 0.1
    assert cfg.train.micro_batch_size == 3
    assert cfg.train.lr == 5e-5 and isinstance(cfg.train.lr, float)  # YAML reads 5e-5 as a string
    assert cfg.checkpoint.resume == 0


@pytest.mark.parametrize("name", ["demo", "aokvqa", "demo.yaml"])
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_flat_dotted_and_separate_value():
    cfg = load_config("demo", ["--lr=3e-4", "--train.num_epochs", "2", "--coconut=false",
                               "--eval.views=cot,coconut", "--model.tokenizer_id=null"])
    assert cfg.train.lr == 3e-4 and cfg.train.num_epochs == 2 and cfg.curriculum.coconut is False
    assert cfg.eval.views == ["cot", "coconut"] and cfg.model.tokenizer_id is None


@pytest.mark.parametrize("overrides, message", [
    (["--lrr=1"], "unknown config key 'lrr'"),
    (["--train.lr=abc"], "expected float"),
    (["--coconut=3"], "expected bool"),
    (["--train.num_epochs=1.5"], "expected int"),
    (["--model.image_tokens=foo"], "not one of"),
    (["--eval.views=cot,bogus"], "unknown ['bogus']"),
    (["--name"], "needs a value"),
    (["positional"], "expected --key=value"),
])
def test_bad_overrides_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    assert message in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  bogus: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "train.bogus" in str(err.value)


def test_missing_config_lists_shipped_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_config("no_such_config")
