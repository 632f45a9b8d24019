"""Built-in pointer-chasing task ("chain"): the answer needs k dependent image reads, one per reasoning step.

The image holds four tiles, one per quadrant (one per patch of a 2x2 patch grid). A tile is a square frame in
its *id* colour around a 2x2 mosaic of four *pointer* squares (reading order 1-4). Every colour is one of
red / blue / green / yellow; the frame colours are a random permutation over the tiles, and so are the colours
of pointer square i for each i (each colour appears exactly once as a frame and once in each square position).

Question: "Start at the red tile and follow 3 pointers. Which colour do you reach?" Hop i reads pointer
square i of the current tile; its colour names the tile to visit next. One step per hop: "1 red blue" (hop 1:
the red tile's square 1 is blue), "2 blue green", "3 green yellow"; answer "yellow" (the choice text). The
choices are always the four colours (in the json for scoring, shuffled); the question does not list them,
which keeps sequences ~30 % shorter (CPU time).

Why this shape (bench/RESULTS.md, "Chain task"): hop i uses its own random permutation (square i), so the
answer after k <= 4 hops is uniform given the question and given any k-1 of the hop results: no shortcut short of
doing every read (with one pointer per tile iterated k times, revisits of a 4-node graph leak the answer: a
text-only guess already scores 37-50 % at k = 3). Each read is keyed by the colour token right before it and
the image has four tokens, the layout the tiny demo model learns to read quickly (mmcoconut/data/synthetic.py).

Every record is a pure function of (index, seed, hops); the image a pure function of its `tiles`.
"""
from __future__ import annotations

import random
from typing import Iterator

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60), "yellow": (240, 205, 30)}
NAMES = tuple(COLOURS)
BACKGROUND = (245, 245, 240)
MAX_HOPS = 4  # pointer squares per tile
POINTER_KINDS = ("per-square", "one")  # hop i reads square i (4 permutations) | one pointer per tile, read every hop
STEP_FORMATS = ("pointer", "colour")  # "1 red blue" (hop, key, read) | " blue" (the colour reached, one token)
N_DIRECT_ANSWERS = 10
SUPERSAMPLE = 2
# tile geometry as fractions of a quadrant: frame outer margin and the inner mosaic's margin
FRAME_MARGIN, GAP_MARGIN, INNER_MARGIN = 1 / 16, 5 / 32, 3 / 16


def record_key(index: int, seed: int, hops: int) -> str:
    return f"chain{hops}-{seed}-{index:07d}"


def _make_tiles(rng: random.Random, pointers: str = "per-square") -> list[dict]:
    """Four tiles in reading order: frame colour + four pointer colours, each position a permutation
    (per-square), or one pointer colour per tile drawn independently, any colour (one: all four squares show it)."""
    ids = rng.sample(NAMES, 4)
    if pointers == "one":
        return [{"id": ids[t], "pointers": [rng.choice(NAMES)] * MAX_HOPS} for t in range(4)]
    pointers = [rng.sample(NAMES, 4) for _ in range(MAX_HOPS)]  # pointers[i][t]: square i of tile t
    return [{"id": ids[t], "pointers": [pointers[i][t] for i in range(MAX_HOPS)]} for t in range(4)]


def follow(tiles: list[dict], start: str, hops: int) -> list[str]:
    """Colours visited: [start, after hop 1, ..., after hop `hops`]; hop i reads pointer square i."""
    by_id = {t["id"]: t for t in tiles}
    path = [start]
    for i in range(hops):
        path.append(by_id[path[-1]]["pointers"][i])
    return path


def make_record(index: int, seed: int, hops: int = 3, steps: str = "pointer", pointers: str = "per-square") -> dict:
    """The full shard json (docs/internals.md, "Shard sample") of chain sample `index` with `hops` hops (1..4);
    `steps` picks the step text (STEP_FORMATS), `pointers` the tile kind (POINTER_KINDS)."""
    if pointers not in POINTER_KINDS:
        raise ValueError(f"chain task: pointers must be one of {POINTER_KINDS}, got {pointers!r}")
    if not 1 <= hops <= MAX_HOPS:
        raise ValueError(f"chain task: hops must be in 1..{MAX_HOPS}, got {hops}")
    if steps not in STEP_FORMATS:
        raise ValueError(f"chain task: step format must be one of {STEP_FORMATS}, got {steps!r}")
    rng = random.Random((seed * 1_000_003 + index) * 8 + hops)
    tiles = _make_tiles(rng, pointers)
    start = rng.choice(NAMES)
    path = follow(tiles, start, hops)
    answer = path[-1]
    choices = list(NAMES)
    rng.shuffle(choices)
    pointer_word = "pointer" if hops == 1 else "pointers"
    raw_question = f"Start at the {start} tile and follow {hops} {pointer_word}. Which colour do you reach?"
    if steps == "pointer":
        step_texts = [f"{i + 1} {path[i]} {path[i + 1]}" for i in range(hops)]
    else:  # the leading space makes each colour the one token it is in the question and the answer
        step_texts = [f" {path[i + 1]}" for i in range(hops)]
    return {
        "question_id": record_key(index, seed, hops),
        "question": raw_question,
        "raw_question": raw_question,
        "steps": step_texts,
        "answer": answer,
        "choices": choices,
        "correct_choice_idx": choices.index(answer),
        "direct_answers": [answer] * N_DIRECT_ANSWERS,
        "difficult_direct_answer": False,
        "rationales": list(step_texts),
        "source": "synthetic",
        "task": "chain",
        "hops": hops,
        "tiles": tiles,
    }


