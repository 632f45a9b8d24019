"""Built-in synthetic visual-reasoning task, drawn with PIL.

A row of four shapes (circle / square / triangle / diamond) with distinct colours sits on a plain background, one
shape per quarter of the width, so with a 4x4 patch grid every shape falls in one patch. The question names one
shape by colour and kind and asks for the colour or the kind of the shape one or two places to its left or right,
e.g. "Find the red circle. Which colour is the shape one place to its right?". The answer cannot be read off the
text: it needs the image. The rationale takes 3 steps (locate the anchor, move, read the target) and the answer is
the choice's text, e.g. "green" (the choices are also listed in the question, A-OKVQA style).

The anchor is named first, so it sits at the same place in every question, and each step restates what the next
one needs: a tiny GPT-2 trained from scratch learns the text side of the reasoning (copy the anchor, move) within a
few hundred steps on a CPU; reading the image takes longer (bench/RESULTS.md).

Every record is a pure function of (index, seed), and the image a pure function of the record's `scene`, so shards
are reproducible byte for byte and an image can be redrawn from its json.
"""
from __future__ import annotations

import random
from typing import Iterator

from PIL import Image, ImageDraw

COLOURS = {  # name -> RGB, chosen to stay distinguishable after JPEG and a 224 -> 32 px resize
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60),
    "yellow": (240, 205, 30), "purple": (140, 60, 180), "orange": (245, 135, 20),
}
KINDS = ("circle", "square", "triangle", "diamond")
BACKGROUND = (245, 245, 240)
N_SLOTS = 4  # shapes per image, one per quarter of the width
N_DIRECT_ANSWERS = 10  # A-OKVQA has 10 direct answers per question
ORDINALS = ("1st", "2nd", "3rd", "4th")
SUPERSAMPLE = 2  # draw at 2x and downsample for anti-aliased edges


def record_key(index: int, seed: int) -> str:
    return f"syn{seed}-{index:07d}"


def choices_suffix(choices: list[str]) -> str:
    """' The choices are 0: cat, 1: dog, ...' — appended to the question (docs/CONTRACT.md)."""
    return " The choices are " + ", ".join(f"{i}: {c}" for i, c in enumerate(choices))


def _make_scene(rng: random.Random) -> list[dict]:
    """Shapes left to right; coordinates and sizes are fractions of the image side."""
    colours = rng.sample(sorted(COLOURS), N_SLOTS)
    slot = 1.0 / N_SLOTS
    row = rng.randrange(N_SLOTS)  # the row of slots the shapes sit in
    scene = []
    for i, colour in enumerate(colours):
        size = rng.uniform(0.75, 0.9) * slot  # neighbours never touch
        x = (i + 0.5) * slot
        y = (row + 0.5) * slot
        scene.append({"kind": rng.choice(KINDS), "colour": colour,
                      "x": round(x, 4), "y": round(y, 4), "size": round(size, 4)})
    return scene


def _describe(shape: dict) -> str:
    return f"{shape['colour']} {shape['kind']}"


def make_record(index: int, seed: int) -> dict:
    """The full shard json (docs/CONTRACT.md) of synthetic sample `index` for `seed`."""
    rng = random.Random(seed * 1_000_003 + index)  # hash-free, so stable across processes and Python runs
    scene = _make_scene(rng)
    hops = rng.choice((1, 2))
    direction = rng.choice(("right", "left"))
    step = hops if direction == "right" else -hops
    anchor = rng.choice([i for i in range(N_SLOTS) if 0 <= i + step < N_SLOTS])
    t = anchor + step
    target = scene[t]
    ask = rng.choice(("colour", "kind"))
    move = ("one place" if hops == 1 else "two places") + f" to its {direction}"
    raw_question = f"Find the {_describe(scene[anchor])}. Which {ask} is the shape {move}?"
    steps = [f"The {_describe(scene[anchor])} is {ORDINALS[anchor]}.",
             f"{move.capitalize()} is {ORDINALS[t]}.",
             f"The {ORDINALS[t]} is a {_describe(target)}."]
    correct = target[ask]
    choices = [s[ask] for s in scene] if ask == "colour" else list(KINDS)  # the scene's colours / every kind
    rng.shuffle(choices)
    idx = choices.index(correct)
    key = record_key(index, seed)
    return {
        "question_id": key,
        "question": raw_question + choices_suffix(choices),
        "raw_question": raw_question,
        "steps": steps,
        "answer": correct,
        "choices": choices,
        "correct_choice_idx": idx,
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


def iter_records(n: int, seed: int) -> Iterator[dict]:
    for index in range(n):
        yield make_record(index, seed)


def synthetic_texts(n: int, seed: int) -> list[str]:
    """Question + steps + answer texts, e.g. to train the tiny tokenizer on the demo's vocabulary."""
    texts = []
    for rec in iter_records(n, seed):
        texts.append("\n".join([rec["question"], *rec["steps"], "### " + rec["answer"]]))
    return texts
