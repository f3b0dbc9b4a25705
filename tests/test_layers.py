"""The import layers, read from the source with ``ast`` (function-level imports included).

Floors, lowest first; a module may import its own floor and the floors below it:

    0 core        revline.core: settings, errors, Kafka admin/readback, metrics, helpers
    1 schemas     revline.schemas (the root folder schemas/)
    2 processors  revline.processors
    3 sinks       revline.sinks: the stores and adapters effects are applied to (ledger, ERP,
                  the operators' read model), and the sink processor
    4 streams     revline.streams: the worker, the auditor and the exception manager (the
                  last two maintain the read model, a store of the floor below)
    5 operations  revline.operations: publish, replay, re-drive, report, verify
    6 tools       revline.tools: benchmark, workload generator, local broker, chaos
    7 cli         revline.cli: the command line and the demo; nothing else imports it

Also: no cycle between packages or between modules (static imports), and no module is
importable under two names (``schemas`` and ``revline.schemas``) in one process.
Run with ``-s`` for the layer summary.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT_FOLDERS = ("schemas", "processors", "streams", "sinks")
FLOORS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("schemas",),
    ("processors",),
    ("sinks",),
    ("streams",),
    ("operations",),
    ("tools",),
    ("cli",),
)
LEVEL = {pkg: level for level, pkgs in enumerate(FLOORS) for pkg in pkgs}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.where}: {self.src} imports {self.dst}"


def _modules() -> dict[str, Path]:
    """Dotted name -> file, from the real folders (the revline/<root> symlinks are skipped)."""
    out: dict[str, Path] = {}
    sources = [(REPO / "revline", "revline")] + [(REPO / r, f"revline.{r}") for r in ROOT_FOLDERS]
    for base, prefix in sources:
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if base.name == "revline" and rel.parts[0] in ROOT_FOLDERS:
                continue
            parts = [prefix, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest known module that ``name`` starts with."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _edges() -> tuple[list[Edge], list[str]]:
    edges: list[Edge] = []
    problems: list[str] = []
    for mod, path in MODULES.items():
        where_file = path.relative_to(REPO)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                           for a in node.names]
            for target in targets:
                where = f"{where_file}:{node.lineno}"
                head = target.split(".")[0]
                if head in ROOT_FOLDERS:
                    problems.append(f"{where}: imports {target} under its old top-level name")
                    continue
                dst = _resolve(target) if head == "revline" else None
                if dst is not None and dst != mod:
                    edges.append(Edge(mod, dst, where))
    return edges, problems


EDGES, OLD_NAMES = _edges()


def package(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVEL else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        item = stack.pop()
                        on_stack.discard(item)
                        scc.append(item)
                        if item == node:
                            break
                    if len(scc) > 1:
                        out.append(sorted(scc))
    return out


def test_every_module_is_on_a_floor() -> None:
    stray = sorted(m for m in MODULES if m != "revline" and package(m) is None)
    assert not stray, f"modules on no floor (put them in one of {sorted(LEVEL)}): {stray}"
    top = MODULES["revline"].read_text()
    assert "import" not in top, "revline/__init__.py imports nothing (it sits above no floor)"


def test_no_old_top_level_names() -> None:
    assert not OLD_NAMES, "\n".join(OLD_NAMES)


def test_imports_go_down_only() -> None:
    bad = []
    for e in EDGES:
        src, dst = package(e.src), package(e.dst)
        if src is None or dst is None or src == dst:
            continue
        if LEVEL[dst] > LEVEL[src]:
            bad.append(f"{e}  ({src} is below {dst})")
        elif LEVEL[dst] == LEVEL[src]:
            bad.append(f"{e}  ({src} and {dst} are peers)")
    assert not bad, "imports going up or sideways:\n" + "\n".join(sorted(bad))


def test_no_cycles() -> None:
    packages: dict[str, set[str]] = defaultdict(set)
    modules: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], str] = {}
    for e in EDGES:
        modules[e.src].add(e.dst)
        modules.setdefault(e.dst, set())
        where.setdefault((e.src, e.dst), e.where)
        src, dst = package(e.src), package(e.dst)
        if src and dst and src != dst:
            packages[src].add(dst)
            packages.setdefault(dst, set())
    assert not _cycles(packages), f"package cycles: {_cycles(packages)}"
    lines = []
    for scc in _cycles(modules):
        members = set(scc)
        lines.append(" <-> ".join(scc))
        lines += [f"    {where[(a, b)]}: {a} imports {b}"
                  for a in scc for b in sorted(modules[a] & members)]
    assert not lines, "module cycles:\n" + "\n".join(lines)


IMPORTABLE = sorted(m for m in MODULES if ".migrations" not in m and not m.endswith("__main__"))


def test_one_name_per_module() -> None:
    """Importing every module loads no top-level schemas/processors/streams/sinks."""
    code = (
        "import importlib, sys\n"
        f"for name in {IMPORTABLE!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"  # _bench_faust reads its settings from the environment
        "        pass\n"
        f"old = sorted(m for m in sys.modules if m.split('.')[0] in {ROOT_FOLDERS!r})\n"
        "files = [getattr(m, '__file__', None) for m in list(sys.modules.values())]\n"
        "import os\n"
        "real = [os.path.realpath(f) for f in files if f and 'revline' in f]\n"
        "dups = sorted({f for f in real if real.count(f) > 1})\n"
        "print(old, dups)\n"
        "sys.exit(1 if old or dups else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_summary() -> None:
    """The layer summary (shown with -s)."""
    counts = Counter(package(m) for m in MODULES if package(m))
    deps: dict[str, set[str]] = defaultdict(set)
    for e in EDGES:
        src, dst = package(e.src), package(e.dst)
        if src and dst and src != dst:
            deps[src].add(dst)
    print(f"\n{len(MODULES)} modules, {len(EDGES)} imports of Revline modules;"
          " floors, lowest first:")
    for level, pkgs in enumerate(FLOORS):
        for pkg in pkgs:
            below = ", ".join(sorted(deps[pkg], key=lambda p: (LEVEL[p], p))) or "nothing"
            print(f"  {level} {pkg:<11} {counts[pkg]:>3} modules  imports: {below}")
    print("  no import goes up or sideways, no cycle")
