"""The package's seams, read from its source with ast (the imports as written; nothing is run): the service never
imports the CLI's loader of ~/.imsa, and the command line imports nothing heavy when it starts (DESIGN §9)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The service checks what it is sent with imsa.limits; ~/.imsa is the CLI's to read, never the service's.
SERVER_FORBIDDEN = ("imsa.config",)
# At module level of a command's module these would cost every run of every command.
COMMANDS_HEAVY = ("flask", "waitress")
# At module level of cli.py (or of what it imports at module level) these would slow completion and imsa status.
CLI_HEAVY = ("boto3", "botocore", "yaml", "flask", "waitress")
# At module level of cli.py and of the held-session fast path of export / credential-process (imsa/commands/fast.py),
# which answer at the start of every shell and SDK process: the parser, logging, the profile loader and
# dataclasses (with inspect) cost several times the interpreter's own start.
FAST_PATH = ("imsa.cli", "imsa.commands.fast")
FAST_PATH_HEAVY = CLI_HEAVY + ("argparse", "logging", "dataclasses", "inspect", "imsa.config", "imsa.credentials")
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def package_modules(root):
    """{dotted name: path} of every module of the imsa package under *root*."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(root, "imsa")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(path, module, module_level_only):
    """The names *path* (module *module*) imports: at module level only, or anywhere (functions too).

    ``from imsa import config`` gives both ``imsa`` and ``imsa.config``: the name may be a module.
    """
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not (in_function and module_level_only):
                if isinstance(child, ast.Import):
                    found.update(alias.name for alias in child.names)
                else:
                    base = child.module or ""
                    if child.level:  # relative: from . import x, from ..config import y
                        parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                        base = ".".join(parts + ([child.module] if child.module else []))
                    found.add(base)
                    found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child, in_function or isinstance(child, FUNCTIONS))

    visit(tree, False)
    return found


def imported_closure(root, start, module_level_only):
    """Every name imported by module *start* and, transitively, by the package's modules it imports."""
    modules = package_modules(root)
    seen, names, todo = set(), set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        found = imports(modules[module], module, module_level_only)
        names |= found
        for name in found:
            parts = name.split(".")
            # Importing a.b.c runs a, a.b and a.b.c.
            todo.extend(prefix for prefix in (".".join(parts[:end]) for end in range(1, len(parts) + 1))
                        if prefix in modules)
    return names


def hits(names, forbidden):
    """The names among *names* that are, or are inside, one of the *forbidden* modules."""
    return sorted(name for name in names if any(name == bad or name.startswith(bad + ".") for bad in forbidden))


def violations(root):
    """What breaks the seams in the package under *root*: one line per module and rule."""
    modules = package_modules(root)
    found = []
    for module in sorted(modules):
        if module.startswith("imsa.server.") or module == "imsa.server":
            bad = hits(imported_closure(root, module, module_level_only=False), SERVER_FORBIDDEN)
            if bad:
                found.append(f"{module} imports {', '.join(bad)}")
        if module.startswith("imsa.commands.") or module == "imsa.commands":
            bad = hits(imported_closure(root, module, module_level_only=True), COMMANDS_HEAVY)
            if bad:
                found.append(f"{module} imports at module level {', '.join(bad)}")
    bad = hits(imported_closure(root, "imsa.cli", module_level_only=True), CLI_HEAVY)
    if bad:
        found.append(f"imsa.cli imports at module level {', '.join(bad)}")
    for module in FAST_PATH:
        if module in modules:
            bad = hits(imported_closure(root, module, module_level_only=True), FAST_PATH_HEAVY)
            if bad:
                found.append(f"{module} (a fast path) imports at module level {', '.join(bad)}")
    return found


def test_the_package_keeps_its_seams():
    modules = package_modules(ROOT)
    assert "imsa.server.process" in modules and "imsa.commands.roles" in modules and "imsa.cli" in modules
    assert violations(ROOT) == []


def _package(root, files):
    """A small imsa package under *root*: the given {relative path: source}, plus what every tree has."""
    files = {"imsa/__init__.py": "", "imsa/cli.py": "import os\n", "imsa/config.py": "import os\n",
             "imsa/server/__init__.py": "", "imsa/commands/__init__.py": "", **files}
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


@pytest.mark.parametrize("files, expected", [
    ({"imsa/server/store.py": "from imsa import config\n"}, ["imsa.server.store imports imsa.config"]),
    ({"imsa/server/store.py": "import imsa.config\n"}, ["imsa.server.store imports imsa.config"]),
    ({"imsa/server/store.py": "from imsa.config import PATTERNS\n"},
     ["imsa.server.store imports imsa.config, imsa.config.PATTERNS"]),
    ({"imsa/server/store.py": "from .. import config\n"}, ["imsa.server.store imports imsa.config"]),
    ({"imsa/server/store.py": "def load():\n    from imsa import config\n"},  # lazily: still the loader
     ["imsa.server.store imports imsa.config"]),
    ({"imsa/server/store.py": "from imsa import helper\n", "imsa/helper.py": "def f():\n    import imsa.config\n"},
     ["imsa.server.store imports imsa.config"]),  # through another module
    ({"imsa/commands/roles.py": "from flask import Flask\n"},
     ["imsa.commands.roles imports at module level flask, flask.Flask"]),
    ({"imsa/commands/roles.py": "from imsa.server import imds\n", "imsa/server/imds.py": "import flask\n"},
     ["imsa.commands.roles imports at module level flask"]),
    ({"imsa/commands/roles.py": "def serve():\n    import waitress\n"}, []),  # only when it runs: allowed
    ({"imsa/cli.py": "import yaml\n"}, ["imsa.cli imports at module level yaml",
                                        "imsa.cli (a fast path) imports at module level yaml"]),
    ({"imsa/cli.py": "import logging\n"}, ["imsa.cli (a fast path) imports at module level logging"]),
    ({"imsa/commands/fast.py": "from imsa import config\n"},
     ["imsa.commands.fast (a fast path) imports at module level imsa.config"]),
    ({"imsa/commands/fast.py": "from imsa import credentials\n", "imsa/credentials.py": "import dataclasses\n"},
     ["imsa.commands.fast (a fast path) imports at module level dataclasses, imsa.credentials"]),
    ({"imsa/cli.py": "def build_parser():\n    import argparse\n"}, []),
    ({"imsa/cli.py": "from imsa.commands import roles\n", "imsa/commands/roles.py": "import botocore.session\n"},
     ["imsa.cli imports at module level botocore.session",
      "imsa.cli (a fast path) imports at module level botocore.session"]),
    ({"imsa/cli.py": "def run():\n    import boto3\n"}, []),
])
def test_each_seam_rule_finds_its_violation(tmp_path, files, expected):
    _package(tmp_path, files)
    assert violations(tmp_path) == expected
