"""The simulator's engine against the reference engine on the two Azure hour traces, whole cluster:
`dctl simulate --policy dynamollm` with the engine as it runs (decode-only runs in one step, compiled
where built) and with `--reference-engine` (every iteration on its own, plain Python). The issue's
accuracy bar is SLO attainment within 0.1 point and energy within 0.5%; the reports are in fact equal
but for the wall time, and that is what is checked."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from controller.dctl.main import main


def _report(trace: Path, out: Path, *flags: str) -> dict[str, Any]:
    argv = ["simulate", "--trace", str(trace), "--policy", "dynamollm", "--no-progress", "--json", str(out)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, *flags]) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    del report["wall_s"]
    return report


@pytest.mark.parametrize("name", ["conv", "code"])
def test_hour_trace_reports_equal_the_reference_engine(shared_data: Path, tmp_path: Path, name: str) -> None:
    trace = shared_data / "traces" / f"AzureLLMInferenceTrace_{name}.csv"
    fast = _report(trace, tmp_path / "fast.json")
    reference = _report(trace, tmp_path / "reference.json", "--reference-engine")
    assert abs(fast["slo_attainment"] - reference["slo_attainment"]) <= 0.001
    assert fast["energy_j"] == pytest.approx(reference["energy_j"], rel=0.005)
    assert fast == reference
    assert fast["engine_iterations"] > 100_000
