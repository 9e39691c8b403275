"""The shape of the package: the layer order, no import cycle, each option declared once, one
list of tables."""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import typer.main
from conftest import ROOT

import ksm_analyze
from ksm_analyze.cli import app
from ksm_analyze.ksm import KsmSettings
from ksm_analyze.options import ScanOptions

PACKAGE = ROOT / "ksm_analyze"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path, name: str) -> set[str]:
    """Modules of the package that ``path`` imports when it is imported: top-level
    statements only (imports inside functions are lazy; ``if TYPE_CHECKING`` never runs)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.startswith("ksm_analyze"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # Keep only real modules; importing a package also runs its __init__.
        deps = {d for d in _runtime_imports(path, name) if d in modules}
        graph[name] = {d for d in deps if d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    # Submodules of a package are imported with the package's __init__ first; ksm_analyze's
    # own __init__ re-exports the API, so edges into it from inside are left out (a module
    # importing `from .. import __version__` needs only the attribute, set before the rest).
    for deps in graph.values():
        deps.discard("ksm_analyze")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return list(contract["layers"])


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # The console script of this Python's import-linter, run where `root` is the package's
    # top folder, so it analyses that tree's ksm_analyze.
    script = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(script)], cwd=root,  # reads root/pyproject.toml
                          capture_output=True, text=True, env={"PYTHONPATH": str(root)},
                          check=False)


def test_imports_go_down_the_layers_only():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_the_layer_contract_fails_on_an_import_going_up(tmp_path):
    # A copy of the package where a bottom module imports the command line lazily, inside a
    # function (the kind of edge the old cycle check let through): the contract must break.
    shutil.copytree(PACKAGE, tmp_path / "ksm_analyze",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_vendor"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    pages = tmp_path / "ksm_analyze" / "pages.py"
    pages.write_text(pages.read_text() + "\n\ndef _up() -> None:\n    from .cli import app  # noqa\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0
    assert "ksm_analyze.pages is not allowed to import ksm_analyze.cli" in r.stdout


def test_every_module_is_in_a_layer():
    # A new module left out of the list would escape the contract.
    layers = {part.strip() for layer in _layers() for part in re.split(r"[|:]", layer)}
    top = {p.stem if p.suffix else p.name for p in PACKAGE.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__")
           or (p.is_dir() and (p / "__init__.py").exists())}
    assert top == layers, (top - layers, layers - top)


def test_the_architecture_doc_draws_the_layer_order():
    # docs/architecture.md's drawing names each layer's modules first on its line, top down.
    doc = (ROOT / "docs" / "architecture.md").read_text()
    drawing = doc.split("## Layers", 1)[1].split("```", 2)[1]
    drawn = [line.split()[0] for line in drawing.strip().splitlines()]
    expected = [re.split(r"\s*[|:]\s*", layer)[0] for layer in _layers()]
    assert [d.removesuffix(".py").removesuffix("/") for d in drawn] == expected


def _field_defaults() -> dict[str, object]:
    defaults = {}
    for cls in (ScanOptions, KsmSettings):
        for f in dataclasses.fields(cls):
            value = f.default
            defaults[f.name] = getattr(value, "value", value)  # enums as the CLI spells them
    return defaults


def test_cli_defaults_are_the_settings_defaults():
    defaults = _field_defaults()
    command = typer.main.get_command(app)
    checked = set()
    for name in ("scan", "report", "plan", "fingerprint", "info", "ksm-status"):
        for param in command.commands[name].params:  # type: ignore[attr-defined]
            if param.name in defaults and param.name != "base_address":
                assert param.default == defaults[param.name], (name, param.name)
                checked.add(param.name)
    assert {"prefix_bytes", "max_page_sharing", "scope", "top", "page_size",
            "use_zero_pages", "pages_to_scan", "sleep_millisecs", "verify", "jobs"} <= checked


_KSM_KNOBS_AND_POLICY = {"--max-page-sharing", "--use-zero-pages", "--pages-to-scan",
                         "--sleep-millisecs", "--scope", "--domain", "--domains", "--merge"}


def _flags(command_name: str) -> set[str]:
    command = typer.main.get_command(app).commands[command_name]  # type: ignore[attr-defined]
    return {flag for param in command.params
            for flag in (*param.opts, *getattr(param, "secondary_opts", ()))}


def test_fingerprint_shows_only_the_options_it_uses():
    # fingerprint reads and hashes: it never compares pages (stage 2), never uses the cache
    # (it writes the files a cache holds), and predicts nothing, so it takes no KSM knob and
    # no merging policy.
    flags = _flags("fingerprint")
    assert not flags & _KSM_KNOBS_AND_POLICY, flags & _KSM_KNOBS_AND_POLICY
    assert not flags & {"--verify", "--no-verify", "--cache"}
    assert {"--format", "--page-size", "--prefix-bytes", "--base-address", "--jobs",
            "--scheduler", "--quiet", "--output"} <= flags


def test_analysis_commands_take_every_bundle():
    for name in ("scan", "report", "plan"):
        flags = _flags(name)
        assert _KSM_KNOBS_AND_POLICY | {"--verify", "--cache", "--prefix-bytes",
                                        "--scheduler"} <= flags, name


def _option_flags_declared(tree: ast.AST) -> list[tuple[str, int]]:
    """Every flag string of every ``typer.Option(...)`` call, with its line."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "Option"):
            flags = [a.value for a in node.args
                     if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            assert flags, f"line {node.lineno}: typer.Option without its flags spelled out"
            found += [(flag, node.lineno) for spec in flags for flag in spec.split("/")]
    return found


def _declared_twice(source: str) -> dict[str, list[int]]:
    lines: dict[str, list[int]] = {}
    for flag, line in _option_flags_declared(ast.parse(source)):
        lines.setdefault(flag, []).append(line)
    return {flag: at for flag, at in lines.items() if len(at) > 1}


def test_each_cli_option_is_declared_once():
    twice = _declared_twice((PACKAGE / "cli.py").read_text())
    assert not twice, f"declared in several typer.Option calls (flag: lines): {twice}"


def test_the_declared_once_check_finds_a_repeat():
    source = ('a = typer.Option("--json", help="x")\n'
              'b = typer.Option("--quiet", "-q")\n'
              'c = typer.Option("--json", help="y")\n'
              'd = typer.Option("--verify/--no-verify")\n')
    assert _declared_twice(source) == {"--json": [1, 3]}


def test_option_defaults_are_written_once_in_the_package():
    # The defaults of the options the issue found repeated: written in the settings types
    # only, and nowhere else as a parameter default.
    pattern = re.compile(
        r"(prefix_bytes|max_page_sharing|scope|page_size)\s*(:[^=\n]*)?=\s*"
        r"(128|256|4096|[\"']mergeable[\"']|Scope\.MERGEABLE)\b"
    )
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in PACKAGE.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and p.name not in ("options.py", "ksm.py")]
    assert not offenders, offenders


