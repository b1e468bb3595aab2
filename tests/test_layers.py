"""The flow in the imports: no module imports from a layer above its own, nor another module's private names.

The layers, bottom to top (docs/concepts.md draws the same flow): the core values and readers; model
families, hardware, profiles and the compression arithmetic; partition algorithms; the plan and its
search; the cost model; reports, exports and audits; the torch edges that apply compression and
deploy; the commands and the CLI; the package face (lazy verbs) on top. A module may import from its
own layer and those below; within one package (``cachefit.plan.*``) it may import its siblings.
Lazy imports inside functions count too: the walk reads every import statement in the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cachefit

ROOT = Path(cachefit.__file__).resolve().parent

# (module prefix, layer); the longest prefix that matches a module decides its layer
LAYERS: tuple[tuple[str, int], ...] = (
    ("cachefit.errors", 0), ("cachefit.version", 0), ("cachefit.limits", 0),
    ("cachefit.units", 1), ("cachefit.sizes", 1), ("cachefit.files", 1),
    ("cachefit.families", 2), ("cachefit.hardware", 2), ("cachefit.profile", 2), ("cachefit.compress.techniques", 2),
    ("cachefit.compress.quality_profile", 2),
    ("cachefit.partition", 3),
    ("cachefit.plan", 4),
    ("cachefit.cost", 5),
    ("cachefit.audit", 6), ("cachefit.report", 6), ("cachefit.export", 6),
    ("cachefit.compress", 7), ("cachefit.deploy", 7),
    ("cachefit.commands", 8), ("cachefit.cli", 8),
    ("cachefit", 9),
)


def _layer(module: str) -> tuple[str, int]:
    matches = [(p, n) for p, n in LAYERS if module == p or module.startswith(p + ".")]
    return max(matches, key=lambda m: len(m[0]))


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(imported module, names taken from it) for every import of a cachefit module in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "cachefit" or target.startswith("cachefit."):
                found.append((target, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Import):
            found += [(a.name, ()) for a in node.names if a.name.startswith("cachefit")]
    return found


def test_every_module_has_a_layer():
    assert all(_layer(name) for name in _modules())


def test_no_import_runs_against_the_flow():
    upward = []
    for name, path in _modules().items():
        here, level = _layer(name)
        for target, _ in _imports(name, path):
            there, target_level = _layer(target)
            if target_level > level and there != here:
                upward.append(f"{name} (layer {level}) imports {target} (layer {target_level})")
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name, path in _modules().items():
        for target, names in _imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                offenders.append(f"{name} imports {', '.join(private)} from {target}")
    assert not offenders, "\n".join(offenders)


def test_the_walk_sees_an_upward_import():
    # the checker itself: a made-up plan module importing the CLI is caught
    here, level = _layer("cachefit.plan.search")
    there, target_level = _layer("cachefit.cli")
    assert target_level > level and there != here
