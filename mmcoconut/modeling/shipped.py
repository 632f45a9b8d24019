"""The code an export ships: this folder, flat, so `trust_remote_code=True` works where mmcoconut is not installed.

Every module of mmcoconut/modeling/ imports only torch, transformers (and the standard library, PIL, numpy,
huggingface_hub) and its sibling modules with single-dot imports (`from .latent import MMCoconut`): the layout
transformers' remote-code loader expects. So an export is the folder's files copied next to config.json, unchanged
but for a header line. The same holds when an export saves itself again (its files are flat already).
"""
from __future__ import annotations

import sys
from pathlib import Path

ENTRY_MODULES = ("configuration_mmcoconut", "modeling_mmcoconut", "processing_mmcoconut")
SHIPPABLE = {"torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "numpy", "PIL"}
HEADER = "# Shipped with an mmcoconut export (from mmcoconut/modeling/{name}); edit the mmcoconut sources instead.\n"


class ShippingError(RuntimeError):
    pass


def shipped_files(here: Path | None = None) -> list[Path]:
    """The entry modules and every module they reach by relative imports (transformers' own walk), sorted."""
    from transformers.dynamic_module_utils import get_relative_import_files

    here = Path(here or Path(__file__).parent)
    files = set()
    for entry in ENTRY_MODULES:
        first = here / f"{entry}.py"
        try:
            files |= {first, *map(Path, get_relative_import_files(str(first)))}
        except (FileNotFoundError, OSError) as e:
            raise ShippingError(f"{here}: a shipped module imports a module that is missing ({e})") from None
    return sorted(files)


def check_code(out_dir) -> None:
    """What transformers checks when it loads the export: every import outside a try block is stdlib/SHIPPABLE."""
    from transformers.dynamic_module_utils import get_imports

    for f in shipped_files(Path(out_dir)):
        foreign = [m for m in get_imports(str(f)) if m not in SHIPPABLE and m not in sys.stdlib_module_names]
        if foreign:
            raise ShippingError(f"{f}: transformers would require {foreign} to load this export")


def write_code(out_dir, here: Path | None = None) -> list[str]:
    """Copy the shipped modules into `out_dir` (flat); returns their file names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for src in shipped_files(here):
        text = src.read_text(encoding="utf-8")
        if not text.startswith(HEADER.split("(")[0]):
            text = HEADER.format(name=src.name) + text
        (out / src.name).write_text(text, encoding="utf-8")
        names.append(src.name)
    check_code(out)
    return names
