"""The README's first lines are the commands CI runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_command(prefix: str) -> str:
    for line in REPO.joinpath("README.md").read_text().splitlines()[:8]:
        if line.startswith(prefix):
            return line.split("`")[1]
    raise AssertionError(f"README's first lines have no '{prefix}' command")


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    ci_lines = [l.strip() for l in REPO.joinpath(".ci", "run").read_text().splitlines()]
    assert _readme_command("Install:") in ci_lines
    assert _readme_command("Test:") in ci_lines
