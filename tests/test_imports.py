"""Imports flow one way (docs/architecture.md): every ``import`` in src/kvlab -- at module level or inside a
function -- goes to the same layer or a lower one, and every name imported from a kvlab module exists there.

Read with ``ast``, nothing is imported, so a function-level import that only runs on a GPU is checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Top to bottom. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("kvlab.cli", "kvlab.__main__")),
    ("commands", ("kvlab.commands",)),
    ("experiments", ("kvlab.experiments", "kvlab.vllm")),  # the vLLM plugin sits beside the experiments
    # the driver, its runtime (transformers' cache and attention function), `import kvlab`: the package's API
    ("generation", ("kvlab.generation", "kvlab.runtime", "kvlab")),
    ("models / methods", ("kvlab.models", "kvlab.methods")),
    ("attention", ("kvlab.attention",)),
    ("kernels", ("kvlab.kernels",)),
    ("cache", ("kvlab.cache",)),
    ("utilities", ("kvlab.errors", "kvlab.io", "kvlab.progress", "kvlab.machine", "kvlab.files")),
]
APART = ("kvlab.models", "kvlab.methods")  # one layer, and neither imports the other: models know no method
PLUGIN = "kvlab.vllm"
PLUGIN_IMPORTERS = ("kvlab.vllm", "kvlab.commands.serve")  # nothing else starts the plugin
PLUGIN_MAY_IMPORT = ("models / methods", "attention", "kernels", "cache", "utilities")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or (prefix != "kvlab" and module.startswith(prefix + "."))


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a kvlab module (the longest matching prefix decides)."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if _within(module, p)),
               default=None)
    assert best is not None, f"{module} is in no layer of tests/test_imports.py: place it (and docs/architecture.md)"
    return best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted((SRC / "kvlab").rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every kvlab import in a file (``names`` empty for ``import x``)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name == "kvlab" or a.name.startswith("kvlab.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "kvlab" or target.startswith("kvlab."):
                out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def targets(module: str, names: list[str]) -> list[str]:
    """The modules an import reaches: ``from kvlab.methods import snapkv`` reaches ``kvlab.methods.snapkv``."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs + ([module] if len(subs) < len(names) or not names else [])


def violations(modules: dict[str, Path]) -> list[str]:
    bad = []
    for me, path in modules.items():
        mine = layer_of(me)
        for line, module, names in imports_of(path):
            for target in targets(module, names):
                where = f"{path.relative_to(SRC)}:{line}: {me} ({LAYERS[mine][0]}) imports {target}"
                theirs = layer_of(target)
                sides = [next((a for a in APART if _within(m, a)), None) for m in (me, target)]
                if None not in sides and sides[0] != sides[1]:
                    bad.append(f"{where}: {APART[0]} and {APART[1]} stay apart (neither imports the other)")
                elif _within(target, PLUGIN) and not any(_within(me, p) for p in PLUGIN_IMPORTERS):
                    bad.append(f"{where}: only {', '.join(PLUGIN_IMPORTERS)} may import the vLLM plugin")
                elif _within(me, PLUGIN) and not _within(target, PLUGIN) and LAYERS[theirs][0] not in PLUGIN_MAY_IMPORT:
                    bad.append(f"{where} ({LAYERS[theirs][0]}): the plugin imports only "
                               f"{', '.join(PLUGIN_MAY_IMPORT)}")
                elif theirs < mine:
                    bad.append(f"{where} ({LAYERS[theirs][0]}): an upward import")
    return bad


def test_every_module_is_in_a_layer() -> None:
    assert len(MODULES) > 50
    for name in MODULES:
        layer_of(name)


def test_imports_flow_one_way() -> None:
    bad = violations(MODULES)
    assert not bad, "imports that go up a layer (docs/architecture.md, 'Layers'):\n" + "\n".join(bad)


def _defined(path: Path) -> set[str]:
    """Top-level names a module defines or imports (what ``from module import name`` can take)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names |= {(a.asname or a.name).split(".")[0] for a in sub.names}
                elif isinstance(sub, ast.Assign):
                    names |= {n.id for t in sub.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_every_imported_name_exists() -> None:
    """``from kvlab.x import y``: ``y`` is defined in ``kvlab.x`` or is its submodule (a moved function whose
    old import was left behind fails here, even where the import only runs on a GPU)."""
    missing = []
    for path in MODULES.values():
        for line, module, names in imports_of(path):
            if module not in MODULES:
                missing.append(f"{path.relative_to(SRC)}:{line}: no module {module}")
                continue
            defined = _defined(MODULES[module])
            missing += [f"{path.relative_to(SRC)}:{line}: {module} has no {n}" for n in names
                        if n != "*" and n not in defined and f"{module}.{n}" not in MODULES]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize(("importer", "imported", "why"), [
    ("kvlab.methods.cross_layer", "kvlab.experiments.memory_calc", "upward"),
    ("kvlab.kernels.dispatch", "kvlab.attention.reads", "upward"),
    ("kvlab.cache.store", "kvlab.errors", None),
    ("kvlab.experiments.runner", "kvlab.vllm.config", "plugin"),
    ("kvlab.vllm.config", "kvlab.experiments.runner", "plugin"),
    ("kvlab.commands.serve", "kvlab.vllm.config", None),
    ("kvlab.methods.low_rank", "kvlab.models.builtin", "apart"),
    ("kvlab.models.shaping", "kvlab.methods.base", "apart"),
    ("kvlab.methods.low_rank", "kvlab.files", None),
    ("kvlab.runtime", "kvlab.methods.base", None),
    ("kvlab.methods.base", "kvlab.runtime", "upward"),
])
def test_the_rules_catch_what_they_should(tmp_path: Path, importer: str, imported: str, why: str | None) -> None:
    """The checker itself: an upward import and a plugin import from outside fail, a downward one passes."""
    path = tmp_path / "src" / Path(*importer.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True)
    path.write_text(f"def f():\n    from {imported} import x\n")
    global SRC
    saved, SRC = SRC, tmp_path / "src"
    try:
        bad = violations({importer: path})
    finally:
        SRC = saved
    assert bool(bad) == (why is not None), bad
    if why:
        assert why in bad[0]


def test_no_import_cycles() -> None:
    """No module reaches itself through imports, type-only ones (``if TYPE_CHECKING:``) included: a circle is
    two modules that are really one, or a piece that belongs below both."""
    graph = {me: {t for _, module, names in imports_of(path) for t in targets(module, names)
                  if t in MODULES and t != me and not (path.name == "__init__.py" and _within(t, me))}
             for me, path in MODULES.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
