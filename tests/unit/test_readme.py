"""The README keeps its promises: the two commands first, and a configuration table equal to the code's."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_opens_with_the_demo_and_the_test_commands():
    block = readme().split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_configuration_reference_matches_the_code():
    table = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "config_reference.py")], capture_output=True, text=True, check=True).stdout
    assert table.strip() in readme(), "README's configuration table is stale: paste scripts/config_reference.py's output"
