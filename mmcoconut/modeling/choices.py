"""Map a generated answer to one of the question's choices.

``map_to_choice(text, choices) -> (index, used_fallback)`` tries, in order, on the text stripped and with an
optional leading ``"###"`` (the answer marker of our sequences) removed:

1. a choice index: the whole text is an integer in ``range(len(choices))`` (``"2"``);
2. the exact choice text, case-sensitive;
3. a choice index as the first token: an in-range integer followed by ``:``, ``)``, ``.`` (not a decimal
   point) or whitespace (``"2: horse"``, ``"2 horse"``) -- tried after (2) so a choice that itself starts with a number
   (``"3 dogs"``) is matched by its text;
4. the choice text case-insensitively with whitespace collapsed (first such choice);
5. fallback (``used_fallback=True``): the choice with the highest
   ``difflib.SequenceMatcher(None, text.lower(), choice.lower()).ratio()``, ties -> lowest index.
   Empty text -> index 0 with fallback. An out-of-range index (``"7"`` with 4 choices) is matched as text.
"""

from __future__ import annotations

import difflib
import re
from typing import Sequence

_INT = re.compile(r"[+-]?\d+")
_FIRST_INT = re.compile(r"(\d+)(?:\s*[:)]|\.(?!\d)|\s)")  # "2: x", "2) x", "2. x", "2 x" (not "2.5")


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


def _in_range(i: int, n: int) -> bool:
    return 0 <= i < n


def map_to_choice(text: str, choices: Sequence[str]) -> tuple[int, bool]:
    """(choice index, whether the fuzzy fallback was used) for one generated answer (see module docstring)."""
    if not choices:
        raise ValueError("map_to_choice: empty choice list")
    body = (text or "").strip()
    if body.startswith("###"):
        body = body[3:].strip()
    if not body:
        return 0, True
    n = len(choices)
    if _INT.fullmatch(body) and _in_range(int(body), n):          # (1) "2"
        return int(body), False
    for i, c in enumerate(choices):                                # (2) exact text
        if body == c:
            return i, False
    m = _FIRST_INT.match(body)                                     # (3) "2: horse"
    if m and _in_range(int(m.group(1)), n):
        return int(m.group(1)), False
    nb = _norm(body)                                               # (4) case/whitespace-insensitive
    for i, c in enumerate(choices):
        if _norm(c) == nb:
            return i, False
    low = body.lower()                                             # (5) closest by SequenceMatcher ratio
    best, best_r = 0, -1.0
    for i, c in enumerate(choices):
        r = difflib.SequenceMatcher(None, low, str(c).lower()).ratio()
        if r > best_r:                                             # strict '>' keeps the lowest index on ties
            best, best_r = i, r
    return best, True
