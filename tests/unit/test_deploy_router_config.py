"""deploy/router.toml, the router's example config: it loads with the router's own settings code to
exactly the defaults, and it documents every router key (set, or commented out with an example)."""

from __future__ import annotations

import re
from pathlib import Path

from agent.api.config import read_toml_config
from controller.router.settings import KEYS, merge_settings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "router.toml"
GUIDE = ROOT / "docs" / "router.md"


def test_the_example_loads_to_the_defaults() -> None:
    from_file = merge_settings(read_toml_config(CONFIG, CONFIG), {}, {})
    assert from_file == merge_settings({}, {}, {})
    assert from_file.routes_source == "controller" and from_file.controller_tls is None


def test_the_example_and_the_guide_document_every_key() -> None:
    text = CONFIG.read_text()
    guide = GUIDE.read_text()
    tables = {m.group(1): m.start() for m in re.finditer(r"^\[(\w+)\]$", text, re.M)}
    for key in KEYS:
        table, _, leaf = key.name.rpartition(".")
        found = re.search(
            rf"^#? ?{re.escape(leaf)} = ", text[tables.get(table, 0) :] if table else text, re.M
        )
        assert found, f"{key.name} missing in {CONFIG.name}"
        if not table:  # a top-level key must come before the first table
            assert found.start() < min(tables.values()), key.name
        assert f"`{key.name}`" in guide or f"`{leaf}`" in guide, f"{key.name} missing in {GUIDE.name}"
