"""``pip install revline`` adds one top-level package, ``revline``, and it works installed.

Builds the wheel, installs it (no dependencies) into a fresh venv and lists what it put
in site-packages; the root folders schemas/, processors/, streams/ and sinks/ must arrive
as revline.schemas, revline.processors, … with their data files.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(*args: str | Path, cwd: Path = REPO) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_wheel_installs_only_revline(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", dist, REPO)
    (wheel,) = dist.glob("revline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("revline/schemas/avro/v1/Envelope.avsc", "revline/core/data/rules.yaml",
                 "revline/tools/broker_dist/pom.xml", "revline/sinks/ledger/postings.yaml",
                 "revline/sinks/ledger/migrations/alembic.ini"):
        assert data in names, f"{data} is not in the wheel"

    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .strip())
    before = {"pip", "_distutils_hack", "setuptools", "pkg_resources", "distutils-precedence.pth",
              "__pycache__"}
    added = sorted(p.name for p in site.iterdir()
                   if p.name not in before and not p.name.startswith(("pip-", "setuptools-")))
    print(f"\ntop-level entries the wheel added to site-packages: {added}")
    assert [a for a in added if not a.endswith(".dist-info")] == ["revline"], added
    top_level = [n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")]
    assert set(top_level) == {"revline"}, sorted(set(top_level))
    # installed, the subpackages are real folders and the symlinks are gone
    assert (site / "revline" / "schemas" / "__init__.py").is_file()
    assert not (site / "revline" / "schemas").is_symlink()
