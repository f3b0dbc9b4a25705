#!/usr/bin/env python3
"""Move a checkout of Revline to the layered layout of issue 19. Idempotent.

Not applied yet (issue 19's layout half): it was written while the tree was changing
under other work, and is meant to be run on a quiet tree, first thing::

    cp scripts/layout_tests/test_layers.py scripts/layout_tests/test_wheel.py tests/
    .venv/bin/python scripts/relayout.py          # transform the tree in place
    .venv/bin/python scripts/relayout.py          # again: "0 change(s)"
    .venv/bin/python scripts/relayout.py --check  # exit 1 if anything is left to do

then fix what it reports as "left for a person" (a module added to ``revline/`` since it
was written needs a line in MODULE_MOVES; lines it made longer than 100 characters), and
break the one import cycle the layer test finds today: ``revline.settings`` builds client
configs through ``revline.kafka_config`` (``Settings.producer_config``/``consumer_config``
and its security validator), which itself reads ``Settings``; move those builders into
kafka_config (their callers pass the settings) and validate the security settings where
the CLI reads them.

Run it from anywhere inside the checkout, with the project's venv (it calls ruff).

What it does:

1. **One import root.** ``schemas/``, ``processors/``, ``streams/`` and ``sinks/`` stay real
   folders at the repository root; relative symlinks ``revline/<name> -> ../<name>`` make
   them the subpackages ``revline.schemas``, ``revline.processors``, ``revline.streams`` and
   ``revline.sinks``. pyproject.toml then packages only ``revline*``.
2. **Floors.** The modules of ``revline/`` move (``git mv``) into
   ``revline/core`` (the ground floor: imports nothing of Revline outside itself),
   ``revline/operations`` (replay, redrive, report, verify, publisher: above streams/sinks),
   ``revline/tools`` (benchmark, workload generator, local broker and what only they use)
   and ``revline/cli`` (the top floor: ``revline.cli`` is the former ``revline/cli.py``, so
   ``revline = revline.cli:main`` and ``python -m revline.cli`` keep working). The
   manifest comparison of ``readback`` (it needs schemas) moves to
   ``revline.operations.verify``; the Kafka part of readback stays in core.
   The bench helpers under ``sinks/`` (they use the workload generator) move to tools.
3. **Every reference** in every tracked or untracked-but-not-ignored file is rewritten by
   pattern, not from a list of files: Python imports (module and function level, ``from
   revline import x``, ``import a.b``, ``import a.b as c``), dotted module names in string
   literals (monkeypatch/mock targets, ``-m`` arguments, importlib names), docstrings,
   comments and docs (``sinks.erp`` -> ``revline.sinks.erp``), file paths
   (``revline/bench.py`` -> ``revline/tools/bench.py``), pyproject.toml. Kafka header
   names (``revline.errors.*``), topic names and explicit logger names are left alone.
4. ``ruff check --fix --select I001`` re-sorts the import blocks it touched.

Idempotent: every step checks the state first (a moved file is not moved again, an
import already under ``revline.`` maps to itself), so a second run changes nothing.
What it cannot do is reported at the end: modules added to ``revline/`` that no table
here places on a floor, and any import still naming an old module.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from collections.abc import Callable, Iterable
from pathlib import Path

ROOTS = ("schemas", "processors", "streams", "sinks")

# Old module -> new module. A module's submodules follow it (longest prefix wins).
MODULE_MOVES: dict[str, str] = {
    # ground floor: the shared kernel
    "revline.errors": "revline.core.errors",
    "revline.settings": "revline.core.settings",
    "revline.admin": "revline.core.admin",
    "revline.startup": "revline.core.startup",
    "revline.auditlog": "revline.core.auditlog",
    "revline.metrics": "revline.core.metrics",
    "revline.watchdog": "revline.core.watchdog",
    "revline.redact": "revline.core.redact",
    "revline.money": "revline.core.money",
    "revline._gc": "revline.core._gc",
    "revline.readback": "revline.core.readback",
    "revline.kafka_config": "revline.core.kafka_config",
    # operations: between streams/sinks and the command line
    "revline.publisher": "revline.operations.publisher",
    "revline.replay": "revline.operations.replay",
    "revline.redrive": "revline.operations.redrive",
    "revline.report": "revline.operations.report",
    "revline.report_html": "revline.operations.report_html",
    "revline.verify": "revline.operations.verify",
    # tools: not part of the runtime
    "revline.bench": "revline.tools.bench",
    "revline._bench_faust": "revline.tools._bench_faust",
    "revline.workload": "revline.tools.workload",
    "revline.broker": "revline.tools.broker",
    "revline.isolated": "revline.tools.isolated",
    "sinks.ledger._bench": "revline.tools.ledger_bench",
    "sinks.erp._tryton_bench": "revline.tools.tryton_bench",
    "revline.read_model_bench": "revline.tools.read_model_bench",
    "revline.registry_server": "revline.tools.registry_server",
    "revline.chaos": "revline.tools.chaos",
    # top floor: the command line and the demo
    "revline.cli_audit": "revline.cli.audit",
    "revline.cli_exceptions": "revline.cli.exceptions",
    "revline.cli_reconcile": "revline.cli.reconcile",
    "revline.cli_replay": "revline.cli.replay",
    "revline.cli_report": "revline.cli.report",
    "revline.cli_rules": "revline.cli.rules",
    "revline.cli_chaos": "revline.cli.chaos",
    "revline.cli_index": "revline.cli.index",
    "revline.demo": "revline.cli.demo",
}
# Modules whose file moves but whose dotted name does not.
FILE_ONLY_MOVES = {"revline/cli.py": "revline/cli/__init__.py"}
# Folders that move with the module that reads them.
DIR_MOVES = {"revline/data": "revline/core/data",
             "revline/broker_dist": "revline/tools/broker_dist"}
# (old module, names) -> new module: part of a module that belongs on a higher floor.
SYMBOL_MOVES: dict[str, tuple[frozenset[str], str]] = {
    # the manifest comparison needs schemas and the publisher's header: not core
    "revline.readback": (frozenset({"ReadbackReport", "_STAGE", "check_against_manifest"}),
                         "revline.operations.verify"),
    # a Kafka admin helper the exception manager (streams) needs: core, not operations
    "revline.replay": (frozenset({"live_members", "_TIMEOUT_S"}), "revline.core.admin"),
    # what the demo shares with the command line, so that they do not import each other
    "revline.cli": (frozenset({"counts_table"}), "revline.cli._tables"),
}
NEW_MODULE_DOCS = {
    "revline.cli._tables": "Rich tables the command line and the demo share.",
}
PACKAGES = {
    "revline/core": '"""The ground floor: settings, errors, Kafka admin and readback, metrics,\n'
                    'the small helpers. Imports nothing of Revline outside ``revline.core``."""\n',
    "revline/operations": '"""Operations over the running pipeline (publish, replay, re-drive,\n'
                          'report, verify): above streams and sinks, below the command line."""\n',
    "revline/tools": '"""Tools, not part of the runtime: the benchmark, the workload generator,\n'
                     'the local broker and the isolated pipeline runs they drive."""\n',
}
CLI_MAIN = ('"""``python -m revline.cli``: the ``revline`` command."""\n\n'
            "import sys\n\nfrom revline.cli import main\n\nsys.exit(main())\n")
