#!/usr/bin/env python3
"""Compile the simulator's hot modules with mypyc into the virtualenv: the `dynamollm_native` package.

    .venv/bin/python tools/build_native.py          # `make` runs it after installing the package

The simulated engine (agent/sim/engine_core.py) and its physics (agent/sim/physics/model.py) run about a
million iterations per simulated hour of a cluster; compiled by mypyc from the same typed source, the
cluster simulator runs them several times faster with the same results bit for bit (docs/simulator.md).
Copies of the two files are compiled as `dynamollm_native.engine_core` and
`dynamollm_native.physics_model`, each with the SHA-256 of its source, and installed into the platform
site-packages of the running interpreter. `agent.sim.native` uses them only while the sources still hash
the same: an edited source runs as plain Python until this is run again, never as a stale build.

Needs a C compiler and the Python headers (mypyc comes with mypy, a dev dependency). Where the build
fails it says why on stderr and exits 1; the simulator then runs as plain Python. Build output goes to
stderr; stdout stays empty.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.sim.native import PACKAGE, SOURCES  # noqa: E402

_SETUP = f"""
from mypyc.build import mypycify
from setuptools import setup

setup(
    name="{PACKAGE}",
    ext_modules=mypycify(
        [{", ".join(f'"{PACKAGE}/{name}.py"' for name in SOURCES)}], opt_level="3", group_name="{PACKAGE}"
    ),
    script_args=["build_ext", "--inplace"],
)
"""


def build(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pkg = work / PACKAGE
        pkg.mkdir()
        (pkg / "__init__.py").write_text('"""mypyc build of the simulator (tools/build_native.py)."""\n')
        for name, source in SOURCES.items():
            text = (ROOT / source).read_bytes()
            digest = hashlib.sha256(text).hexdigest()
            (pkg / f"{name}.py").write_bytes(text + f'\nSOURCE_SHA256 = "{digest}"\n'.encode())
        (work / "setup.py").write_text(_SETUP)
        # mypyc type-checks the copies, which import the rest of the project from the source tree
        env = {"PATH": "/usr/bin:/bin", "MYPYPATH": str(ROOT), "PYTHONPATH": str(ROOT), "HOME": tmp}
        done = subprocess.run(
            [sys.executable, "setup.py"], cwd=work, env=env, stdout=sys.stderr, stderr=sys.stderr
        )
        if done.returncode != 0:
            raise SystemExit(f"build_native: mypyc failed (exit {done.returncode}): engines stay Python")
        built = sorted(work.glob(f"{PACKAGE}__mypyc*.so")) + sorted(pkg.glob("*.so"))
        if len(built) != len(SOURCES) + 1:
            raise SystemExit(f"build_native: expected {len(SOURCES) + 1} libraries, got {built}")
        # replace the previous build whole
        shutil.rmtree(dest / PACKAGE, ignore_errors=True)
        for old in dest.glob(f"{PACKAGE}__mypyc*.so"):
            old.unlink()
        (dest / PACKAGE).mkdir()
        shutil.copy2(pkg / "__init__.py", dest / PACKAGE / "__init__.py")
        for lib in built:
            shutil.copy2(lib, dest / lib.relative_to(work))


def main() -> int:
    dest = Path(sysconfig.get_paths()["platlib"])
    build(dest)
    print(f"build_native: {PACKAGE} ({', '.join(SOURCES)}) built into {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
