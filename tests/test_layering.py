"""The folder tree is the architecture: imports only go down to the layers below, the
solver and the cost model never need jax, and no modules import each other in a cycle.

The import graph is read from the source of the installed package (every ``import`` and
``from … import``, inside functions too), so a lazy import cannot hide a broken rule.
"""
from __future__ import annotations

import ast
import graphlib
import importlib
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import autoshard

# What each part of the package may import besides itself (ARCHITECTURE.md's table):
# lower layers never import upper ones, and the runtime never imports the ILP.
_BASE = ("autoshard.cost_model", "autoshard.errors", "autoshard.ir")
MAY_IMPORT = {
    "autoshard.cost_model": (),
    "autoshard.ilp": ("autoshard.cost_model",),
    "autoshard.errors": (),
    "autoshard.ir": (),
    "autoshard.runtime": ("autoshard.cost_model", "autoshard.ir"),
    "autoshard.mesh": ("autoshard.cost_model",),
    "autoshard.planning_gc": (),
    "autoshard.methods": ("autoshard.cost_model", "autoshard.ir"),
    "autoshard.plan": _BASE + ("autoshard.methods", "autoshard.runtime"),
    "autoshard.intra": _BASE + ("autoshard.ilp", "autoshard.methods", "autoshard.plan"),
    "autoshard.pipeline": _BASE + ("autoshard.ilp", "autoshard.methods", "autoshard.plan",
                                   "autoshard.runtime", "autoshard.intra"),
    "autoshard.distributed": _BASE + ("autoshard.plan", "autoshard.runtime"),
    "autoshard.calibration": _BASE + ("autoshard.mesh",),
    "autoshard.kernel_calibration": _BASE + ("autoshard.mesh", "autoshard.calibration",
                                             "autoshard.intra"),
    "autoshard.call_errors": _BASE + ("autoshard.runtime", "autoshard.pipeline"),
    "autoshard.api": _BASE + ("autoshard.call_errors", "autoshard.ilp", "autoshard.runtime", "autoshard.mesh",
                              "autoshard.planning_gc", "autoshard.methods", "autoshard.plan", "autoshard.intra",
                              "autoshard.pipeline", "autoshard.distributed"),
    "autoshard.cli": _BASE + ("autoshard.mesh", "autoshard.methods", "autoshard.plan",
                              "autoshard.api", "autoshard.calibration",
                              "autoshard.kernel_calibration"),
    "autoshard.__main__": ("autoshard.cli",),
}
# Third-party packages a layer may import (the standard library is always allowed);
# layers not listed may import any declared dependency.
THIRD_PARTY = {
    "autoshard.cost_model": {"numpy"},
    "autoshard.ilp": {"numpy", "scipy", "ortools", "highspy"},
}


def _group(module: str) -> str | None:
    """The part of the package (a key of ``MAY_IMPORT``) that ``module`` belongs to."""
    parts = [g for g in MAY_IMPORT if module == g or module.startswith(g + ".")]
    return max(parts, key=len) if parts else None


def package_sources() -> dict[str, str]:
    """Every module of the installed package (subpackages mapped from other folders
    included) → its source text."""
    sources = {}
    todo = [autoshard]
    for name in ("cost_model", "ilp", "runtime"):
        todo.append(importlib.import_module(f"autoshard.{name}"))
    seen = set()
    while todo:
        package = todo.pop()
        if package.__name__ in seen:
            continue
        seen.add(package.__name__)
        sources[package.__name__] = Path(package.__file__).read_text()
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.ispkg:
                todo.append(importlib.import_module(info.name))
            else:
                spec = importlib.util.find_spec(info.name)
                sources[info.name] = Path(spec.origin).read_text()
    return sources


