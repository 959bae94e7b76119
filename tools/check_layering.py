#!/usr/bin/env python3
"""Transitive import-layering check (docs/architecture.md, layering rules), run by `make test` and by
tests/unit/test_layering.py.

The checker parses every module under `agent/` and `controller/` of the tree given, builds the project's
own import graph and checks these contracts on it. "Imports" means directly or through any chain of
project modules (third-party and stdlib modules are leaves; site-packages is never read):

  1. `agent` never imports `controller`.
  2. The agent's production modules (everything under `agent` but `agent.sim`) never import `agent.sim`.
     Exception: the composition root `agent.app` may import it lazily, inside a function; such imports of
     `agent.app` are not followed for this contract.
  3. `agent.api` imports nothing else from `agent`.
  4. `controller` imports only `agent.api` from the agent; `controller.sim` may also import `agent.sim`
     (and whoever may import `controller.sim` gets that with it: the chain is not followed into it).
  5. The pure core (`controller.model`, `controller.orchestrator`, `controller.policy`,
     `controller.control`) imports no I/O: PURE_CORE_IO below (network and RPC, the event loop, the
     clock, processes and signals, the file system and OS, databases, the GPU, terminal and plot output).
     Pure codecs on in-memory values (json, csv, tomllib, struct) and numpy, math, dataclasses, logging,
     threading (a lock around a cache) are allowed. `open()` is a builtin and not an import: not seen here.
  6. cvxpy is allowed in the pure core only in `controller.policy` (`controller.control` may reach it
     through `controller.policy`, never on its own).
  7. The pure core imports nothing above it in model < orchestrator < policy < control: model imports
     none of the other three, orchestrator only model, policy model and orchestrator, control all three.
  8. The pure core never imports `controller.sim`, `controller.dctl` or a live package.
  9. Live packages (LIVE_PACKAGES: fleet, loops, router, store, admin, metrics, controller app) never
     import `controller.sim` or `agent.sim`. Checked whether or not those packages exist yet.
 10. `controller.sim` never imports grpc (or its grpc_* companions), aiohttp or aiomqtt.
 11. Only `agent/gpu/nvml.py` imports `pynvml` (directly: the others go through it).
 12. Nothing under `agent` imports cvxpy.
 13. Start-up time: the module-level imports of `controller.dctl` and `controller.router`, followed
     through module-level imports only, never reach cvxpy or matplotlib (import them in the command).
 14. No import cycles among project modules. Function-level (lazy) imports count: a lazy import may keep
     a slow dependency off a start-up path, it must not hide a cycle.

Which imports count. Every `import` / `from ... import` statement, at module level or inside a function
(both are followed), except where a contract says otherwise. Imports under `if TYPE_CHECKING:` never run:
they count as dependencies for the layer contracts (1-10) but not for the start-up rule (13) or cycles
(14). `from pkg import name` is an import of the submodule `pkg.name` when that module exists, else of
`pkg`. Importing `a.b.c` also runs the `__init__` of `a` and `a.b`: those packages are imported too
(unless the importer is itself inside them), but a package reached only that way is not reported as an
import of that package, just followed through. Dynamic imports (`importlib.import_module`) are not seen.

Exit status 1 and one line per violation, `path:line: chain (contract)`, the line being the importer's
first step of the chain; a module is reported once per offending import statement, with the shortest
chain through it.
"""

from __future__ import annotations

import ast
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TOPS = ("agent", "controller")

PURE_CORE = ("controller.model", "controller.orchestrator", "controller.policy", "controller.control")
LIVE_PACKAGES = (
    "controller.fleet",
    "controller.loops",
    "controller.router",
    "controller.store",
    "controller.admin",
    "controller.metrics",
    "controller.app",
)
GRPC = ("grpc", "grpc_health", "grpc_reflection", "grpc_status")
WIRE = (*GRPC, "aiohttp", "aiomqtt")
PURE_CORE_IO = (
    # network and RPC, the event loop
    *WIRE,
    "paho",
    "socket",
    "ssl",
    "selectors",
    "http",
    "urllib",
    "requests",
    "httpx",
    "asyncio",
    # the clock (time flows in as a value; agent.api.clock is the shell's)
    "time",
    # processes, signals, threads pools
    "subprocess",
    "signal",
    "multiprocessing",
    "concurrent",
    # the file system and the OS (environment, files, paths)
    "os",
    "pathlib",
    "io",
    "shutil",
    "tempfile",
    "glob",
    "fcntl",
    "mmap",
    # databases, the GPU
    "sqlite3",
    "pynvml",
    # terminal and plot output
    "tqdm",
    "matplotlib",
)
SLOW_AT_STARTUP = ("cvxpy", "matplotlib")

