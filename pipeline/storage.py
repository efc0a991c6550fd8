"""Where a run's files live: a local (or NFS) path, or object storage `s3://bucket/prefix` (AWS S3 and the
S3-compatible stores: MinIO, Ceph, OSS, R2).

    root = location("s3://logs/clicks")          # S3Path; a local path gives a pathlib.Path, unchanged
    day = root / "day=2026-11-01"                 # the pathlib calls the pipeline uses: / name parent exists()
    day.is_dir(); day.glob("*.parquet"); (day / "_SUCCESS").exists(); (root / "latest").read_text()
    write_atomic(root / "latest", "step-000000012\\n")   # pipeline.files: readers see the old object or the new one
    pq.ParquetFile(open_input(file))              # pyarrow's own S3 filesystem for Parquet
    FsspecWriter(str(root / "step-1"), **fsspec_options())   # DCP through s3fs (pipeline/train/checkpoint.py)

S3Path is the few pathlib calls the pipeline makes, each one call of s3fs (listing, head, get, put, delete), not a
client of our own; the conditional PUTs (If-None-Match / If-Match: the run lock, a published version's manifest) go
through boto3's client, as s3fs does not expose them. Object storage has no folders and no rename: a "folder"
exists while an object has its prefix, and a single PUT is atomic per object (readers see the whole old object or
the whole new one), which is what `write_atomic` promises; a set of objects (a checkpoint, an exported version) is
made visible by writing its pointer (meta.json, `latest`) last, after the others are uploaded and verified.

Credentials come from the standard AWS chain (environment, ~/.aws config, instance or pod role). An S3-compatible
store is named by the standard `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (e.g. http://minio:9000). A missing
bucket or refused credentials are one line naming the location (StorageError).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

SCHEME = "s3://"


class StorageError(OSError):
    """A location cannot be reached: missing bucket, refused credentials, unreachable endpoint (one line)."""


def is_remote(loc: Any) -> bool:
    return isinstance(loc, S3Path) or str(loc).startswith(SCHEME)


def location(loc: str | Path | S3Path) -> Path | S3Path:
    """A local path as pathlib.Path (exactly as before), `s3://bucket/key` as S3Path."""
    if isinstance(loc, (Path, S3Path)):
        return loc
    return S3Path(loc) if str(loc).startswith(SCHEME) else Path(loc)


def endpoint_url() -> str | None:
    """The S3-compatible store's endpoint, from the standard variables botocore reads (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.cache
def _s3fs(endpoint: str | None, pid: int):
    import s3fs

    # no listings cache: `--follow`, `latest` and the lock must see what another process wrote a second ago
    return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True,
                             client_kwargs={"endpoint_url": endpoint} if endpoint else {})


def s3fs_fs():
    """The s3fs filesystem for the configured endpoint (one per process: s3fs's event loop is not fork-safe)."""
    return _s3fs(endpoint_url(), os.getpid())


