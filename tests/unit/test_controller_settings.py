"""controller/settings.py: TOML < DYNAMOLLM_CONTROLLER_* < CLI, [policy] and [[nodes]], per-node
credentials, errors naming the key; and `python -m controller.app`'s one-line exit 2 on a bad config."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.api.errors import InvalidArgumentError
from controller.profiles import default_profile, save_profile
from controller.settings import MAX_NODES, load_settings, merge_settings

REPO = Path(__file__).resolve().parents[2]
ONE_NODE = [{"name": "gpu1", "address": "10.0.0.1:50051"}]
TOKEN = "t" * 24


def _merge(
    file_values: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    cli: dict[str, Any] | None = None,
    cli_nodes: list[dict[str, str]] | None = None,
) -> Any:
    table = {"nodes": ONE_NODE, **(file_values or {})}
    return merge_settings(table, env or {}, cli or {}, cli_nodes=cli_nodes or ())


def _error(**kwargs: Any) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        _merge(**kwargs)
    return info.value


def _secret(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


# ------------------------------------------------------------------------------------------ merging


def test_defaults_of_a_one_node_fleet() -> None:
    s = _merge()
    assert s.listen == "127.0.0.1:50061" and s.metrics_listen == "127.0.0.1:9461"
    assert s.mode == "observe" and s.policy_name == "dynamollm"
    assert s.time_scale == 1.0 and s.profile_path is None
    assert (s.model, s.gpu, s.engine_model) == ("llama2-70b", "h100-sxm", "llama2-70b")
    assert s.unix_socket_mode == 0o660
    assert s.fleet.drain_timeout_s == 60.0 and s.fleet.renew_fraction == pytest.approx(1 / 3)
    assert [(n.name, n.address, n.token, n.tls) for n in s.nodes] == [("gpu1", "10.0.0.1:50051", None, None)]
    # No credentials anywhere: a local demo, reflection and loopback access on.
    assert s.reflection is True and s.allow_unauthenticated_loopback is True


def test_precedence_is_toml_then_environment_then_cli() -> None:
    file_values = {"control": {"time_scale": 2.0, "initial_rate_rps": 3.0}, "fleet": {"lease_s": 30}}
    env = {"DYNAMOLLM_CONTROLLER_CONTROL_TIME_SCALE": "4", "DYNAMOLLM_CONTROLLER_FLEET_LEASE_S": "90"}
    s = _merge(file_values, env, {"control.time_scale": "8"})
    assert s.time_scale == 8.0  # CLI beats environment beats TOML
    assert s.fleet.lease_s == 90.0  # environment beats TOML
    assert s.initial_rate_rps == 3.0  # TOML beats the default


def test_environment_nodes_replace_toml_nodes_and_cli_nodes_replace_both() -> None:
    env = {"DYNAMOLLM_CONTROLLER_NODES": "gpu1=10.0.0.1:1, gpu2=10.0.0.2:2,"}
    assert [(n.name, n.address) for n in _merge(env=env).nodes] == [
        ("gpu1", "10.0.0.1:1"),
        ("gpu2", "10.0.0.2:2"),
    ]
    cli = [{"name": "c", "address": "unix:/run/agent.sock"}]
    assert [(n.name, n.address) for n in _merge(env=env, cli_nodes=cli).nodes] == [
        ("c", "unix:/run/agent.sock")
    ]


def test_the_policy_table_sets_the_policys_knobs() -> None:
    s = _merge({"policy": {"merge_fill": 0.5, "periods": {"pool_s": 120}, "costs": {"warm_start_s": 30}}})
    assert s.policy.merge_fill == 0.5
    assert s.policy.periods.pool_s == 120.0
    assert s.policy.costs.warm_start_s == 30.0


def test_engine_options_are_key_value_items_and_engine_model_overrides_the_profiles() -> None:
    s = _merge({"engine": {"options": ["max_num_seqs=64", "enforce_eager="], "model": "served-name"}})
    assert dict(s.engine_options) == {"max_num_seqs": "64", "enforce_eager": ""}
    assert s.engine_model == "served-name" and s.model == "llama2-70b"


def test_log_json_words_map_to_a_tristate() -> None:
    assert [_merge({"log_json": word}).log_json for word in ("true", "false", "auto")] == [True, False, None]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed_part"),
    [
        ({"file_values": {"nope": 1}}, "nope", "listen"),
        ({"file_values": {"control": {"time_scale": -1}}}, "control.time_scale", "> 0"),
        ({"file_values": {"control": {"policy": "magic"}}}, "control.policy", "dynamollm"),
        ({"file_values": {"mode": "yolo"}}, "mode", "observe, apply, paused"),
        ({"file_values": {"fleet": {"renew_fraction": 1.0}}}, "fleet.renew_fraction", "(0, 1)"),
        ({"file_values": {"fleet": {"drain_timeout_s": -1}}}, "fleet.drain_timeout_s", ">= 0"),
        ({"file_values": {"unix_socket_mode": "999"}}, "unix_socket_mode", "octal"),
        ({"file_values": {"listen": "nowhere"}}, "listen", "HOST:PORT"),
        ({"file_values": {"metrics_listen": "nowhere"}}, "metrics_listen", "HOST:PORT"),
        ({"file_values": {"engine": {"options": ["novalue"]}}}, "engine.options", "KEY=VALUE"),
        ({"file_values": {"policy": 3}}, "policy", "a table"),
        ({"file_values": {"policy": {"nope": 1}}}, "policy.nope", "merge_fill"),
        (
            {"env": {"DYNAMOLLM_CONTROLLER_NOPE": "1"}},
            "DYNAMOLLM_CONTROLLER_NOPE",
            "DYNAMOLLM_CONTROLLER_LISTEN",
        ),
        ({"env": {"DYNAMOLLM_CONTROLLER_CONTROL_TIME_SCALE": "fast"}}, "control.time_scale", "a number"),
        ({"env": {"DYNAMOLLM_CONTROLLER_NODES": "gpu1"}}, "DYNAMOLLM_CONTROLLER_NODES", "NAME=HOST:PORT"),
        ({"cli": {"mode": "yolo"}}, "mode", "observe"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(
    kwargs: dict[str, Any], field: str, allowed_part: str
) -> None:
    err = _error(**kwargs)
    assert err.field == field
    assert allowed_part in err.allowed


def test_the_message_reads_field_got_value_allowed() -> None:
    assert (
        str(_error(file_values={"control": {"time_scale": -1}}))
        == "control.time_scale: got -1.0; allowed: > 0"
    )


@pytest.mark.parametrize(
    ("nodes", "field"),
    [
        ([], "nodes"),
        ("gpu1=h:1", "nodes"),
        (["gpu1=h:1"], "nodes[0]"),
        ([{"name": "Bad_Name", "address": "h:1"}], "nodes[0].name"),
        ([{"name": "-x", "address": "h:1"}], "nodes[0].name"),
        ([{"name": "a", "address": ""}], "nodes[0].address"),
        ([{"name": "a", "address": "h:1"}, {"name": "b", "address": "no-port"}], "nodes[1].address"),
        ([{"name": "a", "address": "h:1", "port": 2}], "nodes[0].port"),
        ([{"name": "a", "address": "h:1"}, {"name": "a", "address": "h:2"}], "nodes"),
    ],
)
def test_bad_nodes_name_the_entry_and_key(nodes: Any, field: str) -> None:
    assert _error(file_values={"nodes": nodes}).field == field


def test_a_fleet_without_nodes_is_refused() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        merge_settings({}, {}, {})
    assert info.value.field == "nodes"


def test_duplicate_node_names_are_refused_as_such() -> None:
    err = _error(cli_nodes=[{"name": "a", "address": "h:1"}, {"name": "a", "address": "h:2"}])
    assert err.field == "nodes" and err.allowed == "distinct node names"


def test_at_most_max_nodes() -> None:
    many = [{"name": f"n{i}", "address": f"h:{i + 1}"} for i in range(MAX_NODES + 1)]
    err = _error(file_values={"nodes": many})
    assert err.field == "nodes" and str(MAX_NODES) in err.allowed
    assert len(_merge({"nodes": many[:MAX_NODES]}).nodes) == MAX_NODES


# ------------------------------------------------------------------------------------------ credentials


def test_the_agents_token_is_every_nodes_unless_a_node_has_its_own(tmp_path: Path) -> None:
    shared = _secret(tmp_path, "shared", TOKEN + "\n")
    own = _secret(tmp_path, "own", "o" * 20)
    nodes = [
        {"name": "a", "address": "h:1"},
        {"name": "b", "address": "h:2", "token_file": str(own)},
        {"name": "c", "address": "h:3", "token_file": ""},  # empty: the default applies
    ]
    s = _merge({"nodes": nodes, "agents": {"token_file": str(shared)}})
    assert [n.token for n in s.nodes] == [TOKEN, "o" * 20, TOKEN]
    assert s.allow_unauthenticated_loopback is False  # agent credentials: no open loopback by default


def test_a_token_file_readable_by_others_is_refused_naming_the_node(tmp_path: Path) -> None:
    loose = _secret(tmp_path, "loose", TOKEN, mode=0o644)
    err = _error(file_values={"nodes": [{"name": "a", "address": "h:1", "token_file": str(loose)}]})
    assert err.field == "nodes[0].token_file"
    assert "0644" in str(err) and "chmod 600" in err.allowed


def test_a_loose_shared_token_file_is_refused_for_the_first_node(tmp_path: Path) -> None:
    loose = _secret(tmp_path, "loose", TOKEN, mode=0o640)
    assert _error(file_values={"agents": {"token_file": str(loose)}}).field == "nodes[0].token_file"


@pytest.mark.parametrize("text", ["short", TOKEN + "\n" + TOKEN])
def test_a_token_file_must_hold_one_long_token(tmp_path: Path, text: str) -> None:
    bad = _secret(tmp_path, "bad", text)
    err = _error(file_values={"nodes": [{"name": "a", "address": "h:1", "token_file": str(bad)}]})
    assert err.field == "nodes[0].token_file" and "16 characters" in err.allowed


def test_a_missing_token_file_is_refused(tmp_path: Path) -> None:
    err = _error(
        file_values={"nodes": [{"name": "a", "address": "h:1", "token_file": str(tmp_path / "none")}]}
    )
    assert err.field == "nodes[0].token_file"


def test_without_load_secrets_no_credential_is_read(tmp_path: Path) -> None:
    missing = str(tmp_path / "none")
    s = merge_settings(
        {"nodes": [{"name": "a", "address": "h:1", "token_file": missing}], "auth": {"tokens_file": missing}},
        {},
        {},
        load_secrets=False,
    )
    assert s.nodes[0].token is None and s.tokens == ()


def test_a_node_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = _secret(tmp_path, "key.pem", "-----BEGIN PRIVATE KEY-----\n", mode=0o644)
    err = _error(file_values={"nodes": [{"name": "a", "address": "h:1", "key_file": str(key)}]})
    assert err.field == "nodes[0].key_file"


# ------------------------------------------------------------------------------------------ load_settings


def test_load_settings_reads_the_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(
        'mode = "apply"\n[control]\ntime_scale = 5.0\n[[nodes]]\nname = "a"\naddress = "h:1"\n'
        '[[nodes]]\nname = "b"\naddress = "h:2"\n',
        encoding="utf-8",
    )
    s = load_settings(config, env={}, cli_values={"control.time_scale": "6"})
    assert s.mode == "apply" and s.time_scale == 6.0
    assert [n.name for n in s.nodes] == ["a", "b"]


def test_load_settings_names_an_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        load_settings(tmp_path / "absent.toml", env={})
    assert info.value.field == "--config"
    bad = tmp_path / "bad.toml"
    bad.write_text("mode = \n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError) as info:
        load_settings(bad, env={})
    assert info.value.field == "--config" and "valid TOML" in info.value.allowed


# ------------------------------------------------------------------------------------------ the app's exit


def _run_app(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMOLLM_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "controller.app", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(
        f'store_path = "{tmp_path / "store" / "c.db"}"\nmetrics_listen = ""\nlisten = "127.0.0.1:0"\n'
        f'{extra}\n[[nodes]]\nname = "a"\naddress = "127.0.0.1:1"\n',
        encoding="utf-8",
    )
    return path


def _assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dynamollm-controller: error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in lines[0]


def test_app_exits_2_on_an_unknown_toml_key(tmp_path: Path) -> None:
    result = _run_app(["--config", str(_config(tmp_path, "colour = 1"))])
    _assert_one_line_exit_2(result, "colour: got 1")


def test_app_exits_2_on_a_bad_node_flag(tmp_path: Path) -> None:
    _assert_one_line_exit_2(
        _run_app(["--config", str(_config(tmp_path)), "--node", "bad"]), "--node: got 'bad'"
    )


def test_app_exits_2_on_duplicate_node_names(tmp_path: Path) -> None:
    result = _run_app(["--config", str(_config(tmp_path)), "--node", "a=h:1", "--node", "a=h:2"])
    _assert_one_line_exit_2(result, "nodes: got", "distinct node names")


def test_app_exits_2_on_a_negative_time_scale(tmp_path: Path) -> None:
    result = _run_app(["--config", str(_config(tmp_path, "[control]\ntime_scale = -1"))])
    _assert_one_line_exit_2(result, "control.time_scale: got -1.0; allowed: > 0")


def test_app_exits_2_on_a_token_file_readable_by_others(tmp_path: Path) -> None:
    loose = _secret(tmp_path, "token", TOKEN, mode=0o644)
    config = tmp_path / "controller.toml"
    config.write_text(
        f'[[nodes]]\nname = "a"\naddress = "127.0.0.1:1"\ntoken_file = "{loose}"\n', encoding="utf-8"
    )
    _assert_one_line_exit_2(_run_app(["--config", str(config)]), "nodes[0].token_file", "0644")


def test_app_exits_2_on_a_profile_of_another_model(tmp_path: Path) -> None:
    other = dataclasses.replace(default_profile("llama2-70b", "h100-sxm"), model="other-model")
    path = tmp_path / "other.json"
    save_profile(other, path)
    result = _run_app(["--config", str(_config(tmp_path, f'[profile]\npath = "{path}"'))])
    _assert_one_line_exit_2(result, "profile.path", "other-model")
    assert not (tmp_path / "store").exists()  # refused before the store is created


def test_app_exits_2_on_a_file_that_is_not_a_profile(tmp_path: Path) -> None:
    path = tmp_path / "notes.json"
    path.write_text("not json at all\n", encoding="utf-8")
    result = _run_app(["--config", str(_config(tmp_path, f'[profile]\npath = "{path}"'))])
    _assert_one_line_exit_2(result, str(path))


def test_app_exits_2_on_a_missing_profile_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    result = _run_app(["--config", str(_config(tmp_path, f'[profile]\npath = "{path}"'))])
    _assert_one_line_exit_2(result, str(path))


# ------------------------------------------------------------------------------------------ first plan


def _stats_file(tmp_path: Path, **changes: Any) -> Path:
    from controller.model.classes import CLASS_NAMES
    from controller.policy.base import ArrivalStats, arrival_stats_to_json

    n = len(CLASS_NAMES)
    stats = ArrivalStats(3600.0, 60.0, tuple([2000] * n), 6.0, tuple([0.7] * n))
    doc = {**arrival_stats_to_json(stats), **changes}
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_the_first_plan_is_sized_for_the_workload_file_or_pinned_for_a_static_policy(tmp_path: Path) -> None:
    from controller.app import initial_plan
    from controller.policy.registry import make_policy

    profile = default_profile("llama2-70b", "h100-sxm")
    even = _merge(file_values={"control": {"initial_rate_rps": 5.0}})
    loaded = _merge(file_values={"control": {"initial_workload": str(_stats_file(tmp_path))}})
    assert loaded.initial_workload is not None and loaded.initial_workload.requests == 18000
    dyn = make_policy("dynamollm", loaded.policy)
    # the file's per-class peaks, not an even 5 req/s, size the pools
    assert initial_plan(dyn, profile, loaded) == dyn.initial_plan(loaded.initial_workload, profile)
    assert initial_plan(dyn, profile, loaded) != initial_plan(dyn, profile, even)
    pinned = _merge(file_values={"control": {"policy": "singlepool", "instances": 3}})
    plan = initial_plan(make_policy("singlepool", pinned.policy), profile, pinned)
    assert sum(n for pool in plan.pools for n in pool.instance_counts().values()) == 3
    dynamic_pinned = _merge(file_values={"control": {"instances": 3}})
    with pytest.raises(InvalidArgumentError, match=r"control\.instances"):
        initial_plan(make_policy("dynamollm", dynamic_pinned.policy), profile, dynamic_pinned)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"schema": "x/v1"}, "schema"),
        ({"duration_s": 0}, "duration_s"),
        ({"peak_rate_rps": "fast"}, "peak_rate_rps"),
        ({"requests_by_class": {"SS": 1}}, "requests_by_class"),
        ({"peak_rate_rps_by_class": None}, "peak_rate_rps_by_class"),
    ],
)
def test_a_bad_workload_file_is_refused_naming_the_key_and_its_field(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    err = _error(file_values={"control": {"initial_workload": str(_stats_file(tmp_path, **changes))}})
    assert err.field == "control.initial_workload" and field in str(err)


def test_a_workload_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\x00\xff\x10")
    err = _error(file_values={"control": {"initial_workload": str(tmp_path / "bin")}})
    assert err.field == "control.initial_workload" and "JSON" in str(err)


def test_the_origin_of_a_new_store_is_the_configured_one(tmp_path: Path) -> None:
    assert _merge().origin_unix_s == 0.0
    assert _merge(file_values={"control": {"origin_unix_s": 1.8e9}}).origin_unix_s == 1.8e9
    assert _error(file_values={"control": {"origin_unix_s": -1}}).field == "control.origin_unix_s"
