"""The README's library example runs as written, anywhere, every time (a fresh folder, twice in a row)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("```python\nfrom registry import Endpoint") + len("```python\n")
    return text[start : text.index("\n```", start)]


def test_the_readme_library_example_runs_the_same_every_time(tmp_path: Path) -> None:
    shutil.copytree(REPO / "inventories", tmp_path / "inventories")  # it reads inventories/services.yaml
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    outputs = []
    for _ in range(2):
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout.splitlines())
    for lines in outputs:
        assert lines[:3] == ["http://192.168.1.100:8080 lan", "192.168.1.2", "192.168.1.3"]
        assert [line.split(" ", 1)[1] for line in lines[3:]] == [
            "ServiceRegistered api-server",
            "IpAllocated 192.168.1.2",
            "ServiceRegistered web",
            "IpAllocated 192.168.1.3",
        ]
    assert (tmp_path / "var" / "example" / "registry.db").exists()
