"""The package's shape: one-way layers, no cycle, small modules and classes, no private reads.

Built from the source with :mod:`ast` (nothing is imported), so a lazy import inside a function
counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "segment"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 350

#: Layers from the top; a module may import its own layer and those below, never one above.
#: A name matches itself and everything under it (``segment.io`` holds ``segment.io.read``).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("segment.cli", "segment.commands", "segment.__main__")),
    ("batch", ("segment.batch", "segment.resume", "segment.discovery", "segment.summary")),
    ("api", ("segment.api", "segment.result", "segment.volumes", "segment.scan_masks",
             "segment.evaluate", "segment.evaluate_fractions", "segment.qc", "segment.qc_plot",
             "segment._font", "segment._png", "segment.pipelines", "segment.samples")),
    ("image model", ("segment.mixture", "segment.spatial", "segment._spatial", "segment._sweeps",
                     "segment.partial_volume", "segment._pve", "segment._estimator")),
    ("EM engine", ("segment._em", "segment._initialise", "segment._chunked", "segment._kmeans",
                   "segment._scheduler", "segment.em")),
    ("kernels", ("segment._kernels", "segment._estep", "segment.kernels")),
    ("base", ("segment", "segment.exceptions", "segment._validation", "segment._options",
              "segment._reading", "segment.io", "segment.masking", "segment.naming",
              "segment.sidecar")),
]  # fmt: skip


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()
#: Compiled modules (no .py file) that are modules all the same.
COMPILED = {f"segment.{p.name.split('.')[0]}" for p in PACKAGE.glob("*.c")}


def is_module(name: str) -> bool:
    return name in MODULES or name in COMPILED


def layer_of(module: str) -> int:
    """Index of ``module``'s layer in :data:`LAYERS` (0 is the top)."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} has no layer; add it to LAYERS in {__file__}")
    return best[0]


@functools.cache
def imports(module: str) -> tuple[tuple[str, str | None, int], ...]:
    """``(imported module, imported name or None, line)`` for every import of the package's own
    modules in ``module``, at any depth."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level \
                else node.module  # fmt: skip
            if not target or not (target == "segment" or target.startswith("segment.")):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if is_module(full):
                    found.append((full, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "segment" or alias.name.startswith("segment."):
                    found.append((alias.name, None, node.lineno))
    return tuple(found)


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m) if t != m} for m in MODULES}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def subpackage(module: str) -> str | None:
    """The sub-package of ``segment`` that holds ``module`` (``segment.io`` for
    ``segment.io.read`` and for ``segment.io`` itself), or None for a top-level module."""
    unit = ".".join(module.split(".")[:2])
    return unit if unit != module or MODULES.get(unit, Path()).name == "__init__.py" else None


def same_subpackage(a: str, b: str) -> bool:
    """Both in one sub-package (e.g. ``segment.io``): a unit whose ``__init__`` is its public
    face, inside which modules share private helpers. The top-level package is not such a unit."""
    return subpackage(a) is not None and subpackage(a) == subpackage(b)


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


#: The only imports allowed against the layer order, each with its reason.
ALLOWED_UPWARD = {
    # GaussianMixtureEM.fit_image: a deprecated shim for scripts written before the image model
    # had its own class; it imports the class inside the method and says to use it instead.
    ("segment.mixture", "segment.spatial.model"),
}


def test_no_upward_import():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target) < layer_of(module) and (module, target) not in ALLOWED_UPWARD:
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")  # fmt: skip
    assert upward == []


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if target == "segment" or target not in edges or (module, target) in ALLOWED_UPWARD:
                continue  # the package's lazy facade; compiled modules import nothing
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_api_and_batch_do_not_import_each_other_both_ways():
    edges = graph()
    assert "segment.batch" not in edges["segment.api"]


def test_no_module_reads_another_modules_private_names():
    reads = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}  # local name -> package module it is bound to
        for target, name, line in imports(module):
            if name is not None and is_private(name) and target != module \
                    and not same_subpackage(module, target):  # fmt: skip
                reads.append(f"{module}:{line} imports {target}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                for alias in node.names:
                    for target, name, _ in imports(module):
                        if name is None and target.rsplit(".", 1)[-1] == alias.name:
                            aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and is_private(node.attr)
                    and not is_module(f"{aliases[node.value.id]}.{node.attr}")
                    and not same_subpackage(module, aliases[node.value.id])):  # fmt: skip
                reads.append(f"{module}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert reads == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_class_sizes(module):
    path = MODULES[module]
    text = path.read_text(encoding="utf-8")
    n_lines = len(text.splitlines())
    assert n_lines <= MAX_MODULE_LINES, f"{path.name}: {n_lines} lines > {MAX_MODULE_LINES}"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {node.name}: {size} lines > {MAX_CLASS_LINES}"


def test_the_checks_see_a_violation(tmp_path):
    """The graph helpers find an upward import and a cycle when there is one."""
    assert layer_of("segment.commands.run") == 0 and layer_of("segment.io.read") == len(LAYERS) - 1
    assert layer_of("segment.spatial.bias") == 3 and layer_of("segment._em") == 4
    assert ("segment.api", "make_estimator", 1) in [
        (t, n, 1) for t, n, _ in imports("segment.commands.options")
    ]
