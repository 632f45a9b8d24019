"""Documentation of the run config, generated from mmcoconut/config.py (its trailing `# comments` are the docs).

The one source of truth is the field definition in config.py: `name: type = default  # one-line doc`. This module
reads those comments (with `ast` + `tokenize`) and renders `mmcoconut-train --help` and the generated tables of the
docs: the config reference in docs/configuration.md (`python -m mmcoconut.config_help --markdown`) and the seed-key
table in docs/seed-compatibility.md. `python -m mmcoconut.config_help --write FILE` renews the generated blocks FILE
contains; tests/test_config.py checks both pages are in sync.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import re
import sys
import tokenize
from pathlib import Path

from . import config as C
from .seed_config import SEED_KEYS, describe


def _comments(cls) -> dict[str, str]:
    """{field name: its trailing comment} for one dataclass, from its source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):  # no source shipped: docs stay empty
        return {}
    by_line = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = [by_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in by_line]
            out[node.target.id] = " ".join(text)
    return out


def field_docs() -> dict[str, dict[str, str]]:
    """{section: {field: doc}} for every config field."""
    classes = {f.name: f.default_factory for f in dataclasses.fields(C.Config)}
    return {s: _comments(classes[s]) for s in C.FIELDS}


def rows() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every field, in section order."""
    docs, out = field_docs(), []
    defaults = C.Config().to_dict()
    for section, fields in C.FIELDS.items():
        for name, f in fields.items():
            tp = C.type_name(f.type)
            default = defaults[section][name]
            default = ",".join(default) if isinstance(default, list) else repr(default) if isinstance(default, str) \
                else str(default)
            out.append((f"{section}.{name}", tp, default, docs[section].get(name, "")))
    return out


def help_text(prog: str = "mmcoconut-train") -> str:
    """The training CLI's --help: usage, then every key grouped by section, then the seed keys."""
    lines = [
        f"usage: {prog} CONFIG [--section.key=VALUE ...] [--deepspeed DS_CONFIG]",
        "       deepspeed --num_gpus N --module mmcoconut.train CONFIG ...   (several processes; or ./launch.sh)",
        "",
        "CONFIG        a YAML file or a shipped config (" + ", ".join(C.shipped_configs())
        + "); without a launcher the run",
        "              is one process",
        "--deepspeed   a ds_config JSON file or the name of a shipped one (zero2_2gpu, zero3_1gpu, ...);",
        "              default: zero2_<world size>gpu",
        "--KEY=VALUE   any key below, in the YAML as `section: {key: value}`; `--section.key VALUE` works too.",
        "              A bare --key=VALUE works only when exactly one field has that name and no other field",
        "              ends with it: --lr=1e-4 is train.lr, --batch_size is an error naming the candidates.",
    ]
    width = max(len(r[0]) for r in rows()) + 2
    section = None
    for key, tp, default, doc in rows():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines += ["", f"{section}:"]
        lines.append(f"  --{key:<{width}} {tp}, default {default}")
        if doc:
            lines.append(f"  {'':<{width + 2}} {doc}")
    lines += ["", "seed keys (the seed trainers' flat YAML keys, accepted as they are):"]
    for key in SEED_KEYS:
        lines.append(f"  {key:<28} -> {describe(key)}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """README's config reference table."""
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in rows():
        doc = doc.replace("|", "&#124;").replace("<", "&lt;").replace(">", "&gt;")
        out.append(f"| `{key}` | {tp.replace('|', '&#124;')} | `{default}` | {doc} |")
    return "\n".join(out) + "\n"


def seed_table() -> str:
    """README's seed-key table."""
    out = ["| seed key | mmcoconut key |", "|---|---|"]
    for key in SEED_KEYS:
        out.append(f"| {key} | {describe(key)} |")
    return "\n".join(out) + "\n"


GENERATED_BLOCKS = {"config-reference": markdown_table, "seed-keys": seed_table}


def begin_marker(name: str, path: str) -> str:
    """The line that opens generated block `name` in the file `path` (as the repo root sees it)."""
    return f"<!-- {name}:begin (generated: python -m mmcoconut.config_help --write {path}) -->\n"


def end_marker(name: str) -> str:
    return f"<!-- {name}:end -->"


def _begin_re(name: str) -> "re.Pattern[str]":
    return re.compile(rf"<!-- {re.escape(name)}:begin\b[^\n]*-->\n")


def blocks_in(text: str) -> list[str]:
    """Names of the generated blocks whose begin marker `text` contains."""
    return [name for name in GENERATED_BLOCKS if _begin_re(name).search(text)]


def sync_blocks(text: str, path: str) -> str:
    """`text` (the contents of `path`) with every generated block it contains renewed: the lines between
    `<!-- NAME:begin ... -->` and `<!-- NAME:end -->` re-rendered, the begin marker naming `path`.
    ValueError when it contains none, or a begin marker without its end marker."""
    names = blocks_in(text)
    if not names:
        raise ValueError(f"{path}: no generated block to renew (a line `{begin_marker('NAME', path).strip()}`, "
                         f"NAME one of {', '.join(GENERATED_BLOCKS)}, and `{end_marker('NAME')}`)")
    for name in names:
        m = _begin_re(name).search(text)
        j = text.find(end_marker(name), m.end())
        if j < 0:
            raise ValueError(f"{path}: {name!r} begins ({m.group(0).strip()}) but {end_marker(name)} is missing")
        text = text[:m.start()] + begin_marker(name, path) + GENERATED_BLOCKS[name]() + text[j:]
    return text


def _display_path(p) -> str:
    """`p` as the markers name it: relative to the working directory (the repo root, as documented), so that no
    machine path is written into a committed file."""
    rel = os.path.relpath(p)
    return p.as_posix() if rel.startswith("..") else Path(rel).as_posix()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:
        print(markdown_table(), end="")
    elif argv[:1] == ["--write"] and len(argv) == 2:
        p = Path(argv[1])
        try:
            text = sync_blocks(p.read_text(encoding="utf-8"), _display_path(p))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        p.write_text(text, encoding="utf-8")
        print(f"updated the generated blocks of {p}: {', '.join(blocks_in(text))}")
    else:
        print(help_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
