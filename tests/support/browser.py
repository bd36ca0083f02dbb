"""Headless Chromium (Debian's `chromium`, installed by .ci/bootstrap) reading a web UI as a user
would: the page's visible text after its JavaScript ran."""

from __future__ import annotations

import html
import re
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"


def rendered_text(url: str, profile: Path, wanted: list[str], *, within: float = 90, window: str | None = None) -> str:
    """The visible text of `url` once every string of `wanted` is in it (polled: single-page apps
    render after their API calls), or the last text seen after `within` seconds. `window` ("W,H")
    sizes the window: tables render only the columns that fit."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (.ci/bootstrap installs it)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url]  # fmt: skip
    if window:
        cmd.insert(-2, f"--window-size={window}")
    text = ""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
        text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<style.*?</style>", "", dom, flags=re.S)))
        text = " ".join(text.split())
        if all(w in text for w in wanted):
            break
        time.sleep(1)
    return text
