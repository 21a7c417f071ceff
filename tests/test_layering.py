"""Imports go one way: apps → jobs → pipeline → sampling, data → weights → models → root utilities.

Every module under ``instaflow_jax/`` is read with ``ast`` (nothing is imported): each static
``import`` / ``from … import`` statement, module-level or inside a function, is mapped to the layer
of the module it names, and an import of a higher layer (a smaller number) fails. A string given
to ``importlib`` is not an import: that is how the image-dataset registry finds the toy's data.

Layers, top (0) to bottom (6); a module may import its own layer and anything below:

0 apps: ``examples``, ``cli``, ``demo`` (the web demo is an app, like the CLIs).
1 jobs: ``train``, ``generate_triplets``, ``evaluation`` (FID / CLIP score on COCO).
2 pipeline: ``pipeline``, ``controlnet``, ``transfer``, and ``entry``: the one CLI entry helper
  (``error:`` + exit 2, log quieting) that jobs and apps share; it sits here, not with the root
  utilities, because its ``USER_ERRORS`` names ``pipeline.InsufficientMemoryError`` (and the
  models' and weights' errors). The package root ``instaflow_jax`` (its ``__init__`` re-exports
  the pipeline API and the research API of ``sampling``) counts as this layer when imported; as an
  importer it is exempt.
3 ``sampling``, ``data`` (data draws its noise with ``sampling.noise``).
4 ``weights``.
5 ``models``.
6 root utilities: every other module at the package root (``conventions``, ``parallel``, ``files``,
  ``image_io`` (PNG/GIF files; it uses ``files``), ``image_ops`` (canny; numpy only), ``progress``,
  ``phases``, ``precision``, ``config_utils``, ``text`` (the tokenizer loader; imports nothing of
  ours) …). A new subpackage must be added to ``LAYERS``.

``instaflow_jax/testing.py`` is test support: it may import anything, and no other module of the
package may import it. Import cycles between modules (counting only imports that run at import
time: module level, outside functions and ``if TYPE_CHECKING:``) fail too.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "instaflow_jax"

LAYERS = {
    "instaflow_jax.examples": 0,
    "instaflow_jax.cli": 0,
    "instaflow_jax.demo": 0,
    "instaflow_jax.train": 1,
    "instaflow_jax.generate_triplets": 1,
    "instaflow_jax.evaluation": 1,
    "instaflow_jax": 2,  # the package's __init__ (public API), as an imported module
    "instaflow_jax.entry": 2,
    "instaflow_jax.pipeline": 2,
    "instaflow_jax.controlnet": 2,
    "instaflow_jax.transfer": 2,
    "instaflow_jax.sampling": 3,
    "instaflow_jax.data": 3,
    "instaflow_jax.weights": 4,
    "instaflow_jax.models": 5,
}
ROOT_UTILITIES = 6
TEST_SUPPORT = "instaflow_jax.testing"
NAMES = ["apps", "jobs", "pipeline", "sampling/data", "weights", "models", "root utilities"]


def package_modules() -> dict[str, str]:
    """Dotted module name → file path, for every ``.py`` file of the package."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def layer(module: str) -> int:
    """The layer of a package module: the longest ``LAYERS`` prefix, else a root utility."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):  # the package itself only matches exactly
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    if module == PACKAGE:
        return LAYERS[PACKAGE]
    if len(parts) == 2:  # a module file at the package root
        return ROOT_UTILITIES
    raise AssertionError(f"{module} is in a subpackage missing from LAYERS in {__file__}")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(module: str, path: str, modules: dict[str, str]) -> list[tuple[str, int, bool]]:
    """(imported package module, line, runs at import time) for each import of ours in ``path``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    found = []

    def resolve(name: str) -> str | None:
        """The package module ``name`` names (its longest known prefix), or None if not ours."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
        return None

    def visit(node: ast.AST, at_import_time: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name)
                if target:
                    found.append((target, node.lineno, at_import_time))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from pkg import submodule`` names the submodule
                target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else None
                target = target or resolve(base)
                if target and (target, node.lineno, at_import_time) not in found:
                    found.append((target, node.lineno, at_import_time))
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import_time)
            return
        inner = at_import_time and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return found


def import_graph() -> tuple[dict[str, str], dict[str, list[tuple[str, int, bool]]]]:
    modules = package_modules()
    return modules, {module: imports(module, path, modules) for module, path in modules.items()}


def test_the_package_is_found() -> None:
    modules, graph = import_graph()
    assert {"instaflow_jax.pipeline", "instaflow_jax.cli.common", "instaflow_jax.models.unet"} <= set(modules)
    assert any(graph.values())


def test_imports_go_down_the_layers() -> None:
    modules, graph = import_graph()
    upward = []
    for module, found in sorted(graph.items()):
        if module in (PACKAGE, TEST_SUPPORT):  # the public API re-exports; test support uses anything
            continue
        for target, line, _ in found:
            if target in (TEST_SUPPORT, module):
                continue
            if layer(target) < layer(module):
                upward.append(
                    f"  {module} ({NAMES[layer(module)]}) → {target} ({NAMES[layer(target)]}), "
                    f"{os.path.relpath(modules[module], ROOT)}:{line}"
                )
    assert not upward, "upward imports (see the layers in tests/test_layering.py):\n" + "\n".join(upward)


def test_only_tests_import_the_test_support_module() -> None:
    modules, graph = import_graph()
    users = [
        f"  {module} → {TEST_SUPPORT}, {os.path.relpath(modules[module], ROOT)}:{line}"
        for module, found in sorted(graph.items())
        for target, line, _ in found
        if target == TEST_SUPPORT and module != TEST_SUPPORT
    ]
    assert not users, "instaflow_jax.testing is for tests; import weights.tiny instead:\n" + "\n".join(users)


def test_no_import_cycles() -> None:
    """Module-level imports between the package's modules form no cycle (Tarjan's components)."""
    _, graph = import_graph()
    edges = {
        module: sorted({t for t, _, now in found if now and t != module and t != PACKAGE})
        for module, found in graph.items()
        if module != PACKAGE
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def strongconnect(node: str) -> None:  # recursion depth ≤ the number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, []):
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            strongconnect(module)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(
        "  " + " ↔ ".join(cycle) for cycle in cycles
    )


def test_the_checker_sees_function_level_and_relative_imports(tmp_path) -> None:
    """The walker catches what the rules are about: an import inside a function, ``from pkg import
    module``, a relative import, and treats TYPE_CHECKING imports as not run at import time."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from instaflow_jax import files\n"
        "from .. import pipeline\n"
        "if TYPE_CHECKING:\n"
        "    from instaflow_jax.models import unet\n"
        "def f():\n"
        "    import instaflow_jax.train.trainer\n"
    )
    modules = package_modules()
    found = imports("instaflow_jax.data.mod", str(source), modules)
    assert found == [
        ("instaflow_jax.files", 2, True),
        ("instaflow_jax.pipeline", 3, True),
        ("instaflow_jax.models.unet", 5, False),
        ("instaflow_jax.train.trainer", 7, False),
    ]
    assert layer("instaflow_jax.data.mod") == 3 and layer("instaflow_jax.train.trainer") == 1