def imports(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules ``module`` imports (absolute names; ``from pkg import sub`` names the
    submodule when ``pkg.sub`` is one of ``known``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
    return found


def layer_violations(sources: dict[str, str], packages: set[str]) -> list[str]:
    """Every broken rule of the modules in ``sources`` (name → source text; ``packages``
    names those that are packages): upward imports, third-party imports a layer may not
    make, imports of the lazy package root's own names, and import cycles."""
    known = set(sources)
    problems = []
    graph: dict[str, set[str]] = {}
    for module, source in sorted(sources.items()):
        targets = imports(module, source, module in packages, known)
        graph[module] = {t for t in targets if t in known}
        group = _group(module)
        for target in sorted(targets):
            top = target.split(".")[0]
            if top == "autoshard":
                other = _group(target)
                if target == "autoshard" or other == group or group is None:
                    continue  # the lazy root (``__version__``) imports nothing itself
                if other not in MAY_IMPORT[group]:
                    problems.append(f"{module} imports {target}, which {group} may not "
                                    f"import (it may import {list(MAY_IMPORT[group])})")
            elif top not in sys.stdlib_module_names and top != "__future__":
                allowed = THIRD_PARTY.get(_group(module) or "")
                if allowed is not None and top not in allowed:
                    problems.append(f"{module} imports {target}; its layer may import "
                                    f"only {sorted(allowed)} and the standard library")
    root = sources.get("autoshard", "")
    if any(t.startswith("autoshard.") for t in imports("autoshard", root, True, known)):
        problems.append("autoshard/__init__.py imports a submodule (public names must "
                        "load lazily)")
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        problems.append(f"import cycle: {' -> '.join(err.args[1])}")
    return problems


def test_the_package_keeps_its_layers():
    sources = package_sources()
    assert {"autoshard.ilp", "autoshard.intra.planner", "autoshard.runtime.sharded",
            "autoshard.plan.html.render"} <= set(sources)
    unplaced = [m for m in sources if _group(m) is None and m != "autoshard"]
    assert not unplaced, f"modules in no part (add them to MAY_IMPORT): {unplaced}"
    packages = {m for m in sources if m == "autoshard" or
                importlib.util.find_spec(m).submodule_search_locations is not None}
    assert layer_violations(sources, packages) == []


def test_no_module_is_longer_than_600_lines():
    long = {m: s.count("\n") for m, s in package_sources().items() if s.count("\n") > 600}
    assert not long, f"split these modules: {long}"


@pytest.mark.parametrize("sources,expected", [
    # the solver reaching for jax
    ({"autoshard.ilp._x": "import jax\n"}, "autoshard.ilp._x imports jax"),
    # the runtime reaching into the ILP
    ({"autoshard.runtime.x": "from autoshard import ilp\n", "autoshard.ilp": ""},
     "autoshard.runtime.x imports autoshard.ilp, which autoshard.runtime may not"),
    # a relative import upward
    ({"autoshard.intra.x": "from ..pipeline import y\n", "autoshard.pipeline.y": ""},
     "autoshard.intra.x imports autoshard.pipeline.y, which autoshard.intra may not"),
    # two modules of one layer importing each other, one of them lazily
    ({"autoshard.plan.a": "from .b import f\n",
      "autoshard.plan.b": "def f():\n    from .a import g\n"}, "import cycle"),
    # an eager root
    ({"autoshard": "from .api import parallelize\n", "autoshard.api": ""},
     "must load lazily"),
])
def test_a_broken_rule_is_reported(sources, expected):
    problems = layer_violations(sources, {"autoshard"} & set(sources))
    assert any(expected in p for p in problems), problems


def test_solver_and_cost_model_import_without_jax(tmp_path):
    script = textwrap.dedent("""
        import sys

        class NoJax:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib"):
                    raise ImportError(f"{name} is blocked in this test")

        sys.meta_path.insert(0, NoJax())
        import numpy as np
        import autoshard
        from autoshard import cost_model, ilp
        request = ilp.IntraOpRequest(node_costs=(np.array([2.0, 1.0]), np.array([1.0, 3.0])),
                                     edges=(ilp.EdgeCost(0, 1, [[0.0, 5.0], [5.0, 0.0]]),))
        # worked out: (1, 0) costs 1 + 1 + 5 = 7, (0, 0) 2 + 1 = 3, (1, 1) 1 + 3 = 4
        assert ilp.solve_intra_op(request).choices == (0, 0)
        model = cost_model.MeshCostModel(cost_model.cluster_preset("h100-80gb"), (2, 4))
        assert model.all_reduce(2**20, (1,)) > 0
        assert autoshard.__version__
        assert not any(m.split(".")[0] in ("jax", "jaxlib") for m in sys.modules)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_public_names_resolve_to_what_they_name():
    for name in autoshard.__all__:
        value = getattr(autoshard, name)
        assert not isinstance(value, type(autoshard)), f"autoshard.{name} is a module"
    # importing every module must not shadow a public name with a submodule
    for module in package_sources():
        if not module.endswith("__main__"):  # that one runs the command line
            importlib.import_module(module)
    assert callable(autoshard.calibrate) and callable(autoshard.parallelize)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        autoshard.nope  # noqa: B018
