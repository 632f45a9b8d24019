"""Hugging Face-native model: config/model/processor round trips, the answer API, the shipped code (loads where
mmcoconut is not importable, also after a push to a Hub-like server), and what an export ships."""
import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHOICES = ["red", "blue", "green", "yellow"]
QUESTIONS = ["What color is the cube?", "How many shapes are there? Count the circles", "The ball is red."]


def _image(seed: int, size=40):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size, size + 7, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, tiny_dirs, eval_cfg_factory):
    """A tiny model built from *copies* of the tiny dirs, exported; the copies are deleted afterwards, so loading
    the export can only use what is inside it."""
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer
    from mmcoconut.export.hf_export import save_export
    d = tmp_path_factory.mktemp("hfexp")
    lm, vision = shutil.copytree(tiny_dirs["lm"], d / "src" / "lm"), shutil.copytree(tiny_dirs["vision"],
                                                                                     d / "src" / "vision")
    cfg = eval_cfg_factory({"model.lm_id": str(lm), "model.vision_id": str(vision), "eval.max_new_tokens": 12})
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok).eval()
    from conftest import scale_tiny_weights
    scale_tiny_weights(model)  # visible logits
    out = save_export(model, tok, cfg, d / "export", image_processor=build_image_processor(cfg.model))
    shutil.rmtree(d / "src")
    return out, model, tok, cfg


def test_config_and_weights_round_trip(hf_export):
    from mmcoconut.modeling import MMCoconutConfig, MMCoconutForConditionalGeneration
    out, model, _, cfg = hf_export
    conf = MMCoconutConfig.from_pretrained(out)
    assert conf.num_image_tokens == model.n_image_tokens and conf.default_n_latents == 2
    assert conf.special_ids["latent"] == model.ids.latent and conf.text_config.vocab_size == model.lm.config.vocab_size
    hf = MMCoconutForConditionalGeneration.from_pretrained(out)
    sd, ref = hf.model.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert hf.model.lm.lm_head.weight is hf.model.lm.transformer.wte.weight  # still tied after loading
    assert all(not p.requires_grad for p in hf.model.vision.parameters())  # frozen tower stays frozen


