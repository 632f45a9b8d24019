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


# ---------------------------------------------------------------- model (test_model.py, test_generate.py, test_model_dist.py)
WTE_SCALE, LM_SCALE = 2.0, 6.0  # tiny-model weight scaling for the model tests (see build_tiny_mmcoconut)


def build_tiny_mmcoconut(dirs, image_tokens="pooled", seed=0, **over):
    """(model, tokenizer) for the tiny dirs; deterministic (seeded projector), eval mode, fp32."""
    import torch
    from mmcoconut.config import ModelConfig
    from mmcoconut.factory import build_model, build_tokenizer
    mcfg = ModelConfig(lm_id=dirs["lm"], vision_id=dirs["vision"], image_tokens=image_tokens, vision_layer=-1,
                       **over)
    tok = build_tokenizer(mcfg)
    torch.manual_seed(seed)
    model = build_model(mcfg, tok).eval()
    scale_tiny_weights(model)
    return model, tok


def scale_tiny_weights(model):
    """Larger weights than the 0.02 init: visible logits, non-degenerate greedy output (input embeddings and GPT-2's
    position table x WTE_SCALE, every other matrix of the LM x LM_SCALE)."""
    import torch
    emb = model.lm.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if p.dim() == 2:
                p.mul_(WTE_SCALE if p is emb or "wpe" in name else LM_SCALE)


def make_mm_batch(model, tok, latents, q_extra=None, seed=0, labels=True):
    """Collator batch: rows with `latents[i]` latents and questions of different lengths (-> left padding)."""
    import torch
    from mmcoconut.data.collate import Collator
    ids = model.ids
    g = torch.Generator().manual_seed(seed)
    q = tok.encode("What color is the cube? The choices are 0: red, 1: blue\n")
    rows = []
    for i, nl in enumerate(latents):
        extra = q_extra[i] if q_extra is not None else (3 * i) % 7
        seq = [ids.image] * model.n_image_tokens + q[: 6 + extra]
        seq += [ids.start] + [ids.latent] * nl + [ids.end]
        ans = tok.encode("The ball is red.\n"[: 4 + 3 * i] + "### 1") + [ids.eos]
        seq = seq + ans
        lab = [-100] * (len(seq) - len(ans)) + ans if labels else [-100] * len(seq)
        rows.append({"input_ids": seq, "labels": lab, "n_latents": nl, "key": str(i),
                     "pixel_values": torch.randn(3, 32, 32, generator=g)})
    return Collator(ids, ids.pad)(rows)


@pytest.fixture(scope="session")
def tiny_mm(tiny_dirs):
    """mode -> (model, tokenizer), built once per session (tests must not modify the weights)."""
    cache = {}

    def get(mode="pooled"):
        if mode not in cache:
            cache[mode] = build_tiny_mmcoconut(tiny_dirs, mode)
        return cache[mode]
    return get


# ---------------------------------------------------------------- backbone families (model-level tests per family)
FAMILY_VISION = {"gpt2": "clip", "llama": "clip", "qwen2": "siglip", "mistral": "siglip"}  # tower per LM family
# (family, image_tokens) of the family-parametrised model tests: GPT-2 in both modes, each other family once, so that
# SigLIP runs pooled (its attention-pool head) and patches (no CLS token)
MODEL_CASES = [("gpt2", "pooled"), ("gpt2", "patches"), ("llama", "patches"), ("qwen2", "pooled"),
               ("mistral", "patches")]
CASE_IDS = [f"{a}-{FAMILY_VISION[a]}-{m}" for a, m in MODEL_CASES]
FAMILIES = list(FAMILY_VISION)


def families(*slow):
    """FAMILIES as pytest params, those named in `slow` marked slow (repeats of what another family already proves
    in the default suite: `make test-all` runs them)."""
    return [pytest.param(f, marks=pytest.mark.slow) if f in slow else f for f in FAMILIES]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tiny_dirs):
    """arch -> tiny dirs of that LM family and its FAMILY_VISION tower (test preset), built once per session."""
    from mmcoconut.tiny_models import make_tiny_models
    cache = {"gpt2": tiny_dirs}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_tiny_models(tmp_path_factory.mktemp(f"tiny-{arch}"), "test", texts=TINY_TEXTS,
                                           arch=arch, vision=FAMILY_VISION[arch])
        return cache[arch]
    return get


@pytest.fixture(scope="session")
def family_mm(family_dirs, tiny_mm):
    """(arch, mode) -> (model, tokenizer) like tiny_mm (GPT-2: tiny_mm's own), built once per session."""
    cache = {}

    def get(arch, mode="patches"):
        if arch == "gpt2":
            return tiny_mm(mode)
        if (arch, mode) not in cache:
            cache[arch, mode] = build_tiny_mmcoconut(family_dirs(arch), mode)
        return cache[arch, mode]
    return get


# ---------------------------------------------------------------- spawned ranks (test_fsdp.py, test_model_dist.py)
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned_ranks(worker, world: int, args: tuple, timeout: float = 600) -> dict:
    """Start `worker(rank, port, *args, queue)` in `world` spawned processes; {rank: rest of what it put}."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=worker, args=(r, port, *args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, *rest = queue.get(timeout=timeout)
            results[rank] = rest[0] if len(rest) == 1 else rest
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return results
