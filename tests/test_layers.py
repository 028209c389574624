"""The package's layering: argparse only in the command-line modules, imports in one direction
(no cycle among erase/, eval/ and prompts/ modules), and the erasure pipeline below eval/."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("erase", "eval", "prompts")
CLI_MODULES = ("erase.cli", "eval.cli", "eval.attacks.cli")  # and the modules below erase.cli


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the packages by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(path: pathlib.Path) -> set[str]:
    """Every absolute import in a file, at the top or inside a function: modules and their
    attributes (`from a import b` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports. A package's own registry lines (its __init__
    importing its submodules so they register) are not edges: they run after its body."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_names(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            registry_line = path.name == "__init__.py" and imported.startswith(name + ".")
            if imported and imported != name and not registry_line:
                edges.add(imported)
        graph[name] = edges
    return graph


def is_cli(name: str) -> bool:
    return name in CLI_MODULES or name.startswith("erase.cli.")


def test_argparse_is_imported_by_command_line_modules_only():
    users = {
        name
        for name, path in module_files().items()
        if "argparse" in {n.partition(".")[0] for n in imported_names(path)}
    }
    assert users and all(is_cli(name) for name in users), sorted(users)


def test_the_library_never_imports_a_command_line_module():
    graph = import_graph()
    offenders = {n: sorted(filter(is_cli, e)) for n, e in graph.items() if not is_cli(n)}
    assert not {n: e for n, e in offenders.items() if e}


def test_the_module_import_graph_has_no_cycle():
    graph = import_graph()
    visiting, done, cycles = [], set(), []

    def visit(name):
        visiting.append(name)
        for imported in sorted(graph[name]):
            if imported in visiting:
                cycles.append(visiting[visiting.index(imported) :] + [imported])
            elif imported not in done:
                visit(imported)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name)
    assert not cycles, cycles


def test_the_erasure_pipeline_does_not_import_eval():
    # eval/ measures what erase/ makes; only the layers above the pipeline (the API, the bench,
    # the CLI) compose the two.
    above = {"erase.api", "erase.bench"}
    graph = import_graph()
    importers = {
        name
        for name, edges in graph.items()
        if name.startswith(("erase", "prompts")) and any(e.startswith("eval") for e in edges)
    }
    assert importers and all(name in above or is_cli(name) for name in importers), importers
