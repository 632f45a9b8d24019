"""Ship the model's source code inside an export, so `trust_remote_code=True` works where mmcoconut is not installed.

Hugging Face loads remote code from flat `.py` files next to config.json and copies only the files reached by
single-dot relative imports (`from .latent import MMCoconut`, transformers.dynamic_module_utils). It refuses to load
a module whose (non-`try`) imports name a package that is not installed. `write_code(out_dir)` therefore:

1. starts from the entry modules (configuration/modeling/processing_mmcoconut.py, in this directory) and follows
   their package-relative imports (at any depth, e.g. `from ..model.latent import MMCoconut`) to every module they
   need; each is written flat into `out_dir` (`model/latent.py` -> `latent.py`; a clash of names -> `model_latent.py`)
   with its relative imports rewritten to the flat names;
2. a relative import inside `try: ... except ImportError:` is optional (e.g. the compiled kernels): it is replaced by
   `raise ImportError(...)` so the shipped code takes its pure-PyTorch fallback and the export stays self-contained;
3. an absolute import of a package outside SHIPPABLE (torch, transformers, ...) is allowed only inside a function
   (e.g. `import deepspeed` on the ZeRO-3 path): it becomes an `importlib.import_module(...)` call, which runs only
   when that code runs; at module level it is a BundleError naming the file and line.
Nothing here knows today's module list. In an export (flat files) the same walk copies the files as they are.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ENTRY_MODULES = ("configuration_mmcoconut", "modeling_mmcoconut", "processing_mmcoconut")
SHIPPABLE = {"torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "numpy", "PIL"}
HEADER = "# Shipped with an mmcoconut export (generated from mmcoconut/{src}); edit the mmcoconut sources instead.\n"


class BundleError(RuntimeError):
    pass


def _package_root(here: Path) -> Path:
    """The outermost directory above `here` reached through package directories (mmcoconut/ for hf/)."""
    root = here
    while (root / "__init__.py").is_file() and (root.parent / "__init__.py").is_file():
        root = root.parent
    return root


def _resolve(src: Path, level: int, module: str | None, root: Path) -> Path:
    base = src.parent
    for _ in range(level - 1):
        base = base.parent
    if module is None:
        raise BundleError(f"{src}: 'from {'.' * level} import ...' imports modules by name; write "
                          f"'from {'.' * level}<module> import <name>' so the export can ship it")
    target = base.joinpath(*module.split("."))
    for cand in (target.with_suffix(".py"), target / "__init__.py"):
        if cand.is_file():
            if root not in cand.resolve().parents and cand.resolve().parent != root:
                raise BundleError(f"{src}: relative import '{'.' * level}{module}' leaves the package")
            return cand.resolve()
    raise BundleError(f"{src}: relative import '{'.' * level}{module}' names no module ({target}.py)")


def _parents(tree: ast.AST) -> dict:
    out = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            out[child] = node
    return out


def _inside(node, parents, kinds) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, kinds):
            return True
    return False


def _in_try_importerror(node, parents) -> bool:
    """Inside the body of a `try` with an `except ImportError` (or ModuleNotFoundError / bare except) handler."""
    child = node
    while child in parents:
        parent = parents[child]
        if isinstance(parent, ast.Try) and child in parent.body:
            for h in parent.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if h.type is None or any(getattr(n, "id", None) in ("ImportError", "ModuleNotFoundError",
                                                                       "Exception") for n in names):
                    return True
        child = parent
    return False


def _imports(src: Path, root: Path):
    """(tree, parents, [(node, kind, target)]): kind 'rel' (shipped), 'optional' (relative, in try/except
    ImportError), 'lazy' (absolute non-shippable inside a function), 'ok' (stdlib / shippable / in try)."""
    tree = ast.parse(src.read_text(encoding="utf-8"), filename=str(src))
    parents = _parents(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if _in_try_importerror(node, parents):
                found.append((node, "optional", None))
            else:
                found.append((node, "rel", _resolve(src, node.level, node.module, root)))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            tops = {n.split(".")[0] for n in names}
            foreign = sorted(t for t in tops if t not in SHIPPABLE and t not in sys.stdlib_module_names
                             and t != "__future__")
            if not foreign or _in_try_importerror(node, parents):
                found.append((node, "ok", None))
            elif _inside(node, parents, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node, "lazy", None))
            else:
                raise BundleError(f"{src}:{node.lineno}: module-level import of {', '.join(foreign)}, which an "
                                  f"export cannot ship; import it inside the function that needs it, or in "
                                  f"try/except ImportError")
    return tree, found


def collect(here: Path | None = None) -> dict[Path, list]:
    """{module file: its imports} for the entry modules and every module they reach by relative imports."""
    here = Path(here or Path(__file__).parent).resolve()
    root = _package_root(here)
    todo = [(here / f"{m}.py").resolve() for m in ENTRY_MODULES]
    seen: dict[Path, list] = {}
    while todo:
        src = todo.pop()
        if src in seen:
            continue
        if not src.is_file():
            raise BundleError(f"{src}: missing (an entry module of the export)")
        _, found = _imports(src, root)
        seen[src] = found
        todo += [t for _, kind, t in found if kind == "rel" and t not in seen]
    return seen


def flat_names(files, here: Path | None = None) -> dict[Path, str]:
    """Module file -> flat module name in the export (basename; parent-prefixed where basenames clash)."""
    here = Path(here or Path(__file__).parent).resolve()
    root = _package_root(here)
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        stem = f.parent.name if f.name == "__init__.py" else f.stem
        by_stem.setdefault(stem, []).append(f)
    out = {}
    for stem, group in by_stem.items():
        for f in group:
            if len(group) == 1 or f.parent == here:
                out[f] = stem
            else:
                rel = f.relative_to(root).with_suffix("")
                out[f] = "_".join(p for p in rel.parts if p != "__init__")
    if len(set(out.values())) != len(out):
        raise BundleError(f"export module names clash: {sorted(out.values())}")
    return out


def _lazy_import(node) -> str:
    """`import a.b as c` / `from a.b import x as y` -> the same bindings through importlib (one line)."""
    imp = '__import__("importlib").import_module'
    parts = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.asname:
                parts.append(f'{a.asname} = {imp}("{a.name}")')
            else:
                top = a.name.split(".")[0]
                parts.append(f'{imp}("{a.name}"); {top} = {imp}("{top}")' if "." in a.name else
                             f'{top} = {imp}("{top}")')
    else:
        if any(a.name == "*" for a in node.names):
            raise BundleError(f"line {node.lineno}: 'from {node.module} import *' cannot be shipped")
        parts.append(f'_mod = {imp}("{node.module}")')
        parts += [f"{a.asname or a.name} = _mod.{a.name}" for a in node.names]
    return "; ".join(parts)


def _rewrite(src: Path, found: list, names: dict[Path, str]) -> str:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    edits = []
    for node, kind, target in found:
        if kind == "ok":
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][:node.col_offset]
        rest = lines[last][node.end_col_offset:].strip()
        if indent.strip() or (rest and not rest.startswith("#")):
            raise BundleError(f"{src}:{node.lineno}: put this import on its own line(s) so the export can rewrite it")
        if kind == "rel":
            text = ast.get_source_segment("".join(lines), node)
            new = re.sub(r"^from\s+\.+[\w.]*\s+import", f"from .{names[target]} import", text, count=1)
        elif kind == "optional":
            mod = "." * node.level + (node.module or "")
            new = f'raise ImportError("{mod} is not shipped with the export")  # optional: the fallback below runs'
        else:
            new = _lazy_import(node)
        edits.append((first, last, indent + new + "\n"))
    for first, last, text in sorted(edits, reverse=True):
        lines[first:last + 1] = [text]
    return "".join(lines)


def write_code(out_dir, here: Path | None = None) -> list[str]:
    """Write the shipped modules into `out_dir`; returns their file names (sorted)."""
    here = Path(here or Path(__file__).parent).resolve()
    root = _package_root(here)
    mods = collect(here)
    names = flat_names(mods, here)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src, found in mods.items():
        text = _rewrite(src, found, names)
        if not text.startswith(HEADER.split("(")[0]):
            text = HEADER.format(src=src.relative_to(root).as_posix() if root != here else src.name) + text
        (out / f"{names[src]}.py").write_text(text, encoding="utf-8")
        written.append(f"{names[src]}.py")
    check_code(out)
    return sorted(written)


def check_code(out_dir) -> None:
    """What transformers will do with the shipped files: every relative import resolves to a shipped file and every
    import it checks (outside try blocks) is stdlib or SHIPPABLE. Raises BundleError."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    out = Path(out_dir)
    for entry in ENTRY_MODULES:
        for f in [str(out / f"{entry}.py")] + get_relative_import_files(str(out / f"{entry}.py")):
            if not Path(f).is_file():
                raise BundleError(f"{out}: {Path(f).name} is imported by the shipped code but missing")
            foreign = [m for m in get_imports(f) if m not in SHIPPABLE and m not in sys.stdlib_module_names]
            if foreign:
                raise BundleError(f"{f}: transformers would require {foreign} to load this export")


__all__ = ["write_code", "collect", "flat_names", "BundleError", "ENTRY_MODULES", "SHIPPABLE"]
