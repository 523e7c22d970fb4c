"""The house rule of ``docs/architecture.md``: imports only go down, and never in a circle.

The floors are read from the table in ``docs/architecture.md`` (the block after "Who may import
whom"), so the rule is written once. A room is a top-level module or package of ``longtune``;
every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "longtune"


def floors() -> dict[str, int]:
    """Room -> floor (higher floors may import lower ones) from docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("Who may import whom", 1)[1].split("```", 2)[1]
    table = {}
    for line in block.splitlines():
        match = re.fullmatch(r"\s*(\d+)\s+(.+?)\s*", line)
        if match:
            for room in match.group(2).split(","):
                table[room.strip()] = int(match.group(1))
    return table


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports() -> dict[str, set[str]]:
    """Module -> the longtune modules it imports (``from pkg import mod`` names the module)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longtune"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("longtune")}
        graph[name] = targets - {name}
    return graph


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_room_has_a_floor():
    rooms = {room(m) for m in modules()}
    assert rooms == set(floors()), "rooms and the table in docs/architecture.md differ"


def test_imports_only_go_down():
    table = floors()
    upward = [
        f"{src} -> {dst} (floor {table[room(src)]} -> {table[room(dst)]})"
        for src, targets in imports().items()
        for dst in targets
        if room(src) != room(dst) and table[room(dst)] >= table[room(src)]
    ]
    assert not upward, "imports that do not go down:\n" + "\n".join(sorted(upward))


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start)):
            return circle
    return None


def test_no_import_circle():
    circle = find_circle(imports())
    assert circle is None, "import circle: " + " -> ".join(circle or [])
    # The search is real: it finds a circle of three.
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks are real: a model module importing the trainer is reported."""
    fake = tmp_path / "longtune"
    for path in PACKAGE.rglob("*.py"):
        target = fake / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake / "model" / "args.py").write_text(
        (PACKAGE / "model" / "args.py").read_text() + "\nfrom longtune.train import trainer\n"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "architecture.md").write_text(
        (ROOT / "docs" / "architecture.md").read_text()
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    try:
        test_imports_only_go_down()
    except AssertionError as e:
        assert "longtune.model.args -> longtune.train.trainer" in str(e)
    else:
        raise AssertionError("an upward import went unnoticed")
