"""In-process Coconut curriculum on the pointer-chasing task (mmcoconut/data/chain.py), no DeepSpeed: a cheap way
to explore hop counts, stage lengths and c_thought before a real `launch.sh` run.

Trains MMCoconut (tiny demo-preset GPT-2 + CLIP, tokenizer trained on chain texts) with AdamW, batch --bs, through
stage 0 (CoT, --stage0-steps) and stages 1..max_latent_stage (--stage-steps each). After each stage it prints
teacher-forced accuracy of every hop's read (stage 0 format) and greedy-generation MC of the four views
(nocot / cot / coconut / dummy) on --nval val samples, with the mean generated tokens. --no-cot trains the
answer-only baseline instead (curriculum.no_cot) for --stage0-steps steps.

  python bench/probe_chain.py --hops 3 --stage0-steps 1500 --stage-steps 400 --eval-every 500
  # the showcase recipe (bench/RESULTS.md, "Showcase"): 4 thoughts per step, rescaled, lr 1e-4 after stage 0
  python bench/probe_chain.py --threads 1 --hops 3 --c-thought 4 --latent-scale embedding --lr-latent 1e-4 \
      --reset-optimizer --seed 0 --plan 0:1500,1:250,2:250 --eval-every 750
"""
from __future__ import annotations

import argparse
import atexit
import io
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcoconut import tiny_models  # noqa: E402
from mmcoconut.config import load_config  # noqa: E402
from mmcoconut.data import chain  # noqa: E402
from mmcoconut.data.collate import Collator, GenerationCollator  # noqa: E402
from mmcoconut.data.curriculum import build_example, build_prompt  # noqa: E402
from mmcoconut.data.pipeline import FastClipPreprocess  # noqa: E402
from mmcoconut.data.sharding import encode_jpeg  # noqa: E402
from mmcoconut.modeling.choices import map_to_choice  # noqa: E402
from mmcoconut.modeling.prompt import extract_answer  # noqa: E402
from mmcoconut.factory import build_image_processor, build_model, build_tokenizer  # noqa: E402
from mmcoconut.modeling.tokens import SpecialIds  # noqa: E402

