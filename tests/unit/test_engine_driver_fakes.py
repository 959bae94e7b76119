"""EngineDriver logic behind its seams: a fake spawner and a fake HTTP client standing in for engines.

The real-subprocess counterpart is tests/integration/test_engine_driver.py.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.api.errors import (
    DynamoError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    UnsupportedError,
)
from agent.engine.driver import (
    EngineDriver,
    EngineSpec,
    EngineState,
    HttpResponse,
    ReconfigureTimings,
)
from agent.gpu.base import GpuProcess

TEMPLATE = "fake-engine --model {model} --tp {tp} --pp {pp} --port {port} --gpus {gpus} --dir {node_dir}"


@dataclass
class FakeEngine:
    """One fake engine process and the HTTP endpoint it serves."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    pid: int
    ignore_sigterm: bool = False
    healthy_after_polls: int = 1  # GET /health answers 200 from this poll on; 0 = never
    exit_at_start: int | None = None  # exit with this status on the first health poll
    running: int = 0
    waiting: int = 0
    generation_tokens: int = 0
    drain_status: int = 200
    health_polls: int = 0
    signals: list[int] = field(default_factory=list)
    returncode: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def exit(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
            self.exited.set()

    # EngineProcess
    async def wait(self) -> int:
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.ignore_sigterm):
            self.exit(-sig)


class FakeNode:
    """Spawner and HTTP client at once: engines are looked up by the port in their argv."""

    def __init__(self) -> None:
        self.engines: list[FakeEngine] = []
        self.plans: list[dict[str, object]] = []  # per future spawn: FakeEngine field overrides
        self.spawn_error: OSError | None = None
        self.requests: list[tuple[str, str]] = []

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> FakeEngine:
        if self.spawn_error is not None:
            raise self.spawn_error
        log_path.write_text(f"loading {argv[2]}\nCUDA error: out of memory\n")
        engine = FakeEngine(argv=list(argv), env=dict(env), log_path=log_path, pid=1000 + len(self.engines))
        for key, value in (self.plans.pop(0) if self.plans else {}).items():
            setattr(engine, key, value)
        self.engines.append(engine)
        return engine

    def live_on(self, port: int) -> FakeEngine | None:
        for engine in reversed(self.engines):
            if engine.argv[engine.argv.index("--port") + 1] == str(port) and engine.returncode is None:
                return engine
        return None

    async def request(self, method: str, url: str, *, timeout_s: float) -> HttpResponse:
        self.requests.append((method, url))
        port = int(url.split(":")[2].split("/")[0])
        path = "/" + url.split("/", 3)[3]
        engine = self.live_on(port)
        if engine is None:
            raise UnavailableError(f"{method} {url}: connection refused")
        if path == "/health":
            engine.health_polls += 1
            if engine.exit_at_start is not None:
                engine.exit(engine.exit_at_start)
                raise UnavailableError(f"{method} {url}: connection reset")
            ok = engine.healthy_after_polls and engine.health_polls >= engine.healthy_after_polls
            return HttpResponse(200 if ok else 503, "")
        if path == "/admin/drain":
            return HttpResponse(engine.drain_status, "")
        if path == "/metrics":
            body = (
                f"vllm:num_requests_running {engine.running}\n"
                f"vllm:num_requests_waiting {engine.waiting}\n"
                f"vllm:generation_tokens_total {engine.generation_tokens}\n"
            )
            # each scrape sees one request finish, as if the engine kept working
            if engine.running:
                engine.running -= 1
            elif engine.waiting:
                engine.waiting -= 1
            return HttpResponse(200, body)
        return HttpResponse(404, "")

    async def close(self) -> None:
        return None


