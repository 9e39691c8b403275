#!/usr/bin/env python3
"""Count the code lines of a Python tree: no blank lines, comments or docstrings.

Refactors are held to "shorter, not longer" by this number (docstrings grow with the docs
and are not counted).

    python benchmarks/code_lines.py ksm_analyze
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def code_lines(path: Path) -> int:
    """Lines of ``path`` that are neither blank, a comment, nor part of a string statement."""
    source = path.read_text()
    strings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            strings.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return sum(1 for n, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and n not in strings)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "ksm_analyze")
    files = sorted(root.rglob("*.py"))
    total = sum(code_lines(p) for p in files)
    print(f"{total} code lines in {len(files)} files under {root}")


if __name__ == "__main__":
    main()
