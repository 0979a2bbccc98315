"""The agent runs without any of the hub's dependencies: every module of ``warden.agent`` imports, and
``warden-agent`` works, in a Python where FastAPI, SQLAlchemy, Typer, rich, httpx and the rest cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

HUB_ONLY = [
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "typer",
    "rich",
    "click",
    "httpx",
    "psycopg",
    "prometheus_client",
    "httptools",
    "warden.hub",
    "warden.store",
    "warden.api",
    "warden.cli",
]

_BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, runpy, sys
    BLOCKED = {HUB_ONLY!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} is not installed on this device")
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + textwrap.dedent(code), *args], capture_output=True, text=True, timeout=60
    )


def test_the_blocker_blocks() -> None:
    # Positive control: without it this test module would prove nothing.
    result = _run("import httpx")
    assert result.returncode != 0
    assert "is not installed on this device" in result.stderr


def test_every_agent_module_imports_without_the_hub() -> None:
    modules = sorted(p.stem for p in (Path(__file__).parents[2] / "src" / "warden" / "agent").glob("_*.py"))
    assert "_agent" in modules and "_simulate" in modules
    code = (
        "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('warden.agent.' + m)\nprint('ok')"
    )
    result = _run(code, *[m for m in modules if m != "__main__"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_agent_command_runs_without_the_hub(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    config = tmp_path / "agent.toml"
    config.write_text(
        'state_dir = "state"\ndevice_id = "dev-1"\n[hub]\nurl = "https://hub.example.test"\nca = "ca.pem"\n'
        '[broker]\nhost = "broker.example.test"\n[onboarding]\ntoken_file = "token"\n'
    )
    code = (
        "import runpy, sys\nsys.argv = ['warden-agent', *sys.argv[1:]]\n"
        "runpy.run_module('warden.agent', run_name='__main__')"
    )
    result = _run(code, "status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "has not run yet" in result.stdout
    result = _run(code, "--help")
    assert result.returncode == 0, result.stderr
    assert "simulate" in result.stdout and "status" in result.stdout
