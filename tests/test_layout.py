"""Each subpackage has one face: another package imports from ``agent.X``, never from
``agent.X.module``, so a package's insides can move without touching its users. (The
layers themselves are checked by ``lint-imports``, see pyproject.toml.)"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"


def faces_skipped(root: Path) -> list[str]:
    """Imports in the package at ``root`` that reach past another subpackage's face."""
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        own = parts[0] if len(parts) > 1 else None
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            module = node.module.split(".")
            if (
                len(module) >= 3
                and module[0] == root.name
                and module[1] != own
                and (root / module[1] / "__init__.py").exists()
            ):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.module}")
    return found


def test_no_import_skips_a_package_face() -> None:
    assert faces_skipped(AGENT) == []


def test_an_import_past_a_face_is_found(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    for package in ("stream", "panel"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "stream" / "host.py").write_text("from agent.stream.peer import x\n")  # its own
    (root / "panel" / "server.py").write_text(
        "from agent.stream import LessonHost\nfrom agent.stream.host import LessonConflict\n"
    )
    assert faces_skipped(root) == ["agent/panel/server.py:2 agent.stream.host"]