@functools.cache
def _arrow_s3(endpoint: str | None, pid: int):
    from pyarrow import fs as pafs

    if endpoint is None:
        return pafs.S3FileSystem()
    parsed = urlparse(endpoint)
    return pafs.S3FileSystem(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")


def arrow_s3():
    """pyarrow's native S3 filesystem for the configured endpoint (Parquet reads: footers, row groups, datasets)."""
    return _arrow_s3(endpoint_url(), os.getpid())


def fsspec_options() -> dict[str, Any]:
    """What fsspec.url_to_fs (DCP's FsspecWriter/FsspecReader) needs to reach the configured store, listings
    uncached."""
    endpoint = endpoint_url()
    return {"use_listings_cache": False, **({"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {})}


def open_input(file: str | Path | S3Path) -> Any:
    """What pq.ParquetFile reads: a local path as it is, an s3:// file opened through pyarrow's S3 filesystem."""
    if not is_remote(file):
        return file
    path = S3Path(str(file))
    with _clear_errors(path):
        return arrow_s3().open_input_file(path.key_path)


def arrow_dataset_source(root: Path | S3Path) -> tuple[str, Any]:
    """(path, filesystem) for pyarrow.dataset.dataset(path, filesystem=...)."""
    if isinstance(root, S3Path):
        return root.key_path, arrow_s3()
    return str(root), None


class _clear_errors:
    """Turn botocore/pyarrow errors about a location into one StorageError line naming it."""

    def __init__(self, path: S3Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, (StorageError, FileNotFoundError)) and not _is_bucket_error(e):
            return False
        text = f"{type(e).__name__}: {e}"
        low = text.lower()
        if _is_bucket_error(e):
            raise StorageError(f"{self.path}: bucket {self.path.bucket!r} does not exist") from e
        if isinstance(e, PermissionError) or any(w in low for w in _DENIED):
            raise StorageError(f"{self.path}: access denied (credentials from the standard AWS chain: "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, or the instance/pod role): "
                               f"{_first_line(text)}") from e
        if isinstance(e, (OSError, ConnectionError)) and any(w in low for w in ("connect", "resolve", "timed out")):
            raise StorageError(f"{self.path}: cannot reach the object store at {endpoint_url() or 'AWS'}: "
                               f"{_first_line(text)}") from e
        return False


# botocore's error codes, s3fs's and pyarrow's (AWS SDK for C++) words for refused credentials
_DENIED = ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "access denied", "access_denied",
           "forbidden", "nocredentials", "unable to locate credentials")


def _is_bucket_error(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return any(w in text for w in ("nosuchbucket", "no_such_bucket", "bucket does not exist"))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""


@functools.total_ordering
class S3Path:
    """`s3://bucket/key` with the pathlib calls the pipeline makes (see the module docstring)."""

    def __init__(self, url: str):
        if not url.startswith(SCHEME):
            raise ValueError(f"not an s3:// location: {url!r}")
        rest = url[len(SCHEME):].strip("/")
        if not rest:
            raise ValueError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
        self.key_path = "/".join(p for p in rest.split("/") if p)  # "bucket/a/b", as s3fs and pyarrow name it
        self._listed_type: str | None = None  # "file" or "directory" when a listing made it (no second call)

    # -- pure path ----------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return SCHEME + self.key_path

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and other.key_path == self.key_path

    def __lt__(self, other: S3Path) -> bool:
        return self.key_path < other.key_path

    def __hash__(self) -> int:
        return hash(self.key_path)

    def __truediv__(self, name: str | Path) -> S3Path:
        return S3Path(f"{self}/{name}")

    @property
    def bucket(self) -> str:
        return self.key_path.split("/")[0]

    @property
    def name(self) -> str:
        return self.key_path.rsplit("/", 1)[-1] if "/" in self.key_path else ""

    @property
    def parent(self) -> S3Path:
        return S3Path(SCHEME + self.key_path.rsplit("/", 1)[0]) if "/" in self.key_path else self

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def with_name(self, name: str) -> S3Path:
        return self.parent / name

    def resolve(self) -> S3Path:
        return self

    def relative_to(self, other: S3Path) -> Path:
        if not self.key_path.startswith(other.key_path + "/"):
            raise ValueError(f"{self} is not under {other}")
        return Path(self.key_path[len(other.key_path) + 1:])

    # -- store ---------------------------------------------------------------------------------------------------
    def _call(self, method: str, *args, **kwargs):
        with _clear_errors(self):
            return getattr(s3fs_fs(), method)(*args, **kwargs)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_file(self) -> bool:
        if self._listed_type is not None:
            return self._listed_type == "file"
        try:
            return self._call("info", self.key_path).get("type") == "file"
        except FileNotFoundError:
            return False

    def is_dir(self) -> bool:
        if self._listed_type is not None:
            return self._listed_type == "directory"
        if "/" not in self.key_path:  # a bucket: it exists or this raises StorageError
            self._call("ls", self.key_path)
            return True
        return bool(self._ls(missing_ok=True))

    def _ls(self, *, missing_ok: bool = False) -> list[dict]:
        try:
            return self._call("ls", self.key_path, detail=True)
        except FileNotFoundError:
            if missing_ok:
                return []
            raise

    def iterdir(self) -> Iterator[S3Path]:
        for entry in self._ls(missing_ok=True):
            name = entry["name"].rstrip("/")
            if name != self.key_path:
                child = S3Path(SCHEME + name)
                child._listed_type = entry.get("type")
                yield child

    def glob(self, pattern: str) -> Iterator[S3Path]:
        """Objects of this folder whose name matches `pattern` (one level, as the pipeline globs)."""
        for entry in self._ls(missing_ok=True):
            if entry.get("type") == "file" and fnmatch.fnmatch(entry["name"].rsplit("/", 1)[-1], pattern):
                yield S3Path(SCHEME + entry["name"])

    def files(self) -> list[S3Path]:
        """Every object under this prefix, at any depth."""
        return [S3Path(SCHEME + name) for name in self._call("find", self.key_path)]

    def size(self) -> int:
        return int(self._call("info", self.key_path)["size"])

    def mtime_ns(self) -> int:
        modified = self._call("info", self.key_path).get("LastModified")
        return int(modified.timestamp() * 1e9) if modified is not None else 0

    def read_bytes(self) -> bytes:
        return self._call("cat_file", self.key_path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One PUT: readers see the old object or this one, whole."""
        self._call("pipe_file", self.key_path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self, *args, **kwargs) -> None:
        """Nothing to do: object storage has no folders."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("rm_file", self.key_path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Delete every object under this prefix (a missing prefix is nothing to do)."""
        try:
            self._call("rm", self.key_path, recursive=True)
        except FileNotFoundError:
            pass

    def sha256(self) -> str:
        h = hashlib.sha256()
        with _clear_errors(self), s3fs_fs().open(self.key_path, "rb", block_size=1 << 22) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()

    def create_exclusive(self, data: bytes) -> str | None:
        """PUT only if no object has this key (If-None-Match: *, S3's conditional write): the new object's ETag if
        this call created it, None if one was there."""
        return self._put_if(data, IfNoneMatch="*")

    def replace_if(self, data: bytes, etag: str) -> str | None:
        """PUT only if the object is still the version `etag` names (If-Match): the new ETag, or None if another
        writer replaced or deleted it since."""
        return self._put_if(data, IfMatch=etag)

    def read_with_etag(self) -> tuple[bytes, str] | None:
        """The object's content and ETag (None if there is none): what replace_if compares with."""
        from botocore.exceptions import ClientError

        try:
            with _clear_errors(self):
                got = _client().get_object(Bucket=self.bucket, Key=self._key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    @property
    def _key(self) -> str:
        return self.key_path.split("/", 1)[1]

    def _put_if(self, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            with _clear_errors(self):
                return _client().put_object(Bucket=self.bucket, Key=self._key, Body=data, **condition)["ETag"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                             "NoSuchKey"):
                return None
            raise


@functools.cache
def _boto(endpoint: str | None, pid: int):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def _client():
    """boto3's S3 client for what s3fs does not expose (a conditional PUT)."""
    return _boto(endpoint_url(), os.getpid())


@contextlib.contextmanager
def local_copy(folder: Path | S3Path) -> Iterator[Path]:
    """A local folder holding `folder`'s files: itself when local, else a temporary download of the prefix
    (torch.export.load reads a local file), removed on exit."""
    if not isinstance(folder, S3Path):
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="hyrank-s3-") as tmp:
        for entry in folder.glob("*"):
            with _clear_errors(entry):
                s3fs_fs().get_file(entry.key_path, str(Path(tmp) / entry.name))
        yield Path(tmp)


def upload(local: Path, dest: S3Path) -> None:
    """One local file to an object (multipart for large files), whole or not at all."""
    with _clear_errors(dest):
        s3fs_fs().put_file(str(local), dest.key_path)


def rmtree(path: Path | S3Path) -> None:
    """shutil.rmtree(path, ignore_errors=True), also for object storage."""
    if isinstance(path, S3Path):
        path.rmtree()
    else:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def mtime_ns(path: Path | S3Path) -> int:
    return path.mtime_ns() if isinstance(path, S3Path) else path.stat().st_mtime_ns


def size(path: Path | S3Path) -> int:
    return path.size() if isinstance(path, S3Path) else path.stat().st_size
