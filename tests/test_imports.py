"""The package's house: no import cycle, no module importing one of a layer above it, and every
module importable on its own (BUILD_NOTES.md, "The house"); and no module taking another module's
private name.

The import graph is read from the source (every `import` statement, inside functions too), so a
cycle hidden behind a function-level import is found as well. The registry's lazy import of an
architecture module by its path (models/registry.py) is the one deliberate seam: it is no import
statement, and the architecture modules import the registry, never the other way round.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "jax_specsel"

# Bottom to top. A module may import modules of its own layer or of layers below, never above.
LAYERS = (
    (
        "foundations",
        (
            "jax_specsel.versions",
            "jax_specsel.validation",
            "jax_specsel.cpu_backend",
            "jax_specsel.flat_params",
            "jax_specsel.token_batches",
            "jax_specsel.models",
            "jax_specsel.models.registry",
            "jax_specsel.models.attention",
            "jax_specsel.models.activations",
            "jax_specsel.models.checkpoint",
            "jax_specsel.decoding.sampling",
            "jax_specsel.bandit.rewards",
            "jax_specsel.data",
            "jax_specsel.data.tasks",
            "jax_specsel.data.world",
            "jax_specsel.data.world_language",
            "jax_specsel.models.checkpoint_tensors",
            "jax_specsel.eval",
        ),
    ),
    # Every other module of models/ is an architecture: a new one needs no line here.
    (
        "architectures",
        ("jax_specsel.models.t5", "jax_specsel.models.llama", "jax_specsel.models.*"),
    ),
    ("meshes and sharding rules", ("jax_specsel.sharding",)),
    ("the decoder protocol and Model", ("jax_specsel.models.interface",)),
    (
        "building models",
        (
            "jax_specsel.models.loading",
            "jax_specsel.memory",
            "jax_specsel.models.hf_export",
            "jax_specsel.models.growth",
        ),
    ),
    # Every module of decoding/ (loop, request, programs, ...) and of bandit/ is in its layer.
    ("decoding", ("jax_specsel.decoding", "jax_specsel.decoding.*")),
    ("the bandit", ("jax_specsel.bandit", "jax_specsel.bandit.*")),
    ("data products and evaluation", ("jax_specsel.data.*", "jax_specsel.eval.*")),
    (
        "orchestration",
        (
            "jax_specsel.experiment",
            "jax_specsel.config_checks",
            "jax_specsel.pipeline",
            "jax_specsel.demo",
        ),
    ),
    ("public API", ("jax_specsel",)),
)


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  found = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def _imports(path: str, module: str, modules: dict) -> set[str]:
  """The package modules that `module` imports (statement by statement, functions included)."""
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  targets = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolved against the importing module's package
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
      # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
      targets.update(
          f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
      )
  return {t for t in targets if t in modules and t != module}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, name, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
  for index, (_, patterns) in enumerate(LAYERS):
    if module in patterns:  # an exact name wins over a pattern of a higher layer
      return index
  for index, (_, patterns) in enumerate(LAYERS):
    if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
      return index
  raise AssertionError(
      f"{module} has no layer: add it to LAYERS in tests/test_imports.py and to "
      "BUILD_NOTES.md's 'The house'."
  )


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        return stack[stack.index(target) :] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_graph_reader_sees_imports_inside_functions():
  graph = _graph()
  assert "jax_specsel.data.zoo" in graph["jax_specsel.demo"]  # imported inside run_demo
  assert graph["jax_specsel.models.registry"] == set()
  assert "jax_specsel.models.registry" in graph["jax_specsel.sharding"]


def test_no_import_cycle():
  cycle = _cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_one_of_a_layer_above_it():
  upward = [
      f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
      for module, targets in sorted(_graph().items())
      for target in sorted(targets)
      if _layer(target) > _layer(module)
  ]
  assert not upward, "\n".join(upward)


@pytest.mark.slow  # one interpreter per module; CI runs it with the slow set
def test_every_module_imports_on_its_own():
  """Each module imported first in a fresh package state: in one subprocess, every jax_specsel
  module is dropped from sys.modules before the next is imported (third-party modules stay
  loaded, which cannot hide a cycle inside the package, and saves a minute of jax imports)."""
  script = textwrap.dedent(f"""
      import importlib, json, sys, traceback
      failures = {{}}
      for name in {sorted(_modules())!r}:
        for loaded in [m for m in sys.modules if m == "{PACKAGE}" or m.startswith("{PACKAGE}.")]:
          del sys.modules[loaded]
        try:
          importlib.import_module(name)
        except Exception:
          failures[name] = traceback.format_exc(limit=4)
      print(json.dumps(failures))
  """)
  env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  completed = subprocess.run(
      [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  failures = json.loads(completed.stdout.strip().splitlines()[-1])
  assert not failures, "\n\n".join(f"{name}:\n{trace}" for name, trace in failures.items())


# Where the private-name rule applies: the package, the launches, the configs, the benchmarks and
# the tests (whose helper modules are imported by their bare names, tests/ being on sys.path).
PRIVATE_NAME_SCOPE = (PACKAGE, "launch", "configs", "benchmarks", "tests")


def _scope() -> tuple[list[str], set[str]]:
  """(every file the private-name rule covers, every name a project module is imported by)."""
  files, names = [], set(_modules())
  for top in PRIVATE_NAME_SCOPE:
    for folder, _, entries in os.walk(os.path.join(ROOT, top)):
      for entry in sorted(e for e in entries if e.endswith(".py")):
        path = os.path.join(folder, entry)
        files.append(path)
        if top != PACKAGE:
          dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          names.update((dotted.removesuffix(".__init__"), entry[:-3]))
  return sorted(files), names


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> list[str] | None:
  """["a", "b", "c"] for the expression a.b.c, None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  return [node.id] + parts if isinstance(node, ast.Name) else None


