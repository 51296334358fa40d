"""Atomic file outputs and content hashes.

Every stage writes through these helpers: the new file appears under its final name only
once it is complete and on disk (fsync before the rename, and of the folder after it), so a
failed, killed or crashed stage leaves the previous good output in place. Files are created
with the user's umask, as any other tool's outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it over `path` in one step,
    durably. The temporary name is a dotfile ending in .tmp, which readers of a folder
    (the landing folder, DVC) pass over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666 less the umask
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; on success it takes the place of
    `path` (a file or a folder before), the old one moved aside first and then removed: a
    failed or killed stage leaves the previous output whole. The temporary name is a dotfile
    ending in .tmp, as `atomic_path`'s."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp_path, old_path = path.with_name(f".{path.name}.{token}.tmp"), path.with_name(f".{path.name}.{token}.old")
    tmp_path.mkdir()
    try:
        yield tmp_path
        for part in tmp_path.iterdir():
            _fsync(part)
        _fsync(tmp_path)
        if path.exists():
            os.replace(path, old_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
        if old_path.is_dir():
            shutil.rmtree(old_path, ignore_errors=True)
        else:
            old_path.unlink(missing_ok=True)


def write_parquet(data: pd.DataFrame | pa.Table, path: str | Path) -> None:
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def require_input(path: Path, stage: str) -> Path:
    """`path`, which a stage reads (a file, or a folder of Parquet parts): an error naming it
    and the way to make it when it is missing."""
    if not (path.is_file() or (path.is_dir() and any(path.glob("*.parquet")))):
        from pipelines.core.errors import LooplineError

        raise LooplineError(stage, f"input {path} does not exist; run the earlier stages first (dvc repro)")
    return path


def read_input(path: Path, stage: str) -> pd.DataFrame:
    """A Parquet file a stage reads, as a DataFrame (`require_input` first)."""
    return pq.read_table(require_input(path, stage)).to_pandas()


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def path_md5(path: str | Path) -> str:
    """md5 of a file, or of a folder's file names and contents (a stage output in Parquet
    parts, a source folder of CSV files); 'missing' if neither."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if path.is_dir():
        digest = hashlib.md5()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(path)}:{file_md5(f)}\n".encode())
        return digest.hexdigest()
    return "missing"


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    return file_digest(path, "md5")


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
