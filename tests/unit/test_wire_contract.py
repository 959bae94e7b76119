"""The agent's wire contract (proto/agent/api/v1, docs/wire.md) and the freshness of its generated code.

Checks the rules later issues rely on: units in every quantity's name, a generation on every control
request and a lease where GPU settings are held, the two services and their streaming shapes, comments on
every element of the .proto files, and `tools/gen_proto.py --check` catching drift (on a temp copy).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor, ServiceDescriptor

from agent.api.v1 import (
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    telemetry_pb2,
    telemetry_pb2_grpc,
)
from controller.api.v1 import admin_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
GEN_PROTO = ROOT / "tools" / "gen_proto.py"
_spec = importlib.util.spec_from_file_location("gen_proto", GEN_PROTO)
assert _spec and _spec.loader
gen_proto = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gen_proto  # dataclasses look their module up there
_spec.loader.exec_module(gen_proto)

FILES: tuple[FileDescriptor, ...] = (
    common_pb2.DESCRIPTOR,
    telemetry_pb2.DESCRIPTOR,
    control_pb2.DESCRIPTOR,
    admin_pb2.DESCRIPTOR,
)

# A numeric field is a physical quantity unless its name says it is an identifier, position or tally.
UNIT_SUFFIXES = ("_w", "_j", "_mhz", "_s", "_ns", "_bytes", "_ratio", "_pct", "_c", "_tokens", "_rps")
DIMENSIONLESS_SUFFIXES = (
    "_index",
    "_indices",
    "_count",
    "_port",
    "_mask",
    "_degree",
    "_id",
    "_generation",
    "_version",
    "_factor",
)
DIMENSIONLESS_NAMES = frozenset({"generation", "id", "version", "seq", "page_size"})
NUMERIC_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_DOUBLE,
        FieldDescriptor.TYPE_FLOAT,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def names_its_unit(name: str) -> bool:
    if name in DIMENSIONLESS_NAMES:
        return True
    return any(
        name.endswith(suffix) and len(name) > len(suffix) for suffix in UNIT_SUFFIXES + DIMENSIONLESS_SUFFIXES
    )


def _messages(messages: Iterable[Descriptor]) -> Iterator[Descriptor]:
    for message in messages:
        if message.GetOptions().map_entry:
            continue
        yield message
        yield from _messages(message.nested_types)


def all_messages() -> list[Descriptor]:
    return [m for f in FILES for m in _messages(f.message_types_by_name.values())]


def _value_type(field: FieldDescriptor) -> int:
    # A map's values carry the quantity; the map field's name must then name the unit.
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        return int(entry.fields_by_name["value"].type)
    return int(field.type)


def numeric_fields() -> list[tuple[str, str]]:
    return [
        (m.full_name, f.name) for m in all_messages() for f in m.fields if _value_type(f) in NUMERIC_TYPES
    ]


@pytest.mark.parametrize(
    "name",
    ["power", "energy", "clock", "sm_clock", "latency", "temperature", "util_gpu", "lease", "timeout", "_s"],
)
def test_unit_rule_rejects_bare_quantities(name: str) -> None:
    assert not names_its_unit(name)


@pytest.mark.parametrize(
    "name", ["power_w", "energy_j", "sm_clock_mhz", "lease_s", "gpu_indices", "generation"]
)
def test_unit_rule_accepts_suffixed_names(name: str) -> None:
    assert names_its_unit(name)


def test_every_numeric_field_names_its_unit() -> None:
    fields = numeric_fields()
    assert len(fields) > 40  # the walk really reached the contract's messages
    offenders = [f"{msg}.{name}" for msg, name in fields if not names_its_unit(name)]
    assert offenders == []


def _control_service() -> ServiceDescriptor:
    return control_pb2.DESCRIPTOR.services_by_name["NodeControl"]


def test_every_control_request_carries_a_uint64_generation() -> None:
    methods = _control_service().methods
    assert len(methods) == 5
    for method in methods:
        generation = method.input_type.fields_by_name.get("generation")
        assert generation is not None, method.name
        assert generation.type == FieldDescriptor.TYPE_UINT64, method.name


@pytest.mark.parametrize("method", ["ApplyGpuConfig", "RenewLease"])
def test_lease_holding_requests_carry_lease_s(method: str) -> None:
    request = _control_service().methods_by_name[method].input_type
    lease = request.fields_by_name.get("lease_s")
    assert lease is not None and lease.type == FieldDescriptor.TYPE_DOUBLE


@pytest.mark.parametrize(
    ("file", "service", "methods"),
    [
        (telemetry_pb2.DESCRIPTOR, "NodeTelemetry", {"GetInventory": False, "StreamTelemetry": True}),
        (
            control_pb2.DESCRIPTOR,
            "NodeControl",
            {
                "ApplyGpuConfig": False,
                "ReconfigureEngine": False,
                "StopEngine": False,
                "RenewLease": False,
                "RestoreDefaults": False,
            },
        ),
    ],
)
def test_services_and_streaming_shapes(file: FileDescriptor, service: str, methods: dict[str, bool]) -> None:
    # One service per authorization scope (read, control): the agent grants scopes by full service name.
    descriptor = file.services_by_name[service]
    assert descriptor.full_name == f"dynamollm.agent.v1.{service}"
    assert {m.name: m.server_streaming for m in descriptor.methods} == methods
    assert not any(m.client_streaming for m in descriptor.methods)


def test_optional_power_limit_keeps_presence() -> None:
    setting = control_pb2.GpuSetting.DESCRIPTOR.fields_by_name["power_limit_w"]
    assert setting.has_presence
    locked = common_pb2.GpuInfo.DESCRIPTOR.fields_by_name["sm_clock_lock"]
    assert locked.message_type is common_pb2.SmClockRange.DESCRIPTOR


def test_messages_round_trip() -> None:
    request = control_pb2.ApplyGpuConfigRequest(
        generation=7,
        lease_s=30.0,
        gpus=[
            control_pb2.GpuSetting(gpu_index=0, min_clock_mhz=1200, max_clock_mhz=1200, power_limit_w=500.0),
            control_pb2.GpuSetting(gpu_index=1, min_clock_mhz=800, max_clock_mhz=1980),
        ],
    )
    back = control_pb2.ApplyGpuConfigRequest.FromString(request.SerializeToString())
    assert back == request
    assert back.gpus[0].HasField("power_limit_w") and back.gpus[0].power_limit_w == 500.0
    assert not back.gpus[1].HasField("power_limit_w")

    sample = telemetry_pb2.TelemetrySample(
        ts_unix_ns=1_700_000_000_000_000_000,
        period_s=1.0,
        gpus=[common_pb2.GpuSample(gpu_index=3, power_w=412.5, energy_j=1.25e9, sm_clock_mhz=1980)],
        engines=[
            common_pb2.EngineMetrics(
                engine_id="pool-ss-0", state=common_pb2.ENGINE_STATE_READY, kv_cache_usage_ratio=0.42
            )
        ],
        dropped_samples_count=2,
    )
    assert telemetry_pb2.TelemetrySample.FromString(sample.SerializeToString()) == sample


def _commented_paths(fdp: descriptor_pb2.FileDescriptorProto) -> set[tuple[int, ...]]:
    return {
        tuple(loc.path)
        for loc in fdp.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }


def _undocumented(fdp: descriptor_pb2.FileDescriptorProto) -> list[str]:
    # Paths follow descriptor.proto field numbers: file.message_type=4, .enum_type=5, .service=6;
    # message.field=2, message.nested_type=3, message.enum_type=4; service.method=2.
    commented = _commented_paths(fdp)
    missing: list[str] = []

    def visit_message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        if msg.options.map_entry:
            return
        name = f"{prefix}{msg.name}"
        if path not in commented:
            missing.append(name)
        missing.extend(f"{name}.{f.name}" for i, f in enumerate(msg.field) if (*path, 2, i) not in commented)
        for i, nested in enumerate(msg.nested_type):
            visit_message(nested, (*path, 3, i), f"{name}.")
        missing.extend(
            f"{name}.{e.name}" for i, e in enumerate(msg.enum_type) if (*path, 4, i) not in commented
        )

    for i, msg in enumerate(fdp.message_type):
        visit_message(msg, (4, i), "")
    missing.extend(e.name for i, e in enumerate(fdp.enum_type) if (5, i) not in commented)
    for i, svc in enumerate(fdp.service):
        if (6, i) not in commented:
            missing.append(svc.name)
        missing.extend(
            f"{svc.name}.{m.name}" for j, m in enumerate(svc.method) if (6, i, 2, j) not in commented
        )
    return missing


def test_every_message_field_enum_and_rpc_is_documented() -> None:
    files: list[descriptor_pb2.FileDescriptorProto] = list(
        gen_proto.read_descriptors(PROTO_ROOT, source_info=True).file
    )
    assert sorted(f.name for f in files) == sorted(f.name for f in FILES)
    missing = [f"{fdp.name}: {name}" for fdp in files for name in _undocumented(fdp)]
    assert missing == []


class _FixedTelemetry(telemetry_pb2_grpc.NodeTelemetryServicer):
    """Serves a constant inventory and three samples, to exercise the generated stubs over loopback."""

    def GetInventory(
        self, request: telemetry_pb2.GetInventoryRequest, context: grpc.ServicerContext
    ) -> telemetry_pb2.GetInventoryResponse:
        return telemetry_pb2.GetInventoryResponse(
            node_id="node-a",
            gpu_backend=common_pb2.GPU_BACKEND_KIND_SIMULATED,
            gpus=[common_pb2.GpuInfo(gpu_index=0)],
        )

    def StreamTelemetry(
        self, request: telemetry_pb2.StreamTelemetryRequest, context: grpc.ServicerContext
    ) -> Iterator[telemetry_pb2.TelemetrySample]:
        for i in range(3):
            yield telemetry_pb2.TelemetrySample(ts_unix_ns=i, period_s=request.period_s)


def test_generated_stubs_serve_over_loopback() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    telemetry_pb2_grpc.add_NodeTelemetryServicer_to_server(_FixedTelemetry(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            telemetry = telemetry_pb2_grpc.NodeTelemetryStub(channel)
            inventory = telemetry.GetInventory(telemetry_pb2.GetInventoryRequest(), timeout=5)
            assert inventory.node_id == "node-a" and [g.gpu_index for g in inventory.gpus] == [0]
            stream = telemetry.StreamTelemetry(telemetry_pb2.StreamTelemetryRequest(period_s=0.5), timeout=5)
            assert [(s.ts_unix_ns, s.period_s) for s in stream] == [(0, 0.5), (1, 0.5), (2, 0.5)]
            control = control_pb2_grpc.NodeControlStub(channel)
            with pytest.raises(grpc.RpcError) as failure:
                control.RenewLease(control_pb2.RenewLeaseRequest(generation=1, lease_s=10.0), timeout=5)
            assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)


def test_gen_proto_check_passes_on_the_tree() -> None:
    done = subprocess.run(
        [sys.executable, str(GEN_PROTO), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    shutil.copytree(PROTO_ROOT, tmp_path / "proto")
    shutil.copytree(ROOT / "agent" / "api" / "v1", tmp_path / "agent" / "api" / "v1")
    shutil.copytree(ROOT / "controller" / "api" / "v1", tmp_path / "controller" / "api" / "v1")
    return tmp_path


def _check(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = gen_proto.main(["--check", "--proto-root", str(root / "proto"), "--out-root", str(root)])
    return status, capsys.readouterr().err


def test_gen_proto_check_flags_drift_and_regeneration_repairs_it(
    repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1 = repo_copy / "agent" / "api" / "v1"
    assert _check(repo_copy, capsys) == (0, "")

    with (v1 / "control_pb2.py").open("a") as f:
        f.write("# hand edit\n")
    (v1 / "telemetry_pb2_grpc.pyi").unlink()
    (v1 / "retired_pb2.py").write_text("# generated from a .proto that no longer exists\n")
    proto = repo_copy / "proto" / "agent" / "api" / "v1" / "common.proto"
    proto.write_text(
        proto.read_text().replace("  bool modified = 12;\n", "  bool modified = 12;\n  bool spare = 999;\n")
    )

    status, err = _check(repo_copy, capsys)
    assert status == 1
    assert "agent/api/v1/control_pb2.py: differs" in err
    assert "agent/api/v1/common_pb2.py: differs" in err
    assert "agent/api/v1/telemetry_pb2_grpc.pyi: missing" in err
    assert "agent/api/v1/retired_pb2.py: orphan" in err
    assert "agent/api/v1/__init__.py" not in err  # hand-written files are never touched

    assert gen_proto.main(["--proto-root", str(repo_copy / "proto"), "--out-root", str(repo_copy)]) == 0
    assert _check(repo_copy, capsys)[0] == 0
    assert not (v1 / "retired_pb2.py").exists() and (v1 / "__init__.py").is_file()


def test_gen_proto_check_exits_1_from_the_command_line(repo_copy: Path) -> None:
    target = repo_copy / "agent" / "api" / "v1" / "telemetry_pb2.py"
    target.write_bytes(target.read_bytes().replace(b"NodeTelemetry", b"NodeTelemetrx", 1))
    done = subprocess.run(
        [
            sys.executable,
            str(GEN_PROTO),
            "--check",
            "--proto-root",
            str(repo_copy / "proto"),
            "--out-root",
            str(repo_copy),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "agent/api/v1/telemetry_pb2.py: differs" in done.stderr