def _listed_tables(text: str) -> list[str]:
    line = re.search(r"^\s*Tables: (.*)\.$", text, re.MULTILINE)
    assert line, "no 'Tables:' line"
    return [name.strip(" `") for name in line.group(1).split(",")]


def test_readme_changelog_and_cli_doc_list_every_table_in_order():
    for doc in ("README.md", "CHANGELOG.md", "docs/cli.md"):
        assert _listed_tables((ROOT / doc).read_text()) == list(ksm_analyze.TABLES), doc


def test_json_csv_and_report_write_the_one_list_of_tables(tmp_path):
    from typer.testing import CliRunner

    samples = sorted(map(str, (ROOT / "sample_dumps").iterdir()))
    runner = CliRunner()
    r = runner.invoke(app, ["scan", *samples, "--json", "--csv", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.stdout)
    assert [k for k in data if k not in ("options", "warnings")] == list(ksm_analyze.TABLES)
    assert sorted(p.stem for p in (tmp_path / "csv").iterdir()) == sorted(ksm_analyze.TABLES)
    r = runner.invoke(app, ["report", *samples, "-o", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    csvs = sorted(p.stem for p in (tmp_path / "report").glob("*.csv"))
    assert csvs == sorted(ksm_analyze.TABLES)
    files = len(list((tmp_path / "report").iterdir()))
    assert r.stdout.startswith(f"Wrote {files} files")
