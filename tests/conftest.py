"""Shared fixtures: tiny tokenizer / image processor built once per session."""
import pytest

TINY_TEXTS = [
    "What color is the cube? The choices are 0: red, 1: blue, 2: green, 3: yellow\n",
    "The cube is left of the ball.\n", "The ball is red.\n", "So the answer is red.\n", "### 0", "### 1",
    "How many shapes are there? Count the circles and squares in the picture.\n",
] * 20


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny GPT-2 / CLIP dirs (test preset), built once per session."""
    from mmcoconut.tiny_models import make_tiny_models
    return make_tiny_models(tmp_path_factory.mktemp("tiny"), "test", texts=TINY_TEXTS)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dirs):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dirs["lm"])


@pytest.fixture(scope="session")
def tiny_processor(tiny_dirs):
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor.from_pretrained(tiny_dirs["vision"])


# ---------------------------------------------------------------- eval / export (test_eval_views.py, test_export.py)
@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory):
    """13 synthetic val samples in 3 uneven shards (5, 5, 3), 32 px images, written by tools/make_shards.py."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "make_shards", Path(__file__).resolve().parents[1] / "tools" / "make_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("eval_shards")
    assert mod.main(["--synthetic", "13", "--seed", "1", "--split", "val", "--out", str(out), "--maxcount", "5",
                     "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def eval_cfg_factory(tiny_dirs, eval_shards):
    """cfg({"section.key": value}) -> a fresh Config for the tiny models and eval_shards (CPU, no workers)."""
    from mmcoconut.config import load_config

    def make(over=None):
        data = {"model": {"lm_id": tiny_dirs["lm"], "vision_id": tiny_dirs["vision"], "image_tokens": "patches",
                          "vision_layer": -1, "freeze_vision": True, "new_token_init": "", "max_length": 256},
                "data": {"val_shards": eval_shards, "train_shards": eval_shards, "num_workers": 0},
                "curriculum": {"c_thought": 1, "max_latent_stage": 2},
                "eval": {"batch_size": 4, "max_new_tokens": 5}, "logging": {"report_to": "none"}}
        return load_config(data=data, overrides=[f"--{k}={v}" for k, v in (over or {}).items()])
    return make
