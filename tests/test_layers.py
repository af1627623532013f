"""The module's sections keep their word: each uses only names of its own section and of the
earlier sections its banner says it may call (parsed from the source with ``ast``)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

MODULE = Path(__file__).resolve().parent.parent / "sqlrs_engine.py"
RULE = "#" * 79
FOUNDATION = ("ids", "errors")
BANNER_RE = re.compile(rf"^{RULE}\n# ([a-z/ ]+): (.*?)\n{RULE}$", re.M | re.S)


@dataclass
class Section:
    name: str
    first_line: int
    allowed: set[str]
    defined: set[str] = field(default_factory=set)


def sections(source: str) -> list[Section]:
    found: list[Section] = []
    for match in BANNER_RE.finditer(source):
        name, text = match.group(1), " ".join(match.group(2).replace("#", " ").split())
        grant = text.split("may call", 1)[1].split(".")[0] if "may call" in text else ""
        earlier = [s.name for s in found]
        if "every section above" in grant or "wires every section" in text:
            allowed = set(earlier)
        else:  # ids and errors are everyone's foundation (the module docstring says so)
            allowed = {s for s in earlier if s in FOUNDATION or re.search(
                rf"(?<![\w/]){re.escape(s)}(?![\w/])", grant)}
        line = source.count("\n", 0, match.start()) + 1
        found.append(Section(name, line, allowed))
    return found


PRELUDE = Section("prelude", 0, set())  # imports, the logger and JsonDict: for everyone


def section_of(all_sections: list[Section], line: int) -> Section:
    return ([PRELUDE] + [s for s in all_sections if s.first_line <= line])[-1]


def top_level_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, ast.AnnAssign) else [])
    return {t.id for t in targets if isinstance(t, ast.Name)}


def test_sections_use_only_what_their_banner_allows() -> None:
    source = MODULE.read_text()
    tree = ast.parse(source)
    all_sections = sections(source)
    assert [s.name for s in all_sections] == [
        "ids", "errors", "config", "store", "queue", "registry", "auth", "stream", "snapshot",
        "dbms", "runtime", "conntrack", "instances", "deletion", "cache", "remote", "planner",
        "executor", "prepare manager", "runs", "httpapi", "cli/main"]
    owner: dict[str, Section] = {}
    for node in tree.body:
        for name in top_level_names(node):
            owner[name] = section_of(all_sections, node.lineno)
            owner[name].defined.add(name)
    problems = set()
    for node in tree.body:
        user = section_of(all_sections, node.lineno)
        for inner in ast.walk(node):
            used = inner.id if isinstance(inner, ast.Name) else None
            if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                used = inner.value if inner.value in owner else None  # string annotations
            home = owner.get(used or "")
            if home in (None, user, PRELUDE) or home.name in user.allowed:
                continue
            problems.add(f"{user.name} uses {used} from {home.name}")
    assert not problems, "\n".join(sorted(problems))


#: ``self.<part>.<collaborator>.<method>(…)`` chains that stay inside one object's own parts:
#: a request handler's server, a server manager's OS user, the engine wiring its runtimes
OWN_PARTS = {"server", "dbms", "runtimes"}


def test_no_reach_through_chains() -> None:
    """A section asks its collaborator, never the collaborator's collaborator: no call
    ``self.a.b.m(...)`` reaches through another object's parts (it would tie the caller to
    that object's private wiring)."""
    tree = ast.parse(MODULE.read_text())
    chains = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        hops: list[str] = []
        target: ast.expr = node.func.value
        while isinstance(target, ast.Attribute):
            hops.append(target.attr)
            target = target.value
        if isinstance(target, ast.Name) and target.id == "self" and len(hops) >= 2 \
                and hops[-1] not in OWN_PARTS:
            chains.add(f"line {node.lineno}: self.{'.'.join(reversed(hops))}."
                       f"{node.func.attr}(...)")
    assert not chains, "\n".join(sorted(chains))


def test_unit_tests_are_whole_files() -> None:
    """``scripts/test.sh`` runs the unit part over the files marked unit as a whole
    (``pytestmark = pytest.mark.unit``); a unit test anywhere else would run in neither
    part."""
    tests = Path(__file__).resolve().parent
    for path in sorted(tests.glob("test_*.py")):
        text = path.read_text()
        whole = re.search(r"^pytestmark = pytest\.mark\.unit$", text, re.M)
        assert whole or "mark.unit" not in text, f"{path.name}: unit tests in a mixed file"
