"""Export round trip: ZeRO-2 DeepSpeed checkpoint (frozen vision excluded) -> mmcoconut-export (a self-contained
Hugging Face dir) -> load_export gives the engine's logits; eval CLI on the checkpoint; mmcoconut-predict on the export;
the model card carries the eval table of the same checkpoint."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs in a subprocess (its own single-rank process group): train 3 steps through a ZeRO-2 engine, save a
# checkpoint with the resolved config in client_state (frozen vision excluded), store inputs + reference logits.
DS_SCRIPT = textwrap.dedent('''
    import json, sys, torch, deepspeed
    from mmcoconut.config import load_config
    from mmcoconut.data.eval_loader import EvalLoader
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer
    cfg_path, shards, ckpt, ref = sys.argv[1:5]
    cfg = load_config(data=json.load(open(cfg_path)))
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok)
    ip = build_image_processor(cfg.model)
    batch = next(iter(EvalLoader(shards, tok, ip, cfg, view="coconut", n_latents=2, batch_size=4, rank=0,
                                 world_size=1, n_image_tokens=model.n_image_tokens)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values")}
    ids = model.ids
    labels = batch["input_ids"].clone()
    special = torch.tensor([ids.image, ids.start, ids.latent, ids.end, ids.pad])
    labels[torch.isin(labels, special) | (batch["attention_mask"] == 0)] = -100
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "zero_optimization": {"stage": 2}}
    from mmcoconut.train.engines import ds_ops
    ds_ops.init_distributed()  # the trainer's path: gloo, no DeepSpeed op compiled on CPU
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    for _ in range(3):
        loss = engine(**inputs, labels=labels).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(ckpt, tag="step3", client_state={"run": {"config": cfg.to_dict()}},
                           exclude_frozen_parameters=True)
    engine.module.eval()
    with torch.no_grad():
        logits = engine.module(**inputs).logits
    torch.save({"inputs": inputs, "logits": logits}, ref)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero2_ckpt(eval_cfg_factory, eval_shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("zero2")
    cfg = eval_cfg_factory()
    (d / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (d / "ds_script.py").write_text(DS_SCRIPT)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(d / "ds_script.py"), str(d / "cfg.json"), eval_shards,
                        str(d / "ckpt"), str(d / "ref.pt")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d / "ckpt", torch.load(d / "ref.pt"), cfg


@pytest.fixture(scope="module")
def exported(zero2_ckpt, tmp_path_factory):
    from mmcoconut.cli import export as export_hf
    ckpt, _, _ = zero2_ckpt
    out = tmp_path_factory.mktemp("export") / "hf"
    assert export_hf.main([str(ckpt), str(out)]) == 0
    return out


def test_export_layout(exported, tiny_dirs, zero2_ckpt):
    from safetensors import safe_open
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
            "preprocessor_config.json", "README.md", "configuration_mmcoconut.py", "modeling_mmcoconut.py",
            "processing_mmcoconut.py", "latent.py"} <= names
    assert not any(n.startswith(".") for n in names)  # no temp dirs left behind
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "mmcoconut" and cfg["auto_map"]["AutoModel"].startswith("modeling_mmcoconut.")
    assert (cfg["c_thought"], cfg["max_latent_stage"], cfg["image_tokens"]) == (1, 2, "patches")
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.vision.") for k in keys)  # frozen tower: shipped, not referenced
    assert any(k.startswith("model.projector.") for k in keys) and "model.lm.transformer.wte.weight" in keys
    # portable: no path of this machine anywhere in the text files (models, shards, checkpoint dirs)
    roots = {str(Path(tiny_dirs["lm"]).resolve().parents[1]), str(zero2_ckpt[0].resolve().parents[1])}
    for f in exported.iterdir():
        if f.suffix in (".json", ".md", ".py"):
            text = f.read_text()
            assert not any(r in text for r in roots), f"{f.name} names a local path"
    assert cfg["run_config"]["model"]["lm_id"].startswith("local:")


def test_model_card_has_the_eval_table_of_this_checkpoint(zero2_ckpt, eval_shards, tmp_path):
    from mmcoconut.cli.eval import main as eval_main
    from mmcoconut.cli import export as export_hf
    ckpt, _, _ = zero2_ckpt
    assert eval_main([str(ckpt / "step3"), eval_shards, "--views", "nocot,coconut", "--max-samples", "4",
                      "--out", str(ckpt / "eval-step3")]) == 0
    out = tmp_path / "hf"
    assert export_hf.main([str(ckpt), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "## Use" in card
    assert "| coconut |" in card and "| nocot |" in card and "## Curriculum" in card
    assert json.loads((out / "config.json").read_text())["eval_results"]["views"]["coconut"]["n"] == 4


def test_export_roundtrip_matches_engine_logits(zero2_ckpt, exported, eval_cfg_factory):
    from mmcoconut.factory import build_model, build_tokenizer
    from mmcoconut.export.hf_export import load_export
    _, ref, cfg = zero2_ckpt
    model, tok, improc, cfg2 = load_export(exported)
    assert cfg2.curriculum.max_latent_stage == cfg.curriculum.max_latent_stage
    with torch.no_grad():
        logits = model(**ref["inputs"]).logits
    torch.testing.assert_close(logits, ref["logits"], atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)  # the untrained model differs: the export carries the trained weights
    fresh = build_model(cfg.model, build_tokenizer(cfg.model)).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**ref["inputs"]).logits, ref["logits"], atol=1e-3)


def test_eval_cli_on_deepspeed_checkpoint(zero2_ckpt, eval_shards, tmp_path):
    from mmcoconut.cli.eval import main
    ckpt, _, _ = zero2_ckpt
    out = tmp_path / "ev"
    assert main([str(ckpt / "step3"), eval_shards, "--views", "coconut", "--stage", "1", "--max-samples", "4",
                 "--out", str(out)]) == 0
    res = json.loads((out / "eval_results.json").read_text())
    assert res["views"]["coconut"]["n"] == 4 and res["n_latents"] == 1
    assert len(json.loads((out / "predictions_coconut.json").read_text())) == 4


def test_predict_from_export(exported, eval_shards, tmp_path, capsys):
    from mmcoconut.cli import predict
    out = tmp_path / "preds.json"
    assert predict.main([str(exported), eval_shards, str(out), "--view", "coconut", "--batch-size", "8"]) == 0
    preds = json.loads(out.read_text())
    assert len(preds) == 13
    assert all(set(p) == {"multiple_choice", "direct_answer"} for p in preds.values())
    assert "MC" in capsys.readouterr().out


@pytest.mark.parametrize("freeze_vision", [False])
def test_save_load_export_tuned_vision(eval_cfg_factory, tmp_path, freeze_vision):
    """A tuned vision tower is saved with the other weights and reloaded from there."""
    from mmcoconut.data.eval_loader import EvalLoader
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer
    from mmcoconut.export.hf_export import load_export, save_export
    cfg = eval_cfg_factory({"model.freeze_vision": freeze_vision})
    torch.manual_seed(1)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok).eval()
    with torch.no_grad():
        for p in model.vision.parameters():  # differs from the tiny vision dir on disk
            p.add_(0.01 * torch.randn_like(p))
    save_export(model, tok, cfg, tmp_path / "x")
    model2, tok2, ip2, _ = load_export(tmp_path / "x")
    batch = next(iter(EvalLoader(cfg.data.val_shards, tok2, ip2, cfg, view="coconut", n_latents=1, batch_size=2,
                                 rank=0, world_size=1, n_image_tokens=model2.n_image_tokens)))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values")}
    with torch.no_grad():
        torch.testing.assert_close(model2(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)
    assert build_image_processor(cfg.model).to_dict()["crop_size"] == ip2.to_dict()["crop_size"]
