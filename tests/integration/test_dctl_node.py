"""`dctl node ...` against a real agent (simulated backend, 8 GPUs) serving gRPC on loopback.

The agent runs in its own event loop on a background thread (dctl's handlers run `asyncio.run` in the
test's thread, as from a shell); every command goes through `controller.dctl.main.main`, so exit codes
and the one-line errors are those an operator sees. Engines are the real simulated engine program.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app import RunningAgent, start_agent
from agent.settings import merge_settings
from controller.dctl.main import main
from tests.integration.tls_pki import Pki, make_pki, openssl_available

GPUS = 8
TOKEN = "an-admin-token-of-some-length"
CONTROL_TOKEN = "a-control-token-of-some-length"


class _AgentThread:
    """An agent in an event loop of its own, so that synchronous dctl calls can reach it."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="agent", daemon=True)
        self._thread.start()
        settings = merge_settings(values, {}, {}, hostname="test-node")
        self._agent: RunningAgent = asyncio.run_coroutine_threadsafe(
            start_agent(settings), self._loop
        ).result(60)
        self.addr = f"127.0.0.1:{self._agent.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._agent.stop(grace_s=1.0), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _values(run_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "metrics_listen": "",
        "runtime_dir": str(run_dir),
        "log_level": "error",
        "gpu": {"backend": "simulated"},
        "simulated": {"gpus": GPUS},
        "telemetry": {"period_s": 0.05, "min_period_s": 0.05},
        "engine": {"base_port": 0, "stop_grace_s": 5.0, "ready_timeout_s": 60.0},
        **extra,
    }


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = _AgentThread(_values(tmp_path_factory.mktemp("agent")))
    yield running.addr
    running.close()


