"""The house: imports only go down, and no module grows past its one job.

protocol <- hf, families, regime <- runtime_device, runtime_edge <- export <- toy <- bench <- cli.
The two runtimes never import each other (the device never sees the edge's code). Nor do
they launch or name a higher package in code: a string naming ``covspec.<package>`` (a
``python -c`` or ``-m`` launch, an ``importlib`` name) counts as an import of it.
"""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import covspec

LAYERS = {"protocol": 0, "hf": 1, "families": 1, "regime": 1, "runtime_device": 2, "runtime_edge": 2,
          "export": 3, "toy": 4, "bench": 5, "cli": 6}
APART = {("runtime_device", "runtime_edge"), ("runtime_edge", "runtime_device")}
ROOT = pathlib.Path(covspec.__file__).parent
MAX_LINES = 400


def imported_packages(path: pathlib.Path) -> set[str]:
    """The covspec packages ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {name.split(".")[1] for name in names if name.startswith("covspec.") and name.count(".") >= 1}
    return found


def named_packages(source: str) -> set[str]:
    """The covspec packages the string literals of ``source`` name as modules (``"covspec.cli.main"``,
    ``"from covspec.cli.main import cli; cli()"``): imports a launch or ``importlib`` would make,
    hidden from ``imported_packages``. Docstrings are prose, not code, and are not read."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {name for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            for name in re.findall(r"\bcovspec\.([A-Za-z_]\w*)", node.value)}


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] in LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path):
    package = path.relative_to(ROOT).parts[0]
    for target in imported_packages(path) & LAYERS.keys():
        assert LAYERS[target] <= LAYERS[package], f"{package} imports the higher covspec.{target}"
        assert (package, target) not in APART, f"{package} imports covspec.{target}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_string_launches_a_higher_package(path):
    package = path.relative_to(ROOT).parts[0]
    for target in named_packages(path.read_text()) & LAYERS.keys():
        assert LAYERS[target] <= LAYERS[package], f"{package} names the higher covspec.{target} in a string"
        assert (package, target) not in APART, f"{package} names covspec.{target} in a string"


def test_launch_strings_are_seen_and_docstrings_are_not():
    source = '''"""Module prose may mention covspec.cli."""
import subprocess, sys

def start():
    """So may a function's: covspec.bench."""
    subprocess.Popen([sys.executable, "-c", "from covspec.cli.main import cli; cli()", "edge", "serve"])
    return "python -m covspec.toy.train", f"{sys.executable} -m covspec.bench"
'''
    assert named_packages(source) == {"cli", "toy", "bench"}


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


BLOCK_HIGHER = """
import importlib, importlib.abc, pkgutil, sys
higher = {higher!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in higher):
            raise ImportError(f"import of {{name}} halted: it sits above {package!r}")
sys.meta_path.insert(0, Block())
import covspec.{package} as package
for module in pkgutil.walk_packages(package.__path__, "covspec.{package}."):
    importlib.import_module(module.name)
print("ok")
"""


@pytest.mark.parametrize("package", ["protocol", "families", "runtime_device", "runtime_edge"])
def test_each_runtime_imports_with_the_higher_packages_blocked(package):
    higher = [f"covspec.{name}" for name, level in LAYERS.items()
              if level > LAYERS[package] or (package, name) in APART]
    result = subprocess.run([sys.executable, "-c", BLOCK_HIGHER.format(higher=higher, package=package)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