Level = Literal["module", "function", "typing"]


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str  # a project module, or any other dotted name (a leaf)
    line: int
    level: Level  # module: runs when src is imported; function: inside a def; typing: under TYPE_CHECKING
    implicit: bool  # a package whose __init__ runs because a module under it is imported


@dataclass
class Graph:
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)  # project module -> file
    edges: dict[str, list[Edge]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def rel(self, module: str) -> str:
        return self.paths[module].relative_to(self.root).as_posix()


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    chain: tuple[str, ...]
    contract: str  # key of the contract (see CONTRACTS)
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {' -> '.join(self.chain)} ({self.message})"


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# ---------------------------------------------------------------------------------------------- graph


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


ImportFound = tuple[int, str | None, int, list[str] | None, Level]


def _collect(body: list[ast.stmt], level: Level, found: list[ImportFound]) -> None:
    """(line, module or `from` base, relative level, names of a `from` import, level) of every import.

    Walks statements only (an import is a statement), so it never descends into expressions.
    """
    for node in body:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, 0, None, level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module, node.level, [a.name for a in node.names], level))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            _collect(node.body, "function" if level == "module" else level, found)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            _collect(node.body, "typing", found)
            _collect(node.orelse, level, found)
        else:
            for name in ("body", "orelse", "finalbody"):
                block = getattr(node, name, None)
                if isinstance(block, list):
                    _collect([n for n in block if isinstance(n, ast.stmt)], level, found)
            for handler in getattr(node, "handlers", ()):  # try / try*
                _collect(handler.body, level, found)
            for case in getattr(node, "cases", ()):  # match
                _collect(case.body, level, found)


def build_graph(root: Path) -> Graph:
    graph = Graph(root)
    trees: dict[str, tuple[ast.Module, bool]] = {}
    for top in TOPS:
        for path in sorted((root / top).rglob("*.py")):
            module, is_package = _module_name(root, path)
            graph.paths[module] = path
            try:
                trees[module] = (ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), is_package)
            except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
                graph.errors.append(f"{path.relative_to(root).as_posix()}: cannot parse: {exc}")
    for module, (tree, is_package) in trees.items():
        found: list[ImportFound] = []
        _collect(tree.body, "module", found)
        graph.edges[module] = _edges(graph, module, is_package, found)
    return graph


def _edges(graph: Graph, module: str, is_package: bool, found: list[ImportFound]) -> list[Edge]:
    out: list[Edge] = []
    own = {module, *_ancestors(module)}  # packages already imported when this module runs

    def add(target: str, line: int, level: Level) -> None:
        if target in own:
            return
        out.append(Edge(module, target, line, level, False))
        out.extend(
            Edge(module, pkg, line, level, True)
            for pkg in _ancestors(target)
            if pkg not in own and pkg in graph.paths
        )

    for line, base, rel_level, names, level in found:
        if rel_level:  # relative: against this package (an __init__ is its own package)
            package = module.split(".") if is_package else module.split(".")[:-1]
            keep = len(package) - (rel_level - 1)
            if keep <= 0:
                graph.errors.append(f"{graph.rel(module)}:{line}: relative import beyond the top level")
                continue
            base = ".".join([*package[:keep], *([base] if base else [])])
        if base is None:
            continue
        if names is None:
            add(base, line, level)
            continue
        attributes = False
        for name in names:
            sub = f"{base}.{name}"
            if name != "*" and sub in graph.paths:
                add(sub, line, level)
            else:
                attributes = True
        if attributes:
            add(base, line, level)
    # one edge per (target, level, implicit), at its first line
    seen: set[tuple[str, str, bool]] = set()
    edges: list[Edge] = []
    for edge in sorted(out, key=lambda e: e.line):
        if (edge.dst, edge.level, edge.implicit) not in seen:
            seen.add((edge.dst, edge.level, edge.implicit))
            edges.append(edge)
    return edges


# ------------------------------------------------------------------------------------------ contracts


@dataclass(frozen=True)
class Contract:
    key: str
    message: str
    applies: Callable[[str], bool]  # modules the contract is about
    forbidden: Callable[[str, str], bool]  # (imported name, start module)
    follow: Callable[[Edge, str], bool] = lambda e, start: True  # (edge, start module)
    barrier: Callable[[str, str], bool] = lambda m, start: False  # do not walk into m from start
    transitive: bool = True


