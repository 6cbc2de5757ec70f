"""The package layout: module-level imports between pegp_hf's modules form no cycle, and each layer imports only
the layers it is built on (read from the source, so a new import that breaks the architecture fails here)."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "pegp_hf"
# layer -> the pegp_hf layers it may import (itself included)
ALLOWED = {
    "utils": {"utils"},
    "core": {"core", "utils"},
    "tuners": {"tuners", "core", "utils"},
    "continual": {"continual", "core", "utils"},
    "backends": {"backends", "core"},
    "config": {"config", "backends", "continual"},
    "io": {"io", "continual", "core", "tuners", "utils"},
    "bracket": {"bracket", "core"},
    "training_capture": {"training_capture", "core"},
    "callback": {"callback", "backends", "bracket", "core", "tuners"},
    "trainer": {
        "trainer",
        "backends",
        "bracket",
        "config",
        "continual",
        "core",
        "io",
        "training_capture",
        "tuners",
        "utils",
    },
    "plots": {"plots", "continual"},
    "multimodal": {"multimodal", "continual", "tuners", "utils"},
    "language": {"language", "continual", "tuners"},
    "offline": {"offline", "language"},
    "experiments": {
        "experiments",
        "config",
        "continual",
        "language",
        "multimodal",
        "offline",
        "plots",
        "trainer",
        "tuners",
    },
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_time_imports(path: Path) -> set[str]:
    """pegp_hf modules imported when ``path`` is imported: module-level statements, not those under
    ``if TYPE_CHECKING:`` nor inside functions."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pegp_hf"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pegp_hf"))
    return found


MODULES = {module_name(path): load_time_imports(path) for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "package"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) != "package"))
def test_each_layer_imports_only_the_layers_below_it(module):
    wrong = {imported for imported in MODULES[module] if layer(imported) not in ALLOWED[layer(module)]}
    assert not wrong, f"{module} imports {wrong}"


def test_no_import_cycles():
    def resolve(name: str) -> str:  # a package import runs its __init__
        return name if name in MODULES else name.rsplit(".", 1)[0]

    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(MODULES[module]):
            target = resolve(imported)
            if state.get(target) == "open":
                raise AssertionError(" -> ".join([*trail, module, target]))
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [])


def test_the_core_needs_only_torch():
    """Importing any core module loads, besides the standard library and pegp_hf, torch alone (the pegp_hf modules
    it pulls in included)."""

    def source(module: str) -> Path:
        path = (PACKAGE.parent / Path(*module.split("."))).with_suffix(".py")
        return path if path.exists() else PACKAGE.parent / Path(*module.split(".")) / "__init__.py"

    def third_party(module: str) -> set[str]:
        names = set()
        for node in ast.parse(source(module).read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
        return names - set(sys.stdlib_module_names) - {"pegp_hf"}

    for module in (m for m in MODULES if layer(m) == "core"):
        loaded, todo = set(), [module]
        while todo:
            current = todo.pop()
            if current not in loaded:
                loaded.add(current)
                todo.extend(m if m in MODULES else m.rsplit(".", 1)[0] for m in MODULES[current])
        assert set().union(*(third_party(m) for m in loaded)) == {"torch"}, module