def test_wrapper_computes_what_the_recompute_reference_computes(hf_export):
    """The HF model loaded from the export (its own config and weights) gives the logits and loss of the training
    model's recompute-everything reference (naive_forward: no cache, no pass plan) and its greedy tokens equal
    uncached one-by-one generation: the export is checked against an independent computation, not against itself."""
    from conftest import make_mm_batch
    from mmcoconut.modeling import MMCoconutForConditionalGeneration, generate_reference
    out, model, tok, _ = hf_export
    hf = MMCoconutForConditionalGeneration.from_pretrained(out).eval()
    assert hf.model is not model
    batch = make_mm_batch(model, tok, [2, 0, 1])
    with torch.no_grad():
        got, ref = hf(**batch), model.naive_forward(**batch)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=0)
    prompts = make_mm_batch(model, tok, [2, 1, 0], labels=False)
    args = (prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"])
    assert hf.generate(*args, max_new_tokens=6) == generate_reference(model, *args, max_new_tokens=6)


def test_processor_prompt_is_build_prompt(hf_export):
    """The processor's prompt ids equal the data pipeline's (curriculum.build_prompt) for every view."""
    from mmcoconut.data.curriculum import build_prompt
    from mmcoconut.modeling import MMCoconutProcessor
    from mmcoconut.modeling.prompt import choices_suffix
    out, model, tok, cfg = hf_export
    proc = MMCoconutProcessor.from_pretrained(out)
    sample = {"question": QUESTIONS[0] + choices_suffix(CHOICES), "steps": ["a", "b", "c"], "answer": "0"}
    for view in ("coconut", "dummy", "cot", "nocot"):
        for n in (0, 2, 5):
            ref = build_prompt(dict(sample), tok, model.ids, view=view, stage=2, cur=cfg.curriculum,
                               n_image_tokens=model.n_image_tokens, max_length=256, key="k", n_latents=n)
            assert proc.prompt(QUESTIONS[0], CHOICES, view, n) == ref["input_ids"], (view, n)
            # a question that already carries its choices is not extended twice
            assert proc.prompt(sample["question"], CHOICES, view, n) == ref["input_ids"]
    plain = build_prompt({"question": "q?", "steps": []}, tok, model.ids, view="cot", stage=0, cur=cfg.curriculum,
                         n_image_tokens=model.n_image_tokens, max_length=256, key="k")
    assert proc.prompt("q?", None, "cot") == plain["input_ids"]
    assert model.ids.start in plain["input_ids"]  # a coconut-trained model's cot prompt ends with START END


def test_answer_batched_equals_one_by_one_and_parses(hf_export):
    from mmcoconut.modeling import MMCoconutForConditionalGeneration
    out, _, _, _ = hf_export
    hf = MMCoconutForConditionalGeneration.from_pretrained(out)
    images = [_image(i) for i in range(3)]
    for view in ("coconut", "cot", "nocot", "dummy"):
        batched = hf.answer(images, QUESTIONS, choices=[CHOICES, None, CHOICES[:2]], view=view, batch_size=3)
        single = [hf.answer(im, q, choices=c, view=view)
                  for im, q, c in zip(images, QUESTIONS, [CHOICES, None, CHOICES[:2]])]
        assert batched == single, view
    r = batched[0]
    assert set(r) == {"text", "rationale", "answer", "choice", "choice_index", "fallback", "view", "n_latents",
                      "n_tokens"}
    assert r["choice"] == CHOICES[r["choice_index"]] and isinstance(r["fallback"], bool)
    assert batched[1]["choice"] is None and batched[1]["fallback"] is None
    assert hf.answer(images[0], QUESTIONS[0], n_latents=5)["n_latents"] == 5
    proc = hf.get_processor()  # parse: the answer after the last marker, the steps before it, choice mapping
    assert proc.parse("step one.\nstep two.\n### 2", CHOICES) == {
        "text": "step one.\nstep two.\n### 2", "rationale": "step one.\nstep two.", "answer": "2",
        "choice": "green", "choice_index": 2, "fallback": False}
    assert proc.parse("### grene", CHOICES)["fallback"] is True
    with pytest.raises(ValueError, match="view"):
        hf.answer(images[0], QUESTIONS[0], view="latent")


def test_answer_text_is_the_decode_of_the_generated_ids(hf_export):
    """answer()'s text is exactly the decode of the new token ids (no prompt tail, the first token once), and those
    ids equal uncached one-by-one generation in every view, the cot view's START END prompt included. (A doubled
    first word in the cot view, "OneOne kind after...", comes from the ids: a model trained past stage 0 writes its
    latent-stage continuation after START END; docs/inference.md.)"""
    from mmcoconut.modeling import MMCoconutForConditionalGeneration, generate_reference
    out, _, _, _ = hf_export
    hf = MMCoconutForConditionalGeneration.from_pretrained(out).eval()
    proc = hf.get_processor()
    images = [_image(i) for i in range(3)]
    for view in ("cot", "nocot", "coconut"):
        got = hf.answer(images, QUESTIONS, choices=CHOICES, view=view)
        batch = proc(images, QUESTIONS, CHOICES, view=view, n_latents=hf.config.default_n_latents)
        args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        ids = hf.generate(*args, max_new_tokens=hf.config.answer_max_new_tokens)
        assert ids == generate_reference(hf.model, *args, max_new_tokens=hf.config.answer_max_new_tokens), view
        assert [g["text"] for g in got] == [proc.tokenizer.decode(i, skip_special_tokens=True) for i in ids], view
        assert [g["n_tokens"] for g in got] == [len(i) for i in ids]
        if view == "cot":
            assert batch["input_ids"][0, -2:].tolist() == [hf.model.ids.start, hf.model.ids.end]


def test_auto_classes_with_mmcoconut_installed(hf_export):
    """Importing mmcoconut.modeling registers the model type: no trust_remote_code needed, the package's classes load."""
    import mmcoconut.modeling
    from transformers import AutoConfig, AutoModel, AutoProcessor
    out, _, _, _ = hf_export
    assert type(AutoConfig.from_pretrained(out)) is mmcoconut.modeling.MMCoconutConfig
    assert type(AutoModel.from_pretrained(out)) is mmcoconut.modeling.MMCoconutForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(out)) is mmcoconut.modeling.MMCoconutProcessor


# ------------------------------------------------------------------------ remote code, no mmcoconut importable
REMOTE = textwrap.dedent('''
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):  # the shared venv has mmcoconut installed: hide it completely
        def find_spec(self, name, path=None, target=None):
            if name == "mmcoconut" or name.startswith("mmcoconut."):
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Block())
    try:
        import mmcoconut
        raise SystemExit("mmcoconut is importable")
    except ModuleNotFoundError:
        pass
    from PIL import Image
    from transformers import AutoModel, AutoProcessor
    path, images = sys.argv[1], sys.argv[2].split(",")
    questions, choices = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    proc = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    out = model.answer([Image.open(p) for p in images], questions, choices=choices)
    out += [model.answer(images[0], questions[0], choices=choices[0], view="cot")]
    assert not [m for m in sys.modules if m == "mmcoconut" or m.startswith("mmcoconut.")]
    print("RESULT " + json.dumps({"answers": out, "model": type(model).__module__, "proc": type(proc).__name__}))
''')


