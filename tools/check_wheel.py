#!/usr/bin/env python
"""Check a built mmcoconut wheel against the checkout: python tools/check_wheel.py dist/mmcoconut-*.whl

- every module of mmcoconut/ is in it, plus configs/*.yaml, kernels/csrc/*, all of ds_configs/**/*.json (as
  mmcoconut/ds_configs), and the LICENSE;
- every console script points at a module in the wheel that defines the function;
- Requires-Dist is exactly what the code imports (third-party import roots mapped to distributions), plus the
  runtime-only dependencies listed in RUNTIME_ONLY; optional imports must be in an extra.
Exit 1 with one line per problem.
"""
from __future__ import annotations

import ast
import configparser
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST_OF = {"yaml": "pyyaml", "PIL": "pillow", "huggingface_hub": "huggingface_hub"}  # import name -> distribution
RUNTIME_ONLY = {"accelerate": "transformers' HfDeepSpeedConfig (ZeRO-3)", "ninja": "torch's C++/CUDA op builds"}
SCRIPTS = {"mmcoconut-train", "mmcoconut-eval", "mmcoconut-shard", "mmcoconut-export", "mmcoconut-ask",
           "mmcoconut-predict"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def expected_files() -> set[str]:
    out = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mmcoconut").rglob("*.py") if "__pycache__" not in p.parts}
    out |= {f"mmcoconut/configs/{p.name}" for p in (ROOT / "mmcoconut/configs").glob("*.yaml")}
    out |= {f"mmcoconut/kernels/csrc/{p.name}" for p in (ROOT / "mmcoconut/kernels/csrc").iterdir() if p.is_file()}
    out |= {f"mmcoconut/ds_configs/{p.relative_to(ROOT / 'ds_configs').as_posix()}"
            for p in (ROOT / "ds_configs").rglob("*.json")}
    return out


def imported_roots(sources: dict[str, str]) -> dict[str, set[str]]:
    """{import root: {files}} of third-party absolute imports (stdlib and mmcoconut excluded)."""
    out: dict[str, set[str]] = {}
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text, filename=name)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for m in mods:
                root = m.split(".")[0]
                if root not in sys.stdlib_module_names and root not in ("mmcoconut", "__future__"):
                    out.setdefault(root, set()).add(name)
    return out


def check(wheel: Path) -> list[str]:
    problems = []
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(f"{dist}/METADATA").decode()
        entry = z.read(f"{dist}/entry_points.txt").decode()
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    for f in sorted(expected_files() - names):
        problems.append(f"missing from the wheel: {f}")
    if not any(n.startswith(f"{dist}/licenses/LICENSE") for n in names):
        problems.append("missing from the wheel: LICENSE")
    ep = configparser.ConfigParser()
    ep.read_string(entry)
    scripts = dict(ep["console_scripts"]) if ep.has_section("console_scripts") else {}
    for s in sorted(SCRIPTS - set(scripts)):
        problems.append(f"console script {s} is not declared")
    for s, target in scripts.items():
        mod, _, func = target.partition(":")
        path = mod.replace(".", "/") + ".py"
        if path not in sources or not re.search(rf"^def {func}\(", sources[path], re.M):
            problems.append(f"console script {s} -> {target}: no function {func} in {path}")
    required, extras = set(), set()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            spec = line.split(":", 1)[1].strip()
            name = _norm(re.split(r"[<>=!~; \[]", spec)[0])
            (extras if "extra ==" in spec else required).add(name)
    roots = imported_roots(sources)
    needed = {_norm(DIST_OF.get(r, r)): files for r, files in roots.items()}
    for dist_name, files in sorted(needed.items()):
        if dist_name not in required | extras:
            problems.append(f"imported but not declared: {dist_name} (in {sorted(files)[0]})")
    for dist_name in sorted(required - set(needed) - {_norm(k) for k in RUNTIME_ONLY}):
        problems.append(f"declared but never imported: {dist_name}")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    problems = check(Path(argv[0]))
    for p in problems:
        print(f"check_wheel: {p}")
    print(f"check_wheel: {argv[0]}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
