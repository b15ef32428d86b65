"""The README's quick-start commands are what CI runs, verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    return [line for line in blocks[0].splitlines() if line.strip()] if blocks else []


def test_ci_runs_the_readme_test_command_verbatim():
    commands = readme_commands()
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
