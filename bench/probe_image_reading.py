"""Does the tiny demo model learn to read the image? In-process stage-0 (CoT) training, no DeepSpeed.

Trains MMCoconut (tiny random GPT-2 + CLIP built like `make demo`'s, via `from_pretrained` on a temp dir) on
synthetic samples and reports, every --eval-every steps, teacher-forced accuracy per kind of target token
(`ord1` = 1st ordinal in the target text, `colour2` = 2nd colour word, ...) on 128 val samples, and the cot-view
MC accuracy of greedy generation.

Tasks: `demo` = mmcoconut.data.synthetic (colour1: anchor colour copied from the question, kind1: anchor kind read
from the image, kind3: the kind after the move, colour2: target colour read from the image, the rest copies);
`probe` = a one-step positional task on the demo scene drawn at 32 px with 16 px patches (2x2 grid, 4 image
tokens): "Which colour is the 3rd shape?" -> "The 3rd is a red circle." (colour1/kind1: read from the image).
Before 2026-11-25 evening the demo generator was a row of shapes on a 4x4 grid; bench/RESULTS.md says which
figures used which.

--feed replaces what the <image> tokens carry: `clip` (the model's own path), `wte` (probe only: each patch's
colour word embedding, injected through the same path), `text` (probe only: the colour words as ordinary tokens
in place of <image>), `meanrgb` (per-patch mean RGB -> Linear, init scaled by --proj-scale).

  python bench/probe_image_reading.py --task probe --lr 4e-4 --steps 450 --eval-every 150
"""
from __future__ import annotations

import argparse
import atexit
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcoconut import tiny_models  # noqa: E402
from mmcoconut.config import load_config  # noqa: E402
from mmcoconut.data import synthetic  # noqa: E402
from mmcoconut.data.collate import Collator, GenerationCollator  # noqa: E402
from mmcoconut.data.curriculum import build_example, build_prompt  # noqa: E402
from mmcoconut.data.pipeline import FastClipPreprocess  # noqa: E402
from mmcoconut.modeling.choices import map_to_choice  # noqa: E402
from mmcoconut.modeling.prompt import choices_suffix, extract_answer  # noqa: E402
from mmcoconut.factory import build_image_processor, build_model, build_tokenizer  # noqa: E402
from mmcoconut.modeling.tokens import SpecialIds  # noqa: E402

ORDINALS = ("1st", "2nd", "3rd", "4th")
DEMO_YAML = Path(__file__).resolve().parents[1] / "mmcoconut" / "configs" / "demo.yaml"


