"""Plugin packages installed with pip into a fresh venv, used end to end.

1. The "Write a plugin" guide (docs/plugins.md), followed to the letter: its files are
   written into a temporary directory, installed with `pip install -e .`, and
   its commands run (conformance kit, `dataselect strategies` / `plugins`,
   a training run and `dataselect compare` through a real `dataselect-server`).
2. The example package `examples/dataselect-el2n`: installed, its conformance
   kit and its own tests run, and a short training run through a real server.

The venv sees the already-installed dataselect, torch and pip through a .pth
file that adds this interpreter's site directories (their .pth files, such as
dataselect's editable-install finder, included). Installation is offline:
`--no-deps --no-build-isolation --no-index`. Console scripts are run as
`python -m <their module>` with the venv's interpreter (the venv holds only
the plugin, not dataselect's scripts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from dataselect.testing import CHECKS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "dataselect-el2n"
START, END = "<!-- plugin-guide:start -->", "<!-- plugin-guide:end -->"
CMD_TIMEOUT = 120

DATASELECT = ["-m", "dataselect.client.main"]
SERVER = ["-m", "dataselect.server.cli"]
TRAIN = ["-m", "dataselect.client.cli"]


def _guide() -> str:
    text = (REPO / "docs" / "plugins.md").read_text()
    return text[text.index(START):text.index(END)]


def guide_files() -> dict[str, str]:
    """The files the guide tells a newcomer to write: `File `PATH`:` then a fenced block."""
    found = re.findall(r"^File `([^`]+)`:\s*\n\s*```\w*\n(.*?)^```", _guide(), flags=re.M | re.S)
    return dict(found)


def guide_commands() -> list[str]:
    """The commands of the guide's ```bash block (comments stripped)."""
    block = re.search(r"### 3\. Install, check, use.*?```bash\n(.*?)```", _guide(), flags=re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin-venv") / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(root)
    py = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if Path(d).is_dir()]
    # addsitedir also runs the .pth files there (dataselect's editable finder among them).
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs]
    Path(purelib, "_dataselect_parent_env.pth").write_text("\n".join(lines) + "\n")
    return py


def run(py: Path, args: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(py), *args], cwd=cwd, capture_output=True, text=True, timeout=CMD_TIMEOUT,
                          env={**os.environ, "PYTHONNOUSERSITE": "1", **(env or {})})
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def pip_install(py: Path, *target: str, cwd: Path | None = None) -> None:
    run(py, ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check",
             "-q", *target], cwd=cwd)


def start_server(server_process, py: Path):
    """`dataselect-server --port 0` with the venv's interpreter (conftest's `server_process`)."""
    return server_process("--port", "0", command=[str(py), *SERVER], env={**os.environ, "PYTHONNOUSERSITE": "1"})


def train(py: Path, strategy: str, address: str, out: Path) -> dict:
    proc = run(py, [*TRAIN, "--strategy", strategy, "--dataset", "synthetic", "--train-subset", "300",
                    "--epochs", "1", "--server", address, "--output", str(out), "--json", "-q"])
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    return summary


def test_the_readme_guide_builds_an_installable_plugin(venv_python, tmp_path, server_process):
    files = guide_files()
    assert set(files) == {"dataselect-leastconf/pyproject.toml", "dataselect-leastconf/dataselect_leastconf/__init__.py"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    pkg = tmp_path / "dataselect-leastconf"
    commands = guide_commands()
    assert commands[0] == "cd dataselect-leastconf" and commands[1] == "pip install -e ."
    pip_install(venv_python, "-e", ".", cwd=pkg)

    # python -m dataselect.testing least_confidence
    assert commands[2] == "python -m dataselect.testing least_confidence"
    kit = run(venv_python, ["-m", "dataselect.testing", "least_confidence"])
    assert f"{len(CHECKS)} passed, 0 failed" in kit.stdout

    # dataselect strategies / plugins
    assert commands[3] == "dataselect strategies" and commands[4] == "dataselect plugins"
    rows = {r["name"]: r for r in json.loads(run(venv_python, [*DATASELECT, "strategies", "--json"]).stdout)}
    row = rows["least_confidence"]
    assert (row["plugin"], row["distribution"], row["version"]) == ("leastconf", "dataselect-leastconf", "0.1.0")
    assert row["signals"] == ["probs"] and "temperature" in row["options"]
    assert "least_confidence" in run(venv_python, [*DATASELECT, "strategies"]).stdout
    plugin_rows = {r["name"]: r for r in json.loads(run(venv_python, [*DATASELECT, "plugins", "--json"]).stdout)}
    assert plugin_rows["leastconf"]["hooks"] == ["register_strategies"] and plugin_rows["leastconf"]["error"] is None

    # the same interpreter outside the venv knows nothing of it (the test does not leak into this environment)
    assert "least_confidence" not in json.dumps([r["name"] for r in json.loads(
        run(Path(sys.executable), [*DATASELECT, "strategies", "--json"]).stdout)])

    # dataselect-server, dataselect-train --server, dataselect compare --server
    assert commands[5].startswith("dataselect-server --port")
    assert commands[6].startswith("dataselect-train --strategy least_confidence --dataset synthetic --train-subset 300")
    assert commands[7].startswith("dataselect compare --strategies least_confidence,high_loss")
    with start_server(server_process, venv_python) as process:
        address = process.wait_for_address()
        summary = train(venv_python, "least_confidence", address, tmp_path / "run")
        assert summary["strategy"] == "least_confidence" and summary["scorer"] == "remote"
        assert summary["samples_trained"] > 0 and summary["samples_scored"] > 0
        compare_args = commands[7].split()[1:]
        compare_args[compare_args.index("--server") + 1] = address
        compare_args[compare_args.index("--output") + 1] = str(tmp_path / "compare")
        run(venv_python, [*DATASELECT, *compare_args])
        assert process.proc.poll() is None, "the server died during the test"
    results = (tmp_path / "compare" / "results.csv").read_text()
    assert "least_confidence" in results and "high_loss" in results


def test_example_el2n_package_installs_conforms_and_trains(venv_python, tmp_path, server_process):
    pkg = tmp_path / "dataselect-el2n"
    shutil.copytree(EXAMPLE, pkg, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    pip_install(venv_python, str(pkg))

    kit = run(venv_python, ["-m", "dataselect.testing", "el2n", "forgetting"])
    assert f"{2 * len(CHECKS)} passed, 0 failed" in kit.stdout
    # the package's own tests (check_strategy among them), against the installed package
    own = run(venv_python, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=pkg)
    assert " passed" in own.stdout and "failed" not in own.stdout

    rows = {r["name"]: r for r in json.loads(run(venv_python, [*DATASELECT, "strategies", "--json"]).stdout)}
    assert rows["el2n"]["distribution"] == "dataselect-el2n" and rows["forgetting"]["uses_reports"] is True
    with start_server(server_process, venv_python) as process:
        address = process.wait_for_address()
        for strategy in ("el2n", "forgetting"):
            summary = train(venv_python, strategy, address, tmp_path / strategy)
            assert summary["strategy"] == strategy and summary["scorer"] == "remote"
            assert summary["samples_trained"] > 0
        assert process.proc.poll() is None, "the server died during the test"
