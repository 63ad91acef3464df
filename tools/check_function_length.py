"""Fail when a function in ``src/saal`` is longer than 80 lines (``make test`` and ``make lint`` run it).

A function's length is counted from its ``def`` line to its last line, docstring, comments and nested functions
included (decorators are not). Usage: ``python tools/check_function_length.py [ROOT ...]`` (default
``src/saal``); exit status 0 when every function fits or is in :data:`ALLOWED`, 1 otherwise, with one line per
offender.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_LINES = 80
DEFAULT_ROOTS = ("src/saal",)

# "path:qualified name" of functions known to be too long, each with the reason it is allowed for now. An entry
# that no longer needs its place is named (a warning, not a failure: whoever splits the function may not know of
# this list), so that the list only shrinks.
ALLOWED: dict[str, str] = {}


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """Yield ``(qualified name, first line, line count)`` of every function and method in ``tree``, nested ones
    included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            end = node.end_lineno if node.end_lineno is not None else node.lineno
            yield name, node.lineno, end - node.lineno + 1
            yield from functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def long_functions(root: Path, limit: int = MAX_LINES) -> Iterator[tuple[str, int, int]]:
    """Yield ``(path:qualified name, first line, line count)`` of each function over ``limit`` lines under
    ``root`` (a folder of ``.py`` files or one file), in path order.

    Raises:
        SyntaxError: a file that is not valid Python.
    """
    paths = [root] if root.is_file() else sorted(root.rglob("*.py"))
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line, length in functions(tree):
            if length > limit:
                yield f"{path.as_posix()}:{name}", line, length


def main(argv: list[str] | None = None) -> int:
    """Print every function over :data:`MAX_LINES` lines that :data:`ALLOWED` does not name, and a warning for
    every allow-list entry that is no longer needed.

    Returns:
        0 when no function is too long but those allowed, 1 otherwise.
    """
    roots = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or [Path(r) for r in DEFAULT_ROOTS]
    found = {key: (line, length) for root in roots for key, line, length in long_functions(root)}
    problems = [
        f"{key.split(':')[0]}:{line}: {key.split(':')[1]} is {length} lines (at most {MAX_LINES}); split it"
        for key, (line, length) in found.items()
        if key not in ALLOWED
    ]
    checked = {r.as_posix().rstrip("/") for r in roots}
    for key, why in ALLOWED.items():
        if key not in found and any(key.startswith(c) for c in checked):
            print(f"warning: {key} is allowed to be long ({why}) but no longer is; remove it from ALLOWED")
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
