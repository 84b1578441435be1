"""The suite itself: every third-party module that the packages or the tests import
is declared in pyproject.toml, so a fresh machine that installs only what the
README says has it (a package that merely happens to be installed here is not a
dependency)."""
from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCANNED = ("orchestrator", "strategies", "workloads", "cluster", "tests")


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_norm(re.split(r"[\[<>=!~; ]", r.strip(), maxsplit=1)[0]) for r in reqs}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: pathlib.Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):
            tops.add(str(node.args[0].value).split(".")[0])  # a test that silently skips is still a test we lose
    return tops


def test_every_imported_third_party_module_is_declared():
    ours = {p.name for p in ROOT.iterdir() if p.is_dir()} | {"__future__"}
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for top in _imports(path) - ours - set(sys.stdlib_module_names):
                owners = {_norm(d) for d in dists.get(top, [])}
                if not owners & declared:
                    missing.setdefault(top, []).append(str(path.relative_to(ROOT)))
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(
        f"{m} ({', '.join(paths[:3])}) from distribution {dists.get(m, ['<not installed>'])}"
        for m, paths in sorted(missing.items()))
