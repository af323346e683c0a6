"""Run-directory I/O for local paths and object-store URIs (s3://, gs://) through pyarrow.fs.

Every stage reads and writes `run_dir` through these functions, so a multi-node cluster with no
shared disk can use an object store. Local writes are atomic (temp file + rename), so no reader
ever sees a half-written file; object stores give that on their own (a PUT lands whole or not).
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "is_uri", "join", "filesystem", "exists", "makedirs", "listdir", "remove", "read_bytes", "write_bytes",
    "read_text", "write_text", "read_parquet", "write_parquet", "local_path", "open_output", "sha256",
    "file_sizes",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


def is_uri(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_uri(base):
        return posixpath.join(base, *[str(p) for p in parts])
    return str(Path(base, *parts))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI. S3 endpoint overrides come from the
    usual AWS variables (AWS_ENDPOINT_URL for S3-compatible servers)."""
    path = str(path)
    if is_uri(path):
        if path.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
            endpoint = os.environ["AWS_ENDPOINT_URL"]
            scheme = "https" if endpoint.startswith("https") else "http"
            fs = pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme,
                                   region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            return fs, path[len("s3://"):]
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)


def listdir(path: str, recursive: bool = False) -> list[str]:
    """File paths (not folders) under `path`, as full paths/URIs; [] when it does not exist."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive))
    prefix = str(path)[: len(str(path)) - len(p)] if is_uri(path) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def file_sizes(path: str) -> dict[str, int]:
    """{file path or URI: size in bytes} of every file under `path` (or of `path` itself), one listing."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.File:
        return {str(path): int(info.size)}
    if info.type == pafs.FileType.NotFound:
        return {}
    prefix = str(path)[: len(str(path)) - len(p)] if is_uri(path) else ""
    return {prefix + i.path: int(i.size) for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
            if i.type == pafs.FileType.File}


def sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (adapters and image folders can be large)."""
    import hashlib

    fs, p = filesystem(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def remove(path: str) -> None:
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


@contextmanager
def open_output(path: str) -> Iterator[io.BufferedIOBase]:
    """Binary output stream that appears at `path` only when the block ends without error."""
    fs, p = filesystem(path)
    parent = posixpath.dirname(p) if is_uri(path) else os.path.dirname(p)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix="-" + os.path.basename(p))
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        buf = io.BytesIO()
        yield buf
        with fs.open_output_stream(p) as out:
            out.write(buf.getvalue())


def write_bytes(path: str, data: bytes) -> None:
    with open_output(path) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_parquet(table, path: str) -> None:
    """Write a pandas DataFrame or pyarrow Table atomically."""
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(path, sink.getvalue())


def read_parquet(path: str, **kw):
    """Read a Parquet file into a pandas DataFrame. A file that is there but not readable Parquet (cut
    short, overwritten) is a DamagedFileError naming it; a missing one stays FileNotFoundError."""
    fs, p = filesystem(path)
    try:
        return pq.read_table(p, filesystem=fs, **kw).to_pandas()
    except pa.ArrowException as e:
        if isinstance(e, OSError) and not isinstance(e, pa.ArrowInvalid):
            raise                              # missing file, lost connection: not a damaged file
        from meddap.errors import DamagedFileError

        raise DamagedFileError(
            f"{path} is not a readable Parquet file ({type(e).__name__}: {str(e)[:200]}): it was cut short or "
            f"overwritten. If a meddap stage wrote it, `python -m meddap status` (same --config and run_dir) "
            f"names the stage; redo that stage with --force STAGE.") from None


def local_path(path: str, cache_dir: str | None = None) -> str:
    """A local file path holding `path`'s bytes: the path itself when local, else a cached download.

    The cache is keyed by the URI and the object's size and modification time, so an object rewritten at
    the same URI (an adapter retrained by `finetune --force`) is downloaded again, never served stale."""
    if not is_uri(path):
        return str(Path(path).expanduser().absolute())
    cache = Path(cache_dir or tempfile.gettempdir(), "meddap-cache")
    cache.mkdir(parents=True, exist_ok=True)
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    stamp = f"{info.size}:{info.mtime_ns if info.mtime_ns is not None else ''}"
    target = cache / (uuid.uuid5(uuid.NAMESPACE_URL, f"{path}#{stamp}").hex + "-" + posixpath.basename(path))
    if not target.exists():
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.write_bytes(read_bytes(path))
        os.replace(tmp, target)
    return str(target)
