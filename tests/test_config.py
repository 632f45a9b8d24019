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


# ------------------------------------------------------------------------------------- --help, key resolution
def test_help_lists_every_key_with_type_default_and_doc(capsys):
    from mmcoconut.config_help import rows
    from mmcoconut.cli.train import main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key, tp, default, doc in rows():
        assert doc, f"{key} has no one-line doc (add a trailing # comment in mmcoconut/config.py)"
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"--{key} "))
        assert tp in line and f"default {default}" in line
        assert doc in out
    assert "seed keys" in out and "clip_id" in out
    assert main(["demo", "-h"]) == 0 and "--train.lr" in capsys.readouterr().out


def test_help_in_a_fresh_process_exits_zero():
    import subprocess
    import sys
    for flag in ("--help", "-h"):
        p = subprocess.run([sys.executable, "-m", "mmcoconut.train", flag], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0 and "--model.lm_id" in p.stdout and not p.stderr.strip(), p.stderr[-2000:]


@pytest.mark.parametrize("overrides, candidates", [
    (["--batch_size=8"], ["eval.batch_size", "train.micro_batch_size"]),
])
def test_surprising_short_key_is_an_error_naming_the_candidates(overrides, candidates, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    assert all(c in str(err.value) for c in candidates) and "ambiguous" in str(err.value)
    path = tmp_path / "flat.yaml"
    path.write_text("batch_size: 8\n")
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config(str(path))
    assert load_config("demo", ["--eval.batch_size=8", "--lr=2e-4"]).eval.batch_size == 8  # dotted / unique keys


@pytest.mark.parametrize("doc, blocks", [("docs/configuration.md", ["config-reference"]),
                                         ("docs/seed-compatibility.md", ["seed-keys"])])
def test_docs_generated_tables_are_in_sync_with_config_py(doc, blocks):
    from pathlib import Path
    from mmcoconut.config_help import blocks_in, sync_blocks
    text = (Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8")
    assert blocks_in(text) == blocks, f"{doc} should hold the generated block(s) {blocks}"
    assert sync_blocks(text, doc) == text, f"{doc} is out of date: python -m mmcoconut.config_help --write {doc}"


# ------------------------------------------------------------------------------------------------ seed keys
# Every key of facebookresearch/coconut args/*.yaml (values of args/gsm_coconut.yaml) plus the multimodal seed's
# clip_id / batch_size_eval / load_model_path.
UPSTREAM_SEED = """\
project: coconut
save_path: YOUR_PATH_TO_SAVE_THE_MODEL
name: gsm-coconut
only_eval: False
coconut: True
cot: False
no_thoughts: False
no_cot: False
c_thought: 2
epochs_per_stage: 3
max_latent_stage: 3
pad_latent_to_max: True
save_only_improve: False
uniform_prob: 0.0
model_id: openai-community/gpt2
clip_id: openai/clip-vit-large-patch14
load_model_path: None
seed: 0
resume: 3
bf16: False
train_path: data/gsm_train
val_path: data/gsm_valid
reset_optimizer: True
batch_size_training: 32
batch_size_eval: 64
debug: False
gradient_accumulation_steps: 1
num_epochs: 25
lr: !!float "1e-4"
weight_decay: 0.01
"""


def test_every_upstream_seed_key_maps(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(UPSTREAM_SEED)
    cfg = load_config(str(path))
    assert (cfg.logging.project, cfg.checkpoint.save_dir, cfg.train.name) == ("coconut", "YOUR_PATH_TO_SAVE_THE_MODEL",
                                                                               "gsm-coconut")
    assert cfg.curriculum.coconut and not cfg.curriculum.no_cot and cfg.curriculum.reset_optimizer
    assert (cfg.curriculum.c_thought, cfg.curriculum.epochs_per_stage, cfg.curriculum.max_latent_stage) == (2, 3, 3)
    assert cfg.model.lm_id == "openai-community/gpt2" and cfg.model.vision_id == "openai/clip-vit-large-patch14"
    assert cfg.model.init_from is None and cfg.train.precision == "fp32"
    assert (cfg.train.micro_batch_size, cfg.eval.batch_size, cfg.train.gradient_accumulation_steps) == (32, 64, 1)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.seed, cfg.checkpoint.resume) == (1e-4, 0.01, 0, 3)
    cot = load_config(str(path), ["--coconut=false", "--cot=true", "--c_thought=0", "--max_latent_stage=0",
                                  "--load_model_path=ckpt/cot.pt", "--bf16=true"])
    assert not cot.curriculum.coconut and cot.model.init_from == "ckpt/cot.pt" and cot.train.precision == "bf16"


@pytest.mark.parametrize("line, message", [
    ("only_eval: True", "mmcoconut-eval"),
    ("debug: True", "seed key debug"),
    ("save_only_improve: True", "seed key save_only_improve"),
    ("no_thoughts: True", "not implemented"),
    ("cot: True", "coconut and cot are both true"),
    ("clip_idd: x", "unknown config key 'clip_idd'"),
])
def test_seed_values_mmcoconut_cannot_honour_are_clear_errors(tmp_path, line, message):
    path = tmp_path / "seed.yaml"
    path.write_text("coconut: True\n" + line + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_ds_config_by_name_and_seed_accumulation():
    from mmcoconut.train.engines.ds_config import resolve_ds_config
    cfg = load_config("demo", ["--train.micro_batch_size=3", "--train.gradient_accumulation_steps=2"])
    ds = resolve_ds_config(cfg, path="zero2_1gpu", world=1)
    got = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert got == (3, 2, 6)
    assert resolve_ds_config(load_config("demo"), path="zero3_2gpu.json", world=2)["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="no such file"):
        resolve_ds_config(load_config("demo"), path="zero9_2gpu", world=2)


@pytest.mark.parametrize("written, read", [("true", "on"), ("false", "off"), ("on", "on"), ("off", "off"),
                                           ('"on"', "on"), ("auto", "auto")])
def test_compile_switch_reads_old_bools_and_yaml_on_off(tmp_path, written, read):
    """train.compile is auto | on | off; configs from before (compile: true/false) and YAML 1.1's unquoted on/off
    (which YAML reads as bools) load as on/off, in a file and on the command line."""
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  compile: {written}\n")
    assert load_config(str(path)).train.compile == read
    assert load_config("demo", [f"--train.compile={written}"]).train.compile == read
    assert Config().train.compile == "auto"
    with pytest.raises(ConfigError, match=r"train.compile: 'yes please' is not one of \['auto', 'on', 'off'\]"):
        load_config("demo", ["--train.compile=yes please"])


def test_compile_on_refuses_gradient_checkpointing_auto_does_not():
    with pytest.raises(ConfigError, match="train.compile=on and train.gradient_checkpointing"):
        load_config("demo", ["--train.compile=true", "--train.gradient_checkpointing=true"])
    assert load_config("demo", ["--train.gradient_checkpointing=true"]).train.compile == "auto"


def test_a_seed_config_that_names_coconut_in_its_section_keeps_it(tmp_path):
    """The seed's CoT-only default (no coconut/cot key) never overrides a curriculum.coconut the config spells out."""
    p = tmp_path / "seed.yaml"
    for spelled in ("curriculum:\n  coconut: true\n", "curriculum.coconut: true\n"):
        p.write_text("batch_size_training: 4\n" + spelled)
        assert load_config(str(p)).curriculum.coconut is True, spelled
    p.write_text("batch_size_training: 4\n")
    assert load_config(str(p)).curriculum.coconut is False
