"""Documentation of the run config, generated from mmcoconut/config.py (its trailing `# comments` are the docs).

The one source of truth is the field definition in config.py: `name: type = default  # one-line doc`. This module
reads those comments (with `ast` + `tokenize`) and renders `mmcoconut-train --help` and README's config reference
table (`python -m mmcoconut.config_help --markdown`; tests/test_config.py checks README is in sync).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from typing import Union

from . import config as C


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


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " | ".join(type_name(a) for a in args if a is not type(None)) + \
            (" | None" if type(None) in args else "")
    if origin is list:
        return f"list[{type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def rows() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every field, in section order."""
    docs, out = field_docs(), []
    defaults = C.Config().to_dict()
    for section, fields in C.FIELDS.items():
        for name, f in fields.items():
            tp = type_name(f.type)
            choices = [c for c in f.metadata.get("choices", ()) if c is not None]
            if choices:
                tp += " (" + ", ".join(map(str, choices)) + ")"
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
        "CONFIG        a YAML file or a shipped config (" + ", ".join(_shipped()) + "); without a launcher the run",
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
    for key, target in C.SEED_KEYS.items():
        lines.append(f"  {key:<28} -> {target if isinstance(target, str) else C.SEED_KEY_DOCS.get(key, '')}")
    return "\n".join(lines) + "\n"


def _shipped() -> list[str]:
    from importlib import resources
    return sorted(x.name[:-5] for x in (resources.files("mmcoconut") / "configs").iterdir()
                  if x.name.endswith(".yaml"))


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
    for key, target in C.SEED_KEYS.items():
        out.append(f"| {key} | {target if isinstance(target, str) else C.SEED_KEY_DOCS.get(key, '')} |")
    return "\n".join(out) + "\n"


README_BLOCKS = {"config-reference": markdown_table, "seed-keys": seed_table}


def sync_readme(text: str) -> str:
    """README text with every generated block (between `<!-- NAME:begin -->` and `<!-- NAME:end -->`) renewed."""
    for name, render in README_BLOCKS.items():
        begin, end = f"<!-- {name}:begin (generated: python -m mmcoconut.config_help --write README.md) -->\n", \
            f"<!-- {name}:end -->"
        i, j = text.find(begin), text.find(end)
        if i < 0 or j < i:
            raise ValueError(f"README: markers for {name!r} not found ({begin.strip()} ... {end})")
        text = text[:i + len(begin)] + render() + text[j:]
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:
        print(markdown_table(), end="")
    elif argv[:1] == ["--write"] and len(argv) == 2:
        from pathlib import Path
        p = Path(argv[1])
        p.write_text(sync_readme(p.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"updated the generated blocks of {p}")
    else:
        print(help_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