def _core_rank(module: str) -> int | None:
    for rank, pkg in enumerate(PURE_CORE):
        if _under(module, pkg):
            return rank
    return None


def _core_above(name: str, start: str) -> bool:
    rank, start_rank = _core_rank(name), _core_rank(start)
    return rank is not None and start_rank is not None and rank > start_rank


def _controller_may_import(name: str, start: str) -> bool:
    return _under(name, "agent.api") or (_under(start, "controller.sim") and _under(name, "agent.sim"))


def _in_core(m: str) -> bool:
    return _under(m, *PURE_CORE)


CONTRACTS: tuple[Contract, ...] = (
    Contract(
        "agent-controller",
        "agent never imports controller",
        applies=lambda m: _under(m, "agent"),
        forbidden=lambda n, s: _under(n, "controller"),
    ),
    Contract(
        "agent-sim",
        "agent's production modules never import agent.sim; agent.app only inside a function",
        applies=lambda m: _under(m, "agent") and not _under(m, "agent.sim"),
        forbidden=lambda n, s: _under(n, "agent.sim"),
        follow=lambda e, s: not (e.src == "agent.app" and e.level == "function"),
    ),
    Contract(
        "agent-api",
        "agent.api imports nothing else from agent",
        applies=lambda m: _under(m, "agent.api"),
        forbidden=lambda n, s: _under(n, "agent") and not _under(n, "agent.api"),
    ),
    Contract(
        "controller-agent",
        "controller imports only agent.api from the agent; controller.sim also agent.sim",
        applies=lambda m: _under(m, "controller"),
        forbidden=lambda n, s: _under(n, "agent") and not _controller_may_import(n, s),
        barrier=lambda m, s: _under(m, "controller.sim") and not _under(s, "controller.sim"),
    ),
    Contract(
        "pure-io",
        "pure core imports no I/O",
        applies=_in_core,
        forbidden=lambda n, s: _under(n, *PURE_CORE_IO),
    ),
    Contract(
        "pure-cvxpy",
        "cvxpy is allowed in the pure core only in controller.policy",
        applies=lambda m: _in_core(m) and not _under(m, "controller.policy"),
        forbidden=lambda n, s: _under(n, "cvxpy"),
        barrier=lambda m, s: _under(m, "controller.policy"),
    ),
    Contract(
        "pure-order",
        "pure core imports nothing above it: model < orchestrator < policy < control",
        applies=_in_core,
        forbidden=_core_above,
    ),
    Contract(
        "pure-shell",
        "pure core never imports controller.sim, controller.dctl or live packages",
        applies=_in_core,
        forbidden=lambda n, s: _under(n, "controller.sim", "controller.dctl", *LIVE_PACKAGES),
    ),
    Contract(
        "live-sim",
        "live packages never import controller.sim or agent.sim",
        applies=lambda m: _under(m, *LIVE_PACKAGES),
        forbidden=lambda n, s: _under(n, "controller.sim", "agent.sim"),
    ),
    Contract(
        "sim-wire",
        "controller.sim never imports grpc, aiohttp or aiomqtt",
        applies=lambda m: _under(m, "controller.sim"),
        forbidden=lambda n, s: _under(n, *WIRE),
    ),
    Contract(
        "pynvml",
        "only agent/gpu/nvml.py imports pynvml",
        applies=lambda m: m != "agent.gpu.nvml",
        forbidden=lambda n, s: _under(n, "pynvml"),
        transitive=False,
    ),
    Contract(
        "agent-cvxpy",
        "cvxpy stays off the agent",
        applies=lambda m: _under(m, "agent"),
        forbidden=lambda n, s: _under(n, "cvxpy"),
    ),
    Contract(
        "startup",
        "keep cvxpy and matplotlib off dctl's and the router's start-up: import them inside the command",
        applies=lambda m: _under(m, "controller.dctl", "controller.router"),
        forbidden=lambda n, s: _under(n, *SLOW_AT_STARTUP),
        follow=lambda e, s: e.level == "module",
    ),
)
CYCLE_KEY = "cycle"
CYCLE_MESSAGE = "no import cycles among project modules; function-level imports count"