LOGGER_CALLS = {"getLogger", "at_level", "set_level", "setLevel"}
TEXT_SUFFIXES = {".md", ".toml", ".yml", ".yaml", ".json", ".cfg", ".ini", ".txt", ".sh", ".rst"}
TEXT_NAMES = {"Makefile", "Dockerfile", "run", ".gitignore", ".dockerignore"}
SKIP_FILES = {"scripts/relayout.py", "requirements.lock", "requirements-dev.lock"}


def top_defs(tree: ast.Module) -> set[str]:
    """The names a module's own top-level statements define (imports excluded)."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return out


def insert_imports(text: str, import_text: str) -> str:
    """``import_text`` after the last top-level import of the module's header."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    last = 0
    for n in tree.body:
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            last = n.end_lineno or n.lineno
        elif last or not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)):
            break
    if not last:  # no import at all: after the docstring
        first = tree.body[0] if tree.body else None
        last = (first.end_lineno or 0) if isinstance(first, ast.Expr) else 0
        import_text = "\n" + import_text
    return "".join(lines[:last]) + import_text + "".join(lines[last:])


def sh(*args: str, cwd: Path, check: bool = True) -> str:
    return subprocess.run(args, cwd=cwd, check=check, capture_output=True, text=True).stdout


class Relayout:
    def __init__(self, repo: Path, dry: bool) -> None:
        self.repo = repo
        self.dry = dry
        self.changed: list[str] = []
        self.py_touched: set[Path] = set()
        self.warnings: list[str] = []
        self._names: dict[str, set[str] | None] = {}
        self._kept_format = False
        self.logger_names: set[str] = set()

    # ---------------------------------------------------------------- names
    @staticmethod
    def map_module(name: str) -> str:
        """The new dotted name of an old (or already new) module name."""
        best = ""
        for old in MODULE_MOVES:
            if (name == old or name.startswith(old + ".")) and len(old) > len(best):
                best = old
        if best:
            return MODULE_MOVES[best] + name[len(best):]
        head = name.split(".")[0]
        if head in ROOTS:
            return "revline." + name
        return name

    def old_module_exists(self, dotted: str) -> bool:
        """Is ``dotted`` a module name of the old (or the new) layout?"""
        return dotted in MODULE_MOVES or self.new_file(dotted) is not None

    def new_file(self, old: str) -> Path | None:
        """The file that holds module ``old`` now (or a package's __init__, or a folder)."""
        if "." not in old:
            return None
        bases = [self.repo.joinpath(*self.map_module(old).split("."))]
        head = old.split(".")[0]
        if head in ROOTS:  # the real folder (the symlink may not be there yet)
            bases.append(self.repo.joinpath(*old.split(".")))
        bases.append(self.repo.joinpath(*old.split(".")))  # not moved yet
        for base in bases:
            for cand in (base.with_suffix(".py"), base / "__init__.py"):
                if cand.is_file():
                    return cand
            if base.is_dir() and not base.name.startswith("__"):
                return base
        return None

    def defined_names(self, old: str) -> set[str] | None:
        if old in self._names:
            return self._names[old]
        path = self.new_file(old)
        names: set[str] | None = None
        if path is not None and path.is_file():
            names = set()
            try:
                tree = ast.parse(path.read_text())
            except SyntaxError:
                tree = ast.Module(body=[], type_ignores=[])
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names.update((a.asname or a.name).split(".")[0] for a in node.names)
            if path.name == "__init__.py":
                names.update(p.stem for p in path.parent.iterdir()
                             if p.suffix == ".py" or (p / "__init__.py").exists())
        if path is not None and path.is_dir():
            names = {p.stem for p in path.iterdir()}
        self._names[old] = names
        return names

    def symbol_target(self, module_old_or_new: str, name: str) -> str | None:
        for old, (names, target) in SYMBOL_MOVES.items():
            if module_old_or_new in (old, self.map_module(old)) and name in names:
                return target
        return None

    # ---------------------------------------------------------------- steps
    def write(self, path: Path, text: str) -> None:
        if path.read_text() == text:
            return
        self.changed.append(str(path.relative_to(self.repo)))
        if not self.dry:
            path.write_text(text)
        if path.suffix == ".py":
            self.py_touched.add(path)

    def tracked(self, rel: str) -> bool:
        return bool(sh("git", "ls-files", "--", rel, cwd=self.repo).strip())

    def move(self, src_rel: str, dst_rel: str) -> None:
        src, dst = self.repo / src_rel, self.repo / dst_rel
        if not src.exists() or src.is_symlink():
            return
        if dst.exists():
            self.warnings.append(f"both {src_rel} and {dst_rel} exist: merge them by hand")
            return
        self.changed.append(f"{src_rel} -> {dst_rel}")
        if self.dry:
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        if self.tracked(src_rel):
            sh("git", "mv", src_rel, dst_rel, cwd=self.repo)
            if src.exists():  # untracked files left in a moved folder
                for leftover in sorted(src.rglob("*")):
                    if leftover.is_file():
                        target = dst / leftover.relative_to(src)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        leftover.rename(target)
        else:
            src.rename(dst)
        self.py_touched.discard(src)
        if dst.suffix == ".py":
            self.py_touched.add(dst)

    def step_packages(self) -> None:
        for rel, doc in PACKAGES.items():
            init = self.repo / rel / "__init__.py"
            if not init.exists():
                self.changed.append(f"new {rel}/__init__.py")
                if not self.dry:
                    init.parent.mkdir(parents=True, exist_ok=True)
                    init.write_text(doc)
        for src, dst in FILE_ONLY_MOVES.items():
            self.move(src, dst)
        for src, dst in DIR_MOVES.items():
            self.move(src, dst)
        for old, new in MODULE_MOVES.items():
            src = old.replace(".", "/")
            dst = new.replace(".", "/")
            for suffix in (".py", ""):
                if (self.repo / (src + suffix)).exists():
                    self.move(src + suffix, dst + suffix)
        main = self.repo / "revline/cli/__main__.py"
        if (self.repo / "revline/cli/__init__.py").exists() and not main.exists():
            self.changed.append("new revline/cli/__main__.py")
            if not self.dry:
                main.write_text(CLI_MAIN)
        init = self.repo / "revline/cli/__init__.py"
        if init.exists():  # run as `python -m revline.cli` through __main__ now
            text = init.read_text()
            text = re.sub(r'\n+if __name__ == "__main__":\n    sys\.exit\(main\(\)\)\n*\Z', "\n",
                          text)
            self.write(init, text)

    def step_symlinks(self) -> None:
        for root in ROOTS:
            link = self.repo / "revline" / root
            if link.is_symlink() and os.readlink(link) == f"../{root}":
                continue
            if link.exists() or link.is_symlink():
                self.warnings.append(f"revline/{root} exists and is not the symlink ../{root}")
                continue
            self.changed.append(f"symlink revline/{root} -> ../{root}")
            if not self.dry:
                link.symlink_to(f"../{root}")

    def step_split(self) -> None:
        """Move the SYMBOL_MOVES definitions out of their module (into an existing or new one)."""
        for old, (names, target) in SYMBOL_MOVES.items():
            src = self.new_file(old)
            if src is None or not src.is_file():
                continue
            text = src.read_text()
            tree = ast.parse(text)
            lines = text.splitlines(keepends=True)
            moved: list[tuple[int, int]] = []
            for node in tree.body:
                defined = set()
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined = {node.name}
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    tg = node.targets if isinstance(node, ast.Assign) else [node.target]
                    defined = {n.id for t in tg for n in ast.walk(t) if isinstance(n, ast.Name)}
                if defined and defined <= names:
                    decorators = getattr(node, "decorator_list", [])
                    first = min([node.lineno] + [d.lineno for d in decorators])
                    while first > 1 and lines[first - 2].lstrip().startswith("#"):
                        first -= 1  # the comment above a definition goes with it
                    moved.append((first, node.end_lineno or node.lineno))
            if not moved:
                continue
            chunk = "".join("".join(lines[a - 1:b]) + "\n\n" for a, b in moved).rstrip() + "\n"
            keep = [ln for i, ln in enumerate(lines, 1) if not any(a <= i <= b for a, b in moved)]
            remaining = re.sub(r"\n{3,}", "\n\n\n", "".join(keep)).rstrip() + "\n"
            imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            import_text = "".join("".join(lines[n.lineno - 1:n.end_lineno]) for n in imports
                                  if not (isinstance(n, ast.ImportFrom)
                                          and n.module == "__future__"))
            used = {n.id for n in ast.walk(ast.parse(chunk)) if isinstance(n, ast.Name)}
            own = sorted(used & (top_defs(ast.parse(remaining)) - names))
            if own:
                import_text += f"from {self.map_module(old)} import {', '.join(own)}\n"
            dst = self.repo.joinpath(*target.split(".")).with_suffix(".py")
            if dst.exists():
                new_dst = insert_imports(dst.read_text(), import_text).rstrip() + "\n\n\n" + chunk
            else:
                doc = NEW_MODULE_DOCS.get(target, f"Split from {self.map_module(old)}.")
                new_dst = (f'"""{doc}"""\n\nfrom __future__ import '
                           f"annotations\n\n{import_text}\n\n{chunk}")
            back = sorted(names & {n.id for n in ast.walk(ast.parse(remaining))
                                   if isinstance(n, ast.Name)})
            if back:  # what stays behind still uses some of what moved
                remaining = insert_imports(remaining, f"from {target} import {', '.join(back)}\n")
            self.changed.append(f"split {sorted(names)} from {old} into {target}")
            if not self.dry:
                dst.write_text(new_dst)
                src.write_text(remaining)
                self.py_touched.update({dst, src})
                # the import blocks were copied whole: drop what each half no longer uses
                subprocess.run([sys.executable, "-m", "ruff", "check", "--fix", "-q",
                                "--select", "F401,I001", str(dst), str(src)], cwd=self.repo)
                self._names.clear()

    # ---------------------------------------------------------------- rewriting
    def files(self) -> list[Path]:
        out = sh("git", "ls-files", "-co", "--exclude-standard", cwd=self.repo).splitlines()
        seen = []
        for rel in sorted(set(out)):
            p = self.repo / rel
            if rel in SKIP_FILES or p.is_symlink() or not p.is_file():
                continue
            if any(part in ROOTS for part in Path(rel).parts[1:2]) and rel.startswith("revline/"):
                continue  # through a symlink
            seen.append(p)
        return seen

    def render_import(self, node: ast.Import | ast.ImportFrom, src: str,
                      usage: dict[str, str]) -> str | None:
        """The new text of one import statement, or None when it does not change."""
        self._kept_format = False
        if isinstance(node, ast.ImportFrom):
            if node.level or not node.module:
                return None
            mod = node.module
            groups: dict[str, list[str]] = {}
            for a in node.names:
                full = f"{mod}.{a.name}"
                target = self.symbol_target(mod, a.name)
                if target:
                    groups.setdefault(target, []).append(self._alias(a.name, a.asname))
                    continue
                if self.old_module_exists(full) and self.map_module(full) != \
                        f"{self.map_module(mod)}.{a.name}":
                    new = self.map_module(full)
                    parent, _, last = new.rpartition(".")
                    groups.setdefault(parent, []).append(self._alias(last, a.asname or a.name))
                    continue
                groups.setdefault(self.map_module(mod), []).append(self._alias(a.name, a.asname))
            if list(groups) == [mod]:
                return None
            if list(groups) == [self.map_module(mod)]:
                # only the module changes: substitute it and keep the statement's formatting
                seg = ast.get_source_segment(src, node) or ""
                self._kept_format = True
                return re.sub(r"^from\s+" + re.escape(mod) + r"\b",
                              f"from {self.map_module(mod)}", seg, count=1)
            return "\n".join(f"from {m} import {', '.join(ns)}" for m, ns in groups.items())
        parts: list[str] = []
        changed = False
        for a in node.names:
            new = self.map_module(a.name)
            if new == a.name:
                parts.append(f"import {self._alias(a.name, a.asname)}")
                continue
            changed = True
            if a.asname:
                parts.append(f"import {new} as {a.asname}")
            elif "." not in a.name:  # `import schemas` binds `schemas`: keep that name
                parent, _, last = new.rpartition(".")
                parts.append(f"from {parent} import {self._alias(last, a.name)}")
            else:  # `import a.b` binds `a`: the code says `a.b.x`, which must follow
                parts.append(f"import {new}")
                usage[a.name] = new
        return "\n".join(parts) if changed else None

    @staticmethod
    def _alias(name: str, asname: str | None) -> str:
        return name if not asname or asname == name else f"{name} as {asname}"

    DOTTED = re.compile(r"(?<![\w./\\-])((?:revline|schemas|processors|streams|sinks)(?:\.\w+)+)")
    FROM_IMPORT = re.compile(r"(?<![\w.])((?:from|import)\s+)(schemas|processors|streams|sinks)\b"
                             r"(?=[\s.])")

    def rewrite_dotted(self, text: str, *, code_from_import: bool = False) -> str:
        def repl(m: re.Match[str]) -> str:
            dotted = m.group(1)
            after = text[m.end():m.end() + 2]
            if (after[:1] == "." and not re.match(r"\.\w", after)) or after[:1] == "-":
                return dotted  # `revline.errors.*` headers, `revline.redrive-log` topics
            before = text[max(0, m.start() - 7):m.start()]
            if dotted in self.logger_names and not re.search(r"(from|import|-m)\s+$", before):
                return dotted  # a logger's name, as log lines and log configuration show it
            parts = dotted.split(".")
            for k in range(len(parts), 1, -1):
                mod = ".".join(parts[:k])
                if not self.old_module_exists(mod):
                    continue
                rest = parts[k:]
                if rest:
                    target = self.symbol_target(mod, rest[0])
                    names = self.defined_names(mod) or set()
                    if target:
                        return ".".join([target, *rest])
                    if rest[0] not in names:
                        return dotted  # not a module path (`revline.errors.stage`)
                return ".".join([self.map_module(mod), *rest])
            return dotted
        text = self.DOTTED.sub(repl, text)
        if code_from_import:
            text = self.FROM_IMPORT.sub(lambda m: m.group(1) + "revline." + m.group(2), text)
        return text

    def path_table(self) -> list[tuple[re.Pattern[str], str]]:
        table = dict(FILE_ONLY_MOVES)
        table.update({k + "/": v + "/" for k, v in DIR_MOVES.items()})
        for old, new in MODULE_MOVES.items():
            table[old.replace(".", "/") + ".py"] = new.replace(".", "/") + ".py"
        table['"revline" / "data"'] = '"revline" / "core" / "data"'
        return [(re.compile(r"(?<![\w/.])" + re.escape(o) + r"(?![\w])"), n)
                for o, n in sorted(table.items(), key=lambda kv: -len(kv[0]))]

    def rewrite_paths(self, text: str) -> str:
        for pattern, new in self._paths:
            text = pattern.sub(new, text)
        return text

    def rewrite_python(self, path: Path) -> None:
        src = path.read_text()
        try:
            tree = ast.parse(src)
        except SyntaxError as exc:
            rel = path.relative_to(self.repo)
            self.warnings.append(f"{rel}: cannot parse ({exc}); not rewritten")
            return
        edits: list[tuple[int, int, str]] = []  # (start offset, end offset, text)
        offsets = [0]
        for line in src.splitlines(keepends=True):
            offsets.append(offsets[-1] + len(line))

        def off(lineno: int, col: int) -> int:  # col is in utf-8 bytes
            line_start = offsets[lineno - 1]
            line = src[line_start:offsets[lineno]] if lineno < len(offsets) else src[line_start:]
            return line_start + len(line.encode()[:col].decode(errors="ignore"))

        usage: dict[str, str] = {}
        skip_strings: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                new = self.render_import(node, src, usage)
                if new is not None:
                    indent = " " * node.col_offset
                    if not self._kept_format:  # generated text: indent it like the statement
                        new = new.replace("\n", "\n" + indent)
                    end = off(node.end_lineno or node.lineno, node.end_col_offset or 0)
                    edits.append((off(node.lineno, node.col_offset), end, new))
            elif isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in LOGGER_CALLS:
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            skip_strings.add(off(arg.lineno, arg.col_offset))
        import_spans = [(a, b) for a, b, _ in edits]
        # strings, comments and `a.b` usages of plain-imported moved modules
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            start = offsets[tok.start[0] - 1] + tok.start[1]
            end = offsets[tok.end[0] - 1] + tok.end[1]
            if any(a <= start < b for a, b in import_spans):
                continue
            if tok.type in (tokenize.STRING, tokenize.COMMENT):
                if tok.type == tokenize.STRING and start in skip_strings:
                    continue
                new = self.rewrite_paths(self.rewrite_dotted(tok.string))
                if new != tok.string:
                    edits.append((start, end, new))
            elif tok.type == tokenize.NAME and usage:
                for old, new in usage.items():
                    seq = old.split(".")
                    if tok.string != seq[0] or src[start - 1:start] == ".":
                        continue
                    chain = r"\s*\.\s*".join(map(re.escape, seq)) + r"(?!\w)"
                    m = re.compile(chain).match(src, start)
                    if m:
                        edits.append((start, m.end(), new))
        out = src
        for a, b, new in sorted(edits, reverse=True):
            out = out[:a] + new + out[b:]
        out = re.sub(r'"revline"(\s*/\s*)"(data|broker_dist)"',
                     lambda m: (f'"revline"{m[1]}"{"core" if m[2] == "data" else "tools"}"'
                                f'{m[1]}"{m[2]}"'),
                     out)  # Path(...) / "revline" / "data"
        self.write(path, self.retarget_setattr(out))

    def retarget_setattr(self, text: str) -> str:
        """``monkeypatch.setattr(revline.replay, "live_members", ...)`` follows the symbol."""
        for old, (names, target) in SYMBOL_MOVES.items():
            new = self.map_module(old)
            alternatives = "|".join(map(re.escape, sorted(names)))
            pattern = re.compile(r"(setattr\(\s*)" + re.escape(new)
                                 + rf"(\s*,\s*[\"'](?:{alternatives})[\"'])")
            text, n = pattern.subn(rf"\g<1>{target}\g<2>", text)
            plain = re.compile(r"^(\s*)import " + re.escape(new) + r"\n", re.M)
            if n and plain.search(text) and not re.search(re.escape(new) + r"\.", text):
                text = plain.sub(rf"\g<1>import {target}\n", text)
        return text

    def rewrite_text(self, path: Path) -> None:
        text = path.read_text()
        self.write(path, self.rewrite_paths(self.rewrite_dotted(text, code_from_import=True)))

    def step_rewrite(self) -> None:
        self._paths = self.path_table()
        pattern = re.compile(r"getLogger\(\s*[\"']([\w.]+)[\"']")
        for path in self.files():
            if path.suffix == ".py":
                self.logger_names.update(pattern.findall(path.read_text()))
        for path in self.files():
            if path.suffix == ".py":
                self.rewrite_python(path)
            elif ((path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES)
                  and path.name != "pyproject.toml"):
                try:
                    self.rewrite_text(path)
                except UnicodeDecodeError:
                    continue

    # ---------------------------------------------------------------- configuration
    def step_pyproject(self) -> None:
        path = self.repo / "pyproject.toml"
        text = path.read_text()
        text = re.sub(r'(\[tool\.setuptools\.packages\.find\]\ninclude = )\[[^\]]*\]',
                      r'\1["revline*"]', text)
        # package data: keys are the new package names
        def data(m: re.Match[str]) -> str:
            body = m.group(2)
            body = re.sub(r'^(schemas|processors|streams|sinks) =', r'"revline.\1" =', body,
                          flags=re.M)
            body = body.replace('revline = ["broker_dist/pom.xml", "data/*.yaml"]',
                                '"revline.core" = ["data/*.yaml"]\n'
                                '"revline.tools" = ["broker_dist/pom.xml"]')
            return m.group(1) + body
        text = re.sub(r"(\[tool\.setuptools\.package-data\]\n)((?:.+\n)+)", data, text)
        text = re.sub(r'(\[tool\.mypy\][^\[]*?\npackages = )\[[^\]]*\]', r'\1["revline"]', text)
        text = re.sub(r'(\[tool\.mypy\][^\[]*?\nexclude = )\["tests/"\]',
                      r'\1["^tests/", "^(schemas|processors|streams|sinks)/"]', text)
        if "extend-exclude" not in text:
            text = text.replace(
                '[tool.ruff]\n',
                '[tool.ruff]\n# revline/{schemas,processors,streams,sinks} are symlinks to the '
                'root folders:\n# lint each file once, under its real path.\n'
                'extend-exclude = ["revline/schemas", "revline/processors", "revline/streams",\n'
                '                  "revline/sinks"]\n', 1)
        text = self.rewrite_paths(text)
        self.write(path, text)

    # ---------------------------------------------------------------- report
    def leftovers(self) -> list[str]:
        out = []
        floors = {"core", "operations", "tools", "cli", *ROOTS}
        for p in sorted((self.repo / "revline").iterdir()):
            if p.name in floors or p.name.startswith(("__", ".")) or p.name.endswith(".egg-info"):
                continue
            if p.suffix == ".py" or p.is_dir():
                out.append(f"revline/{p.name}: on no floor; add it to MODULE_MOVES")
        for path in self.files():
            if path.suffix != ".py":
                continue
            try:
                tree = ast.parse(path.read_text())
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                mods: Iterable[str] = ()
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    mods = [node.module]
                elif isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                for mod in mods:
                    if self.map_module(mod) != mod:
                        out.append(f"{path.relative_to(self.repo)}:{node.lineno}: imports {mod}")
        return out

    def run(self, steps: Iterable[Callable[[], None]] | None = None) -> int:
        for step in steps or (self.step_packages, self.step_symlinks, self.step_split,
                              self.step_rewrite, self.step_pyproject):
            step()
        long_lines: list[str] = []
        if self.py_touched and not self.dry:
            files = sorted(str(p) for p in self.py_touched if p.exists())
            subprocess.run([sys.executable, "-m", "ruff", "check", "--fix", "-q", "--select",
                            "I001", *files], cwd=self.repo)
            out = subprocess.run([sys.executable, "-m", "ruff", "check", "-q", "--select", "E501",
                                  "--output-format", "concise", *files], cwd=self.repo,
                                 capture_output=True, text=True).stdout
            long_lines = [f"{line} (a longer module name)" for line in out.splitlines()
                          if ": E501" in line]
        if not self.dry:  # stage what this script created, so `git status` shows the move
            created = [f"revline/{r}" for r in ROOTS] + [f"{p}/__init__.py" for p in PACKAGES]
            created += ["revline/cli/__main__.py"] + [
                t.replace(".", "/") + ".py" for _, t in SYMBOL_MOVES.values()]
            sh("git", "add", "--", *[c for c in created if (self.repo / c).exists()
                                     or (self.repo / c).is_symlink()], cwd=self.repo, check=False)
        for line in self.changed:
            print(("would change: " if self.dry else "changed: ") + line)
        problems = self.warnings + long_lines + ([] if self.dry else self.leftovers())
        for line in problems:
            print("left for a person: " + line, file=sys.stderr)
        print(f"{len(self.changed)} change(s), {len(problems)} left for a person")
        return 1 if (self.dry and self.changed) or problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a "
                        "run would change something")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    repo = Path(sh("git", "rev-parse", "--show-toplevel", cwd=here).strip())
    return Relayout(repo, dry=args.check).run()


if __name__ == "__main__":
    sys.exit(main())
