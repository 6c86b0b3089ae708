"""What a user's install gets: every subpackage, every extra the code names, pinned as requirements.txt pins."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# Extras CI cannot install: their packages are not in requirements.txt, and the reason is said here.
NOT_INSTALLED_HERE = {
    "npu": "torch-npu needs Huawei's CANN toolkit",
    "msmodelslim": "only remakes the committed tests/fixtures/msmodelslim-w8a8; users and CI do not need it",
    "eval": "lmms-eval pulls a CUDA torchvision that breaks the CPU torch beside it; it gets its own venv",
}
# `pip install -e '.[NAME]'`, the README's form; a hint in any other form (dimoo_npu[x], .[x] unquoted) is caught.
HINT = re.compile(r"pip install (?P<target>(?:-e )?[^\s\"`]*\[(?P<extras>[^\]]*)\][^\s\"`),]*)")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_subpackage_is_installed():
    """setuptools installs only the listed packages in a regular install, while an editable install finds the rest
    anyway, so a missing entry passes here and breaks a user's install."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {package: ROOT / folder for package, folder in setuptools["package-dir"].items()}
    found = set()
    for package, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            if "assets" not in relative:
                found.add(".".join((package, *relative)))
    assert found == listed, f"unlisted: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def pinned_requirements() -> dict[str, tuple[str, set[str]]]:
    """requirements.txt: package -> (pinned version, the extras whose heading it stands under)."""
    pins, extras = {}, set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("# extras:"):
            extras = {name.strip() for name in line.removeprefix("# extras:").split("(")[0].split(",")}
        elif line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"requirements.txt pins exact versions: {line}"
            pins[canonicalize_name(requirement.name)] = (spec.version, set(extras))
    return pins


def test_every_extra_pins_what_requirements_txt_pins_under_its_heading():
    extras, pins = project()["optional-dependencies"], pinned_requirements()
    for package, (version, headings) in pins.items():
        for extra in headings:
            assert extra in extras, f"requirements.txt names extra {extra!r}, which pyproject.toml lacks"
            assert f"{package}=={version}" in {str(Requirement(r)).lower() for r in extras[extra]}
    for extra, requirements in extras.items():
        for text in requirements:
            requirement = Requirement(text)
            name, (spec,) = canonicalize_name(requirement.name), requirement.specifier
            if extra in NOT_INSTALLED_HERE:
                assert name not in pins and spec.operator == "=="
                continue
            assert name in pins, f"extra {extra!r} needs {name}, which requirements.txt does not install"
            assert (spec.operator, spec.version) == ("==", pins[name][0]), f"{extra}: {text} vs requirements.txt"
            assert extra in pins[name][1], f"{name} of extra {extra!r} stands under another heading"


def test_core_pins_satisfy_the_declared_dependencies():
    pins = pinned_requirements()
    for text in project()["dependencies"]:
        requirement = Requirement(text)
        version, headings = pins[canonicalize_name(requirement.name)]
        assert not headings and requirement.specifier.contains(version), f"{text} vs requirements.txt {version}"


def install_hints() -> list[tuple[str, str]]:
    """(file, hint) for every `pip install ...[extra]` the code, tests, scripts, docs and Dockerfiles spell."""
    files = [ROOT / "README.md", ROOT / "requirements.txt", *sorted((ROOT / "docker").glob("*"))]
    for folder in ("dimoo_npu", "adapters", "ops", "parallel", "scripts", "tests", "benchmarks", "docs"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".sh"})
    return [
        (str(path.relative_to(ROOT)), match.group(0))
        for path in files
        if path.is_file() and path.name != Path(__file__).name
        for match in HINT.finditer(path.read_text(errors="replace"))
    ]


def test_every_install_hint_names_an_extra_that_exists_in_the_readmes_form():
    hints, extras = install_hints(), project()["optional-dependencies"]
    assert any("[serve]" in hint for _, hint in hints), "dimoo serve's hint is among them"
    for where, hint in hints:
        match = HINT.fullmatch(hint)
        for extra in match.group("extras").split(","):
            assert extra in extras, f"{where}: {hint!r} names extra {extra!r}, which pyproject.toml lacks"
        if not where.startswith("docker/"):  # image builds install non-editable from the copied tree
            form = f"-e '.[{match.group('extras')}]'"
            assert match.group("target") == form, f"{where}: {hint!r} is not in the README's form pip install {form}"