def draw_tiles(tiles: list[dict], size: int = 64) -> Image.Image:
    """RGB size x size image: tile t in quadrant t (reading order), frame + 2x2 pointer mosaic."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    q = big / 2
    for t, tile in enumerate(tiles):
        x0, y0 = (t % 2) * q, (t // 2) * q
        m, g, n = FRAME_MARGIN * q, GAP_MARGIN * q, INNER_MARGIN * q
        draw.rectangle((x0 + m, y0 + m, x0 + q - m - 1, y0 + q - m - 1), fill=COLOURS[tile["id"]])
        draw.rectangle((x0 + g, y0 + g, x0 + q - g - 1, y0 + q - g - 1), fill=BACKGROUND)  # frame / mosaic gap
        cell = (q - 2 * n) / 2
        for i, colour in enumerate(tile["pointers"]):
            cx, cy = x0 + n + (i % 2) * cell, y0 + n + (i // 2) * cell
            draw.rectangle((cx, cy, cx + cell - 1, cy + cell - 1), fill=COLOURS[colour])
    return img.reduce(SUPERSAMPLE)


def draw_image(record: dict, size: int = 64) -> Image.Image:
    return draw_tiles(record["tiles"], size)


class ChainImage:
    """Picklable image callable for the shard writer's worker pool (see sources.WorkItem)."""

    def __init__(self, tiles: list):
        self.tiles = tiles

    def __call__(self, size: int) -> Image.Image:
        return draw_tiles(self.tiles, size=size if size > 0 else 64)


def parse_hops(spec: str | int) -> tuple[int, ...]:
    """'3' -> (3,), '1-4' -> (1, 2, 3, 4), '2,4' -> (2, 4); errors name the bad spec."""
    text = str(spec).strip()
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            out = tuple(range(lo, hi + 1))
        else:
            out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"chain hops {spec!r}: expected K, LO-HI or a comma list, e.g. 3, 1-4, 2,4") from None
    if not out or any(not 1 <= h <= MAX_HOPS for h in out):
        raise ValueError(f"chain hops {spec!r}: every hop count must be in 1..{MAX_HOPS}")
    return out


def hops_for(index: int, seed: int, hops: tuple[int, ...]) -> int:
    """The hop count of sample `index` when several are mixed (a pure function of index and seed)."""
    return hops[0] if len(hops) == 1 else random.Random(f"hops:{seed}:{index}").choice(hops)


def iter_records(n: int, seed: int, hops: str | int | tuple = 3, steps: str = "pointer",
                 pointers: str = "per-square") -> Iterator[dict]:
    hs = hops if isinstance(hops, tuple) else parse_hops(hops)
    for index in range(n):
        yield make_record(index, seed, hops_for(index, seed, hs), steps, pointers)


def record_text(rec: dict) -> str:
    return "\n".join([rec["question"], *rec["steps"], "### " + rec["answer"]])


def chain_texts(n: int, seed: int, hops: str | int = "1-4") -> list[str]:
    """record_text of n records, e.g. to train the tiny tokenizer on this task's vocabulary."""
    return [record_text(rec) for rec in iter_records(n, seed, hops)]


def chain_records(n: int, seed: int, hops: str | int | tuple = 3, steps: str = "pointer",
                  pointers: str = "per-square"):
    """Work items for mmcoconut.data.sharding.write_shards (images drawn by the workers)."""
    from .sources import WorkItem
    hs = hops if isinstance(hops, tuple) else parse_hops(hops)  # errors now, not at the first item
    if steps not in STEP_FORMATS:
        raise ValueError(f"chain step format {steps!r}: choose from {', '.join(STEP_FORMATS)}")
    if pointers not in POINTER_KINDS:
        raise ValueError(f"chain pointers {pointers!r}: choose from {', '.join(POINTER_KINDS)}")
    return (WorkItem(rec["question_id"], rec, ChainImage(rec["tiles"]))
            for rec in iter_records(n, seed, hs, steps, pointers))

