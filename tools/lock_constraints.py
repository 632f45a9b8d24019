#!/usr/bin/env python
"""The lock file of the versions CI tests: constraints.txt pins every package that `make install` puts into the venv
(the requirements of mmcoconut[dev] in pyproject.toml and of torch, followed through installed metadata), torch
itself aside (the Makefile installs TORCH_SPEC first: the CPU or CUDA build the machine needs).

  python tools/lock_constraints.py constraints.txt    # write it from this environment (`make lock`)
  python tools/lock_constraints.py --check constraints.txt
                                                      # exit 1, one line per difference, when this environment's
                                                      # closure is not exactly what the file pins

`make install` (and so .ci/run) installs with `pip install -c constraints.txt`. Renew it on purpose: upgrade in the
venv (.venv/bin/pip install -U transformers), run `make lock`, run the tests, commit the diff.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOT_PINNED = {"torch"}  # installed first by the Makefile's TORCH_SPEC
HEADER = ("# Exact versions CI tests (`make install` / .ci/run install with -c constraints.txt); torch is the\n"
          "# Makefile's TORCH_SPEC. Written by `make lock` (tools/lock_constraints.py): renew on purpose, not by hand.\n")


def roots() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def closure(start: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of `start` and everything they require here (markers evaluated for
    this interpreter, extras followed). KeyError naming a requirement that is not installed."""
    out: dict[str, str] = {}
    todo = [(r, set(r.extras)) for r in start]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise KeyError(f"{req} is required but not installed in {sys.prefix}") from None
        out[name] = dist.version
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((sub, set(sub.extras)))
    return out


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()) if n not in NOT_PINNED)


def read(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9._-]+)==(\S+)\s*", line.split("#", 1)[0]) if line.strip() else None
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def differences(path: Path) -> list[str]:
    want, have = read(path), {n: v for n, v in closure(roots()).items() if n not in NOT_PINNED}
    out = [f"{n}: installed {have[n]}, {path.name} pins {want[n]}" for n in sorted(have) if n in want
           and have[n] != want[n]]
    out += [f"{n}=={have[n]} is installed and required but not in {path.name}" for n in sorted(set(have) - set(want))]
    out += [f"{n}=={want[n]} is pinned but no longer required" for n in sorted(set(want) - set(have))]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", default=ROOT / "constraints.txt")
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    if args.check:
        diff = differences(args.out)
        for d in diff:
            print(f"lock_constraints: {d}")
        print(f"lock_constraints: {args.out}: " + ("matches this environment" if not diff else
                                                   f"{len(diff)} difference(s); `make lock` renews it"))
        return 1 if diff else 0
    pins = closure(roots())
    args.out.write_text(render(pins))
    print(f"lock_constraints: wrote {args.out} ({len(pins) - len(NOT_PINNED & set(pins))} packages pinned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