def _dctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["node", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    """The one line dctl prints on an error (the agent's own log lines may share stderr)."""
    lines = [line for line in err.splitlines() if line.startswith("dctl ")]
    assert len(lines) == 1, err
    return lines[0]


def _status(capsys: pytest.CaptureFixture[str], addr: str) -> dict[str, Any]:
    code, out, err = _dctl(capsys, "status", addr, "--output", "json")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def _supported(capsys: pytest.CaptureFixture[str], addr: str) -> list[int]:
    clocks: list[int] = _status(capsys, addr)["inventory"]["gpus"][0]["supported_sm_clocks_mhz"]
    return clocks


# ---------------------------------------------------------------------------------------- status, watch


def test_status_table_shows_node_gpus_and_lease(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _dctl(capsys, "status", agent)
    assert code == 0, err
    assert "node test-node" in out and "backend SIMULATED" in out and "lease:" in out
    gpu_rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(row.split()[0]) for row in gpu_rows] == list(range(GPUS))


def test_status_json_has_inventory_and_a_live_sample(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _status(capsys, agent)
    inventory, sample = doc["inventory"], doc["sample"]
    assert inventory["node_id"] == "test-node" and inventory["gpu_backend"] == "GPU_BACKEND_KIND_SIMULATED"
    assert [g["gpu_index"] for g in inventory["gpus"]] == list(range(GPUS))
    assert isinstance(inventory["ts_unix_ns"], int)  # numbers stay numbers, unlike proto3 JSON
    assert len(sample["gpus"]) == GPUS and all(g["power_w"] > 0 for g in sample["gpus"])


def test_watch_json_prints_count_samples(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _dctl(capsys, "watch", agent, "--count", "3", "--gpu", "1,2", "--output", "json")
    assert code == 0, err
    samples = [json.loads(line) for line in out.splitlines()]
    assert len(samples) == 3
    assert all([g["gpu_index"] for g in s["gpus"]] == [1, 2] for s in samples)
    stamps = [s["ts_unix_ns"] for s in samples]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


def test_watch_table_prints_a_row_per_gpu_and_sample(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _dctl(capsys, "watch", agent, "--count", "2", "--period-s", "0.1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "UTC", "GPU"]
    assert len(lines) == 1 + 2 * GPUS


# ---------------------------------------------------------------------------------------- clocks


def test_set_clocks_then_reset(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    clock = _supported(capsys, agent)[-5]
    code, out, err = _dctl(
        capsys, "set-clocks", agent, "--gpu", "0,1", "--min-mhz", str(clock), "--max-mhz", str(clock),
        "--lease-s", "30", "--power-limit-w", "500",
    )  # fmt: skip
    assert code == 0, err
    assert f"GPU 0: SM clock {clock} MHz, power limit 500 W" in out and "lease: active" in out
    gpus = _status(capsys, agent)["inventory"]["gpus"]
    assert gpus[0]["sm_clock_lock"] == {"min_clock_mhz": clock, "max_clock_mhz": clock}
    assert gpus[1]["modified"] and gpus[1]["power_limit_w"] == 500.0
    assert gpus[2]["sm_clock_lock"] is None and not gpus[2]["modified"]

    code, out, err = _dctl(capsys, "reset-clocks", agent, "--gpu", "1")
    assert code == 0, err
    assert "GPU 1: SM clock default" in out
    gpus = _status(capsys, agent)["inventory"]["gpus"]
    assert gpus[1]["sm_clock_lock"] is None and gpus[0]["sm_clock_lock"] is not None

    code, out, err = _dctl(capsys, "reset-clocks", agent, "--output", "json")
    assert code == 0, err
    reply = json.loads(out)
    assert [r["gpu_index"] for r in reply["restored"]] == list(range(GPUS))
    assert reply["lease"]["active"] is False
    inventory = _status(capsys, agent)["inventory"]
    assert not any(g["modified"] for g in inventory["gpus"]) and not inventory["lease"]["active"]


def test_set_clocks_all_and_dry_run(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    low, high = _supported(capsys, agent)[-20], _supported(capsys, agent)[-1]
    code, out, err = _dctl(
        capsys,
        "set-clocks",
        agent,
        "--gpu",
        "all",
        "--min-mhz",
        str(low),
        "--max-mhz",
        str(high),
        "--dry-run",
    )
    assert code == 0, err
    assert "would apply (dry run)" in out
    assert not any(g["modified"] for g in _status(capsys, agent)["inventory"]["gpus"])

    code, out, err = _dctl(
        capsys, "set-clocks", agent, "--gpu", "all", "--min-mhz", str(low), "--max-mhz", str(high),
        "--output", "json",
    )  # fmt: skip
    assert code == 0, err
    reply = json.loads(out)
    assert [a["gpu_index"] for a in reply["applied"]] == list(range(GPUS))
    assert all(a["sm_clock_lock"] == {"min_clock_mhz": low, "max_clock_mhz": high} for a in reply["applied"])
    assert reply["lease"]["active"] and 0 < reply["lease"]["remaining_s"] <= 300.0
    assert _dctl(capsys, "reset-clocks", agent)[0] == 0


def test_an_unsupported_clock_is_refused_with_the_agent_message(
    agent: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _dctl(capsys, "set-clocks", agent, "--gpu", "0", "--min-mhz", "1200", "--max-mhz", "1990")
    assert code == 2
    line = _error_line(err)
    assert line.startswith("dctl node: error: gpus[0].max_clock_mhz: got 1990")
    assert "allowed:" in line
    assert not _status(capsys, agent)["inventory"]["gpus"][0]["modified"]  # nothing changed


def test_an_unknown_gpu_is_refused_by_the_agent(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _dctl(capsys, "reset-clocks", agent, "--gpu", "9")
    assert code == 2 and "9" in _error_line(err) and "gpu_indices" in _error_line(err)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--gpu", "0,x", "--min-mhz", "1200", "--max-mhz", "1200"], "--gpu"),
        (["--gpu", "0", "--min-mhz", "fast", "--max-mhz", "1200"], "--min-mhz"),
        (["--gpu", "0", "--min-mhz", "1200", "--max-mhz", "0"], "--max-mhz"),
        (["--gpu", "0", "--min-mhz", "1200", "--max-mhz", "1200", "--lease-s", "-1"], "--lease-s"),
        (["--gpu", "0", "--min-mhz", "1200", "--max-mhz", "1200", "--lease-s", "nan"], "--lease-s"),
        (["--gpu", "0", "--min-mhz", "1200", "--max-mhz", "1200", "--power-limit-w", "x"], "--power-limit-w"),
        (["--gpu", "0", "--min-mhz", "1200", "--max-mhz", "1200", "--timeout-s", "0"], "--timeout-s"),
    ],
)
def test_bad_set_clocks_flags_exit_2_naming_the_flag(
    agent: str, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    code, out, err = _dctl(capsys, "set-clocks", agent, *argv)
    assert code == 2 and out == ""
    assert _error_line(err).startswith(f"dctl node: error: {flag}: got ")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["watch", "ADDR", "--count", "0"], "--count"),
        (["watch", "ADDR", "--period-s", "soon"], "--period-s"),
        (["engine", "start", "ADDR", "--engine", "e", "--model", "m", "--gpus", "0,-1"], "--gpus"),
        (["engine", "start", "ADDR", "--engine", "e", "--model", "m", "--gpus", "0", "--tp", "0"], "--tp"),
        (
            ["engine", "start", "ADDR", "--engine", "e", "--model", "m", "--gpus", "0", "--option", "x"],
            "--option",
        ),
        (["engine", "stop", "ADDR", "--engine", "e", "--drain-timeout-s", "-2"], "--drain-timeout-s"),
        (["status", "no-port-here"], "ADDR"),
    ],
)
def test_bad_flags_of_other_commands_exit_2_naming_the_flag(
    agent: str, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    code, out, err = _dctl(capsys, *[agent if a == "ADDR" else a for a in argv])
    assert code == 2 and out == ""
    assert _error_line(err).startswith(f"dctl node: error: {flag}: got ")


def test_a_missing_required_flag_is_an_argparse_error(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["node", "set-clocks", agent, "--gpu", "0", "--min-mhz", "1200"])
    assert exited.value.code == 2 and "--max-mhz" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["watch", "--count", "1"],
        ["set-clocks", "--gpu", "0", "--min-mhz", "1200", "--max-mhz", "1200"],
        ["reset-clocks"],
        ["engine", "stop", "--engine", "e"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_unreachable_node_exits_3_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    command, rest = argv[0], argv[1:]
    if command == "engine":
        full = ["engine", rest[0], "127.0.0.1:1", *rest[1:]]
    else:
        full = [command, "127.0.0.1:1", *rest]
    code, out, err = _dctl(capsys, *full, "--timeout-s", "5")
    assert code == 3
    if command != "watch":  # watch prints its table header before the stream fails
        assert out == ""
    line = _error_line(err)
    assert "127.0.0.1:1" in line and "UNAVAILABLE" in line


# ---------------------------------------------------------------------------------------- engines


def test_engine_start_reconfigure_stop(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _dctl(
        capsys, "engine", "start", agent, "--engine", "llama-a", "--model", "llama2-70b", "--gpus", "0,1,2,3",
        "--option", "max-num-seqs=64",
    )  # fmt: skip
    assert code == 0, err
    assert "engine llama-a READY: model llama2-70b, GPUs 0,1,2,3, TP 4" in out and "start " in out

    # the same start again: nothing to do
    code, out, err = _dctl(
        capsys, "engine", "start", agent, "--engine", "llama-a", "--model", "llama2-70b", "--gpus", "0,1,2,3",
        "--option", "max-num-seqs=64",
    )  # fmt: skip
    assert code == 0, err
    assert "nothing done" in out

    # start must not silently reshape a live engine
    code, _, err = _dctl(
        capsys, "engine", "start", agent, "--engine", "llama-a", "--model", "llama2-70b", "--gpus", "0,1"
    )
    assert code == 2 and "use `dctl node engine reconfigure`" in _error_line(err)

    # a TP degree not dividing the GPU set: the agent's INVALID_ARGUMENT, engine untouched
    code, _, err = _dctl(capsys, "engine", "reconfigure", agent, "--engine", "llama-a", "--tp", "3")
    assert code == 2 and _error_line(err).startswith("dctl node: error: tp_degree: got 3")

    code, out, err = _dctl(
        capsys, "engine", "reconfigure", agent, "--engine", "llama-a", "--gpus", "0,1,2,3,4,5,6,7",
        "--tp", "8", "--output", "json",
    )  # fmt: skip
    assert code == 0, err
    reply = json.loads(out)
    engine = reply["engine"]
    assert engine["state"] == "ENGINE_STATE_READY" and engine["tp_degree"] == 8
    assert engine["gpu_indices"] == list(range(8)) and engine["engine_options"] == {"max-num-seqs": "64"}
    assert reply["restarted"] and reply["start_s"] > 0

    inventory = _status(capsys, agent)["inventory"]
    assert [(e["engine_id"], e["tp_degree"]) for e in inventory["engines"]] == [("llama-a", 8)]
    code, out, _ = _dctl(capsys, "status", agent)
    assert "llama-a" in out and "READY" in out

    code, out, err = _dctl(capsys, "engine", "stop", agent, "--engine", "llama-a", "--drain-timeout-s", "5")
    assert code == 0, err
    assert "engine llama-a STOPPED" in out
    states = [e["state"] for e in _status(capsys, agent)["inventory"]["engines"]]
    assert states == ["ENGINE_STATE_STOPPED"]


def test_engine_errors(agent: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _dctl(capsys, "engine", "reconfigure", agent, "--engine", "ghost", "--tp", "2")
    assert code == 2 and "engine 'ghost' is not on node" in _error_line(err)

    code, _, err = _dctl(capsys, "engine", "stop", agent, "--engine", "ghost")
    assert code == 2 and "ghost" in _error_line(err) and "NOT_FOUND" in _error_line(err)

    code, _, err = _dctl(
        capsys, "engine", "start", agent, "--engine", "e2", "--model", "gpt-17", "--gpus", "4,5"
    )
    assert code == 2 and _error_line(err).startswith("dctl node: error: model: got 'gpt-17'")


# ---------------------------------------------------------------------------------------- tokens


def test_the_token_reaches_an_agent_that_requires_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[tokens]]\nname = "ops"\ntoken = "{TOKEN}"\nscopes = ["read", "control", "admin"]\n'
        f'[[tokens]]\nname = "tuner"\ntoken = "{CONTROL_TOKEN}"\nscopes = ["read", "control"]\n'
    )
    tokens.chmod(0o600)
    running = _AgentThread(_values(tmp_path / "run", auth={"tokens_file": str(tokens)}))
    try:
        code, _, err = _dctl(capsys, "reset-clocks", running.addr)
        assert code == 2 and "UNAUTHENTICATED" in _error_line(err)
        # every GPU at once preempts whoever manages the node: admin
        code, _, err = _dctl(capsys, "reset-clocks", running.addr, "--token", CONTROL_TOKEN)
        assert code == 2 and "PERMISSION_DENIED" in _error_line(err) and "'admin'" in _error_line(err)
        code, _, err = _dctl(capsys, "reset-clocks", running.addr, "--gpu", "1", "--token", CONTROL_TOKEN)
        assert code == 0, err
        code, _, err = _dctl(capsys, "reset-clocks", running.addr, "--token", TOKEN)
        assert code == 0, err
        monkeypatch.setenv("DYNAMOLLM_TOKEN", TOKEN)
        code, _, err = _dctl(
            capsys, "set-clocks", running.addr, "--gpu", "0", "--min-mhz", "1980", "--max-mhz", "1980"
        )
        assert code == 0, err
        assert _status(capsys, running.addr)["inventory"]["lease"]["holder"] == "ops"
    finally:
        running.close()


# ---------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not openssl_available():
        pytest.skip("the openssl command is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_dctl_over_mtls(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(pki.ca.cert)}
    running = _AgentThread(_values(tmp_path / "run", tls=tls))
    ca = ("--tls-ca", str(pki.ca.cert))
    client = ("--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key))
    try:
        code, out, err = _dctl(capsys, "status", running.addr, *ca, *client, "--output", "json")
        assert code == 0, err
        assert json.loads(out)["inventory"]["node_id"] == "test-node"
        # the certificate grants read (tls.client_scopes); changing clocks needs more
        code, _, err = _dctl(capsys, "reset-clocks", running.addr, "--gpu", "0", *ca, *client)
        assert code == 2 and "PERMISSION_DENIED" in _error_line(err) and "cert:controller" in _error_line(err)
        # no client certificate, or one from another CA: the TLS handshake fails, the node is unreachable
        code, _, err = _dctl(capsys, "status", running.addr, *ca, "--timeout-s", "5")
        assert code == 3 and "UNAVAILABLE" in _error_line(err)
        stranger = ("--tls-cert", str(pki.stranger.cert), "--tls-key", str(pki.stranger.key))
        code, _, err = _dctl(capsys, "status", running.addr, *ca, *stranger, "--timeout-s", "5")
        assert code == 3
        code, _, err = _dctl(capsys, "status", running.addr, "--timeout-s", "5")  # plaintext
        assert code == 3
        # bad TLS flags are flag errors before any RPC
        code, out, err = _dctl(capsys, "status", running.addr, *ca, "--tls-cert", str(pki.client.cert))
        assert (
            code == 2 and out == "" and _error_line(err).startswith("dctl node: error: --tls-key: got None")
        )
        code, _, err = _dctl(capsys, "status", running.addr, "--tls-ca", str(tmp_path / "none.pem"))
        assert code == 2 and _error_line(err).startswith("dctl node: error: --tls-ca: got ")
    finally:
        running.close()
