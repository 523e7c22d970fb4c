"""The house of ``longtune/``: its rooms, their floors, and who imports whom.

A room is a top-level module or package of ``longtune``; the floors are the table in
``docs/architecture.md`` (the block after "Who may import whom"). ``tests/test_architecture.py``
checks the rule with these functions; run this file to draw the house as it is::

    python scripts/house.py docs/house.svg

Each room is a box on its floor (wider: more lines of code), each import between two rooms an
arrow from the importer down to the imported room; an arrow that goes up or sideways is drawn
in red (the test fails on it).
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def floors(root: Path = ROOT) -> dict[str, int]:
    """Room -> floor (higher floors may import lower ones) from docs/architecture.md."""
    text = (root / "docs" / "architecture.md").read_text()
    block = text.split("Who may import whom", 1)[1].split("```", 2)[1]
    table = {}
    for line in block.splitlines():
        match = re.fullmatch(r"\s*(\d+)\s+(.+?)\s*", line)
        if match:
            for room in match.group(2).split(","):
                table[room.strip()] = int(match.group(1))
    return table


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``longtune``."""
    found = {}
    for path in (root / "longtune").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the longtune modules it imports, at any depth of the file (``from pkg import
    mod`` names the module)."""
    mods = modules(root)
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
    """The room of a module: ``longtune.train.run`` -> ``train``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(root: Path = ROOT) -> list[str]:
    """Imports between rooms that do not go down a floor, as ``src -> dst (floor a -> b)``."""
    table = floors(root)
    return sorted(
        f"{src} -> {dst} (floor {table[room(src)]} -> {table[room(dst)]})"
        for src, targets in imports(root).items()
        for dst in targets
        if room(src) != room(dst) and table[room(dst)] >= table[room(src)]
    )


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


def draw(out: Path, root: Path = ROOT) -> None:
    """Write the house as an SVG picture (see the module docstring)."""
    table = floors(root)
    lines: dict[str, int] = defaultdict(int)
    for name, path in modules(root).items():
        lines[room(name)] += len(path.read_text().splitlines())
    arrows = {
        (room(src), room(dst))
        for src, targets in imports(root).items()
        for dst in targets
        if room(src) != room(dst)
    }
    by_floor: dict[int, list[str]] = defaultdict(list)
    for name, floor in table.items():
        by_floor[floor].append(name)
    width, row, box_h, gap = 1200, 90, 44, 16
    top = max(by_floor)
    sizes = {n: max(lines[n], 250) for n in table}  # a box's width: its lines (a label's least)
    widest = max(sum(sizes[n] for n in names) for names in by_floor.values())
    most = max(len(names) for names in by_floor.values())
    scale = (width - 160 - gap * (most - 1)) / widest  # one scale: width means lines everywhere
    boxes = {}
    for floor, names in by_floor.items():
        total = sum(sizes[n] for n in names) * scale + gap * (len(names) - 1)
        x = 140 + (width - 160 - total) / 2
        for name in sorted(names, key=lambda n: -lines[n]):
            w = sizes[name] * scale
            boxes[name] = (x, 30 + (top - floor) * row, w)
            x += w + gap
    height = 30 + (top + 1) * row
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        '<defs><marker id="a" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
    ]
    for floor in sorted(by_floor):
        y = 30 + (top - floor) * row
        svg.append(f'<text x="10" y="{y + 27}" fill="#777">floor {floor}</text>')
    for src, dst in sorted(arrows):
        (x1, y1, w1), (x2, y2, w2) = boxes[src], boxes[dst]
        bad = table[dst] >= table[src]
        color = "#d00" if bad else "#999"
        svg.append(
            f'<line x1="{x1 + w1 / 2:.0f}" y1="{y1 + box_h}" x2="{x2 + w2 / 2:.0f}" y2="{y2}" '
            f'stroke="{color}" stroke-width="{2 if bad else 1}" marker-end="url(#a)" '
            'opacity="0.7"/>'
        )
    for name, (x, y, w) in boxes.items():
        label = f"{name}.py" if name in ("__init__", "__main__") else name
        svg.append(
            f'<rect x="{x:.0f}" y="{y}" width="{w:.0f}" height="{box_h}" rx="4" '
            'fill="#dde8f3" stroke="#4a6f96"/>'
            f'<text x="{x + 6:.0f}" y="{y + 18}" font-weight="bold">{escape(label)}</text>'
            f'<text x="{x + 6:.0f}" y="{y + 34}" fill="#555">{lines[name]} lines</text>'
        )
    svg.append("</svg>")
    out.write_text("\n".join(svg) + "\n")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "house.svg"
    draw(target)
    print(f"wrote {target}; upward imports: {upward_imports() or 'none'}")