def run_remote(export, tmp_path, images, choices):
    script = tmp_path / "remote.py"
    script.write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run([sys.executable, "-I", str(script), str(export), ",".join(map(str, images)),
                        json.dumps(QUESTIONS), json.dumps(choices)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])


def test_export_loads_and_answers_without_mmcoconut(hf_export, tmp_path):
    """AutoModel(trust_remote_code) in a process where `import mmcoconut` fails, cwd and sys.path outside the repo,
    from a copy of the export in another place: the same answers as the package computes."""
    from mmcoconut.modeling import MMCoconutForConditionalGeneration
    out, _, _, _ = hf_export
    moved = shutil.copytree(out, tmp_path / "elsewhere" / "my-model")
    images = []
    for i in range(3):
        images.append(tmp_path / f"img{i}.png")
        _image(i).save(images[-1])
    choices = [CHOICES, None, CHOICES[:2]]
    got = run_remote(moved, tmp_path, images, choices)
    assert got["model"].startswith("transformers_modules.") and got["proc"] == "MMCoconutProcessor"
    hf = MMCoconutForConditionalGeneration.from_pretrained(out)
    ref = hf.answer([Image.open(p) for p in images], QUESTIONS, choices=choices)
    ref += [hf.answer(str(images[0]), QUESTIONS[0], choices=CHOICES, view="cot")]
    assert got["answers"] == ref


class FakeHub(BaseHTTPRequestHandler):
    """The four Hub endpoints create_repo + create_commit use, storing committed files in `root/<repo>`."""
    root: Path = None

    def _reply(self, obj, code=200):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        host = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            req = json.loads(body)
            return self._reply({"url": f"{host}/{req['organization']}/{req['name']}"})
        if self.path == "/api/validate-yaml":
            return self._reply({})
        parts = self.path.split("?")[0].split("/")  # /api/models/<org>/<name>/<preupload|commit>/<rev>
        repo, action = "/".join(parts[3:5]), parts[5]
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if action == "commit":
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    dest = self.root / repo / item["value"]["path"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(base64.b64decode(item["value"]["content"]))
            return self._reply({"commitUrl": f"{host}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
        return self._reply({"error": self.path}, 404)

    def log_message(self, *args):
        pass


def test_push_to_hub_uploads_a_loadable_repo(hf_export, tmp_path, monkeypatch):
    """push_to_hub against a local server speaking the Hub's upload API (huggingface_hub has no file:// backend):
    the committed repo holds weights, code, processor and card, and loads without mmcoconut."""
    import huggingface_hub.constants
    from mmcoconut.modeling import MMCoconutForConditionalGeneration
    FakeHub.root = tmp_path / "hub"
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    out, _, _, _ = hf_export
    try:
        info = MMCoconutForConditionalGeneration.from_pretrained(out).push_to_hub("me/tiny-coconut", token="hf_x")
    finally:
        server.shutdown()
    repo = FakeHub.root / "me" / "tiny-coconut"
    assert info.oid == "0" * 40
    assert {p.name for p in out.iterdir()} == {p.name for p in repo.iterdir()}
    img = tmp_path / "a.png"
    _image(0).save(img)
    got = run_remote(repo, tmp_path, [img] * 3, [CHOICES] * 3)
    assert len(got["answers"]) == 4


# ----------------------------------------------------------------------------------------------- shipped code
def test_the_export_ships_the_modeling_folder_unchanged(hf_export):
    """An export's code is mmcoconut/modeling/ (every module but __init__), each file byte for byte after one
    header line: nothing is rewritten or hand-copied."""
    import mmcoconut.modeling as modeling
    from mmcoconut.modeling.shipped import shipped_files
    here = Path(modeling.__file__).parent
    assert {f.name for f in shipped_files()} == {f.name for f in here.glob("*.py")} - {"__init__.py"}
    out, _, _, _ = hf_export
    assert {f.name for f in out.glob("*.py")} == {f.name for f in shipped_files()}
    for src in shipped_files():
        assert (out / src.name).read_text().split("\n", 1)[1] == src.read_text(), src.name


def test_an_unshippable_import_is_refused(tmp_path):
    import mmcoconut.modeling as modeling
    from mmcoconut.modeling.shipped import ShippingError, write_code
    here = tmp_path / "modeling"
    shutil.copytree(Path(modeling.__file__).parent, here, ignore=shutil.ignore_patterns("__pycache__"))
    card = here / "card.py"
    card.write_text("import deepspeed\n" + card.read_text())
    with pytest.raises(ShippingError, match="deepspeed"):
        write_code(tmp_path / "out", here=here)
    card.write_text(card.read_text().replace("import deepspeed\n", "from .missing_module import x\n"))
    with pytest.raises(ShippingError, match="missing"):
        write_code(tmp_path / "out2", here=here)