DEMO_YAML = Path(__file__).resolve().parents[1] / "mmcoconut" / "configs" / "demo.yaml"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hops", default="3", help="hop count(s): 3, 1-4, 2,4")
    ap.add_argument("--stage0-steps", type=int, default=1500)
    ap.add_argument("--stage-steps", type=int, default=400, help="steps of each latent stage")
    ap.add_argument("--max-stage", type=int, default=None, help="default: the largest hop count")
    ap.add_argument("--plan", default=None, help="explicit stages STAGE:STEPS,..., e.g. 0:1500,3:1000 (stage 0 "
                    "is skipped with --load-stage0); overrides --stage0-steps / --stage-steps")
    ap.add_argument("--latent-scale", default="none", choices=("none", "embedding"),
                    help="model.latent_scale (embedding: each fed-back hidden state at the mean wte row norm)")
    ap.add_argument("--tiles", default="per-square", choices=chain.POINTER_KINDS, help="chain tile kind")
    ap.add_argument("--steps", default="pointer", choices=chain.STEP_FORMATS, help="chain step format")
    ap.add_argument("--c-thought", type=int, default=1)
    ap.add_argument("--uniform-prob", type=float, default=0.0)
    ap.add_argument("--reset-optimizer", action="store_true")
    ap.add_argument("--no-cot", action="store_true", help="train the answer-only baseline")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps inside a stage")
    ap.add_argument("--show", type=int, default=0, help="print the first N generations of each view")
    ap.add_argument("--eval-at-start", action="store_true", help="also evaluate before the first step of each "
                    "latent stage (what the stage's latents give with no training at that stage)")
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--lr-latent", type=float, default=None, help="lr of the latent stages (default: --lr)")
    ap.add_argument("--ntrain", type=int, default=6000)
    ap.add_argument("--nval", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="model init, data order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--save-stage0", default=None, help="save the model after stage 0 here (torch.save)")
    ap.add_argument("--load-stage0", default=None, help="start from this saved stage-0 model, skip stage 0")
    ap.add_argument("--models", default=None, help="tiny model dir to reuse (default: a fresh temp dir)")
    ap.add_argument("--print-every", type=int, default=100, help="print the running loss every N steps")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    hops = chain.parse_hops(a.hops)
    max_stage = max(hops) if a.max_stage is None else a.max_stage

    mdir = a.models
    if mdir is None:
        mdir = tempfile.mkdtemp(prefix="probe_chain_")
        atexit.register(shutil.rmtree, mdir, ignore_errors=True)
    tiny_models.make_tiny_models(mdir, preset="demo", texts=chain.chain_texts(2000, 0, "1-4"))
    cfg = load_config(str(DEMO_YAML), [f"--model.lm_id={mdir}/lm", f"--model.vision_id={mdir}/vision",
                                        f"--curriculum.c_thought={a.c_thought}",
                                        f"--curriculum.max_latent_stage={max_stage}",
                                        f"--curriculum.uniform_prob={a.uniform_prob}",
                                        f"--curriculum.no_cot={a.no_cot}", f"--model.latent_scale={a.latent_scale}",
                                        *(f"--{kv}" for kv in a.set)])
    cur = cfg.curriculum
    tok, proc = build_tokenizer(cfg.model), build_image_processor(cfg.model)
    torch.manual_seed(a.seed)
    model = build_model(cfg.model, tok)
    if a.load_stage0:
        model.load_state_dict(torch.load(a.load_stage0, map_location="cpu"))
    ids, fast = SpecialIds.from_tokenizer(tok), FastClipPreprocess.build(proc)
    size = tiny_models.PRESETS["demo"]["image_size"]

    def pixels(rec):  # the shard path: drawn, JPEG-encoded at the shard size, decoded, preprocessed
        img = Image.open(io.BytesIO(encode_jpeg(chain.draw_image(rec, size)))).convert("RGB")
        return fast(img)

    def records(n, seed):
        return list(chain.iter_records(n, seed, hops, steps=a.steps, pointers=a.tiles))

    train_recs, val_recs = records(a.ntrain, 0), records(a.nval, 1)
    train_px = [pixels(r) for r in train_recs]
    val_px = [pixels(r) for r in val_recs]
    col, gcol = Collator(ids, tok.pad_token_id), GenerationCollator(ids, tok.pad_token_id)
    kw = dict(cur=cur, n_image_tokens=model.n_image_tokens, max_length=cfg.model.max_length)
    colour_ids = {tok.encode(" " + c)[0] for c in chain.NAMES}

    def train_row(i, stage, rng):
        rec = train_recs[i]
        r = build_example(rec, tok, ids, view="train", stage=stage, rng=rng, key=rec["question_id"], **kw)
        return dict(r, pixel_values=train_px[i], key=rec["question_id"])

    @torch.no_grad()
    def teacher_forced() -> str:
        """Accuracy of each colour read after a step's key (stage-0 cot sequence), per hop."""
        rows = []
        for rec, px in zip(val_recs, val_px):
            r = build_example(rec, tok, ids, view="cot", stage=0, rng=None, key=rec["question_id"], **kw)
            rows.append(dict(r, pixel_values=px, key=rec["question_id"]))
        b = col(rows)
        pred = model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"],
                     position_ids=b["position_ids"]).logits[:, :-1].argmax(-1)
        gold = b["labels"][:, 1:]
        hits, n = {}, {}
        for r in range(gold.shape[0]):
            seen = 0
            last = max(t for t in range(gold.shape[1]) if int(gold[r, t]) in colour_ids)  # the answer
            for t in range(last):
                g = int(gold[r, t])
                if a.steps == "colour":
                    read = g in colour_ids  # every step is the colour reached
                else:
                    read = g in colour_ids and t > 0 and int(gold[r, t - 1]) in colour_ids  # "<i> <key> <read>"
                if read:
                    seen += 1
                    hits[seen] = hits.get(seen, 0) + int(pred[r, t] == g)
                    n[seen] = n.get(seen, 0) + 1
        return " ".join(f"hop{h}:{100 * hits[h] / n[h]:.0f}" for h in sorted(n))

    @torch.no_grad()
    def view_mc(view: str, stage: int) -> tuple[float, float]:
        hits, ntok = 0, 0
        for i in range(0, len(val_recs), 64):
            rows = []
            for rec, px in zip(val_recs[i:i + 64], val_px[i:i + 64]):
                r = build_prompt(rec, tok, ids, view=view, stage=stage, key=rec["question_id"], **kw)
                rows.append(dict(r, pixel_values=px, key=rec["question_id"], meta=rec))
            b = gcol(rows)
            new = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"],
                                 position_ids=b["position_ids"], max_new_tokens=4 * max(hops) + 4,
                                 dummy_latent="zeros" if view == "dummy" else None)
            for j, (out, meta) in enumerate(zip(new, b["meta"])):
                if i + j < a.show:
                    print(f"    {view}: {tok.decode(out)!r} (answer {meta['answer']})", flush=True)
                ans = extract_answer(tok.decode(out, skip_special_tokens=True))
                idx, _ = map_to_choice(ans, meta["choices"]) if ans else (-1, True)
                hits += idx == meta["correct_choice_idx"]
                ntok += len(out)
        return 100 * hits / len(val_recs), ntok / len(val_recs)

    def report(step, stage, losses, t0):
        model.eval()
        views = ("nocot",) if a.no_cot else ("nocot", "cot", "coconut", "dummy")
        res = {v: view_mc(v, stage) for v in views}
        tf = "" if a.no_cot else f" | teacher-forced {teacher_forced()}"
        txt = " ".join(f"{v} {mc:.1f} ({nt:.1f} tok)" for v, (mc, nt) in res.items())
        print(f"step {step} stage {stage} loss {sum(losses[-25:]) / max(1, len(losses[-25:])):.4f}{tf} | {txt} | "
              f"{time.time() - t0:.0f}s", flush=True)
        model.train()

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    rng, order, t0, losses, step = random.Random(a.seed), [], time.time(), [], 0
    if a.plan:
        plan = [tuple(int(x) for x in part.split(":")) for part in a.plan.split(",")]
        plan = [(s, 0 if s == 0 and a.load_stage0 else n) for s, n in plan]
    elif a.no_cot:
        plan = [(0, a.stage0_steps)]
    else:
        plan = [(0, 0 if a.load_stage0 else a.stage0_steps)] + [(s, a.stage_steps) for s in range(1, max_stage + 1)]
    print(f"chain hops {hops} | c_thought {a.c_thought} | stages {plan} | lr {a.lr} (latent {a.lr_latent}) "
          f"batch {a.bs} train {a.ntrain} seed {a.seed} | tiles {a.tiles} steps {a.steps} "
          f"latent-scale {a.latent_scale} | "
          f"uniform {a.uniform_prob} reset {a.reset_optimizer}", flush=True)
    model.train()
    for stage, n_steps in plan:
        if stage > 0 and a.reset_optimizer:
            opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
        if stage > 0 and a.eval_at_start:
            report(step, stage, losses, t0)
        for k in range(1, n_steps + 1):
            step += 1
            if len(order) < a.bs:
                order += rng.sample(range(len(train_recs)), len(train_recs))
            idx, order = order[:a.bs], order[a.bs:]
            batch = col([train_row(i, stage, random.Random(f"{a.seed}:{step}:{i}")) for i in idx])
            base_lr = a.lr if stage == 0 or a.lr_latent is None else a.lr_latent
            for g in opt.param_groups:
                g["lr"] = base_lr * min(1.0, step / 20)
            loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                         pixel_values=batch["pixel_values"], position_ids=batch["position_ids"]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if a.print_every and step % a.print_every == 0:
                print(f"  step {step} stage {stage} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} | "
                      f"{time.time() - t0:.0f}s", flush=True)
            if k == n_steps or (a.eval_every and k % a.eval_every == 0):
                report(step, stage, losses, t0)
        if stage == 0 and a.save_stage0 and n_steps:
            torch.save(model.state_dict(), a.save_stage0)
        if stage == 0 and a.load_stage0:
            report(step, stage, losses, t0)


if __name__ == "__main__":
    main()
