"""Function and module lengths of bonsai_mlx/ (the structure rule: functions <= 60 lines,
modules <= ~600, the emulator's C++ shim aside).

    python scripts/code_stats.py              # summary, modules > 400 lines, functions > 40
    python scripts/code_stats.py --limit 60   # list only functions longer than 60 lines
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "bonsai_mlx"


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from `def` (decorators excluded) to the last line)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((name, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=40, help="list functions longer than this")
    parser.add_argument("--module-limit", type=int, default=400)
    args = parser.parse_args()
    modules = sorted(ROOT.rglob("*.py"))
    lines = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in modules}
    funcs = [(p, n, k) for p in modules for n, k in function_lengths(p)]
    print(f"modules: {len(modules)}, lines: {sum(lines.values())}, "
          f"largest: {max(lines.values())} ({max(lines, key=lines.get).relative_to(ROOT.parent)})")
    print(f"functions: {len(funcs)}, longest: {max(k for _, _, k in funcs)}, "
          f"> 60 lines: {sum(k > 60 for _, _, k in funcs)}, "
          f"> 40 lines: {sum(k > 40 for _, _, k in funcs)}")
    print(f"\nmodules > {args.module_limit} lines:")
    for p, n in sorted(lines.items(), key=lambda kv: -kv[1]):
        if n > args.module_limit:
            print(f"  {n:5d}  {p.relative_to(ROOT.parent)}")
    print(f"\nfunctions > {args.limit} lines:")
    for p, name, k in sorted(funcs, key=lambda t: -t[2]):
        if k > args.limit:
            print(f"  {k:5d}  {p.relative_to(ROOT.parent)}::{name}")


if __name__ == "__main__":
    main()
