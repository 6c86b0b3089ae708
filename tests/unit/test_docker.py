"""The Dockerfiles, checked without a Docker engine: a small parser for their syntax, and their torch/torch-npu pins
against pyproject.toml and requirements.txt."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile.npu", "Dockerfile.cuda", "Dockerfile.cpu")
KNOWN = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


class DockerfileError(ValueError):
    pass


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; raises DockerfileError on what `docker build` would reject."""
    instructions, pending, start = [], None, 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments, also inside a continued instruction
        body = stripped[:-1].rstrip() if stripped.endswith("\\") else stripped
        pending, start = ((pending + " " + body) if pending is not None else body), (start if pending else number)
        if not stripped.endswith("\\"):
            instructions.append(_instruction(pending, start))
            pending = None
    if pending is not None:
        raise DockerfileError(f"line {start}: the file ends inside a continued instruction")
    _check_order_and_variables(instructions)
    return instructions


def _instruction(text: str, line: int) -> Instruction:
    keyword, _, args = text.partition(" ")
    if keyword not in KNOWN:
        raise DockerfileError(f"line {line}: unknown instruction {keyword!r}")
    if not args.strip():
        raise DockerfileError(f"line {line}: {keyword} without arguments")
    if keyword in ("CMD", "ENTRYPOINT", "SHELL") and args.lstrip().startswith("["):
        try:
            form = json.loads(args)
        except json.JSONDecodeError as err:
            raise DockerfileError(f"line {line}: {keyword} exec form is not a JSON array ({err})") from None
        if not all(isinstance(item, str) for item in form):
            raise DockerfileError(f"line {line}: {keyword} exec form must hold strings")
    return Instruction(keyword, args.strip(), line)


def _check_order_and_variables(instructions: list[Instruction]) -> None:
    """FROM first (only ARG may precede it); every ${VAR} declared by ARG/ENV in scope before its use."""
    first = next((i for i in instructions if i.keyword != "ARG"), None)
    if first is None or first.keyword != "FROM":
        raise DockerfileError(f"line {first.line if first else 1}: the first instruction after ARGs must be FROM")
    global_args: set[str] = set()
    stage: set[str] | None = None  # names usable inside the current stage
    for ins in instructions:
        if ins.keyword in ("RUN", "CMD", "ENTRYPOINT"):
            continue  # expanded by the shell at run time, not by the builder
        scope = global_args if stage is None or ins.keyword == "FROM" else stage
        for name in VARIABLE.findall(ins.args.split("=", 1)[1] if ins.keyword in ("ARG", "ENV") else ins.args):
            if name not in scope:
                raise DockerfileError(f"line {ins.line}: ${{{name}}} is used before an ARG or ENV declares it")
        if ins.keyword == "FROM":
            stage = set()
        elif ins.keyword == "ARG":
            (global_args if stage is None else stage).add(ins.args.split("=")[0])
        elif ins.keyword == "ENV":
            stage.update(match.split("=")[0] for match in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", ins.args))


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return dict(ins.args.split("=", 1) for ins in instructions if ins.keyword == "ARG" and "=" in ins.args)


def resolve(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: values[m.group(1)], text)


def pins() -> dict[str, str]:
    """Exact pins (name -> version) from pyproject's dependencies and extras, checked against requirements.txt."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    found = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", spec).groups() for spec in specs if "==" in spec)
    requirements = ROOT / "requirements.txt"
    if requirements.is_file():
        for line in requirements.read_text().splitlines():
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep and name in found:
                assert version == found[name], f"requirements.txt pins {name}=={version}, pyproject {found[name]}"
    return found


@pytest.fixture(scope="module", params=DOCKERFILES)
def dockerfile(request) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile((DOCKER / request.param).read_text())


def test_dockerfile_syntax(dockerfile):
    name, instructions = dockerfile
    assert [i.keyword for i in instructions if i.keyword == "FROM"] == ["FROM"], f"{name}: one stage expected"
    assert instructions[-1].keyword == "CMD"


def test_torch_pin_equals_the_project_pin(dockerfile):
    name, instructions = dockerfile
    assert arg_defaults(instructions)["TORCH_VERSION"] == pins()["torch"] == "2.13.0"
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs, f"{name} must install torch through its pinned ARG"


def test_npu_image_pairs_cpu_torch_with_torch_npu_on_a_cann_base():
    instructions = parse_dockerfile((DOCKER / "Dockerfile.npu").read_text())
    defaults = arg_defaults(instructions)
    assert defaults["TORCH_NPU_VERSION"] == pins()["torch-npu"] == defaults["TORCH_VERSION"]
    base = resolve(next(i.args for i in instructions if i.keyword == "FROM"), defaults)
    assert re.fullmatch(r"quay\.io/ascend/cann:\d+\.\d+\.\d+-910b-ubuntu22\.04-py3\.\d+", base), base
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu' in runs  # never a CUDA torch
    assert '"torch-npu==${TORCH_NPU_VERSION}"' in runs


def test_copied_paths_exist():
    for name in DOCKERFILES:
        for ins in parse_dockerfile((DOCKER / name).read_text()):
            if ins.keyword == "COPY":
                for source in ins.args.split()[:-1]:
                    assert (ROOT / source).exists(), f"{name} line {ins.line}: {source} is not in the repository"


def test_readme_has_the_run_lines():
    readme = (DOCKER / "README.md").read_text()
    for needle in (
        "/dev/davinci0",
        "/dev/davinci_manager",
        "/dev/devmm_svm",
        "/dev/hisi_hdc",
        "ASCEND_RT_VISIBLE_DEVICES",
    ):
        assert needle in readme
    assert "/usr/local/Ascend/driver/lib64" in readme and "--gpus all" in readme


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("RUN echo hi\nFROM python:3.12\n", "first instruction after ARGs must be FROM"),
        ("FROM python:3.12\nRUNN echo\n", "unknown instruction 'RUNN'"),
        ("FROM python:3.12\nRUN pip install \\\n", "ends inside a continued instruction"),
        ('FROM python:3.12\nCMD ["dimoo", doctor]\n', "not a JSON array"),
        ("FROM python:${PY}\n", "${PY} is used before"),
        ("ARG V=1\nFROM python:3.12\nENV X=${V}\n", "${V} is used before"),  # a global ARG is not in the stage
        ("FROM python:3.12\nWORKDIR\n", "WORKDIR without arguments"),
    ],
)
def test_parser_rejects_broken_dockerfiles(text, needle):
    with pytest.raises(DockerfileError, match=re.escape(needle)):
        parse_dockerfile(text)


def test_parser_joins_continuations_and_skips_comments():
    text = "ARG V=3.12\nFROM python:${V}\nRUN a \\\n    # a comment inside\n    && b\n"
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in instructions][-1] == ("RUN", "a && b", 3)