class SteppingClock:
    """Advances one second per monotonic read: timeouts elapse after a known number of polls."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def monotonic_s(self) -> float:
        self.now_s += 1.0
        return self.now_s

    def wall_ns(self) -> int:
        return int(self.now_s * 1e9)


class FakeGpus:
    """`gpu_processes` seam: the compute processes each GPU lists; `error` makes the listing fail."""

    def __init__(self) -> None:
        self.processes: dict[int, list[GpuProcess]] = {}
        self.error: DynamoError | None = None
        self.calls: list[tuple[int, ...]] = []

    async def __call__(self, indices: Sequence[int]) -> dict[int, tuple[GpuProcess, ...]]:
        self.calls.append(tuple(indices))
        if self.error is not None:
            raise self.error
        return {i: tuple(self.processes.get(i, [])) for i in indices}


def make_driver(
    node: FakeNode,
    tmp_path: Path,
    *,
    clock: SteppingClock | None = None,
    gpus: FakeGpus | None = None,
    **kwargs: float,
) -> EngineDriver:
    return EngineDriver(
        TEMPLATE,
        ready_timeout_s=kwargs.get("ready_timeout_s", 5.0),
        stop_grace_s=kwargs.get("stop_grace_s", 0.05),
        http=node,
        spawner=node,
        clock=clock,
        log_dir=tmp_path / "logs",
        template_vars={"node_dir": str(tmp_path / "node")},
        env={"EXTRA": "1"},
        poll_s=0.001,
        gpu_processes=gpus,
        rollback_ready_floor_s=kwargs.get("rollback_ready_floor_s", 30.0),
    )


def spec(
    engine_id: str = "eng-a", gpus: tuple[int, ...] = (0, 1), tp: int = 2, port: int = 8001
) -> EngineSpec:
    return EngineSpec(engine_id=engine_id, model="llama2-70b", gpu_indices=gpus, tp_degree=tp, http_port=port)


def test_command_template_fields_and_options(tmp_path: Path) -> None:
    driver = make_driver(FakeNode(), tmp_path)
    s = EngineSpec(
        engine_id="eng-a",
        model="llama2-70b",
        gpu_indices=(4, 5, 6, 7),
        tp_degree=2,
        http_port=8001,
        options={"max-num-seqs": "256", "enforce-eager": ""},
    )
    assert driver.command_for(s) == [
        "fake-engine", "--model", "llama2-70b", "--tp", "2", "--pp", "2", "--port", "8001",
        "--gpus", "4,5,6,7", "--dir", str(tmp_path / "node"),
        "--enforce-eager", "--max-num-seqs", "256",
    ]  # fmt: skip
    # options given in another order make an equal spec
    assert s == EngineSpec(
        "eng-a", "llama2-70b", (4, 5, 6, 7), 2, 8001, {"enforce-eager": "", "max-num-seqs": "256"}
    )


@pytest.mark.parametrize(
    "template",
    [
        "vllm serve {model} --gpu {gpu}",
        "{python} -m x --dir {node_dir}",
        "x {0}",
        "x {model.upper}",
        "",
        "x 'open",
    ],
)
def test_bad_command_template_names_the_key(template: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        EngineDriver(template)
    assert info.value.field == "engine.command"


@pytest.mark.parametrize(
    ("bad", "field_name"),
    [
        ({"engine_id": "Eng"}, "engine_id"),
        ({"engine_id": "1eng"}, "engine_id"),
        ({"engine_id": "e" * 64}, "engine_id"),
        ({"model": ""}, "model"),
        ({"gpu_indices": ()}, "gpu_indices"),
        ({"gpu_indices": (0, 0)}, "gpu_indices"),
        ({"gpu_indices": (-1, 0)}, "gpu_indices"),
        ({"tp_degree": 3}, "tp_degree"),
        ({"tp_degree": 0}, "tp_degree"),
        ({"http_port": 0}, "http_port"),
        ({"http_port": 70000}, "http_port"),
        ({"model": "m" * 257}, "model"),
        ({"options": {"--max-num-seqs": "1"}}, "engine_options"),
        ({"options": {"k" * 65: ""}}, "engine_options"),
        ({"options": {"max-num-seqs": "1\x00"}}, "engine_options['max-num-seqs']"),
        ({"options": {"max-num-seqs": "-5"}}, "engine_options['max-num-seqs']"),
        ({"options": {"max-num-seqs": "0"}}, "engine_options['max-num-seqs']"),
        ({"options": {"max-num-seqs": "2e3"}}, "engine_options['max-num-seqs']"),
        ({"options": {"max-num-batched-tokens": "9" * 30}}, "engine_options['max-num-batched-tokens']"),
        ({"options": {"gpu-memory-utilization": "0"}}, "engine_options['gpu-memory-utilization']"),
        ({"options": {"gpu-memory-utilization": "1.5"}}, "engine_options['gpu-memory-utilization']"),
        ({"options": {"startup-s": "nan"}}, "engine_options['startup-s']"),
        ({"options": {"startup-s": "inf"}}, "engine_options['startup-s']"),
        ({"options": {"enforce-eager": "yes"}}, "engine_options['enforce-eager']"),
        ({"options": {"dtype": "int4"}}, "engine_options['dtype']"),
        ({"options": {"custom-flag": "--enforce-eager"}}, "engine_options['custom-flag']"),
        ({"options": {"custom-flag": "x" * 257}}, "engine_options['custom-flag']"),
        ({"options": {"custom-flag": "a\nb"}}, "engine_options['custom-flag']"),
    ],
)
async def test_bad_spec_is_rejected_before_anything_happens(
    tmp_path: Path, bad: dict[str, object], field_name: str
) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    base: dict[str, object] = {
        "engine_id": "eng-a",
        "model": "m",
        "gpu_indices": (0, 1, 2, 3),
        "tp_degree": 2,
        "http_port": 8001,
        "options": {},
    }
    bad_spec = EngineSpec(**{**base, **bad})  # type: ignore[arg-type]
    for action in (driver.start(bad_spec), driver.reconfigure(bad_spec, 1.0)):
        with pytest.raises(InvalidArgumentError) as info:
            await action
        assert info.value.field == field_name
    assert driver.engines() == []
    assert node.engines == []


async def test_tp_error_lists_the_divisors(tmp_path: Path) -> None:
    driver = make_driver(FakeNode(), tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"allowed: 1, 2, 3, 6"):
        await driver.start(spec(gpus=(0, 1, 2, 3, 4, 5), tp=4))


async def test_start_ready_env_and_inventory(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    node.plans.append({"healthy_after_polls": 3})
    start_s = await driver.start(spec(gpus=(2, 3)))
    assert start_s >= 0.0
    (engine,) = node.engines
    assert engine.health_polls == 3
    assert engine.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert engine.env["EXTRA"] == "1"
    assert "PATH" in engine.env  # the agent's environment is inherited
    (status,) = driver.engines()
    assert status.state is EngineState.READY
    assert status.pid == engine.pid
    assert status.log_path == tmp_path / "logs" / "eng-a.log"
    with pytest.raises(FailedPreconditionError, match="reconfigure it or stop it first"):
        await driver.start(spec(gpus=(2, 3)))


async def test_gpu_and_port_conflicts_name_the_owner(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    await driver.start(spec("eng-a", gpus=(0, 1), port=8001))
    with pytest.raises(FailedPreconditionError, match=r"GPU\(s\) \[1\] belong to engine eng-a"):
        await driver.start(spec("eng-b", gpus=(1, 2), port=8002))
    with pytest.raises(FailedPreconditionError, match="port 8001 belongs to engine eng-a"):
        await driver.reconfigure(spec("eng-b", gpus=(2, 3), port=8001), 1.0)
    assert [s.spec.engine_id for s in driver.engines()] == ["eng-a"]  # nothing half-registered
    await driver.stop("eng-a")
    await driver.start(spec("eng-b", gpus=(1, 2), port=8001))  # a STOPPED engine holds nothing
    assert [s.state for s in driver.engines()] == [EngineState.STOPPED, EngineState.READY]


async def test_exit_during_startup_fails_with_log_tail(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    node.plans.append({"exit_at_start": 3})
    with pytest.raises(UnavailableError) as info:
        await driver.start(spec())
    assert "exited with status 3 during start-up" in str(info.value)
    assert "CUDA error: out of memory" in str(info.value)
    status = driver.engine("eng-a")
    assert status.state is EngineState.FAILED
    assert status.failure_reason == "exited with status 3 during start-up: CUDA error: out of memory"
    assert status.pid is None


async def test_ready_timeout_kills_and_fails(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path, clock=SteppingClock(), ready_timeout_s=4.0)
    node.plans.append({"healthy_after_polls": 0, "ignore_sigterm": True})
    with pytest.raises(UnavailableError, match=r"not ready within 4 s"):
        await driver.start(spec())
    (engine,) = node.engines
    assert engine.signals[:2] == [signal.SIGTERM, signal.SIGKILL]
    assert engine.returncode == -signal.SIGKILL
    assert driver.engine("eng-a").state is EngineState.FAILED
    # a per-call ready timeout overrides the default (0 means the default)
    node.plans.append({"healthy_after_polls": 0})
    with pytest.raises(UnavailableError, match=r"not ready within 2 s"):
        await driver.start(spec(), ready_timeout_s=2.0)


async def test_spawn_oserror_is_unavailable(tmp_path: Path) -> None:
    node = FakeNode()
    node.spawn_error = FileNotFoundError(2, "No such file or directory", "fake-engine")
    driver = make_driver(node, tmp_path)
    with pytest.raises(UnavailableError, match="cannot run 'fake-engine'"):
        await driver.start(spec())
    assert driver.engine("eng-a").state is EngineState.FAILED


async def test_drain_posts_and_waits_for_empty_queue(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    await driver.start(spec())
    engine = node.engines[0]
    engine.running, engine.waiting = 2, 1
    drain_s = await driver.drain("eng-a", timeout_s=5.0)
    assert drain_s >= 0.0
    assert ("POST", "http://127.0.0.1:8001/admin/drain") in node.requests
    assert engine.running == 0
    assert engine.waiting == 0
    assert driver.engine("eng-a").state is EngineState.DRAINING
    assert await driver.drain("eng-a", timeout_s=5.0) == 0.0  # already draining: nothing to do


async def test_drain_without_endpoint_and_timeout(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path, clock=SteppingClock())
    await driver.start(spec())
    engine = node.engines[0]
    engine.drain_status = 404  # vLLM has no drain endpoint: only the metrics wait remains
    engine.running = 1000
    drain_s = await driver.drain("eng-a", timeout_s=3.0)
    assert 3.0 <= drain_s <= 5.0  # gave up at the timeout rather than failing
    assert engine.running > 0
    with pytest.raises(InvalidArgumentError):
        await driver.drain("eng-a", timeout_s=-1.0)


async def test_stop_sigterm_then_sigkill_after_grace(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    await driver.start(spec("eng-a", gpus=(0,), tp=1, port=8001))
    await driver.start(spec("eng-b", gpus=(1,), tp=1, port=8002))
    polite, stubborn = node.engines
    stubborn.ignore_sigterm = True
    await driver.stop("eng-a")
    assert polite.signals == [signal.SIGTERM, signal.SIGKILL]  # the SIGKILL sweeps leftover workers
    assert polite.returncode == -signal.SIGTERM
    await driver.stop("eng-b", grace_s=0.01)
    assert stubborn.returncode == -signal.SIGKILL
    assert [s.state for s in driver.engines()] == [EngineState.STOPPED, EngineState.STOPPED]
    assert await driver.stop("eng-a") == 0.0  # stopping a STOPPED engine does nothing
    with pytest.raises(NotFoundError):
        await driver.stop("eng-z")


async def test_unexpected_exit_marks_failed(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    await driver.start(spec())
    node.engines[0].exit(139)
    await asyncio.sleep(0)
    status = driver.engine("eng-a")
    assert status.state is EngineState.FAILED
    assert status.failure_reason.startswith("exited with status 139")
    # a FAILED engine can be reconfigured (it has nothing to drain or stop)
    timings = await driver.reconfigure(spec(), drain_timeout_s=1.0)
    assert timings.restarted
    assert timings.drain_s == 0.0
    assert driver.engine("eng-a").state is EngineState.READY


async def test_reconfigure_same_spec_is_a_no_op(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    first = await driver.reconfigure(spec(), drain_timeout_s=1.0)
    assert first.restarted
    assert first.stop_s == 0.0
    again = await driver.reconfigure(spec(), drain_timeout_s=1.0)
    assert again == ReconfigureTimings(drain_s=0.0, stop_s=0.0, start_s=0.0, restarted=False)
    assert len(node.engines) == 1


async def test_reconfigure_new_tp_drains_stops_starts(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    await driver.start(spec(gpus=(0, 1, 2, 3), tp=4))
    old = node.engines[0]
    old.running = 3
    timings = await driver.reconfigure(spec(gpus=tuple(range(8)), tp=8), drain_timeout_s=5.0)
    assert timings.restarted
    assert old.running == 0  # drained before the stop
    assert old.returncode == -signal.SIGTERM
    new = node.engines[1]
    assert new.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert new.argv[new.argv.index("--tp") + 1] == "8"
    status = driver.engine("eng-a")
    assert status.state is EngineState.READY
    assert status.spec.tp_degree == 8
    assert status.pid == new.pid


async def test_reconfigure_failure_rolls_back(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    await driver.start(spec(gpus=(0, 1, 2, 3), tp=4))
    node.plans.append({"exit_at_start": 1})  # the new configuration crashes while loading
    with pytest.raises(UnavailableError) as info:
        await driver.reconfigure(spec(gpus=tuple(range(8)), tp=8), drain_timeout_s=1.0)
    message = str(info.value)
    assert "previous configuration restored" in message
    assert "CUDA error: out of memory" in message
    assert len(node.engines) == 3
    status = driver.engine("eng-a")
    assert status.state is EngineState.READY
    assert status.spec == spec(gpus=(0, 1, 2, 3), tp=4)
    assert status.pid == node.engines[2].pid
    assert (tmp_path / "logs" / "eng-a.prev.log").exists()  # the failed start's log is kept
    # GPUs 4..7 were held only during the attempt
    await driver.start(spec("eng-b", gpus=(4, 5, 6, 7), tp=4, port=8002))


async def test_reconfigure_failure_and_failed_rollback(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    await driver.start(spec())
    node.plans += [{"exit_at_start": 1}, {"exit_at_start": 2}]
    with pytest.raises(UnavailableError, match="restarting the previous configuration failed too"):
        await driver.reconfigure(spec(tp=1), drain_timeout_s=1.0)
    assert driver.engine("eng-a").state is EngineState.FAILED


async def test_rollback_gets_the_known_good_start_time_not_the_callers_timeout(tmp_path: Path) -> None:
    """Fault: the caller's 0.05 s ready timeout fails the new configuration, and the rollback used to get
    the same 0.05 s, fail as well, and leave the READY engine FAILED. The clock steps 1 s per read, so the
    first start measures several seconds."""
    node = FakeNode()
    driver = make_driver(node, tmp_path, clock=SteppingClock(), ready_timeout_s=100.0)
    node.plans.append({"healthy_after_polls": 3})
    start_s = await driver.start(spec())
    assert start_s > 1.0
    node.plans += [{"healthy_after_polls": 0}, {"healthy_after_polls": 3}]  # new: never; old: as before
    with pytest.raises(UnavailableError) as info:
        await driver.reconfigure(spec(tp=1), drain_timeout_s=1.0, ready_timeout_s=0.05)
    assert "previous configuration restored" in str(info.value), str(info.value)
    status = driver.engine("eng-a")
    assert (status.state, status.spec) == (EngineState.READY, spec())


async def test_rollback_timeout_is_margin_times_known_start_with_a_floor(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(
        node, tmp_path, clock=SteppingClock(), ready_timeout_s=100.0, rollback_ready_floor_s=1.0
    )
    node.plans.append({"healthy_after_polls": 3})
    start_s = await driver.start(spec())
    # The previous configuration now needs far longer than 3 x its measured start: the rollback gives up.
    node.plans += [{"healthy_after_polls": 0}, {"healthy_after_polls": 1000}]
    with pytest.raises(UnavailableError, match=f"not ready within {3 * start_s:g} s"):
        await driver.reconfigure(spec(tp=1), drain_timeout_s=1.0, ready_timeout_s=0.05)
    assert driver.engine("eng-a").state is EngineState.FAILED


async def test_new_engine_failing_to_start_has_no_rollback(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    node.plans.append({"exit_at_start": 1})
    with pytest.raises(UnavailableError) as info:
        await driver.reconfigure(spec(), drain_timeout_s=1.0)
    assert "restored" not in str(info.value)
    assert driver.engine("eng-a").state is EngineState.FAILED


async def test_metrics_rates_and_errors(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path, clock=SteppingClock())
    with pytest.raises(NotFoundError):
        await driver.metrics("eng-a")
    await driver.start(spec())
    engine = node.engines[0]
    engine.running, engine.generation_tokens = 2, 100
    first = await driver.metrics("eng-a")
    assert first.running_requests_count == 2
    assert first.generation_tokens_per_s == 0.0
    engine.generation_tokens = 160
    second = await driver.metrics("eng-a")
    assert second.generation_tokens_per_s == pytest.approx(60.0 / (second.scraped_s - first.scraped_s))
    await driver.stop("eng-a")
    with pytest.raises(FailedPreconditionError):
        await driver.metrics("eng-a")


async def test_stop_all_stops_every_engine(tmp_path: Path) -> None:
    node = FakeNode()
    driver = make_driver(node, tmp_path)
    await driver.start(spec("eng-a", gpus=(0,), tp=1, port=8001))
    await driver.start(spec("eng-b", gpus=(1,), tp=1, port=8002))
    await driver.stop_all()
    assert all(e.returncode is not None for e in node.engines)
    assert {s.state for s in driver.engines()} == {EngineState.STOPPED}


# ---- processes on the GPUs that are not this driver's engines --------------------------------------


async def test_foreign_process_on_a_gpu_is_refused_naming_gpu_and_pid(tmp_path: Path) -> None:
    node, gpus = FakeNode(), FakeGpus()
    driver = make_driver(node, tmp_path, gpus=gpus)
    gpus.processes[1] = [GpuProcess(pid=2**22 + 11, used_memory_bytes=5 * 2**30)]
    for action in (driver.start(spec()), driver.reconfigure(spec(), 1.0)):
        with pytest.raises(FailedPreconditionError) as info:
            await action
        message = str(info.value)
        assert "GPU 1" in message and str(2**22 + 11) in message and str(5 * 2**30) in message
    assert node.engines == [] and driver.engines() == []  # nothing started, nothing registered
    assert await driver.foreign_processes(range(4)) == {1: (GpuProcess(2**22 + 11, 5 * 2**30),)}
    await driver.start(spec(gpus=(2, 3)))  # other GPUs are free


async def test_own_engine_processes_are_not_foreign(tmp_path: Path) -> None:
    node, gpus = FakeNode(), FakeGpus()
    driver = make_driver(node, tmp_path, gpus=gpus)
    await driver.start(spec(gpus=(0, 1)))
    own = node.engines[0].pid
    gpus.processes = {0: [GpuProcess(own, None)], 1: [GpuProcess(own, None)]}
    assert driver.owns_pid(own)
    assert await driver.foreign_processes([0, 1]) == {}
    # The engine's own GPUs stay its own through a reconfiguration onto more GPUs.
    timings = await driver.reconfigure(spec(gpus=(0, 1, 2, 3), tp=4), drain_timeout_s=1.0)
    assert timings.restarted and driver.engine("eng-a").state is EngineState.READY
    # Once stopped, its pid is no longer the driver's: a process still listed on the GPU is foreign.
    await driver.stop("eng-a")
    assert not driver.owns_pid(own)
    with pytest.raises(FailedPreconditionError, match=f"process {own}"):
        await driver.start(spec("eng-b", gpus=(0,), tp=1, port=8002))


async def test_unlistable_gpus(tmp_path: Path) -> None:
    node, gpus = FakeNode(), FakeGpus()
    driver = make_driver(node, tmp_path, gpus=gpus)
    gpus.error = UnsupportedError("nvmlDeviceGetComputeRunningProcesses: driver too old")
    await driver.start(spec())  # a driver that cannot list processes does not block engines
    gpus.error = UnavailableError("GPU is lost")
    with pytest.raises(UnavailableError, match="cannot list the processes on GPU"):
        await driver.start(spec("eng-b", gpus=(2, 3), port=8002))
    assert "eng-b" not in {s.spec.engine_id for s in driver.engines()} and len(node.engines) == 1
    assert await driver.foreign_processes([0, 1]) == {}  # GetInventory: logged, nothing found
