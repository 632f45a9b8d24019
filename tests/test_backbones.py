"""Backbones beyond GPT-2 (issue 24): family detection from the config alone, what differs per family (pad/BOS, new
token rows, untied heads, sliding window, SigLIP), an exact model-level resume per family, and exports of every
family loading and answering (in process, through mmcoconut-ask, and with trust_remote_code where mmcoconut is not
importable). The numerics per family are in test_model.py / test_generate.py / test_model_hotpath.py; one
Llama-family run through the trainer with a resume is in test_train_backbones.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAMILIES, FAMILY_VISION, build_tiny_mmcoconut, make_mm_batch, scale_tiny_weights
from mmcoconut.config import ConfigError, ModelConfig

OTHERS = [f for f in FAMILIES if f != "gpt2"]


# ------------------------------------------------------------------------------------ refused from the config
def _config_only(tmp_path, name, config) -> str:
    """A checkpoint dir holding only config.json: loading any weight from it would fail, so a clean refusal proves
    the family was checked before weights were read."""
    d = tmp_path / name
    config.save_pretrained(d)
    return str(d)


def test_unsupported_families_refused_before_any_weight(tmp_path, tiny_dirs):
    import transformers

    from mmcoconut.factory import build_model, build_tokenizer
    cases = {
        "t5": (transformers.T5Config(d_model=16, num_layers=1, num_heads=2), "encoder-decoder"),
        "bert": (transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2), "'bert'"),
        "gpt_neox": (transformers.GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
                     "'gpt_neox' is not supported"),
    }
    for name, (config, says) in cases.items():
        mcfg = ModelConfig(lm_id=_config_only(tmp_path, name, config), vision_id=tiny_dirs["vision"])
        for build in (lambda: build_tokenizer(mcfg), lambda: build_model(mcfg, None)):
            with pytest.raises(ConfigError) as e:
                build()
            msg = str(e.value)
            assert "\n" not in msg and says in msg and f"model.lm_id={mcfg.lm_id}" in msg, msg
            assert "supported: gpt2, llama, qwen2, mistral" in msg, msg
    vit = _config_only(tmp_path, "vit", transformers.ViTConfig(hidden_size=16, num_hidden_layers=1,
                                                               num_attention_heads=2))
    for vision_id, says in ((tiny_dirs["lm"], "'gpt2'"), (vit, "'vit'")):
        with pytest.raises(ConfigError, match=f"model.vision_id=.*{says} is not a supported vision tower.*CLIP"):
            build_tokenizer(ModelConfig(lm_id=tiny_dirs["lm"], vision_id=vision_id))
    with pytest.raises(ConfigError, match="model.lm_id=/nonexistent/lm: "):
        build_tokenizer(ModelConfig(lm_id="/nonexistent/lm", vision_id=tiny_dirs["vision"]))


def test_sliding_window_refused_not_computed_otherwise(family_dirs, family_mm, tmp_path):
    """Mistral attends within a sliding window, mmcoconut over the whole sequence: a config whose max_length
    exceeds the window, a batch or a generation longer than it are refused naming the key."""
    import transformers

    from mmcoconut.factory import build_tokenizer
    cfg = transformers.AutoConfig.from_pretrained(family_dirs("mistral")["lm"])
    cfg.sliding_window = 64
    mcfg = ModelConfig(lm_id=_config_only(tmp_path, "mistral-sw", cfg), vision_id=family_dirs("mistral")["vision"],
                       max_length=128)
    with pytest.raises(ConfigError, match=r"model.max_length=128: a sequence of 128 columns exceeds .*"
                                          r"\(sliding_window=64\)"):
        build_tokenizer(mcfg)
    qwen = transformers.Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    use_sliding_window=True, sliding_window=32, max_window_layers=0)
    with pytest.raises(ConfigError, match=r"use_sliding_window/sliding_window=32"):
        build_tokenizer(ModelConfig(lm_id=_config_only(tmp_path, "qwen-sw", qwen), max_length=64,
                                    vision_id=family_dirs("qwen2")["vision"]))
    model, tok = family_mm("mistral")
    b = make_mm_batch(model, tok, [2, 1])
    window = model.lm.config.sliding_window
    model.lm.config.sliding_window = b["input_ids"].shape[1] - 1
    try:
        with pytest.raises(ValueError, match="exceeds the language model's sliding window"):
            model(**b)
        with pytest.raises(ValueError, match="a generation"):
            model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], max_new_tokens=4)
        model.lm.config.sliding_window = b["input_ids"].shape[1]
        with torch.no_grad():
            model(**b)  # exactly the window: fine
    finally:
        model.lm.config.sliding_window = window


# ------------------------------------------------------------------------------------ what differs per family
@pytest.mark.parametrize("arch", OTHERS)
def test_tokens_rows_and_heads_per_family(family_dirs, arch):
    """Llama: no pad token (one is added, the table grows by one row), BOS starts every prompt; Qwen2: the
    mmcoconut tokens land in the table's spare rows (no resize) and still get new_token_init; Mistral: untied
    output head, whose new rows are initialised like the input rows. GQA: K/V heads < query heads."""
    from transformers import AutoConfig, AutoTokenizer

    from mmcoconut.config import CurriculumConfig
    from mmcoconut.data.curriculum import build_prompt
    from mmcoconut.factory import build_model, build_tokenizer
    from mmcoconut.modeling.families import kv_geometry
    dirs = family_dirs(arch)
    raw, lm_cfg = AutoTokenizer.from_pretrained(dirs["lm"]), AutoConfig.from_pretrained(dirs["lm"])
    mcfg = ModelConfig(lm_id=dirs["lm"], vision_id=dirs["vision"], new_token_init="")
    tok = build_tokenizer(mcfg)
    torch.manual_seed(0)
    model = build_model(mcfg, tok)
    assert model.family == arch and kv_geometry(lm_cfg).n_kv_heads < lm_cfg.num_attention_heads
    emb, head = model.lm.get_input_embeddings().weight, model.lm.get_output_embeddings().weight
    new = list(tok.mmcoconut_new_ids)
    assert raw.pad_token is None if arch != "qwen2" else raw.pad_token == raw.eos_token
    if arch == "llama":
        assert new == [len(raw)] and emb.shape[0] == len(tok) == lm_cfg.vocab_size + 1
    if arch == "qwen2":
        assert len(new) == 4 and emb.shape[0] == lm_cfg.vocab_size > len(tok)
    for w in (emb, head):
        torch.testing.assert_close(w[new], w[:new[0]].mean(0).expand(len(new), -1))
    assert (head is emb) == (arch != "mistral")
    ids = model.ids
    assert ids.bos == (tok.bos_token_id if arch in ("llama", "mistral") else None)
    prompt = build_prompt({"question": "What color?", "steps": ["a"], "answer": "0"}, tok, ids, view="coconut",
                          stage=1, cur=CurriculumConfig(c_thought=1), n_image_tokens=model.n_image_tokens,
                          max_length=256, key="k")["input_ids"]
    start = ([] if ids.bos is None else [ids.bos]) + [ids.image] * model.n_image_tokens
    assert prompt[:len(start)] == start and prompt[len(start)] not in (ids.bos, ids.image)


def test_siglip_tower_tokens(family_mm):
    """SigLIP has no CLS token: patches = every token of the chosen layer; pooled = its attention-pool head."""
    from mmcoconut.modeling.vision import encode_images
    model, _ = family_mm("qwen2", "patches")
    assert model.vision.config.model_type == "siglip_vision_model"
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.vision(pixel_values=px, output_hidden_states=True)
        patches = encode_images(model.vision, px, "patches", -1)
        pooled = encode_images(model.vision, px, "pooled", -1)
    assert patches.shape[1] == model.n_image_tokens == (32 // 16) ** 2 == out.hidden_states[-1].shape[1]
    assert torch.equal(patches, out.hidden_states[-1]) and torch.equal(pooled[:, 0], out.pooler_output)


@pytest.mark.parametrize("arch", FAMILIES)
def test_exact_resume_at_model_level(family_dirs, arch, tmp_path):
    """Three AdamW steps with latents (dropout on: GPT-2's and Llama's test presets) equal two steps, a save of
    weights + optimizer + RNG, a fresh build from other random weights, the load and the third step: bit for bit."""
    def build(seed):
        model, tok = build_tiny_mmcoconut(family_dirs(arch), "patches", seed=seed)
        model.train()
        return model, tok, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(model, opt, b):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    model, tok, opt = build(1)
    batches = [make_mm_batch(model, tok, counts, seed=i) for i, counts in enumerate(([2, 0, 1], [3, 1, 2],
                                                                                       [1, 2, 0]))]
    torch.manual_seed(5)
    ref = [step(model, opt, b) for b in batches]
    model, tok, opt = build(1)
    torch.manual_seed(5)
    first = [step(model, opt, b) for b in batches[:2]]
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
               tmp_path / "ckpt.pt")
    model, tok, opt = build(2)
    with torch.no_grad():  # nothing of the first model may survive but what the checkpoint holds
        for p in model.parameters():
            p.add_(0.5)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    resumed = first + [step(model, opt, batches[2])]
    assert all(torch.equal(a, b) for a, b in zip(resumed, ref)), (resumed, ref)
    assert len({float(x) for x in ref}) == 3


def test_init_from_a_language_model_alone(family_dirs, tmp_path):
    """model.init_from with a Llama-family state dict of the LM alone (`model.*`, `lm_head.*`; upstream Coconut's
    `base_causallm.` prefix too) initialises only the language model."""
    from mmcoconut.export.init_from import load_init_weights, read_state_dict
    model, _ = build_tiny_mmcoconut(family_dirs("llama"), "patches", seed=1)
    other, _ = build_tiny_mmcoconut(family_dirs("llama"), "patches", seed=2)
    with torch.no_grad():
        for p in other.lm.parameters():
            p.add_(1.0)
    torch.save({f"base_causallm.{k}": v for k, v in other.lm.state_dict().items()}, tmp_path / "lm.pt")
    assert all(k.startswith("lm.model.") or k == "lm.lm_head.weight" for k in read_state_dict(tmp_path / "lm.pt"))
    proj = model.projector[0].weight.clone()
    info = load_init_weights(model, tmp_path / "lm.pt")
    assert info["kept"] == ["projector", "vision"]
    assert all(torch.equal(a, b) for a, b in zip(model.lm.state_dict().values(), other.lm.state_dict().values()))
    assert torch.equal(model.projector[0].weight, proj)


# ------------------------------------------------------------------------------------ exports of every family
@pytest.fixture(scope="module")
def family_exports(tmp_path_factory, family_dirs, eval_cfg_factory):
    """arch -> (export dir, model, tokenizer) for Llama, Qwen2 (SigLIP) and Mistral (SigLIP, untied head)."""
    from mmcoconut.export.hf_export import save_export
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer
    out = {}
    for arch in OTHERS:
        dirs = family_dirs(arch)
        cfg = eval_cfg_factory({"model.lm_id": dirs["lm"], "model.vision_id": dirs["vision"],
                                "eval.max_new_tokens": 8})
        tok = build_tokenizer(cfg.model)
        torch.manual_seed(0)
        model = build_model(cfg.model, tok).eval()
        scale_tiny_weights(model)
        d = tmp_path_factory.mktemp(f"export-{arch}")
        out[arch] = (save_export(model, tok, cfg, d / "export", image_processor=build_image_processor(cfg.model)),
                     model, tok)
    return out


@pytest.mark.parametrize("arch", OTHERS)
def test_export_loads_and_computes_the_reference(family_exports, arch, tmp_path, capsys):
    """The export of each family loads with its own config and weights (tied heads still tied), computes the
    recompute reference's logits and the one-by-one generation, and answers through answer() and mmcoconut-ask."""
    from PIL import Image

    from mmcoconut.cli.ask import main as ask
    from mmcoconut.modeling import MMCoconutConfig, MMCoconutForConditionalGeneration, generate_reference
    out, model, tok = family_exports[arch]
    conf = MMCoconutConfig.from_pretrained(out)
    assert conf.text_config.model_type == arch and conf.vision_config.model_type == \
        f"{FAMILY_VISION[arch]}_vision_model"
    hf = MMCoconutForConditionalGeneration.from_pretrained(out).eval()
    sd, ref = hf.model.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    lm = hf.model.lm
    assert (lm.get_output_embeddings().weight is lm.get_input_embeddings().weight) == \
        bool(conf.text_config.tie_word_embeddings)
    batch = make_mm_batch(model, tok, [2, 0, 1])
    with torch.no_grad():
        got, want = hf(**batch), model.naive_forward(**batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    prompts = make_mm_batch(model, tok, [2, 1, 0], labels=False)
    args = (prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"])
    assert hf.generate(*args, max_new_tokens=6) == generate_reference(model, *args, max_new_tokens=6)
    img = tmp_path / "img.png"
    Image.fromarray(torch.randint(0, 256, (40, 47, 3), dtype=torch.uint8).numpy()).save(img)
    res = hf.answer(Image.open(img), "What color is the cube?", choices=["red", "blue"])
    assert res["choice"] in ("red", "blue") and res["n_latents"] == 2
    assert ask(["--model", str(out), "--image", str(img), "--question", "What color is the cube?",
                "--choices", "red|blue", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["choice"] == res["choice"]


REMOTE_MANY = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):  # hide the installed mmcoconut completely
    def find_spec(self, name, path=None, target=None):
        if name == "mmcoconut" or name.startswith("mmcoconut."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
from PIL import Image
from transformers import AutoModel
out = {}
for path in sys.argv[2:]:
    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    out[path] = [model.answer(Image.open(sys.argv[1]), q, choices=["red", "blue"]) for q in ("What?", "Which one?")]
    out[path].append(type(model).__module__)
assert not [m for m in sys.modules if m == "mmcoconut" or m.startswith("mmcoconut.")]
print("RESULT " + json.dumps(out))
"""


def test_exports_load_without_mmcoconut(family_exports, tmp_path):
    """trust_remote_code in a process where `import mmcoconut` fails: each family's export loads through its own
    shipped code and answers what the package answers."""
    from PIL import Image

    from mmcoconut.modeling import MMCoconutForConditionalGeneration
    img = tmp_path / "img.png"
    Image.fromarray(torch.randint(0, 256, (40, 47, 3), dtype=torch.uint8).numpy()).save(img)
    (tmp_path / "remote.py").write_text(REMOTE_MANY)
    paths = [str(family_exports[a][0]) for a in OTHERS]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run([sys.executable, "-I", str(tmp_path / "remote.py"), str(img), *paths], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for path in paths:
        hf = MMCoconutForConditionalGeneration.from_pretrained(path)
        want = [hf.answer(Image.open(img), q, choices=["red", "blue"]) for q in ("What?", "Which one?")]
        assert got[path][:2] == want and got[path][2].startswith("transformers_modules."), path


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_frozen_tower_runs_in_half_precision_on_cuda(family_dirs, arch):
    """MMCoconut._apply: a frozen CLIP or SigLIP tower moved to CUDA runs in fp16; the LM and projector stay fp32."""
    model, _ = build_tiny_mmcoconut(family_dirs(arch), "patches", seed=1)
    model.cuda()
    assert {p.dtype for p in model.vision.parameters()} == {torch.float16}
    assert {p.dtype for p in model.lm.parameters()} | {p.dtype for p in model.projector.parameters()} == \
        {torch.float32}


@pytest.mark.parametrize("arch", FAMILIES)
def test_fsdp2_shards_the_decoder_blocks_of_every_family(family_mm, arch):
    """FSDP2 wraps each decoder block (engines/fsdp.py): the blocks are found for every family, not GPT-2's only."""
    from mmcoconut.train.engines.fsdp import _decoder_blocks
    model, _ = family_mm(arch)
    blocks = _decoder_blocks(model)
    assert len(blocks) == model.lm.config.num_hidden_layers > 0
    assert all(type(b).__name__.endswith(("Block", "DecoderLayer")) for b in blocks)