def probe_record(index: int, seed: int, with_choices: bool = True) -> dict:
    """One-step probe: the demo generator's scene (one shape per quadrant, reading order), asked for one colour."""
    rec = synthetic.make_record(index, seed)
    scene = rec["scene"]
    rng = random.Random(f"probe:{seed}:{index}")
    t = rng.randrange(len(scene))
    correct = scene[t]["colour"]
    choices = [s["colour"] for s in scene]
    rng.shuffle(choices)
    raw = f"Which colour is the {ORDINALS[t]} shape?"
    steps = [f"The {ORDINALS[t]} is a {correct} {scene[t]['kind']}."]
    question = raw + choices_suffix(choices) if with_choices else raw
    return dict(rec, question=question, raw_question=raw, steps=steps, answer=correct,
                choices=choices, correct_choice_idx=choices.index(correct), direct_answers=[correct] * 10,
                rationales=steps, scene=scene)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("demo", "probe"), default="demo")
    ap.add_argument("--feed", choices=("clip", "wte", "text", "meanrgb"), default="clip")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--ntrain", type=int, default=3000)
    ap.add_argument("--proj-scale", type=float, default=None, help="scale the projector's (or meanrgb's) last layer")
    ap.add_argument("--seed", type=int, default=0, help="projector init and batch order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of demo.yaml, e.g. --set model.vision_layer=0")
    ap.add_argument("--no-choices", action="store_true", help="probe: leave the choice list out of the question")
    a = ap.parse_args(argv)
    if a.feed in ("wte", "text") and a.task != "probe":
        ap.error(f"--feed {a.feed} needs --task probe")
    torch.set_num_threads(a.threads)
    if a.no_choices and a.task != "probe":
        ap.error("--no-choices needs --task probe")
    make = (lambda i, seed: probe_record(i, seed, not a.no_choices)) if a.task == "probe" else synthetic.make_record
    preset = dict(tiny_models.PRESETS["demo"], **({"image_size": 32, "patch_size": 16} if a.task == "probe" else {}))
    tiny_models.PRESETS["probe"] = preset

    mdir = tempfile.mkdtemp(prefix="probe_models_")
    atexit.register(shutil.rmtree, mdir, ignore_errors=True)
    texts = [synthetic.record_text(make(i, 0)) for i in range(2000)]
    tiny_models.make_tiny_models(mdir, preset="probe", texts=texts)
    cfg = load_config(str(DEMO_YAML), [f"--model.lm_id={mdir}/lm", f"--model.vision_id={mdir}/vision",
                                        *(f"--{kv}" for kv in a.set)])
    tok, proc = build_tokenizer(cfg.model), build_image_processor(cfg.model)
    torch.manual_seed(a.seed)
    model = build_model(cfg.model, tok)
    ids, fast = SpecialIds.from_tokenizer(tok), FastClipPreprocess.build(proc)
    word = {w: tok.encode(" " + w)[0] for w in [*synthetic.COLOURS, *synthetic.KINDS, "1", "2", "3", "4"]}
    last = model.projector[-1] if isinstance(model.projector, torch.nn.Sequential) else model.projector
    if a.feed == "meanrgb":
        last = torch.nn.Linear(3, model.lm.config.n_embd)
        model.add_module("meanrgb", last)
        model.image_features = lambda px: last(torch.nn.functional.avg_pool2d(px, 16).flatten(2).transpose(1, 2))
    elif a.feed == "wte":
        model.image_features = lambda px: model.lm.transformer.wte(px)  # px carries colour-word ids here
    if a.proj_scale is not None:
        with torch.no_grad():
            last.weight.mul_(a.proj_scale)
            last.bias.zero_()

    def rows(n, seed, prompt):
        out = []
        for i in range(n):
            rec = make(i, seed)
            kw = dict(view="coconut" if prompt else "train", stage=0, cur=cfg.curriculum, key=rec["question_id"],
                      n_image_tokens=model.n_image_tokens, max_length=cfg.model.max_length)
            r = build_prompt(rec, tok, ids, **kw) if prompt else build_example(rec, tok, ids, rng=None, **kw)
            colour_ids = [word[s["colour"]] for s in rec["scene"]]
            if a.feed == "wte":
                r["pixel_values"] = torch.tensor(colour_ids)
            else:
                r["pixel_values"] = fast(synthetic.draw_image(rec, preset["image_size"]).convert("RGB"))
            if a.feed == "text":
                r["input_ids"] = colour_ids + r["input_ids"][len(colour_ids):]
            r.update(key=rec["question_id"], meta=rec)
            out.append(r)
        return out

    train, val_tf, val_gen = rows(a.ntrain, 0, False), rows(128, 1, False), rows(128, 1, True)
    col, gcol = Collator(ids, tok.pad_token_id), GenerationCollator(ids, tok.pad_token_id)
    px = (lambda b: None) if a.feed == "text" else (lambda b: b["pixel_values"])
    kind_of = {word[w]: k for k, ws in (("colour", synthetic.COLOURS), ("kind", synthetic.KINDS),
                                         ("ord", ("1", "2", "3", "4"))) for w in ws}

    def forward(b):
        return model(b["input_ids"], b["attention_mask"], labels=b["labels"], pixel_values=px(b),
                     position_ids=b["position_ids"])

    @torch.no_grad()
    def teacher_forced() -> str:
        b = col(val_tf)
        pred, gold = forward(b).logits[:, :-1].argmax(-1), b["labels"][:, 1:]
        stats = {}
        for r in range(gold.shape[0]):
            seen = dict.fromkeys(("ord", "colour", "kind"), 0)
            for t in range(gold.shape[1]):
                k = kind_of.get(int(gold[r, t]))
                if k is None:
                    continue
                seen[k] += 1
                hit, n = stats.get(f"{k}{seen[k]}", (0, 0))
                stats[f"{k}{seen[k]}"] = (hit + int(pred[r, t] == gold[r, t]), n + 1)
        return " ".join(f"{k}:{100 * h / n:.0f}" for k, (h, n) in sorted(stats.items()))

    @torch.no_grad()
    def cot_mc() -> float:
        hits = 0
        for i in range(0, len(val_gen), 64):
            b = gcol(val_gen[i:i + 64])
            new = model.generate(b["input_ids"], b["attention_mask"], px(b), position_ids=b["position_ids"],
                                 max_new_tokens=48)
            for n, meta in zip(new, b["meta"]):
                idx, _ = map_to_choice(extract_answer(tok.decode(n, skip_special_tokens=True)), meta["choices"])
                hits += idx == meta["correct_choice_idx"]
        return 100 * hits / len(val_gen)

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    rng, order, t0, losses = random.Random(a.seed), [], time.time(), []
    print(f"task {a.task} feed {a.feed} lr {a.lr} batch {a.bs} train {a.ntrain} threads {a.threads}", flush=True)
    for step in range(1, a.steps + 1):
        if len(order) < a.bs:
            order += rng.sample(range(len(train)), len(train))
        batch, order = col([train[i] for i in order[:a.bs]]), order[a.bs:]
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / 20)
        model.train()
        loss = forward(batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            tf = teacher_forced()
            text_only = a.feed == "text"  # generation needs <image> rows; the text feed has none
            mc = "n/a" if text_only else f"{cot_mc():.1f}"
            print(f"step {step} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} | teacher-forced {tf} | "
                  f"cot MC {mc} | {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
