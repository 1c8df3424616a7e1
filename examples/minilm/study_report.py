"""The study's results files from runs.jsonl (filled in below)."""

from __future__ import annotations

from pathlib import Path


def write(out: Path) -> list[Path]:
  return []
