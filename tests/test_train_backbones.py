"""A Llama-family backbone through the trainer: 2 DeepSpeed ranks (ZeRO-2, fp32) on the tiny Llama + CLIP dirs (GQA,
rotary positions, BOS, a pad token added at build time), latent stages 1 and 2 after stage 0, checkpoints, and an
exact resume in a fresh run. (The other families are covered at the model level: tests/test_backbones.py.)"""
import json
import shutil

import pytest
import yaml

from test_train_ds import ROOT, _losses, launch, ok, synthetic_shards

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, family_dirs):
    d = tmp_path_factory.mktemp("train_llama")
    synthetic_shards(d / "shards", 32, seed=0, maxcount=8)
    dirs = family_dirs("llama")
    cfg = {"model": {"lm_id": dirs["lm"], "vision_id": dirs["vision"], "image_tokens": "patches", "vision_layer": -1,
                     "new_token_init": "", "max_length": 256},
           "data": {"train_shards": str(d / "shards"), "num_workers": 0, "shuffle_buffer": 8},
           "curriculum": {"c_thought": 1, "max_latent_stage": 2, "epochs_per_stage": 1},
           "train": {"name": "llama", "num_epochs": 3, "max_steps_per_epoch": 2, "lr": 3.0e-3, "log_every": 1},
           "checkpoint": {"save_dir": str(d / "runs"), "keep_last": 10, "save_every_steps": 3},
           "logging": {"report_to": "none"}, "eval": {"val_every_epoch": False}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    base = json.loads((ROOT / "ds_configs" / "zero2_2gpu.json").read_text())
    (d / "zero2_2.json").write_text(json.dumps(dict(base, train_batch_size=8, train_micro_batch_size_per_gpu=2,
                                                    gradient_accumulation_steps=2)))
    run = d / "run"
    r = ok(launch(2, [str(d / "cfg.yaml"), "--deepspeed", str(d / "zero2_2.json"), "--train.precision=fp32",
                      f"--logging.run_dir={run}"]))
    return d, run, r


def test_llama_trains_with_latents_and_resumes_exactly(llama_run):
    d, run, r = llama_run
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7)) and all(v == v for v in losses.values()), losses
    stages = [json.loads(ln)["stage"] for ln in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(ln).get("kind") == "stage"]
    assert stages == [1, 2], stages  # steps 3..6 ran latent passes
    tags = json.loads((run / "checkpoints.json").read_text())
    assert "step00000003" in tags and tags[-1] == "epoch003", tags
    resumed = d / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("metrics.jsonl"))
    r2 = ok(launch(2, [str(d / "cfg.yaml"), "--deepspeed", str(d / "zero2_2.json"), "--train.precision=fp32",
                       f"--logging.run_dir={resumed}", "--checkpoint.resume=step00000003"]))
    assert "resumed at step 3" in r2.stdout
    again = _losses(resumed)
    assert sorted(again) == [4, 5, 6] and all(again[s] == losses[s] for s in again), (losses, again)


def test_llama_checkpoint_exports_and_generates(llama_run, tmp_path):
    """The run's last ZeRO-2 checkpoint -> Hugging Face export -> loaded back: the trained weights, the recompute
    reference's logits and its one-by-one generation."""
    import torch

    from conftest import make_mm_batch
    from mmcoconut.export.hf_export import load_any, load_hf, save_hf
    from mmcoconut.modeling import MMCoconutForConditionalGeneration, generate_reference
    _, run, _ = llama_run
    model, tok, _, cfg, _ = load_any(run)
    assert model.family == "llama" and cfg.model.lm_id.endswith("lm")
    out = save_hf(load_hf(run), tmp_path / "export")
    hf = MMCoconutForConditionalGeneration.from_pretrained(out).eval()
    assert all(torch.equal(a, b) for a, b in zip(hf.model.state_dict().values(), model.state_dict().values()))
    batch = make_mm_batch(model, tok, [2, 0, 1], labels=False)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(hf(*args[:2], pixel_values=args[2]).logits,
                                   model.naive_forward(*args[:2], pixel_values=args[2]).logits, rtol=1e-5, atol=1e-5)
    assert hf.generate(*args, max_new_tokens=5) == generate_reference(model, *args, max_new_tokens=5)
