"""The package's house: no import cycle, no module importing one of a layer above it, and every
module importable on its own (BUILD_NOTES.md, "The house").

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "jax_specsel"

# Bottom to top. A module may import modules of its own layer or of layers below, never above.
LAYERS = (
    ("foundations", ("jax_specsel.versions", "jax_specsel.validation", "jax_specsel.flat_params",
                     "jax_specsel.token_batches", "jax_specsel.models", "jax_specsel.models.registry",
                     "jax_specsel.models.attention", "jax_specsel.models.activations",
                     "jax_specsel.models.checkpoint", "jax_specsel.decoding.sampling",
                     "jax_specsel.bandit.rewards", "jax_specsel.data", "jax_specsel.data.tasks",
                     "jax_specsel.data.world", "jax_specsel.eval")),
    # Every other module of models/ is an architecture: a new one needs no line here.
    ("architectures", ("jax_specsel.models.t5", "jax_specsel.models.llama", "jax_specsel.models.*")),
    ("meshes and sharding rules", ("jax_specsel.sharding",)),
    ("the decoder protocol and Model", ("jax_specsel.models.interface",)),
    ("building models", ("jax_specsel.models.loading", "jax_specsel.memory",
                        "jax_specsel.models.hf_export", "jax_specsel.models.growth")),
    ("decoding", ("jax_specsel.decoding", "jax_specsel.decoding.*")),
    ("the bandit", ("jax_specsel.bandit", "jax_specsel.bandit.*")),
    ("data products and evaluation", ("jax_specsel.data.*", "jax_specsel.eval.*")),
    ("orchestration", ("jax_specsel.experiment", "jax_specsel.config_checks",
                       "jax_specsel.pipeline", "jax_specsel.demo")),
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
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
      targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names)
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
  raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_imports.py and to "
                       "BUILD_NOTES.md's 'The house'.")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
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
  upward = [f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
            for module, targets in sorted(_graph().items()) for target in sorted(targets)
            if _layer(target) > _layer(module)]
  assert not upward, "\n".join(upward)


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
  completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  failures = json.loads(completed.stdout.strip().splitlines()[-1])
  assert not failures, "\n\n".join(f"{name}:\n{trace}" for name, trace in failures.items())
