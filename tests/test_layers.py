"""The layer stack of ``src/gdmix`` (docs/design.md §5), checked on every import.

Every ``import``/``from ... import`` in every module, at any scope (function-local ones
too), is read with ``ast``; an import of a module in a higher layer, an import between
two coordinate kinds, or any import cycle fails the test with the edges that make it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "gdmix"

# Lowest first. A module belongs to the layer of its longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("gdmix", "gdmix.config", "gdmix.config_keys", "gdmix.config_spec", "gdmix.config_reference",
              "gdmix.metric_names", "gdmix.plan", "gdmix.schema", "gdmix.layout", "gdmix.storage",
              "gdmix.arrow_arrays", "gdmix.timing", "gdmix.lock", "gdmix.console")),
    ("math", ("gdmix.logistic", "gdmix.losses", "gdmix.task_metrics", "gdmix.sparse", "gdmix.shift", "gdmix.auc",
              "gdmix.calibration", "gdmix.joint", "gdmix.joint_newton", "gdmix.block_hessian",
              "gdmix.fixed_effect.objective", "gdmix.fixed_effect.solver", "gdmix.random_effect.newton",
              "gdmix.random_effect.row_scores", "gdmix.random_effect.newton_variances", "gdmix.random_effect.laplace",
              "gdmix.random_effect.scipy_solver", "gdmix.random_effect.vectorised")),
    ("platform", ("gdmix.spark", "gdmix.spark_cds", "gdmix.checks", "gdmix.bags", "gdmix.ntv",
                  "gdmix.ntv_arrow", "gdmix.priors", "gdmix.l2")),
    ("trainers", ("gdmix.fixed_effect", "gdmix.random_effect", "gdmix.deep")),
    ("kinds", ("gdmix.kinds",)),
    ("stages", ("gdmix.prepare", "gdmix.partition", "gdmix.accelerate", "gdmix.metrics", "gdmix.models",
                "gdmix.report", "gdmix.model_summary",
                "gdmix.publish", "gdmix.stages")),
    ("app", ("gdmix.cli", "gdmix.driver", "gdmix.grid", "gdmix.kfp", "gdmix.cds_recorder", "gdmix.data", "gdmix.api",
             "gdmix.starter")),
]
# The package's lazy export: ``gdmix/__init__.py`` (core) imports ``gdmix.api`` (app) only
# inside its module-level ``__getattr__``, i.e. when a user asks for ``gdmix.GLMix``. Importing
# ``gdmix.<module>`` runs ``__init__`` but never that function, so no layer loads the API
# through it. This edge, and only inside that function, is left out of the layer and cycle
# checks; test_the_package_imports_the_api_only_lazily checks that it stays so.
LAZY_EXPORTS = {"gdmix": {"gdmix.api"}}
KIND_PACKAGE = "gdmix.kinds"
KIND_SHARED = {"gdmix.kinds", "gdmix.kinds.base"}  # the registry and the protocol


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    if layer is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return layer


def _resolve(name: str) -> str | None:
    """The project module an import names (a name inside a module resolves to the module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, lazy: bool = False) -> set[str]:
    """Project modules imported by ``module``, at any scope; the ``LAZY_EXPORTS`` imported in
    its module-level ``__getattr__`` left out (``lazy``: only those)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    is_package = MODULES[module].name == "__init__.py"
    in_getattr = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
                  for n in ast.walk(f)}
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            # ``from gdmix import storage`` imports the module gdmix.storage
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            resolved = _resolve(t) if t.split(".")[0] == PACKAGE else None
            is_lazy = id(node) in in_getattr and resolved in LAZY_EXPORTS.get(module, ())
            if resolved and resolved != module and is_lazy == lazy:
                out.add(resolved)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in GRAPH.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_kinds_never_import_each_other():
    kind_modules = [m for m in MODULES if m.startswith(KIND_PACKAGE + ".") and m not in KIND_SHARED]
    assert len(kind_modules) >= 5
    crossing = [f"{m} imports {t}" for m in kind_modules for t in sorted(GRAPH[m])
                if t.startswith(KIND_PACKAGE) and t not in KIND_SHARED - {KIND_PACKAGE}]
    assert not crossing, "\n".join(crossing)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_at_any_scope():
    cycles = _cycles(GRAPH)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_are_for():
    """The checker itself: an upward edge, a cycle and a module outside every layer."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer_of("gdmix.config") < layer_of("gdmix.kinds.linear") < layer_of("gdmix.cli")
    assert layer_of("gdmix.fixed_effect.solver") < layer_of("gdmix.fixed_effect.stage")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("elsewhere.module")
    # function-local imports are seen
    assert "gdmix.random_effect.vectorised" in GRAPH["gdmix.random_effect.stage"]


def test_the_package_imports_the_api_only_lazily():
    """``gdmix`` reaches the API only through ``__getattr__``; no module imports the package
    itself (which would make ``gdmix.GLMix`` reachable from a lower layer); and importing
    the package or a core module does not load ``gdmix.api``, while asking for GLMix does."""
    import subprocess
    import sys

    lazy = {m: imports_of(m, lazy=True) for m in MODULES}
    assert {m: t for m, t in lazy.items() if t} == LAZY_EXPORTS
    assert GRAPH[PACKAGE] == set()
    assert not [m for m, targets in GRAPH.items() if PACKAGE in targets]
    code = ("import sys, gdmix, gdmix.config, gdmix.storage; assert 'gdmix.api' not in sys.modules; "
            "assert gdmix.GLMix.__module__ == 'gdmix.api' and 'gdmix.api' in sys.modules; "
            "assert gdmix.__file__.startswith(sys.argv[1]); print(gdmix.__version__)")
    env = {**__import__("os").environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code, str(SRC)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
