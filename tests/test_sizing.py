"""Micro-batch sizing (mmcoconut/sizing.py): the activation term against bytes measured on CPU
(saved_activation_bytes), the shapes' parameter counts, the ds_configs' micro-batches, the CLI table."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcoconut.sizing import ACT, LMS, LMShape, Setup, activation_bytes, layer_bytes, max_micro_batch
from mmcoconut.testing import saved_activation_bytes

ROOT = Path(__file__).resolve().parents[1]


def _tiny_mmcoconut(D, L, F):
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    import mmcoconut.kernels  # noqa: F401  (the fused embedding op, as in training)
    from mmcoconut.modeling.latent import MMCoconut
    from mmcoconut.modeling.projector import build_projector
    from mmcoconut.modeling.tokens import SpecialIds
    torch.manual_seed(0)
    V = 512
    lcfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_inner=F, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=16)
    ids = SpecialIds(image=V - 5, start=V - 4, latent=V - 3, end=V - 2, pad=V - 1, eos=0)
    model = MMCoconut(GPT2LMHeadModel(lcfg), CLIPVisionModel(vcfg).requires_grad_(False),
                      build_projector("mlp2x_gelu", 32, D), ids, 1)
    return model.train()


def _batch(model, B, n, q):
    from mmcoconut.modeling.pass_plan import plan_batch
    ids, V = model.ids, model.lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rnd = lambda k: torch.randint(1, V - 5, (B, k), generator=g)  # noqa: E731
    x = torch.cat([torch.full((B, 1), ids.image), rnd(q), torch.full((B, 1), ids.start),
                   torch.full((B, n), ids.latent), torch.full((B, 1), ids.end), rnd(20)], 1)
    labels = x.clone()
    labels[:, :q + 3 + n] = -100
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels, "return_logits": False,
            "pixel_values": torch.randn(B, 3, 32, 32, generator=g),
            "latent_plan": plan_batch(x, ids.latent, ids.image, labels=labels)}


@pytest.mark.parametrize("D,L,F,B,n,q", [(64, 2, 256, 2, 0, 40), (64, 3, 256, 4, 6, 40), (128, 2, 1024, 2, 4, 120)])
def test_activation_term_matches_measured_saved_bytes(D, L, F, B, n, q):
    """The model's GPT-2 activation bytes (fp32 here) are within 5 % of what autograd keeps in MMCoconut's
    multi-pass forward, with and without latent passes, at two widths, MLP ratios and sequence lengths."""
    torch.set_num_threads(1)
    model = _tiny_mmcoconut(D, L, F)
    b = _batch(model, B, n, q)
    _, measured = saved_activation_bytes(lambda: model(**b).loss, exclude=list(model.parameters()))
    shape = LMShape("tiny", "gpt2", 512, D, L, 4, 4, F, tied=True)
    predicted = activation_bytes(shape, B, b["input_ids"].shape[1], "fp32", latent_passes=n)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_llama_family_layer_term_matches_measured_saved_bytes():
    """ACT["llama"] against Hugging Face Llama blocks in bf16 (RMSNorm's fp32 upcast included): bytes per token
    and layer from the difference of a 4- and a 2-layer model, within 5 %."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(1)
    D, F, H, KV, B, T = 96, 320, 4, 2, 2, 48
    per = []
    for L in (2, 4):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=D, intermediate_size=F, num_attention_heads=H,
                          num_key_value_heads=KV, num_hidden_layers=L)
        m = LlamaForCausalLM(cfg).to(torch.bfloat16).train()
        x = torch.randint(0, 256, (B, T))
        _, nbytes = saved_activation_bytes(lambda: m.model(input_ids=x).last_hidden_state.float().sum(),
                                           exclude=list(m.parameters()))
        per.append(nbytes)
    measured = (per[1] - per[0]) / 2 / (B * T)
    predicted = layer_bytes(LMShape("tiny", "llama", 256, D, 2, H, KV, F, tied=True), T, "bf16", mask=False)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_shapes_have_their_published_sizes():
    published = {"gpt2": 124.4e6, "qwen2.5-0.5b": 494e6, "llama-3.2-1b": 1.236e9, "llama-3-8b": 8.03e9}
    for key, n in published.items():
        assert abs(LMS[key].params - n) <= 0.01 * n, (key, LMS[key].params)
    assert set(ACT) == {shape.family for shape in LMS.values()}


def test_more_memory_or_more_gpus_never_shrinks_the_micro_batch():
    for key in LMS:
        one = [max_micro_batch(Setup(LMS[key], zero=1, world=1), g) for g in (24, 40, 80)]
        sharded = [max_micro_batch(Setup(LMS[key], zero=3, world=8), g) for g in (24, 40, 80)]
        assert one == sorted(one) and sharded == sorted(sharded)
        assert all(s >= o for s, o in zip(sharded, one))
    assert max_micro_batch(Setup(LMS["llama-3-8b"], zero=1, world=1), 80) == 0  # 16 B/param of states alone
    longer = Setup(LMS["gpt2"], seq=512)
    assert max_micro_batch(longer, 80) < max_micro_batch(Setup(LMS["gpt2"]), 80)


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_gpu_ds_configs_take_their_micro_batch_from_the_model(path):
    """GPT-2 124M at seq 256 on 80 GB: the micro-batch is the model's limit capped at global batch / GPUs (the limit
    is far above 32: 32 with accumulation 4 on one GPU left most of the card idle), and the file says so."""
    from mmcoconut.cli.sizing import _from_ds_config
    c = json.loads(path.read_text())
    n = int(re.fullmatch(r".+_(\d+)gpu", path.stem).group(1))
    limit = max_micro_batch(Setup(LMS["gpt2"], seq=256, **_from_ds_config(str(path))), 80)
    assert limit > 32
    assert c["train_micro_batch_size_per_gpu"] == min(limit, c["train_batch_size"] // n)
    assert "mmcoconut.cli.sizing" in c["comment"] and f"about {limit} rows" in c["comment"]


def test_cli_prints_the_table_and_explains_one_batch():
    run = lambda *a: subprocess.run([sys.executable, "-m", "mmcoconut.cli.sizing", *a], capture_output=True,  # noqa
                                    text=True, timeout=120)
    p = run()
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "model" not in line]
    assert len(rows) == 2 * len(LMS) and "| 24 GB | 40 GB | 80 GB |" in p.stdout
    p = run("--explain", "gpt2:32")
    assert p.returncode == 0 and "activations" in p.stdout and "peak" in p.stdout
    p = run("--models", "gpt3")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unknown" in p.stderr
