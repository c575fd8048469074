"""The reliability suite's fast experiments, at their small loads, as part of `make test`
(`make reliability` runs every experiment at full load and prints the table)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import EXPERIMENTS, Scale

FAST = [name for name, (_, fast) in EXPERIMENTS.items() if fast]


@pytest.mark.e2e
@pytest.mark.parametrize("name", FAST)
def test_experiment(name: str, tmp_path: Path) -> None:
    fn, _ = EXPERIMENTS[name]
    row = fn(tmp_path, Scale(fast=True))
    assert row.ok, f"{row.experiment}: expected {row.expectation}; got {row.figure}"
