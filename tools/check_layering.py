#!/usr/bin/env python3
"""Import-layering check of DESIGN §3, run by `make test` (and by tests/unit/test_layering.py).

Rules, checked on every import statement (module level or not) of the tree given:
  1. `agent` never imports `controller`.
  2. `controller` imports only `agent.api` from the agent; `controller.sim` may also import `agent.sim`.
  3. `controller.policy` and `controller.model` import no I/O or clock: grpc, aiomqtt, sqlite3, pynvml,
     asyncio, time, socket, subprocess.
  4. Only `agent/gpu/nvml.py` imports `pynvml`.
  5. Nothing under `agent/` imports cvxpy, and `controller.dctl` does not import cvxpy or matplotlib at
     module level (both slow to import; they belong inside the command that needs them).
Exit status 1 and one line per violation when a rule is broken.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PURE_FORBIDDEN = ("grpc", "aiomqtt", "sqlite3", "pynvml", "asyncio", "time", "socket", "subprocess")
SLOW_AT_STARTUP = ("cvxpy", "matplotlib")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.Module, module: str) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) for every import in the file."""
    out: list[tuple[int, str, bool]] = []
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".")[: -node.level] if node.level else []
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name, id(node) in top_level))
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check(root: Path) -> list[str]:
    errors: list[str] = []
    for top in ("agent", "controller"):
        for path in sorted((root / top).rglob("*.py")):
            module = _module_name(root, path)
            tree = ast.parse(path.read_text(), filename=str(path))
            rel = path.relative_to(root)
            for line, name, module_level in _imports(tree, module):
                where = f"{rel}:{line}: imports {name}"
                if _under(module, "agent") and _under(name, "controller"):
                    errors.append(f"{where}: agent must never import controller")
                if _under(module, "controller") and _under(name, "agent"):
                    allowed = _under(name, "agent.api") or (
                        _under(module, "controller.sim") and _under(name, "agent.sim")
                    )
                    if not allowed:
                        errors.append(
                            f"{where}: controller may import only agent.api (controller.sim also agent.sim)"
                        )
                if (_under(module, "controller.policy") or _under(module, "controller.model")) and any(
                    _under(name, f) for f in PURE_FORBIDDEN
                ):
                    errors.append(f"{where}: controller.policy/model are pure (no I/O, no clock)")
                if _under(name, "pynvml") and rel.as_posix() != "agent/gpu/nvml.py":
                    errors.append(f"{where}: only agent/gpu/nvml.py may import pynvml")
                if _under(module, "agent") and _under(name, "cvxpy"):
                    errors.append(f"{where}: cvxpy stays off the agent")
                if (
                    _under(module, "controller.dctl")
                    and module_level
                    and any(_under(name, s) for s in SLOW_AT_STARTUP)
                ):
                    errors.append(f"{where}: import it inside the command, not at dctl start-up")
    return errors


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    errors = check(root)
    for e in errors:
        print(e)
    if not errors:
        print("layering: ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