def _bound_modules(tree: ast.AST, path: str, modules: set[str]) -> tuple[dict, list]:
  """(local name -> the project module it names, `from m import _x` / `import m._x` lines)."""
  module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  bound, found = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] in modules and any(map(_private, parts[1:])):
          found.append((node.lineno, f"import {alias.name}"))
        if alias.asname and alias.name in modules:
          bound[alias.asname] = alias.name
        elif not alias.asname and parts[0] in modules:
          bound[parts[0]] = parts[0]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolved against the importing module's package
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
      if base not in modules:
        continue
      for alias in node.names:
        if _private(alias.name):
          found.append((node.lineno, f"from {base} import {alias.name}"))
        elif f"{base}.{alias.name}" in modules:
          bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    elif (
        isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Call)
        and (_dotted(node.value.func) or [""])[-1] == "import_module"
        and node.value.args
        and isinstance(node.value.args[0], ast.Constant)
        and node.value.args[0].value in modules
    ):
      bound[node.targets[0].id] = node.value.args[0].value  # m = importlib.import_module("...")
  return bound, found


def _private_uses(path: str, modules: set[str]) -> list[str]:
  """Every place in one file that takes a private name of another project module: imported
  (`from m import _x`), reached (`m._x`) or patched by name (`setattr(m, "_x", ...)`)."""
  tree = ast.parse(open(path).read(), path)
  bound, found = _bound_modules(tree, path, modules)

  def module_of(node) -> str | None:
    parts = _dotted(node)
    if not parts or parts[0] not in bound:
      return None
    name = ".".join([bound[parts[0]]] + parts[1:])
    return name if name in modules else None

  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _private(node.attr) and module_of(node.value):
      found.append((node.lineno, f"{module_of(node.value)}.{node.attr}"))
    elif (
        isinstance(node, ast.Call)
        and len(node.args) >= 2
        and module_of(node.args[0])
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _private(node.args[1].value)
    ):
      found.append((node.lineno, f"{module_of(node.args[0])}.{node.args[1].value} (by name)"))
  where = os.path.relpath(path, ROOT)
  return [f"{where}:{line}: {text}" for line, text in sorted(found)]


def test_the_private_name_reader_sees_every_form(tmp_path):
  source = textwrap.dedent("""
      import jax_specsel.decoding.loop as loop_lib
      from jax_specsel.decoding import generate as generate_lib
      from jax_specsel import _hidden
      from fake_models import _helper
      generate_by_path = importlib.import_module("jax_specsel.decoding.generate")
      import jax_specsel
      loop_lib._start()
      generate_lib._check_models()
      jax_specsel.decoding.loop._advance()
      setattr(loop_lib, "_round", None)
      generate_by_path._run_flat
      loop_lib.decode_prepared(), loop_lib.__name__, object()._fine
  """)
  path = tmp_path / "example.py"
  path.write_text(source)
  modules = {
      "jax_specsel",
      "jax_specsel.decoding",
      "jax_specsel.decoding.loop",
      "jax_specsel.decoding.generate",
      "fake_models",
  }
  found = [use.split(": ", 1)[1] for use in _private_uses(str(path), modules)]
  assert found == [
      "from jax_specsel import _hidden",
      "from fake_models import _helper",
      "jax_specsel.decoding.loop._start",
      "jax_specsel.decoding.generate._check_models",
      "jax_specsel.decoding.loop._advance",
      "jax_specsel.decoding.loop._round (by name)",
      "jax_specsel.decoding.generate._run_flat",
  ]


def test_no_module_takes_another_modules_private_name():
  """A name shared between modules is public (no leading underscore): a private one may change
  without notice, so no module imports, reaches into or patches another module's."""
  files, modules = _scope()
  uses = [use for path in files for use in _private_uses(path, modules)]
  assert not uses, "private names of other modules (make them public, or move them):\n" + "\n".join(
      uses
  )


MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def test_modules_and_functions_fit_the_house_bounds():
  """No module of the package, the launches or the benchmarks is over 450 lines, and no function
  over 60 (def line to last line, docstring included): a module does one job and a function fits
  on a screen. The tree is formatted (`make lint`), so these are the lines a reader sees."""
  over = []
  for folder in (PACKAGE, "launch", "benchmarks"):
    for directory, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in sorted(n for n in names if n.endswith(".py")):
        path = os.path.join(directory, name)
        source = open(path).read()
        relative = os.path.relpath(path, ROOT)
        if source.count("\n") > MAX_MODULE_LINES:
          over.append(f"{relative}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source, path)):
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
              over.append(f"{relative}:{node.lineno} {node.name}: {length} lines")
  assert not over, "over the house bounds (split by job):\n" + "\n".join(over)
