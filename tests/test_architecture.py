"""The house rule of ``docs/architecture.md``: imports only go down, and never in a circle.

The floors are read from the table in ``docs/architecture.md`` by ``scripts/house.py`` (which
also draws the house), so the rule is written once. Every import counts, those inside
functions too.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import house  # noqa: E402


def test_every_room_has_a_floor():
    rooms = {house.room(m) for m in house.modules()}
    assert rooms == set(house.floors()), "rooms and the table in docs/architecture.md differ"


def test_imports_only_go_down():
    upward = house.upward_imports()
    assert not upward, "imports that do not go down:\n" + "\n".join(upward)


def test_no_import_circle():
    circle = house.find_circle(house.imports())
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    """The checks are real: a model module importing the trainer is reported, and a circle of
    three is found."""
    for path in (ROOT / "longtune").rglob("*.py"):
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    args = tmp_path / "longtune" / "model" / "args.py"
    args.write_text(args.read_text() + "\nfrom longtune.train import trainer\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "architecture.md").write_text((ROOT / "docs/architecture.md").read_text())
    assert "longtune.model.args -> longtune.train.trainer (floor 1 -> 4)" in house.upward_imports(
        tmp_path
    )
    assert house.find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        "a",
        "b",
        "c",
        "a",
    ]


def test_the_house_can_be_drawn(tmp_path):
    house.draw(tmp_path / "house.svg")
    svg = (tmp_path / "house.svg").read_text()
    assert svg.startswith("<svg") and "checkpoint" in svg and 'stroke="#d00"' not in svg


MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    """Small named steps: a function over 80 lines (docstring included) is split."""
    import ast

    root = Path(__file__).resolve().parent.parent / "longtune"
    long = [
        f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({size} lines)"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (size := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES
    ]
    assert not long, long
