"""Property: whatever batch file, numbers and paths a user gives, the request builder returns valid requests or
raises a DimooError (exit 2), never another exception."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dimoo_npu.batch.batch_requests import assign_seeds, build_requests, output_paths
from dimoo_npu.settings.requests import TASKS
from dimoo_npu.utils.errors import DimooError
from dimoo_npu.utils.validate import SEED_LIMIT, check_args

FIELDS = sorted({f.name for cls in TASKS.values() for f in dataclasses.fields(cls)} | {"colour", ""})
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 16, 512, 2**64 - 1, 2**64]),
)
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "   ", "a.png", "../x.png", "x.jpg", "/dev/null", "a/../a.png", "dir/", "\x00.png", "é.png"]),
)
VALUES = st.one_of(NUMBERS, TEXT, st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
LINE = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5).map(lambda item: json.dumps(item)),
    st.sampled_from(["", "{", "[1]", '"text"', '{"prompt": NaN}', '{"width": Infinity}', "\udcff"]),
)
BATCH = st.one_of(st.none(), st.lists(st.one_of(LINE, st.binary(max_size=8)), max_size=4))


def write_batch(folder: Path, lines: list) -> str:
    path = folder / "batch.jsonl"
    with path.open("wb") as handle:
        for line in lines:
            handle.write(line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape"))
            handle.write(b"\n")
    return str(path)


def check_valid(task: str, requests, paths) -> None:
    required = [f.name for f in dataclasses.fields(TASKS[task]) if f.metadata["required"]]
    for item in requests:
        request = dataclasses.asdict(item.request)
        for name in required:
            assert isinstance(request[name], str) and request[name].strip()
        assert isinstance(request["seed"], int) and 0 <= request["seed"] < SEED_LIMIT
        for name in ("width", "height"):
            assert name not in request or (isinstance(request[name], int) and request[name] > 0)
        # edit types need no prompt; no parallel_threshold is exact decoding (the default)
        optional = ("ref_image", "mask", "output", "parallel_threshold") + (("prompt",) if task == "edit" else ())
        for name, value in request.items():  # every field resolved, every number finite
            assert value is not None or name in optional, name
            assert not isinstance(value, float) or math.isfinite(value), name
    if paths is not None:
        assert all(path.suffix == ".png" for path in paths)
        assert len({path.resolve() for path in paths}) == len(paths)


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    task=st.sampled_from(sorted(TASKS)),
    lines=BATCH,
    prompt=st.one_of(st.none(), TEXT),
    seed=NUMBERS,
    width=NUMBERS,
    batch_size=NUMBERS,
    cfg_scale=NUMBERS,
    output=st.one_of(st.none(), TEXT),
    output_dir=TEXT,
)
def test_the_request_builder_returns_valid_requests_or_a_user_error(
    task, lines, prompt, seed, width, batch_size, cfg_scale, output, output_dir
):
    flags = {"prompt": prompt, "question": prompt, "image": "in.png", "width": width, "height": 16,
             "mask_h_ratio": 0.5, "mask_w_ratio": 0.5, "seed": seed, "batch_size": batch_size,
             "cfg_scale": cfg_scale, "device": "cpu"}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        batch_file = None if lines is None else write_batch(Path(folder), lines)
        try:
            check_args(flags)
            requests = assign_seeds(build_requests(task, flags, batch_file), seed)
            paths = (
                None if task == "understand" else output_paths(requests, task, output, str(Path(folder) / output_dir))
            )
        except DimooError:
            return
        check_valid(task, requests, paths)
