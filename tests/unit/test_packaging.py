"""Every subpackage is listed in pyproject.toml: setuptools installs only the listed ones in a regular install,
while an editable install finds the rest anyway, so a missing entry passes here and breaks a user's install."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_installed():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {package: REPO / folder for package, folder in setuptools["package-dir"].items()}
    found = set()
    for package, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            if "assets" not in relative:
                found.add(".".join((package, *relative)))
    assert found == listed, f"unlisted: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
