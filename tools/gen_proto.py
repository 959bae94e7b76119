#!/usr/bin/env python3
"""Regenerates the Python code of the wire contracts from `proto/` (docs/wire.md).

Each `proto/<pkg path>/<name>.proto` yields, under the same path of the output root (the repo root):
`<name>_pb2.py` (protoc), `<name>_pb2.pyi` (mypy-protobuf), and for files that define a service
`<name>_pb2_grpc.py` (grpcio-tools) with `<name>_pb2_grpc.pyi` (mypy-protobuf). Because protoc runs with
`-I <proto root>`, the proto path is the Python module path and generated code imports its siblings as
`agent.api.v1.x_pb2`.

    python tools/gen_proto.py            # rewrite stale generated files, remove orphaned ones
    python tools/gen_proto.py --check    # regenerate into a temp dir only; exit 1 listing stale files

`--check` is the CI freshness gate (`make proto-check`). The output is a pure function of the .proto
files and the pinned generator versions (grpcio-tools, mypy-protobuf in pyproject.toml), so a mismatch
means either a .proto was edited without regenerating or the generators differ from the pins; the
message prints the versions in use to tell the two apart.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
GENERATORS = ("grpcio-tools", "mypy-protobuf", "protobuf")


class GenerationError(Exception):
    """protoc or a plugin failed, or a generator is missing; the message says which."""


@dataclass(frozen=True, slots=True)
class Drift:
    """One generated file whose committed state differs from what the .proto files produce."""

    path: str  # relative to the output root
    reason: str  # "differs", "missing" or "orphan"


def find_protos(proto_root: Path) -> list[Path]:
    """All .proto files under proto_root, relative to it, in a fixed order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def _plugin(name: str) -> Path:
    # The plugins are console scripts of the same environment as this interpreter; look there first
    # so that a venv's pinned mypy-protobuf wins over one elsewhere on PATH.
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise GenerationError(f"{name} not found beside {sys.executable} or on PATH; install mypy-protobuf")
    return Path(found)


def _protoc(args: list[str]) -> None:
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # The well-known types (google/protobuf/*.proto) come last so that our own roots take precedence.
    argv = ["grpc_tools.protoc", *args, f"-I{well_known}"]
    status = protoc.main(argv)
    if status != 0:
        raise GenerationError(f"protoc failed (exit {status}): {' '.join(argv[1:])}")


def read_descriptors(proto_root: Path, *, source_info: bool = False) -> descriptor_pb2.FileDescriptorSet:
    """The parsed descriptors of every .proto under proto_root (with comments when source_info)."""
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as scratch:
        out = Path(scratch) / "descriptors.bin"
        flags = ["--include_source_info"] if source_info else []
        _protoc([f"-I{proto_root}", *flags, f"--descriptor_set_out={out}", *_sources(proto_root)])
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _sources(proto_root: Path) -> list[str]:
    protos = find_protos(proto_root)
    if not protos:
        raise GenerationError(f"no .proto files under {proto_root}")
    return [str(proto_root / p) for p in protos]


def generate(proto_root: Path, out_dir: Path) -> list[str]:
    """Writes all generated files for proto_root into out_dir; returns their relative paths, sorted."""
    include = f"-I{proto_root}"
    _protoc(
        [
            include,
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--python_out={out_dir}",
            f"--mypy_out=quiet:{out_dir}",
            *_sources(proto_root),
        ]
    )
    # grpcio-tools would also emit a _pb2_grpc.py holding only a version check for files without a
    # service; such files serve nothing, so only files that define a service get the gRPC stubs.
    with_services = [f.name for f in read_descriptors(proto_root).file if f.service]
    if with_services:
        _protoc(
            [
                include,
                f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
                f"--grpc_python_out={out_dir}",
                f"--mypy_grpc_out=quiet:{out_dir}",
                *(str(proto_root / name) for name in sorted(with_services)),
            ]
        )
    return sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())


def _is_generated_name(name: str) -> bool:
    return name.endswith(GENERATED_SUFFIXES)


def compare(fresh_dir: Path, fresh: list[str], proto_root: Path, out_root: Path) -> list[Drift]:
    """Drift of out_root against freshly generated files; orphans are looked for beside the protos."""
    drift: list[Drift] = []
    for rel in fresh:
        committed = out_root / rel
        if not committed.is_file():
            drift.append(Drift(rel, "missing"))
        elif committed.read_bytes() != (fresh_dir / rel).read_bytes():
            drift.append(Drift(rel, "differs"))
    expected = set(fresh)
    for package_dir in sorted({p.parent for p in find_protos(proto_root)}):
        target = out_root / package_dir
        if not target.is_dir():
            continue
        for path in sorted(target.iterdir()):
            rel = path.relative_to(out_root).as_posix()
            if path.is_file() and _is_generated_name(path.name) and rel not in expected:
                drift.append(Drift(rel, "orphan"))
    return sorted(drift, key=lambda d: d.path)


def _versions() -> str:
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in GENERATORS)


def run(proto_root: Path, out_root: Path, check: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="gen_proto_out_") as tmp:
        fresh_dir = Path(tmp)
        fresh = generate(proto_root, fresh_dir)
        drift = compare(fresh_dir, fresh, proto_root, out_root)
        if check:
            if not drift:
                return 0
            print(
                f"gen_proto: {len(drift)} generated file(s) out of date with {proto_root}; "
                f"run `python tools/gen_proto.py` (generators here: {_versions()}):",
                file=sys.stderr,
            )
            for d in drift:
                print(f"  {d.path}: {d.reason}", file=sys.stderr)
            return 1
        for d in drift:
            target = out_root / d.path
            if d.reason == "orphan":
                target.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fresh_dir / d.path, target)
            print(f"gen_proto: {'removed' if d.reason == 'orphan' else 'wrote'} {d.path}")
        if not drift:
            print(f"gen_proto: {len(fresh)} generated files already up to date")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if generated code is stale"
    )
    parser.add_argument(
        "--proto-root",
        type=Path,
        default=REPO_ROOT / "proto",
        help="root of the .proto tree (default: proto/)",
    )
    parser.add_argument(
        "--out-root",
        type=Path,
        default=REPO_ROOT,
        help="root the generated package paths are written under (default: the repo root)",
    )
    args = parser.parse_args(argv)
    proto_root: Path = args.proto_root.resolve()
    if not proto_root.is_dir():
        parser.error(f"--proto-root: {proto_root} is not a directory")
    try:
        return run(proto_root, args.out_root.resolve(), args.check)
    except GenerationError as exc:
        print(f"gen_proto: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
