"""The deploy files: every daemon's systemd unit passes `systemd-analyze verify` with no warnings (skipped
where the tool is absent, failing under CI=true), is a hardened Type=notify service with a watchdog, every
directive commented; the agent's carries the GPU-safety directives docs/agent.md asks for, the
controller's and the router's hold no capability and no device; the agent's example config loads with
its own settings code and, like docs/agent.md, documents every key."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent.settings import KEYS, env_name, load_settings
from controller.settings import load_settings as load_controller_settings
from tests.conftest import _missing

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
UNIT = UNITS / "dynamollm-agent.service"
DAEMONS = ("agent", "controller", "router")
HARDENING = (  # each `=yes` in every unit
    "NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectControlGroups", "RestrictNamespaces", "LockPersonality", "RestrictSUIDSGID",
)  # fmt: skip
CONFIG = ROOT / "deploy" / "agent.toml"
GUIDE = ROOT / "docs" / "agent.md"
AGENT_PATH = "/usr/local/bin/dynamollm-agent"


def _directives(text: str) -> dict[str, list[str]]:
    """Section-qualified directives: {"Service.Type": ["notify"], ...}."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key}", []).append(value)
    return out


def test_the_unit_has_the_safety_and_hardening_directives() -> None:
    d = _directives(UNIT.read_text())
    assert d["Service.Type"] == ["notify"]
    assert float(d["Service.WatchdogSec"][0]) > 0
    assert d["Service.ExecStart"] == [f"{AGENT_PATH} --config /etc/dynamollm/agent.toml"]
    assert d["Service.ExecStopPost"] == [f"{AGENT_PATH} restore-defaults --config /etc/dynamollm/agent.toml"]
    assert d["Service.ProtectSystem"] == ["strict"]
    assert d["Service.NoNewPrivileges"] == ["yes"]
    assert d["Service.CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
    assert d["Service.AmbientCapabilities"] == ["CAP_SYS_ADMIN"]
    assert d["Service.RuntimeDirectory"] == ["dynamollm-agent"]
    # the crash-recovery state file must survive a restart of the unit
    assert d["Service.RuntimeDirectoryPreserve"] == ["restart"]
    # the agent, not systemd, stops the engines in order (drain first)
    assert d["Service.KillMode"] == ["mixed"]
    assert "PrivateDevices" not in {k.split(".", 1)[1] for k in d}  # would hide /dev/nvidia*


def _unit(daemon: str) -> Path:
    return UNITS / f"dynamollm-{daemon}.service"


@pytest.mark.parametrize("daemon", DAEMONS)
def test_each_unit_is_a_hardened_notify_service(daemon: str) -> None:
    d = _directives(_unit(daemon).read_text())
    assert d["Service.Type"] == ["notify"] and d["Service.NotifyAccess"] == ["main"]
    assert float(d["Service.WatchdogSec"][0]) > 0
    assert d["Service.ExecStart"] == [
        f"/usr/local/bin/dynamollm-{daemon} --config /etc/dynamollm/{daemon}.toml"
    ]
    assert d["Service.Restart"] == ["on-failure"]
    assert d["Service.User"] == ["dynamollm"] and "Service.DynamicUser" not in d
    for key in HARDENING:
        assert d[f"Service.{key}"] == ["yes"], key
    assert d["Service.ProtectSystem"] == ["strict"]
    assert d["Service.SystemCallArchitectures"] == ["native"]


@pytest.mark.parametrize("daemon", ["controller", "router"])
def test_the_controller_and_the_router_hold_no_capability_and_no_device(daemon: str) -> None:
    d = _directives(_unit(daemon).read_text())
    assert d["Service.CapabilityBoundingSet"] == [""] and d["Service.AmbientCapabilities"] == [""]
    assert d["Service.PrivateDevices"] == ["yes"]
    assert d["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert d["Service.ReadOnlyPaths"] == ["/etc/dynamollm"]


def test_the_controller_store_lives_in_its_state_directory() -> None:
    d = _directives(_unit("controller").read_text())
    settings = load_controller_settings(ROOT / "deploy" / "controller.toml", env={})
    assert settings.store_path.parent == Path("/var/lib") / d["Service.StateDirectory"][0]


@pytest.mark.parametrize("daemon", DAEMONS)
def test_every_service_directive_is_explained_by_a_comment(daemon: str) -> None:
    unit = _unit(daemon)
    lines = unit.read_text().splitlines()
    in_service = False
    for i, line in enumerate(lines):
        if line.startswith("["):
            in_service = line == "[Service]"
            continue
        if not in_service or not line.strip() or line.startswith("#"):
            continue
        j = i - 1
        while j >= 0 and lines[j].strip() and not lines[j].startswith("#") and not lines[j].startswith("["):
            j -= 1  # a directive of the same commented group
        assert j >= 0 and lines[j].startswith("#"), f"{unit.name}:{i + 1}: {line!r} has no comment above"


def test_the_unit_runtime_dir_is_the_config_runtime_dir() -> None:
    d = _directives(UNIT.read_text())
    settings = load_settings(CONFIG, env={})
    assert settings.runtime_dir == Path("/run") / d["Service.RuntimeDirectory"][0]


@pytest.mark.parametrize("daemon", DAEMONS)
def test_systemd_analyze_verify_passes_without_warnings(daemon: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        _missing("systemd-analyze not installed (Debian: apt-get install systemd)")
    # verify checks that ExecStart's program exists: point it at a stand-in with the same name
    program = f"/usr/local/bin/dynamollm-{daemon}"
    stand_in = tmp_path / "bin" / f"dynamollm-{daemon}"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    unit = tmp_path / _unit(daemon).name
    text = _unit(daemon).read_text()
    assert program in text
    unit.write_text(text.replace(program, str(stand_in)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_example_config_loads_and_documents_every_key() -> None:
    settings = load_settings(CONFIG, env={})
    assert settings.gpu_backend == "nvml" and settings.listen.startswith("127.0.0.1:")
    text = CONFIG.read_text()
    # a key is documented when its last part appears as `name =` (set or commented out) in the file
    for key in KEYS:
        leaf = key.name.rsplit(".", 1)[-1]
        assert re.search(rf"^#? ?{re.escape(leaf)} = ", text, re.M), f"{key.name} missing in {CONFIG.name}"


def test_the_operator_guide_documents_every_key_and_its_environment_name() -> None:
    text = GUIDE.read_text()
    for key in KEYS:
        assert f"`{key.name}`" in text, f"{key.name} missing in {GUIDE.name}"
        assert env_name(key.name) in text, f"{env_name(key.name)} missing in {GUIDE.name}"
