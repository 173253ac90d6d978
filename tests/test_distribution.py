"""The distribution ships the Ansible collection and the web UI: a wheel installed outside the checkout can deploy
and serve /ui/."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from registry.webui import _files

REPO = Path(__file__).resolve().parent.parent

CHECK = textwrap.dedent(
    """
    import json, sys
    import registry
    import registry.package
    import registry.network.config, registry.network.ipam, registry.network.topology
    from ansible_collections.svcreg.registry.plugins.module_utils import package_archive, package_format
    from registry.deploy import collection_root
    from registry.webui import _files
    root = collection_root()
    print(json.dumps({
        "registry": registry.__file__,
        "module_utils": package_archive.__file__,
        "root": str(root),
        "playbook": (root / "ansible_collections/svcreg/registry/playbooks/deploy_package.yml").is_file(),
        "runtime": (root / "ansible_collections/svcreg/registry/meta/runtime.yml").is_file(),
        "tests": (root / "ansible_collections/svcreg/registry/tests").exists(),
        "ui": sorted(_files()),
    }))
    """
)


@pytest.mark.slow
def test_installed_wheel_ships_the_collection(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--no-compile", "--target", str(site), wheel],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    # Only the installed copy and the dependencies (this venv's site-packages, without the editable checkout).
    purelib = sysconfig.get_paths()["purelib"]
    process = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path[:0] = [{str(site)!r}, {purelib!r}]\n{CHECK}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    found = json.loads(process.stdout)
    assert Path(found["registry"]).is_relative_to(site)
    assert Path(found["module_utils"]).is_relative_to(site)
    assert found["root"] == str(site)
    assert found["playbook"] and found["runtime"]
    assert not found["tests"]
    # the web UI's static files are package data: every file the checkout serves, the wheel serves
    assert found["ui"] == sorted(_files())
    assert {"index.html", "app.js", "style.css", "views/services.js"} <= set(found["ui"])
