#!/usr/bin/env python
"""Run every console script of pyproject.toml with --help (exit status 0 expected) as an install provides it:

  python tools/check_scripts.py BIN_DIR          # an existing install: BIN_DIR/mmcoconut-* (make's .venv/bin)
  python tools/check_scripts.py --editable       # a fresh editable install of this checkout (what `make` does)
  python tools/check_scripts.py --wheel WHEEL    # a fresh install of a built wheel (what users get)

--editable / --wheel install mmcoconut alone (no dependencies) into a scratch venv under build/ that sees this
interpreter's packages (a .pth line), so the check needs no network and takes seconds. Each script runs from a
temporary directory with PYTHONPATH unset, so only the install under test can be imported. Exit 1 with one line
per script that failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def console_scripts() -> list[str]:
    return sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def scratch_venv(where: Path) -> Path:
    """A venv without pip whose interpreter also sees this interpreter's site-packages; returns its bin dir."""
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_mmcoconut_check_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where / "bin"


def install(bin_dir: Path, target: str, editable: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q", "--no-deps",
           "--no-build-isolation", "--no-index"] + (["-e"] if editable else []) + [target]
    subprocess.run(cmd, check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def run_all(bin_dir: Path, timeout: float = 300) -> list[str]:
    """Problems (one line each) of running BIN_DIR/<script> --help for every console script."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    bin_dir = Path(bin_dir).absolute()  # the scripts run from a scratch dir (.ci/run passes .venv/bin)
    problems = []
    with tempfile.TemporaryDirectory() as cwd:
        for name in console_scripts():
            exe = bin_dir / name
            if not exe.is_file():
                problems.append(f"{name}: not installed in {bin_dir}")
                continue
            p = subprocess.run([str(exe), "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                               timeout=timeout)
            if p.returncode != 0 or "usage" not in (p.stdout + p.stderr).lower():
                tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ["no output"]
                problems.append(f"{name} --help: exit {p.returncode}: {tail[0]}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("bin_dir", nargs="?", type=Path, help="bin dir of an existing install")
    g.add_argument("--editable", action="store_true", help="check a fresh editable install of this checkout")
    g.add_argument("--wheel", type=Path, help="check a fresh install of this wheel")
    ap.add_argument("--venv", type=Path, default=None, help="scratch venv (default: build/check-<kind>-venv)")
    args = ap.parse_args(argv)
    if args.bin_dir is not None:
        bin_dir, what = args.bin_dir, str(args.bin_dir)
    else:
        kind = "editable" if args.editable else "wheel"
        bin_dir = scratch_venv(args.venv or ROOT / "build" / f"check-{kind}-venv")
        install(bin_dir, str(ROOT) if args.editable else str(args.wheel), args.editable)
        what = f"{kind} install" + (f" of {args.wheel.name}" if args.wheel else "")
    problems = run_all(bin_dir)
    for p in problems:
        print(f"check_scripts: {p}")
    n = len(console_scripts())
    print(f"check_scripts: {what}: " + (f"all {n} console scripts run --help" if not problems else
                                         f"{len(problems)} of {n} console scripts failed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
