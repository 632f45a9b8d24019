"""The package's shape: no import cycles, the shipped model folder imports nothing of mmcoconut outside it, no
module over the size a reader can take in, one home for command-line entry points."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mmcoconut"
MAX_LINES = 420  # "files <= ~400 lines"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """mmcoconut modules `path` imports (module level and inside functions), relative imports resolved; `from pkg
    import name` counts as pkg.name when that is a module, else pkg."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mmcoconut"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "mmcoconut":
                mod = node.module
            else:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if _exists(sub) else mod)
    return found


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    return {m: {t for t in _imports(p) if t in mods and t != m} for m, p in mods.items()}


def test_no_module_imports_in_a_cycle():
    """Module A imports B (at any depth of the file, lazy imports included) and B reaches A again: a cycle.
    `__main__` aliases are leaves (nothing imports them)."""
    graph = _graph()
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The checker itself: a two-module package that imports itself round is reported."""
    pkg = tmp_path / "mmcoconut"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from mmcoconut.a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    with pytest.raises(AssertionError, match="mmcoconut.a -> mmcoconut.b -> mmcoconut.a"):
        test_no_module_imports_in_a_cycle()


def test_modeling_imports_only_itself_torch_and_transformers():
    """mmcoconut/modeling is what an export ships: every import is a sibling module (single dot), the standard
    library, or a package an export may require; importing it loads no other mmcoconut module."""
    allowed = {"torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "numpy", "PIL"}
    here = PKG / "modeling"
    for path in here.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module and (here / f"{node.module}.py").is_file(), \
                    f"{path.name}:{node.lineno}: relative import outside modeling/"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for n in names:
                    top = n.split(".")[0]
                    assert top in allowed or top in sys.stdlib_module_names or top == "__future__", \
                        f"{path.name}:{node.lineno}: imports {n}"
    code = ("import sys, mmcoconut.modeling; "
            "print(sorted(m for m in sys.modules if m.startswith('mmcoconut') and m != 'mmcoconut' "
            "and not m.startswith('mmcoconut.modeling')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_is_longer_than_a_reader_takes_in():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_package_dir_is_a_regular_package():
    """find_packages (setup.py) ships only dirs with an __init__.py: a dir of modules without one works from the
    checkout (namespace package) and is missing from the wheel."""
    bare = sorted(str(d.relative_to(ROOT)) for d in [PKG, *PKG.rglob("*")]
                  if d.is_dir() and any(d.glob("*.py")) and not (d / "__init__.py").is_file())
    assert not bare, f"package dirs without __init__.py (not in the wheel): {bare}"


def test_console_scripts_live_in_cli():
    """Every console script of pyproject.toml points into mmcoconut/cli/, and every cli module has a main()."""
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and all(t.startswith("mmcoconut.cli.") and t.endswith(":main") for t in scripts.values()), scripts
    for path in (PKG / "cli").glob("*.py"):
        if path.name != "__init__.py":
            assert any(isinstance(n, ast.FunctionDef) and n.name == "main"
                       for n in ast.parse(path.read_text(encoding="utf-8")).body), path.name
