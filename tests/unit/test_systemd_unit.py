"""The deploy files: every daemon's systemd unit passes `systemd-analyze verify` with no warnings (skipped
where the tool is absent, failing under CI=true), is a hardened Type=notify service with a watchdog, every
directive commented; the agent's carries the GPU-safety directives docs/agent.md asks for, the
controller's and the router's hold no capability and no device, and those two daemons really serve
under their MemoryDenyWriteExecute=yes (systemd's seccomp filter, rebuilt here); the agent's example
config loads with its own settings code and, like docs/agent.md, documents every key."""

from __future__ import annotations

import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.api.config import read_toml_config
from agent.settings import KEYS, env_name, load_settings
from controller.router.settings import merge_settings as merge_router_settings
from controller.settings import load_settings as load_controller_settings
from tests.conftest import _missing
from tests.system.stack import clean_env

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
ROUTER_CONFIG = ROOT / "deploy" / "router.toml"
AGENT_PATH = "/usr/local/bin/dynamollm-agent"

# systemd's MemoryDenyWriteExecute=yes as its seccomp filter (systemd < 253, or kernels without
# PR_SET_MDWE) builds it on x86-64, the stricter of its two forms: mmap with PROT_WRITE|PROT_EXEC,
# mprotect and pkey_mprotect with PROT_EXEC, and shmat with SHM_EXEC fail with EPERM. Classic BPF over
# struct seccomp_data (nr at 0, args[2]'s low word at 32); (code, jump if true, jump if false, k).
MDWE_PRELUDE = """
import ctypes, mmap, struct, sys
ALLOW, EPERM = 0x7FFF0000, 0x00050001
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
program = [
    (LD, 0, 0, 0), (JEQ, 4, 0, 9), (JEQ, 6, 0, 10), (JEQ, 5, 0, 329), (JEQ, 7, 0, 30), (RET, 0, 0, ALLOW),
    (LD, 0, 0, 32), (AND, 0, 0, 6), (JEQ, 6, 7, 6),
    (LD, 0, 0, 32), (AND, 0, 0, 4), (JEQ, 3, 4, 4),
    (LD, 0, 0, 32), (AND, 0, 0, 0x8000), (JEQ, 0, 1, 0x8000),
    (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW),
]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(None, use_errno=True)
prog = Program(len(program), ctypes.cast(code, ctypes.c_void_p))
# PR_SET_NO_NEW_PRIVS, then SECCOMP_MODE_FILTER; a sandbox that forbids filters: exit 77 (skipped)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("the filter let a writable and executable mapping through")
except PermissionError:
    pass
"""
# A pool MILP as the controller's cycle solves it (HiGHS through cvxpy).
MILP = """
from controller.policy.capacity import pool_capacities
from controller.policy.pool import reconfig_cost_j_per_gpu, solve_pool
from controller.profiles import default_profile
caps = pool_capacities(default_profile("llama2-70b", "h100-sxm"), {"SS": 0.5, "MM": 0.5})
costs = reconfig_cost_j_per_gpu(75.0, start_s=60.0, stop_s=0.0, retp_s=90.0, clock_s=0.065)
decision = solve_pool(5.0, 32, caps, {}, reconfig_cost_j=costs, epoch_s=300.0)
assert decision.status == "optimal" and decision.solve_s > 0, decision
"""
UNREACHABLE = "127.0.0.1:1"  # neither daemon needs its peers to start
NO_SECCOMP = 77  # the prelude's exit status where no filter can be installed


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


def test_the_router_outlasts_its_drain_and_holds_many_connections() -> None:
    d = _directives(_unit("router").read_text())
    settings = merge_router_settings(read_toml_config(ROUTER_CONFIG, ROUTER_CONFIG), {}, {})
    # SIGKILL must not cut the drain short: in-flight requests get drain_timeout_s, then the last report
    assert float(d["Service.TimeoutStopSec"][0]) >= settings.drain_timeout_s + 10
    assert int(d["Service.LimitNOFILE"][0]) >= 65536  # a descriptor per client and per engine stream


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


def _daemon_argv(daemon: str, tmp_path: Path) -> list[str]:
    if daemon == "controller":
        return [
            "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--store", str(tmp_path / "c.db"),
            "--node", f"n0={UNREACHABLE}",
        ]  # fmt: skip
    return ["--listen", "127.0.0.1:0", "--controller", UNREACHABLE]


@pytest.mark.parametrize("daemon", ["controller", "router"])
def test_the_daemon_serves_under_memory_deny_write_execute(daemon: str, tmp_path: Path) -> None:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the seccomp filter here is x86-64 Linux's (system call numbers)")
    assert _directives(_unit(daemon).read_text())["Service.MemoryDenyWriteExecute"] == ["yes"]
    module = {"controller": "controller.app", "router": "controller.router.app"}[daemon]
    argv = [module, *_daemon_argv(daemon, tmp_path)]
    script = MDWE_PRELUDE + (MILP if daemon == "controller" else "")
    script += f"import runpy\nsys.argv = {argv!r}\nrunpy.run_module({module!r}, run_name='__main__')\n"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", script], env=clean_env({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        try:
            ready = notify.recv(64)
        except TimeoutError:
            ready = b""
        if proc.poll() == NO_SECCOMP:
            pytest.skip("this machine's sandbox does not let a process install a seccomp filter")
        assert ready == b"READY=1", log.read_text(errors="replace")[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
