"""The README's "Deploying" section, read: its shell commands and config blocks, so the
tests run them exactly as written."""

from __future__ import annotations

import re

from promql import ROOT

README = ROOT / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("\n## Deploying\n")
    return text[start : text.index("\n## ", start + 1)]


def blocks(info: str) -> list[str]:
    return re.findall(rf"^```{info}\n(.*?)^```", section(), re.M | re.S)


def commands(program: str) -> list[str]:
    """The shell commands starting with ``program``, continuation lines joined."""
    lines = [line for block in blocks("sh") for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.split()[:1] == [program]]
