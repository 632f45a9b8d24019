"""Built-in synthetic visual-reasoning task, drawn with PIL.

A row of 3-5 shapes (circle / square / triangle / diamond) with distinct colours sits on a plain background. The
question names one shape by colour and kind and asks for the colour or the kind of the shape one or two places to
its left or right, e.g. "What colour is the shape to the right of the red circle?". The answer cannot be read off the
text: it needs the image, and the rationale takes 3-4 steps (locate the anchor, move, read the target).

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
N_CHOICES = 4
N_DIRECT_ANSWERS = 10  # A-OKVQA has 10 direct answers per question
ORDINALS = ("1st", "2nd", "3rd", "4th", "5th")
SUPERSAMPLE = 2  # draw at 2x and downsample for anti-aliased edges


def record_key(index: int, seed: int) -> str:
    return f"syn{seed}-{index:07d}"


def choices_suffix(choices: list[str]) -> str:
    """' The choices are 0: cat, 1: dog, ...' — appended to the question (docs/CONTRACT.md)."""
    return " The choices are " + ", ".join(f"{i}: {c}" for i, c in enumerate(choices))


def _make_scene(rng: random.Random) -> list[dict]:
    """Shapes left to right; coordinates and sizes are fractions of the image side."""
    n = rng.randint(3, 5)
    colours = rng.sample(sorted(COLOURS), n)
    slot = 1.0 / n
    scene = []
    for i, colour in enumerate(colours):
        size = rng.uniform(0.55, 0.8) * min(slot, 0.3)  # with the jitter below, neighbours never touch
        x = (i + 0.5) * slot + rng.uniform(-0.05, 0.05) * slot
        y = 0.5 + rng.uniform(-0.2, 0.2)
        scene.append({"kind": rng.choice(KINDS), "colour": colour,
                      "x": round(x, 4), "y": round(y, 4), "size": round(size, 4)})
    return scene


def _describe(shape: dict) -> str:
    return f"{shape['colour']} {shape['kind']}"


def make_record(index: int, seed: int) -> dict:
    """The full shard json (docs/CONTRACT.md) of synthetic sample `index` for `seed`."""
    rng = random.Random(seed * 1_000_003 + index)  # hash-free, so stable across processes and Python runs
    scene = _make_scene(rng)
    n = len(scene)
    hops = rng.choice((1, 1, 2))  # n >= 3, so a two-place move always has an anchor
    direction = rng.choice(("right", "left"))
    step = hops if direction == "right" else -hops
    anchor = rng.choice([i for i in range(n) if 0 <= i + step < n])
    target = anchor + step
    ask = rng.choice(("colour", "shape"))

    where = ("to the" if hops == 1 else "two places to the") + f" {direction} of the {_describe(scene[anchor])}"
    raw_question = f"What colour is the shape {where}?" if ask == "colour" else f"What kind of shape is {where}?"
    steps = [f"The {_describe(scene[anchor])} is the {ORDINALS[anchor]} shape from the left."]
    if hops == 2:
        steps.append(f"Two places to its {direction} is the {ORDINALS[target]} shape from the left.")
        subject = f"The {ORDINALS[target]} shape"
    else:
        subject = f"The shape to its {direction}"
    tgt = scene[target]
    if ask == "colour":
        steps += [f"{subject} is a {tgt['kind']}.", f"The {tgt['kind']} is {tgt['colour']}."]
        correct = tgt["colour"]
        # distractors: the scene's other colours first (they are plausible), then the rest of the palette
        in_scene = [s["colour"] for s in scene if s["colour"] != correct]
        rest = [c for c in sorted(COLOURS) if c != correct and c not in in_scene]
        rng.shuffle(in_scene)
        rng.shuffle(rest)
        choices = [correct] + (in_scene + rest)[:N_CHOICES - 1]
    else:
        steps += [f"{subject} is {tgt['colour']}.", f"The {tgt['colour']} shape is a {tgt['kind']}."]
        correct = tgt["kind"]
        choices = list(KINDS)
    rng.shuffle(choices)
    idx = choices.index(correct)
    key = record_key(index, seed)
    return {
        "question_id": key,
        "question": raw_question + choices_suffix(choices),
        "raw_question": raw_question,
        "steps": steps,
        "answer": str(idx),
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
