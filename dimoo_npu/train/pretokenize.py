"""JSONL manifest -> shards of token ids, in parallel processes, resumable, reporting bad records.

The manifest is cut into chunks of ``chunk_size`` lines; chunk k becomes ``shard-k.safetensors``, written
atomically, with the digest of its lines (and of the encoder settings) in its metadata. A rerun skips
every chunk whose shard exists with the same digest and redoes the others, so an interrupted run resumes
where it stopped and no record is ever written twice. A bad record (invalid JSON, unknown task, missing
or unreadable image, too long) is skipped and reported to ``rejected.jsonl`` (line, id, reason); the run
goes on.

The folder records what made it in ``pretokenize.json`` (the manifest's path and hash, the settings, the
hashes of the checkpoint's config, tokenizer and VQ files; not the transformer weights). A rerun resumes
only the run recorded there; any other folder that is not empty is refused, so another dataset's shards
are never deleted or rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dimoo_npu.files.atomic import write_text_atomically
from dimoo_npu.files.safetensors_io import read_metadata
from dimoo_npu.train.encode import EncoderSettings, RecordEncoder, with_paths_under
from dimoo_npu.train.shards import Sample, shard_name, write_shard
from dimoo_npu.utils.errors import DimooError, InputError
from dimoo_npu.utils.validate import input_file

logger = logging.getLogger(__name__)

REJECTED = "rejected.jsonl"
REJECT_DIR = ".rejects"
RECORD = "pretokenize.json"
RECORD_FORMAT = "dimoo-pretokenize-1"
# Checkpoint files that decide the token ids (the transformer weights do not).
ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                 "merges.txt", "special_tokens_map.json")  # fmt: skip

EncoderFactory = Callable[[EncoderSettings], RecordEncoder]


@dataclass(frozen=True)
class Chunk:
    index: int
    first_line: int  # 1-based line number of lines[0]
    lines: list[str]
    digest: str
    folder: Path  # the manifest's folder: relative image paths in its records are read from there


@dataclass
class Summary:
    samples: int = 0
    rejected: int = 0
    chunks_done: int = 0
    chunks_skipped: int = 0


def pretokenize(
    manifest: str | os.PathLike,
    output: str | os.PathLike,
    settings: EncoderSettings,
    chunk_size: int = 1000,
    workers: int = 1,
    encoder_factory: EncoderFactory = RecordEncoder,
) -> Summary:
    """Write the shards of ``manifest`` into ``output`` (resuming what an earlier run left)."""
    manifest, output = input_file(manifest, "manifest"), Path(output)
    if chunk_size < 1 or workers < 1:
        raise InputError("chunk_size and workers must be at least 1")
    claim_folder(output, run_record(manifest, settings, chunk_size))
    (output / REJECT_DIR).mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    summary = Summary()
    with tqdm(total=_count_lines(manifest), desc="pre-tokenizing", unit="record") as bar:

        def pending() -> Iterator[Chunk]:
            for chunk in _chunks(manifest, chunk_size, fingerprint):
                if _is_done(output / shard_name(chunk.index), chunk.digest):
                    summary.chunks_skipped += 1
                    bar.update(len(chunk.lines))
                else:
                    yield chunk

        for samples, rejected, lines in _run(pending(), output, settings, workers, encoder_factory):
            summary.samples += samples
            summary.rejected += rejected
            summary.chunks_done += 1
            bar.update(lines)
            bar.set_postfix(rejected=summary.rejected)
    _merge_rejects(output)
    return summary


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_record(manifest: Path, settings: EncoderSettings, chunk_size: int) -> dict:
    """What makes the shards what they are: the manifest, the settings and the files the encoder reads."""
    checkpoint = Path(settings.checkpoint)
    files = [checkpoint / name for name in ENCODER_FILES if (checkpoint / name).is_file()]
    files += sorted(p for p in (checkpoint / "vqvae").rglob("*") if p.is_file())
    return {
        "format": RECORD_FORMAT,
        "manifest": str(manifest.resolve()),
        "manifest_sha256": _sha256(manifest),
        "settings": {
            "max_length": settings.max_length,
            "image_budget": settings.image_budget,
            "answer_length": settings.answer_length,
            "chunk_size": chunk_size,
        },
        "files": {path.relative_to(checkpoint).as_posix(): _sha256(path) for path in files},
    }


def claim_folder(output: Path, record: dict) -> None:
    """Resume only the run ``output`` records; start in an empty folder; refuse anything else untouched."""
    if output.exists() and not output.is_dir():
        raise InputError(f"output {output} is a file: name a folder for the shards")
    saved_path = output / RECORD
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        if saved != record:
            differs = sorted(key for key in record if saved.get(key) != record[key]) if isinstance(saved, dict) else []
            raise InputError(
                f"{output} was made by another run (differs in: {', '.join(differs) or RECORD}); its shards are "
                f"left as they are: choose an empty folder, or delete {output} to rebuild it from this manifest"
            )
        return
    if output.is_dir() and any(output.iterdir()):
        raise InputError(
            f"{output} is not empty and was not made by dimoo pretokenize (no {RECORD}): choose an empty folder"
        )
    write_text_atomically(saved_path, json.dumps(record, indent=2) + "\n")


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def _chunks(manifest: Path, chunk_size: int, fingerprint: str) -> Iterator[Chunk]:
    folder = manifest.resolve().parent
    with open(manifest, encoding="utf-8", errors="replace") as handle:
        lines: list[str] = []
        index = 0
        for line in handle:
            lines.append(line)
            if len(lines) == chunk_size:
                yield _chunk(index, chunk_size, lines, fingerprint, folder)
                index, lines = index + 1, []
        if lines:
            yield _chunk(index, chunk_size, lines, fingerprint, folder)


def _chunk(index: int, chunk_size: int, lines: list[str], fingerprint: str, folder: Path) -> Chunk:
    digest = hashlib.sha256(("".join(lines) + fingerprint).encode()).hexdigest()
    return Chunk(index, index * chunk_size + 1, lines, digest, folder)


def _is_done(path: Path, digest: str) -> bool:
    if not path.is_file():
        return False
    try:
        same = read_metadata(path).get("digest") == digest
    except Exception:  # an unreadable shard is redone, never trusted
        same = False
    if not same:
        logger.warning("%s was made from other manifest lines or settings: redoing it", path.name)
    return same


def _run(todo: Iterator[Chunk], output: Path, settings: EncoderSettings, workers: int, factory: EncoderFactory):
    """Yield (samples, rejected, lines) per finished chunk, in-process or over a pool of workers.

    The encoder (or the pool) is only built once a chunk needs work, so a finished run resumes instantly.
    """
    first = next(todo, None)
    if first is None:
        return
    todo = itertools.chain([first], todo)
    if workers == 1:
        encoder = factory(settings)
        for chunk in todo:
            yield encode_chunk(encoder, chunk, output)
        return
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(workers, initializer=_init_worker, initargs=(settings, factory))
    try:
        yield from pool.imap_unordered(_worker_chunk, ((chunk, output) for chunk in todo))
        pool.close()  # a finished run lets its workers exit by themselves; only an interrupted one is terminated
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


_WORKER_ENCODER: RecordEncoder | None = None


def _init_worker(settings: EncoderSettings, factory: EncoderFactory) -> None:
    global _WORKER_ENCODER
    import torch

    # Ctrl-C is the parent's to handle (it stops the pool); the pool's SIGTERM then unwinds a worker through
    # its cleanup (a shard being written leaves no temporary file) and exits it without a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    torch.set_num_threads(1)  # the pool already uses every core
    _WORKER_ENCODER = factory(settings)


def _worker_chunk(job: tuple[Chunk, Path]) -> tuple[int, int, int]:
    return encode_chunk(_WORKER_ENCODER, *job)


def encode_chunk(encoder: RecordEncoder, chunk: Chunk, output: Path) -> tuple[int, int, int]:
    """Encode one chunk: its rejects file first, then its shard (the shard marks the chunk done)."""
    samples: list[Sample] = []
    ids: list[str] = []
    rejects: list[dict] = []
    for offset, line in enumerate(chunk.lines):
        if not line.strip():
            continue
        number = chunk.first_line + offset
        record, reason = _parse(line)
        if record is not None:
            try:
                samples.append(encoder.encode(with_paths_under(record, chunk.folder)))
                ids.append(str(record.get("id", number)))
                continue
            except DimooError as err:
                reason = str(err)
            except Exception as err:  # a record is data: whatever it does to a decoder or the VQ model, skip it
                reason = f"unreadable: {type(err).__name__}: {err}"
        rejects.append({"line": number, "id": record.get("id") if record else None, "reason": reason})
    reject_path = output / REJECT_DIR / f"chunk-{chunk.index:06d}.jsonl"
    write_text_atomically(reject_path, "".join(json.dumps(r) + "\n" for r in rejects))
    write_shard(output / shard_name(chunk.index), samples, ids, chunk.digest)
    return len(samples), len(rejects), len(chunk.lines)


def _parse(line: str) -> tuple[dict | None, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {err}"
    if not isinstance(record, dict):
        return None, "record is not a JSON object"
    return record, ""


def _merge_rejects(output: Path) -> None:
    """One ``rejected.jsonl`` in manifest order from the per-chunk files."""
    parts = sorted((output / REJECT_DIR).glob("chunk-*.jsonl"))
    text = "".join(part.read_text() for part in parts)
    write_text_atomically(output / REJECTED, text)
    if text:
        logger.warning("%d record(s) rejected: see %s", text.count("\n"), output / REJECTED)
