"""Built-in synthetic visual-reasoning task, drawn with PIL.

Four shapes, one of each kind (circle / square / triangle / diamond) and each in a different colour, one per
quadrant of a plain background (so one per patch of a 2x2 patch grid). Kinds follow a fixed cycle, circle ->
square -> triangle -> diamond -> circle, which the model learns from the data. The question names a shape by colour
and asks for the colour of the shape one, two or three kinds after it: "Find the red shape. Which colour is the
shape two kinds after it?". Three rationale steps: read the anchor's kind from the image ("The red circle."), move
along the cycle in text ("Two kinds after circle is triangle."), read the target's colour from the image ("The
triangle green."); the answer is the choice text ("green"). Choices: the three other colours of the scene and one
colour that is not in it, so text alone scores 25 %.

Why this shape of task (bench/RESULTS.md): a tiny GPT-2 trained from scratch on a CPU learns an image read within
a few hundred steps when the read is keyed by the token right before it (the colour before the kind, the kind
before the colour) and the image has few tokens; reads keyed by position ("the 3rd shape") or by a token further
back ("The triangle is green."), or among 16 image tokens, stayed at or near chance for 1,000+ steps.

Every record is a pure function of (index, seed), and the image a pure function of the record's `scene`, so shards
are reproducible byte for byte and an image can be redrawn from its json.
"""
from __future__ import annotations

import random
from typing import Iterator

from PIL import Image, ImageDraw

from ..modeling.prompt import choices_suffix

COLOURS = {  # name -> RGB, chosen to stay distinguishable after JPEG and a 224 -> 32 px resize
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60),
    "yellow": (240, 205, 30), "purple": (140, 60, 180), "orange": (245, 135, 20),
}
KINDS = ("circle", "square", "triangle", "diamond")
BACKGROUND = (245, 245, 240)
N_SLOTS = len(KINDS)  # shapes per image: one of each kind, one per quadrant
N_DIRECT_ANSWERS = 10  # A-OKVQA has 10 direct answers per question
HOP_WORDS = ("one kind", "two kinds", "three kinds")
SUPERSAMPLE = 2  # draw at 2x and downsample for anti-aliased edges


def record_key(index: int, seed: int) -> str:
    return f"syn{seed}-{index:07d}"




def _make_scene(rng: random.Random) -> list[dict]:
    """One shape per quadrant (in reading order); coordinates and sizes are fractions of the image side."""
    colours = rng.sample(sorted(COLOURS), N_SLOTS)
    kinds = rng.sample(KINDS, N_SLOTS)  # one shape of each kind
    scene = []
    for i, (colour, kind) in enumerate(zip(colours, kinds)):
        size = rng.uniform(0.75, 0.9) / 2  # neighbours never touch
        scene.append({"kind": kind, "colour": colour, "x": (i % 2 + 0.5) / 2, "y": (i // 2 + 0.5) / 2,
                      "size": round(size, 4)})
    return scene


def kind_after(kind: str, hops: int) -> str:
    """The kind `hops` places after `kind` on the cycle circle -> square -> triangle -> diamond -> circle."""
    return KINDS[(KINDS.index(kind) + hops) % len(KINDS)]


def make_record(index: int, seed: int, list_choices: bool = True) -> dict:
    """The full shard json (docs/internals.md, "Shard sample") of synthetic sample `index` for `seed`.
    `list_choices=False` leaves the choice list out of the question text (32 instead of 50 text tokens: the demo);
    the json keeps them."""
    rng = random.Random(seed * 1_000_003 + index)  # hash-free, so stable across processes and Python runs
    scene = _make_scene(rng)
    anchor = rng.choice(scene)
    hops = rng.randint(1, len(KINDS) - 1)
    target_kind = kind_after(anchor["kind"], hops)
    target = next(s for s in scene if s["kind"] == target_kind)
    correct = target["colour"]
    absent = sorted(set(COLOURS) - {s["colour"] for s in scene})
    choices = [s["colour"] for s in scene if s is not anchor] + [rng.choice(absent)]
    rng.shuffle(choices)
    hop_words = HOP_WORDS[hops - 1]
    raw_question = f"Find the {anchor['colour']} shape. Which colour is the shape {hop_words} after it?"
    steps = [f"The {anchor['colour']} {anchor['kind']}.",
             f"{hop_words.capitalize()} after {anchor['kind']} is {target_kind}.",
             f"The {target_kind} {correct}."]
    key = record_key(index, seed)
    return {
        "question_id": key,
        "question": raw_question + (choices_suffix(choices) if list_choices else ""),
        "raw_question": raw_question,
        "steps": steps,
        "answer": correct,
        "choices": choices,
        "correct_choice_idx": choices.index(correct),
        "direct_answers": [correct] * N_DIRECT_ANSWERS,
        "difficult_direct_answer": False,
        "rationales": list(steps),
        "source": "synthetic",
        "scene": scene,
    }


def draw_image(record: dict, size: int = 224) -> Image.Image:
    """RGB size x size image of `record['scene']`."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for shape in record["scene"]:
        cx, cy, r = shape["x"] * big, shape["y"] * big, shape["size"] * big / 2
        fill = COLOURS[shape["colour"]]
        kind = shape["kind"]
        if kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif kind == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {kind!r}")
    return img.reduce(SUPERSAMPLE)  # box-filter downsample: cheap anti-aliasing


def iter_records(n: int, seed: int, list_choices: bool = True) -> Iterator[dict]:
    for index in range(n):
        yield make_record(index, seed, list_choices)


def record_text(rec: dict) -> str:
    """Question + steps + answer of one record as plain text (what the tiny tokenizer is trained on)."""
    return "\n".join([rec["question"], *rec["steps"], "### " + rec["answer"]])


def synthetic_texts(n: int, seed: int) -> list[str]:
    """record_text of the first n records, e.g. to train the tiny tokenizer on the demo's vocabulary."""
    return [record_text(rec) for rec in iter_records(n, seed)]
