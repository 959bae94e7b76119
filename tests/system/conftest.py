"""The system tests' one fixture: a `Stack` of processes under the test's temporary folder, every one of
them ended at teardown (bounded in time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.system.stack import Stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        await asyncio.wait_for(s.close(), 60)
