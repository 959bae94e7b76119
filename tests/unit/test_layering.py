"""The import-layering check passes on our tree and catches each kind of violation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_layering", ROOT / "tools" / "check_layering.py")
assert _spec and _spec.loader
check_layering = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layering)


def test_our_tree_respects_the_layering() -> None:
    assert check_layering.check(ROOT) == []


@pytest.mark.parametrize(
    ("path", "source", "needle"),
    [
        ("agent/x.py", "import controller.sim\n", "agent must never import controller"),
        ("controller/loops/x.py", "from agent.sim import physics\n", "controller may import only agent.api"),
        ("controller/policy/x.py", "import time\n", "pure"),
        ("controller/model/x.py", "from asyncio import sleep\n", "pure"),
        ("agent/gpu/other.py", "import pynvml\n", "only agent/gpu/nvml.py"),
        ("controller/dctl/x.py", "import cvxpy\n", "inside the command"),
        ("agent/sim/x.py", "def f():\n    import cvxpy\n", "cvxpy stays off the agent"),
    ],
)
def test_violations_are_reported(tmp_path: Path, path: str, source: str, needle: str) -> None:
    target = tmp_path / path
    target.parent.mkdir(parents=True)
    target.write_text(source)
    (tmp_path / "agent").mkdir(exist_ok=True)
    (tmp_path / "controller").mkdir(exist_ok=True)
    errors = check_layering.check(tmp_path)
    assert len(errors) == 1 and needle in errors[0], errors


def test_allowed_imports_pass(tmp_path: Path) -> None:
    (tmp_path / "controller" / "sim").mkdir(parents=True)
    (tmp_path / "agent").mkdir()
    (tmp_path / "controller" / "sim" / "x.py").write_text(
        "from agent.sim.physics import model\nimport agent.api.errors\n"
    )
    (tmp_path / "controller" / "dctl").mkdir()
    (tmp_path / "controller" / "dctl" / "y.py").write_text("def run():\n    import cvxpy\n")
    assert check_layering.check(tmp_path) == []
