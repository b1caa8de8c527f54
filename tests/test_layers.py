"""spd_ext's packages form layers: a package imports its own modules and those of lower
layers only, so a feature can be read (and tested) without what is built on top of it.
The table is docs/design.md's diagram; a new package goes into both."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "spd_ext"

LAYERS: dict[str, int] = {
    "errors": 0, "backend_names": 0,
    "utils": 1, "__init__": 1,
    "ops": 2,
    "comm": 3,
    "launch": 4, "hooks": 4, "parallel_dims": 4,
    "tp": 5, "dp": 5, "data": 5,
    "staleness": 6,
    "deepspeed": 7,
    "train": 8,
    "experiments": 9, "bench": 9, "serve": 9,
    "cli": 10,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_by_package() -> dict[tuple[str, str], list[str]]:
    """(importer's package, imported package) -> the files that import it (function-local
    imports included: they are deferred, not absent)."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        importer = _package(".".join(rel.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name == "spd_ext" or name.startswith("spd_ext."):
                    found.setdefault((importer, _package(name)), []).append(str(rel))
    return found


def test_every_package_has_a_layer() -> None:
    packages = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
                if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert packages == set(LAYERS), "add the package to LAYERS and to docs/design.md"


def test_no_package_imports_a_layer_above_it() -> None:
    upward = {f"{a} -> {b}": files for (a, b), files in imports_by_package().items()
              if LAYERS[b] > LAYERS[a]}
    assert not upward, upward
