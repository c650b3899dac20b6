"""The README's first command: the demo runs, moves traffic through the proxy pair, exits 0."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import ROOT


def test_demo_runs_traffic_through_the_proxy_pair_and_exits_0():
    result = subprocess.run([sys.executable, "-m", "proxy", "demo", "--duration", "5"], cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    done = re.search(r"done: (\d+) successful exchanges through the proxy pair(?: over mTLS)?, (\d+) failed", result.stdout)
    assert done, result.stdout
    assert int(done.group(1)) > 0 and int(done.group(2)) == 0
    assert "over mTLS" in done.group(0)  # both identities appear as tls="true" in the proxies' metrics
    assert "http://127.0.0.1:" in result.stdout  # admin URLs are printed
