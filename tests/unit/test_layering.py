"""The transitive import-layering check passes on our tree and each contract can fail.

Every contract gets a small synthetic tree that breaks that contract and no other, once directly and once
through a chain of project modules; the checker must name the contract and the chain.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_layering", ROOT / "tools" / "check_layering.py")
assert _spec and _spec.loader
check_layering = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check_layering  # dataclasses look their module up
_spec.loader.exec_module(check_layering)


def _tree(root: Path, files: dict[str, str]) -> Path:
    (root / "agent").mkdir(exist_ok=True)
    (root / "controller").mkdir(exist_ok=True)
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def _chains(root: Path) -> dict[str, set[str]]:
    """contract key -> the chains reported for it."""
    out: dict[str, set[str]] = {}
    for v in check_layering.find_violations(root):
        out.setdefault(v.contract, set()).add(" -> ".join(v.chain))
    return out


def test_our_tree_respects_the_layering() -> None:
    errors = check_layering.check(ROOT)
    assert errors == [], "\n".join(errors)


# (contract, files breaking it and no other, chains that must be reported, chains that must not be)
CASES: list[tuple[str, dict[str, str], list[str], list[str]]] = [
    (
        "agent-controller",
        {
            "agent/x.py": "import controller.sim\n",
            "agent/a.py": "import agent.b\n",
            "agent/b.py": "def f():\n    from controller.model import plan\n",
        },
        [
            "agent.x -> controller.sim",
            "agent.b -> controller.model",
            "agent.a -> agent.b -> controller.model",
        ],
        [],
    ),
    (
        "agent-sim",
        {
            "agent/service.py": "from agent.sim.physics import specs\n",
            "agent/app.py": "import agent.service\n\n\ndef main():\n    from agent.sim import node\n",
            "agent/sim/node.py": "",
            "agent/gpu/simulated.py": "from agent.sim.node import NodeDir\n",
            "agent/telemetry.py": "def f():\n    import agent.gpu.simulated\n",
        },
        [
            "agent.service -> agent.sim.physics",
            "agent.app -> agent.service -> agent.sim.physics",
            "agent.gpu.simulated -> agent.sim.node",
            "agent.telemetry -> agent.gpu.simulated -> agent.sim.node",
        ],
        ["agent.app -> agent.sim.node"],
    ),
    (
        "agent-api",
        {
            "agent/api/client.py": "from agent.api import errors\nfrom agent.api.status import x\n",
            "agent/api/errors.py": "",
            "agent/api/status.py": "import agent.settings\n",
            "agent/settings.py": "",
        },
        ["agent.api.status -> agent.settings", "agent.api.client -> agent.api.status -> agent.settings"],
        [],
    ),
    (
        "controller-agent",
        {
            "agent/__init__.py": "",
            "agent/api/__init__.py": "",
            "agent/api/errors.py": "",
            "controller/profiles.py": "from agent.api.errors import E\nfrom agent.safety import x\n",
            "controller/dctl/main.py": (
                "import controller.profiles\nimport controller.sim.a\nimport controller.sim.c\n"
            ),
            "controller/sim/a.py": "import agent.sim.engine_core\n",
            "controller/sim/b.py": "import agent.gpu.worker\n",
            "controller/sim/c.py": "import agent.sim.engine\n",
            "agent/sim/engine.py": "import agent.gpu.simulated\n",
            "agent/sim/engine_core.py": "",
        },
        [
            "controller.profiles -> agent.safety",
            "controller.dctl.main -> controller.profiles -> agent.safety",
            "controller.sim.b -> agent.gpu.worker",
            "controller.sim.c -> agent.sim.engine -> agent.gpu.simulated",
        ],
        ["controller.dctl.main -> controller.sim.c -> agent.sim.engine -> agent.gpu.simulated"],
    ),
    (
        "pure-io",
        {
            "controller/model/y.py": "import grpc\n",
            "controller/policy/x.py": "from controller.model import y\n",
            "controller/orchestrator/plan.py": "from agent.api.clock import Clock\n",
            "agent/api/clock.py": "import time\n",
            "controller/control/cycle.py": "def f():\n    from pathlib import Path\n",
        },
        [
            "controller.model.y -> grpc",
            "controller.policy.x -> controller.model.y -> grpc",
            "controller.orchestrator.plan -> agent.api.clock -> time",
            "controller.control.cycle -> pathlib",
        ],
        [],
    ),
    (
        "pure-cvxpy",
        {
            "controller/model/m.py": "def f():\n    import cvxpy\n",
            "controller/control/cycle.py": "import controller.model.m\nimport controller.policy.pool\n",
            "controller/policy/pool.py": "import cvxpy as cp\n",
        },
        ["controller.model.m -> cvxpy", "controller.control.cycle -> controller.model.m -> cvxpy"],
        ["controller.control.cycle -> controller.policy.pool -> cvxpy", "controller.policy.pool -> cvxpy"],
    ),
    (
        "pure-order",
        {
            "controller/model/m.py": "from controller.orchestrator import plan\n",
            "controller/orchestrator/plan.py": "",
            "controller/orchestrator/o.py": "import controller.model.n\n",
            "controller/model/n.py": "def f():\n    import controller.control.cycle\n",
            "controller/control/cycle.py": "import controller.policy.p\n",
            "controller/policy/p.py": "import controller.orchestrator.plan\nimport controller.model.k\n",
            "controller/model/k.py": "",
        },
        [
            "controller.model.m -> controller.orchestrator.plan",
            "controller.model.n -> controller.control.cycle",
            "controller.orchestrator.o -> controller.model.n -> controller.control.cycle",
        ],
        [],
    ),
    (
        "pure-shell",
        {
            "controller/policy/x.py": "import controller.sim.cluster\n",
            "controller/sim/cluster.py": "",
            "controller/control/c.py": "import controller.policy.y\n",
            "controller/policy/y.py": "def f():\n    import controller.fleet.grpc_fleet\n",
            "controller/fleet/grpc_fleet.py": "",
            "controller/model/z.py": "from controller.dctl import output\n",
        },
        [
            "controller.policy.x -> controller.sim.cluster",
            "controller.control.c -> controller.policy.y -> controller.fleet.grpc_fleet",
            "controller.model.z -> controller.dctl",
        ],
        [],
    ),
    (
        "live-sim",
        {
            "controller/router/app.py": "from controller.sim import traces\n",
            "controller/sim/traces.py": "",
            "controller/store.py": "import controller.profiles\n",
            "controller/profiles.py": "def load():\n    import controller.sim.profiling\n",
            "controller/sim/profiling.py": "import agent.sim.physics\n",
            "controller/metrics.py": "import controller.loops.tick\n",
            "controller/loops/tick.py": "",
        },
        [
            "controller.router.app -> controller.sim.traces",
            "controller.store -> controller.profiles -> controller.sim.profiling",
        ],
        [],
    ),
    (
        "sim-wire",
        {
            "controller/sim/net.py": "from grpc import aio\n",
            "controller/sim/week.py": "import controller.sim.traces\n",
            "controller/sim/traces.py": "from agent.api import status\n",
            "agent/api/status.py": "import grpc\n",
            "controller/sim/e.py": "import agent.sim.engine\n",
            "agent/sim/engine.py": "from aiohttp import web\n",
        },
        [
            "controller.sim.net -> grpc",
            "controller.sim.traces -> agent.api.status -> grpc",
            "controller.sim.week -> controller.sim.traces -> agent.api.status -> grpc",
            "controller.sim.e -> agent.sim.engine -> aiohttp",
        ],
        [],
    ),
    (
        "pynvml",  # deliberately direct only: everything else reaches pynvml through agent/gpu/nvml.py
        {
            "agent/gpu/nvml.py": "import pynvml\n",
            "agent/gpu/other.py": "def f():\n    from pynvml import nvmlInit\n",
            "agent/gpu/uses.py": "import agent.gpu.nvml\n",
        },
        ["agent.gpu.other -> pynvml"],
        ["agent.gpu.nvml -> pynvml", "agent.gpu.uses -> agent.gpu.nvml -> pynvml"],
    ),
    (
        "agent-cvxpy",
        {
            "agent/sim/x.py": "def f():\n    import cvxpy\n",
            "agent/sim/z.py": "import agent.sim.x\n",
        },
        ["agent.sim.x -> cvxpy", "agent.sim.z -> agent.sim.x -> cvxpy"],
        [],
    ),
    (
        "startup",
        {
            "controller/dctl/x.py": "import cvxpy\n",
            "controller/dctl/main.py": "import controller.dctl.cmd\n",
            "controller/dctl/cmd.py": "from controller.sim import plots\n",
            "controller/sim/plots.py": "import matplotlib.pyplot as plt\n",
            "controller/dctl/lazy.py": "def run():\n    import controller.sim.plots\n    import cvxpy\n",
            "controller/dctl/typed.py": "import typing\nif typing.TYPE_CHECKING:\n    import cvxpy\n",
            "controller/router/app.py": "import controller.policy.pool\n",
            "controller/policy/pool.py": "import cvxpy\n",
        },
        [
            "controller.dctl.x -> cvxpy",
            "controller.dctl.cmd -> controller.sim.plots -> matplotlib.pyplot",
            "controller.dctl.main -> controller.dctl.cmd -> controller.sim.plots -> matplotlib.pyplot",
            "controller.router.app -> controller.policy.pool -> cvxpy",
        ],
        [],
    ),
    (
        "cycle",
        {
            "controller/sim/traces.py": "def load():\n    from controller.sim.synthetic import make\n",
            "controller/sim/synthetic.py": "from controller.sim.traces import Trace\n",
            "agent/x.py": "import agent.y\n",
            "agent/y.py": "from agent import z\n",
            "agent/z.py": "import agent.x\n",
        },
        [
            "controller.sim.synthetic -> controller.sim.traces -> controller.sim.synthetic",
            "agent.x -> agent.y -> agent.z -> agent.x",
        ],
        [],
    ),
]


@pytest.mark.parametrize(("contract", "files", "reported", "not_reported"), CASES, ids=[c[0] for c in CASES])
def test_each_contract_can_fail(
    tmp_path: Path, contract: str, files: dict[str, str], reported: list[str], not_reported: list[str]
) -> None:
    chains = _chains(_tree(tmp_path, files))
    assert set(chains) == {contract}, chains
    for chain in reported:
        assert chain in chains[contract], (chain, chains)
    for chain in not_reported:
        assert chain not in chains[contract], (chain, chains)


def test_every_contract_has_a_failing_case() -> None:
    keys = {c.key for c in check_layering.CONTRACTS} | {check_layering.CYCLE_KEY}
    assert keys == {c[0] for c in CASES}


def test_the_report_names_the_file_line_chain_and_contract(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "controller/policy/x.py": '"""Doc."""\n\nimport math\nfrom controller.model import y\n',
            "controller/model/y.py": "import grpc\n",
        },
    )
    assert check_layering.check(tmp_path) == [
        "controller/model/y.py:1: controller.model.y -> grpc (pure core imports no I/O)",
        "controller/policy/x.py:4: controller.policy.x -> controller.model.y -> grpc"
        " (pure core imports no I/O)",
    ]
    assert check_layering.main(["check_layering", str(tmp_path)]) == 1


def test_package_inits_and_relative_imports_are_followed(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "controller/model/__init__.py": "import asyncio\n",
            "controller/model/y.py": "",
            "controller/orchestrator/x.py": "from controller.model.y import Y\n",
            "controller/policy/__init__.py": "from . import p\n",
            "controller/policy/p.py": "from ..control import c\n",
            "controller/control/c.py": "",
        },
    )
    assert _chains(tmp_path) == {
        "pure-io": {
            "controller.model -> asyncio",
            "controller.orchestrator.x -> controller.model -> asyncio",
        },
        "pure-order": {
            "controller.policy.p -> controller.control.c",
            "controller.policy -> controller.policy.p -> controller.control.c",
        },
    }


def test_allowed_imports_pass(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            # controller.sim may use agent.sim; dctl may use controller.sim; all of them agent.api
            "agent/__init__.py": "",
            "agent/api/__init__.py": "",
            "agent/api/errors.py": "",
            "agent/sim/physics/__init__.py": "from agent.sim.physics.model import M\n",
            "agent/sim/physics/model.py": "from agent.api.errors import E\nimport numpy as np\n",
            "controller/sim/x.py": "from agent.sim.physics import model\nimport agent.api.errors, os\n",
            "controller/dctl/main.py": "def main():\n    import controller.sim.x\n    import cvxpy\n",
            # the composition root builds the simulated backend lazily
            "agent/app.py": "import agent.api.errors\n\n\ndef backend():\n    from agent.sim import gpus\n",
            "agent/sim/gpus.py": "import agent.sim.physics\n",
            # the pure core in order, with numpy, json, threading; cvxpy in policy; control reaches it
            "controller/model/a.py": "import numpy\nimport json\nimport math\nimport agent.api.errors\n",
            "controller/orchestrator/b.py": "from controller.model import a\n",
            "controller/policy/c.py": "import cvxpy\nimport threading\nimport controller.orchestrator.b\n",
            "controller/control/d.py": "import controller.policy.c\n",
            # a cycle through TYPE_CHECKING only is no cycle; nor is an __init__ re-exporting its modules
            "controller/sim/u.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import controller.sim.v\n"
            ),
            "controller/sim/v.py": "import controller.sim.u\n",
            "controller/model/__init__.py": "from controller.model.a import A\n",
            # only nvml imports pynvml
            "agent/gpu/nvml.py": "import pynvml\n",
            "agent/gpu/worker.py": "import agent.gpu.nvml\n",
        },
    )
    assert check_layering.check(tmp_path) == []


def test_a_file_that_does_not_parse_is_reported(tmp_path: Path) -> None:
    _tree(tmp_path, {"agent/bad.py": "def f(:\n"})
    errors = check_layering.check(tmp_path)
    assert len(errors) == 1 and errors[0].startswith("agent/bad.py: cannot parse"), errors
