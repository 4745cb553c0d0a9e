"""Imports run one way: the core depends on nothing above it; client, server and plugins depend on
the core and never on each other's insides.

Layers, by installed name (the folder in brackets):

* core     `dataselect`, `dataselect.*` [core/]: may import nothing of client, server or plugins;
* plugins  `dataselect.plugins.*` [plugins/]: may not import client or server;
* client   `dataselect.client.*` [client/]: may not import the server;
* server   `dataselect.server.*` [server/]: may not import the client.

The rule holds for module-level imports (found with `ast`; `if TYPE_CHECKING:` blocks excepted).
Imports inside functions are counted too: an import belongs inside a function only when it is an
optional dependency (an extra in pyproject.toml), or when a command-line module defers a module
that would load torch or grpc, so that `--help` and argument errors stay fast. Any other import
inside a function (usually one that dodges an import cycle) must be in KNOWN_DEFERRED, which may
only shrink. `python tests/test_layering.py` prints the counts and the lists.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: folder -> installed package name
PACKAGES = {"core": "dataselect", "client": "dataselect.client", "server": "dataselect.server",
            "plugins": "dataselect.plugins"}
#: layer -> the layers it must not import at module level
FORBIDDEN = {"core": {"client", "server", "plugins"}, "plugins": {"client", "server"},
             "client": {"server"}, "server": {"client"}}
#: The extras of pyproject.toml: imported where used, so the package works without them.
OPTIONAL = {"matplotlib", "lightning"}
#: Third-party packages that make a command noticeably slower to start (dataselect.v1 pulls in protobuf).
HEAVY = {"torch", "torchvision", "grpc", "grpc_health", "grpc_reflection", "google", "numpy", "PIL", "tqdm",
         "matplotlib", "lightning"}
#: Modules that define console commands: they may defer heavy modules until a command runs.
COMMAND_MODULES = {"dataselect.client.main", "dataselect.client.cli", "dataselect.server.cli"}

#: Module-level imports that break the layering today, each with the change that removes it.
#: The test fails when one is fixed and still listed, so the list stays true.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

#: Imports inside functions that are neither optional dependencies nor start-up deferrals in a
#: command module, as "folder/file.py: module". What is left defers a slow import until it is used:
#: torchvision (about a second) in the model and data set modules, which every registry lookup or
#: training run loads, torch's private serialisation of exported programs, and torch's FLOP counter.
#: Do not add to this list.
KNOWN_DEFERRED = {
    "core/exported.py: torch._export.serde",
    "core/exported.py: torch._export.serde.schema",
    "core/exported.py: torch._export.serde.serialize",
    "core/models.py: torchvision.models",
    "core/proxy.py: torch.utils.flop_counter",
    "plugins/builtin_datasets.py: torchvision",
}


@dataclass
class Module:
    name: str
    path: str  # "folder/file.py"
    top: list[tuple[int, str]] = field(default_factory=list)  # (line, imported module)
    inner: list[tuple[int, str]] = field(default_factory=list)


def layer(name: str) -> str | None:
    if name == "dataselect.v1" or name.startswith("dataselect.v1."):
        return "proto"
    for part in ("client", "server", "plugins"):
        if name == f"dataselect.{part}" or name.startswith(f"dataselect.{part}."):
            return part
    if name == "dataselect" or name.startswith("dataselect."):
        return "core"
    return None


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def scan() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join([package, *(parts[:-1] if is_package else parts)])
            found[name] = Module(name, path.relative_to(REPO).as_posix())
            found[name].is_package = is_package  # type: ignore[attr-defined]
    for mod in found.values():
        tree = ast.parse((REPO / mod.path).read_text(), mod.path)

        def resolve(node: ast.ImportFrom) -> list[str]:
            base = node.module or ""
            if node.level:
                here = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]  # type: ignore[attr-defined]
                here = here[:len(here) - node.level + 1]
                base = ".".join(here + ([base] if base else []))
            # `from dataselect import plugins` imports the module dataselect.plugins (and the
            # generated code is all modules: `from dataselect.v1 import selection_pb2_grpc`)
            subs = [f"{base}.{a.name}" for a in node.names
                    if f"{base}.{a.name}" in found or layer(base) == "proto"]
            return subs + ([base] if len(subs) < len(node.names) else [])

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    targets = resolve(child)
                else:
                    visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
                    continue
                for target in targets:
                    (mod.inner if in_function else mod.top).append((child.lineno, target))

        visit(tree, False)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def heavy_modules(modules: dict[str, Module]) -> set[str]:
    """Our modules whose import (module-level imports, followed through our own modules and their
    parent packages) loads a HEAVY third-party package or the generated protobuf code."""
    def direct_heavy(mod: Module) -> bool:
        return any(t.split(".")[0] in HEAVY or layer(t) == "proto" for _, t in mod.top)

    heavy = {name for name, mod in modules.items() if direct_heavy(mod)}
    changed = True
    while changed:
        changed = False
        for name, mod in modules.items():
            if name in heavy:
                continue
            deps = {p for _, t in mod.top for p in _parents(t) if p in modules} | \
                   {p for p in _parents(name)[:-1] if p in modules}
            if deps & heavy:
                heavy.add(name)
                changed = True
    return heavy


def violations(modules: dict[str, Module]) -> dict[tuple[str, str], int]:
    """(file, imported module) -> line, for module-level imports that cross the layering."""
    out = {}
    for mod in modules.values():
        for line, target in mod.top:
            if layer(target) in FORBIDDEN.get(layer(mod.name), ()):
                out.setdefault((mod.path, target), line)
    return out


def in_function_imports(modules: dict[str, Module]) -> dict[str, list[tuple[str, int, str]]]:
    """Every import inside a function, as (file, line, module), by kind: optional, startup, deferred."""
    heavy = heavy_modules(modules)
    kinds: dict[str, list[tuple[str, int, str]]] = {"optional": [], "startup": [], "deferred": []}
    for mod in modules.values():
        for line, target in mod.inner:
            top = target.split(".")[0]
            if top in OPTIONAL:
                kind = "optional"
            elif mod.name in COMMAND_MODULES and (top in HEAVY or layer(target) == "proto"
                                                  or any(p in heavy for p in _parents(target))):
                kind = "startup"
            else:
                kind = "deferred"
            kinds[kind].append((mod.path, line, target))
    return kinds


# -- tests -------------------------------------------------------------------------------------------
def test_the_scan_sees_every_layer_and_resolves_relative_and_from_imports():
    modules = scan()
    assert {layer(name) for name in modules} == {"core", "client", "server", "plugins"}
    assert "dataselect.server.cli" in modules and "dataselect.engine" in modules
    # server/cli.py defers the app and the engine into main(): seen as inner imports, not top-level
    cli = modules["dataselect.server.cli"]
    assert "dataselect.server.app" in {t for _, t in cli.inner}
    assert "dataselect.server.app" not in {t for _, t in cli.top}
    assert "dataselect.engine" in heavy_modules(modules)
    assert "dataselect.errors" not in heavy_modules(modules)


def test_module_level_imports_follow_the_layering():
    found = violations(scan())
    new = {k: line for k, line in found.items() if k not in KNOWN_VIOLATIONS}
    assert not new, "imports that cross the layering (see this file's docstring):\n" + "\n".join(
        f"  {path}:{line} imports {target}" for (path, target), line in sorted(new.items()))
    fixed = set(KNOWN_VIOLATIONS) - set(found)
    assert not fixed, f"fixed, so remove them from KNOWN_VIOLATIONS: {sorted(fixed)}"


def test_imports_inside_functions_are_optional_dependencies_or_start_up_deferrals():
    deferred = in_function_imports(scan())["deferred"]
    new = sorted({f"{path}: {target}" for path, _, target in deferred} - KNOWN_DEFERRED)
    assert not new, ("imports inside functions that are neither optional dependencies nor start-up deferrals "
                     "in a command module; import them at module level (break the cycle if there is one):\n  "
                     + "\n  ".join(new))


def test_each_command_defers_one_import_its_own_implementation():
    """A command module declares its options with click alone; the command's body imports its implementation
    once (so --help and argument errors need no torch), and nothing else is deferred there."""
    startup = in_function_imports(scan())["startup"]
    assert sorted((path, target) for path, _, target in startup) == [
        ("client/cli.py", "dataselect.client.train"),
        ("client/main.py", "dataselect.client.compare"),
        ("server/cli.py", "dataselect.server.app"),
    ]


def test_the_layering_rule_catches_a_crossing_import(tmp_path, monkeypatch):
    """The checker itself: a core module importing the client is reported (guards against a scan that
    silently finds nothing)."""
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "core" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from dataselect.client import session\n"
        "if TYPE_CHECKING:\n    from dataselect.server import app\n"
        "def f():\n    import dataselect.server.app\n    import matplotlib\n")
    (tmp_path / "client" / "session.py").write_text("import torch\n")
    (tmp_path / "client" / "rel.py").write_text("from ..server import app\nfrom . import session\n")
    (tmp_path / "server" / "app.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    modules = scan()
    assert violations(modules) == {("core/bad.py", "dataselect.client.session"): 2,
                                   ("client/rel.py", "dataselect.server.app"): 1}
    kinds = in_function_imports(modules)
    assert kinds["optional"] == [("core/bad.py", 7, "matplotlib")]
    assert kinds["deferred"] == [("core/bad.py", 6, "dataselect.server.app")]
    # torch reaches dataselect.bad and client.rel through client.session; the packages stay light
    assert heavy_modules(modules) == {"dataselect.client.session", "dataselect.bad", "dataselect.client.rel"}


def report() -> str:
    modules = scan()
    kinds = in_function_imports(modules)
    lines = [f"module-level imports crossing the layering: {len(violations(modules))} "
             f"(known: {len(KNOWN_VIOLATIONS)})"]
    lines += [f"  {path}:{line} imports {target}" for (path, target), line in sorted(violations(modules).items())]
    total = sum(len(v) for v in kinds.values())
    files = len({path for v in kinds.values() for path, _, _ in v})
    lines.append(f"imports inside functions: {total} in {files} files")
    for kind, rows in kinds.items():
        lines.append(f"  {kind}: {len(rows)}")
        lines += [f"    {path}:{line} {target}" for path, line, target in sorted(rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