def _shortest(graph: Graph, contract: Contract, start: str, first: Edge) -> list[Edge] | None:
    """Shortest chain from `start`, beginning with edge `first`, to a name the contract forbids."""
    parent: dict[str, Edge] = {}
    queue: deque[str] = deque()

    def step(e: Edge) -> Edge | None:
        """The edge itself when it reaches a forbidden name; else queue its end."""
        if not e.implicit and contract.forbidden(e.dst, start):
            return e
        if not contract.transitive or e.dst not in graph.paths or e.dst in parent or e.dst == start:
            return None
        if contract.barrier(e.dst, start):
            return None
        parent[e.dst] = e
        queue.append(e.dst)
        return None

    def chain(last: Edge) -> list[Edge]:
        out = [last]
        while out[-1].src != start:
            out.append(parent[out[-1].src])
        return out[::-1]

    hit = step(first)
    if hit:
        return [hit]
    while queue:
        module = queue.popleft()
        for e in graph.edges.get(module, []):
            if contract.follow(e, start):
                hit = step(e)
                if hit:
                    return chain(hit)
    return None


def _reachable_forbidden(graph: Graph, contract: Contract, start: str) -> bool:
    """Cheap first pass: does any chain from `start` reach a forbidden name?"""
    seen = {start}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for e in graph.edges.get(module, []):
            if not contract.follow(e, start):
                continue
            if not e.implicit and contract.forbidden(e.dst, start):
                return True
            if (
                contract.transitive
                and e.dst in graph.paths
                and e.dst not in seen
                and not contract.barrier(e.dst, start)
            ):
                seen.add(e.dst)
                queue.append(e.dst)
    return False


def _check_contract(graph: Graph, contract: Contract) -> list[Violation]:
    out: list[Violation] = []
    for start in sorted(graph.edges):
        if not contract.applies(start) or not _reachable_forbidden(graph, contract, start):
            continue
        lines: set[int] = set()
        for first in graph.edges[start]:
            if first.line in lines or not contract.follow(first, start):
                continue
            chain = _shortest(graph, contract, start, first)
            if chain is None:
                continue
            lines.add(first.line)
            out.append(
                Violation(
                    graph.rel(start),
                    first.line,
                    (start, *(e.dst for e in chain)),
                    contract.key,
                    contract.message,
                )
            )
    return out


def _cycles(graph: Graph) -> list[Violation]:
    """One violation per strongly connected component of the runtime import graph (Tarjan)."""
    succ: dict[str, list[Edge]] = {
        m: [e for e in es if e.level != "typing" and e.dst in graph.paths and e.dst != m]
        for m, es in graph.edges.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    for root in sorted(succ):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, i = work[-1]
            if i < len(succ[node]):
                work[-1] = (node, i + 1)
                nxt = succ[node][i].dst
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    out: list[Violation] = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        parent: dict[str, Edge] = {}
        queue = deque([start])
        closing: Edge | None = None
        while queue and closing is None:
            module = queue.popleft()
            for e in succ[module]:
                if e.dst == start:
                    closing = e
                    break
                if e.dst in members and e.dst not in parent:
                    parent[e.dst] = e
                    queue.append(e.dst)
        assert closing is not None
        cycle = [closing]
        while cycle[-1].src != start:
            cycle.append(parent[cycle[-1].src])
        cycle.reverse()
        levels = {e.level for e in cycle}
        how = "" if levels == {"module"} else ", closed by a function-level import"
        out.append(
            Violation(
                graph.rel(start),
                cycle[0].line,
                (start, *(e.dst for e in cycle)),
                CYCLE_KEY,
                f"{CYCLE_MESSAGE}{how}",
            )
        )
    return out


def find_violations(root: Path, contracts: Iterable[Contract] = CONTRACTS) -> list[Violation]:
    return _violations(build_graph(root), contracts)


def _violations(graph: Graph, contracts: Iterable[Contract] = CONTRACTS) -> list[Violation]:
    out: list[Violation] = []
    for contract in contracts:
        out += _check_contract(graph, contract)
    out += _cycles(graph)
    return sorted(out, key=lambda v: (v.path, v.line, v.contract, v.chain))


def check(root: Path) -> list[str]:
    """One line per violation (and per file that does not parse); empty when the tree is clean."""
    graph = build_graph(root)
    return graph.errors + [str(v) for v in _violations(graph)]


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    t0 = time.perf_counter()
    errors = check(root)
    for e in errors:
        print(e)
    if not errors:
        print(f"layering: ok ({len(CONTRACTS) + 1} contracts, {time.perf_counter() - t0:.2f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
