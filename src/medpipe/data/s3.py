"""Object storage: every ``s3://`` path medpipe accepts is read and written here, through s3fs (fsspec).

Credentials, region and endpoint come from the standard AWS configuration that botocore reads:
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``, or an instance role),
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO,
Ceph, moto). s3fs is imported only when an ``s3://`` path is used (``pip install 'medpipe-imaging[s3]'``).

What S3 answers becomes a :class:`~medpipe.errors.StorageError` naming the URL and the reason: no such bucket,
no such key, access denied, or the endpoint unreachable (``transient``: after s3fs's and botocore's own
retries; a rerun may succeed). A PUT is atomic (an object appears whole or not at all), so writers put each
finished file once and never append; :class:`Staged` keeps an output prefix's files in a local folder while a
job runs, puts each one as it is finished, and brings back what an earlier run put, to resume.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath

from medpipe.errors import StorageError

SCHEME = "s3://"
ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
       "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
# exception class names (botocore, aiohttp, builtins) that mean the endpoint could not be reached or the answer
# was cut off: the request may succeed later
_NETWORK = frozenset({"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
                      "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
                      "IncompleteReadError", "ResponseStreamingError", "ConnectionError", "TimeoutError"})
_FS: dict = {}
_FS_LOCK = threading.Lock()


def is_s3(path) -> bool:
    """Whether ``path`` (as given on the command line, a str) is an ``s3://`` URL."""
    return isinstance(path, str) and path.startswith(SCHEME)


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *(n.strip("/") for n in names)])


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def filesystem():
    """The s3fs filesystem for the current AWS environment: one per process and setting, listings not cached
    (another writer's objects are seen at once)."""
    key = (os.getpid(), tuple(os.environ.get(k) for k in ENV))
    with _FS_LOCK:
        if key not in _FS:
            try:
                import s3fs
            except ImportError:
                raise StorageError("s3:// paths need s3fs: pip install 'medpipe-imaging[s3]'") from None
            _FS[key] = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        return _FS[key]


def reason(exc: BaseException) -> tuple[str, bool]:
    """(what went wrong in words, whether it is transient) for an exception raised by s3fs/botocore/aiohttp."""
    why, transient, _ = classify(exc)
    return why, transient


def classify(exc: BaseException) -> tuple[str, bool, str | None]:
    """:func:`reason` and the :attr:`StorageError.kind <medpipe.errors.StorageError>` it makes."""
    names = {c.__name__ for c in type(exc).__mro__}
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
    if names & _NETWORK:
        return f"cannot reach the S3 endpoint {endpoint()} ({exc.__class__.__name__}: {text})", True, None
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)", False, None
    if isinstance(exc, FileNotFoundError):  # s3fs says which in its message only
        return ("no such bucket" if "bucket" in text.lower() else "no such key"), False, "missing"
    if isinstance(exc, PermissionError):
        return f"access denied ({text})", False, "denied"
    return f"{exc.__class__.__name__}: {text}", False, None


def is_storage_error(exc: BaseException) -> bool:
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or module in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec")


@contextlib.contextmanager
def guard(url: str, doing: str = "read"):
    """Turn what S3 raises inside the block into a :class:`StorageError` naming ``url`` and the reason."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        why, transient, kind = classify(exc)
        raise StorageError(f"{url}: cannot {doing}: {why}", transient=transient, kind=kind) from None


def read_bytes(url: str, max_bytes: int | None = None) -> bytes:
    """The object's bytes; one ranged GET, so an object over ``max_bytes`` is refused after that many bytes."""
    fs = filesystem()
    with guard(url):
        if max_bytes is None:
            return fs.cat_file(url)
        try:
            data = fs.cat_file(url, start=0, end=max_bytes + 1)
        except OSError as exc:  # S3 answers a range over an empty object with 416 (InvalidRange)
            if "range" not in str(exc).lower() or fs.size(url) != 0:
                raise
            data = b""
    if len(data) > max_bytes:
        raise StorageError(f"{url}: over the {max_bytes}-byte file limit", kind="too_large")
    return data


def write_bytes(url: str, data: bytes) -> None:
    """One PUT: the object appears whole or not at all."""
    with guard(url, "write"):
        filesystem().pipe_file(url, data)


def open_read(url: str):
    """A file object streaming the object (errors while reading are the caller's to :func:`guard`)."""
    with guard(url):
        return filesystem().open(url, "rb")


def list_files(url: str, suffixes=None) -> list[str]:
    """The objects under the prefix ``url`` (recursively, or ``url`` itself when it is an object), sorted, as
    ``s3://`` URLs; with ``suffixes`` only names ending in one of them (case-insensitive)."""
    with guard(url, "list"):
        found = filesystem().find(url.rstrip("/"))
    return sorted(SCHEME + p for p in found
                  if suffixes is None or PurePosixPath(p).suffix.lower() in suffixes)


def download(url: str, dest: Path, max_bytes: int | None = None) -> None:
    """Copy the object to ``dest`` (written beside it, then renamed); a ``dest`` of the object's size is kept
    (an earlier, interrupted run fetched it)."""
    fs = filesystem()
    with guard(url):
        size = fs.size(url)
        if max_bytes is not None and size > max_bytes:
            raise StorageError(f"{url}: {size} bytes is over the {max_bytes}-byte file limit", kind="too_large")
        if dest.is_file() and dest.stat().st_size == size:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        fs.get_file(url, str(tmp))
    tmp.replace(dest)


class Staged:
    """An ``s3://`` output prefix staged in a local folder while a job writes it: :meth:`pull` brings back what
    an earlier run put there (to resume), :meth:`put` uploads one finished file (a PUT: atomic), :meth:`close`
    removes the folder. What was put stays in S3 whatever happens to this process."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._tmp = tempfile.TemporaryDirectory(prefix="medpipe-s3-")  # removed also when a failed job unwinds
        self.local = Path(self._tmp.name)

    def url_of(self, path: Path) -> str:
        return join(self.url, Path(path).relative_to(self.local).as_posix())

    def pull(self, *names: str) -> int:
        """Fetch ``url/name`` for each name (an object, or a prefix: every object under it); the number fetched.
        A missing bucket is an error here, before any work is done."""
        fetched = 0
        for name in names:
            for src in list_files(join(self.url, name)):
                rel = src[len(self.url) + 1:]
                if rel and ".." not in PurePosixPath(rel).parts:
                    download(src, self.local / rel)
                    fetched += 1
        return fetched

    def put(self, path: Path) -> str:
        url = self.url_of(path)
        write_bytes(url, Path(path).read_bytes())
        return url

    def put_many(self, paths: list[Path], workers: int = 16) -> None:
        """:meth:`put` each path, ``workers`` at a time (per-file outputs can be many small objects)."""
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="medpipe-s3-put") as pool:
            for _ in pool.map(self.put, paths):
                pass

    def close(self) -> None:
        self._tmp.cleanup()


def fetch_all(pairs: list[tuple[str, Path]], max_bytes: int | None = None,
              workers: int = 8) -> dict[str, StorageError]:
    """:func:`download` each ``(url, dest)`` in parallel; ``{url: error}`` for the objects that cannot be had
    (no such key, access denied, over the limit: the error's ``kind``). An unreachable endpoint stops the rest
    and raises (transient): what was fetched is kept, so a rerun fetches only what is missing."""
    failed: dict[str, StorageError] = {}
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="medpipe-s3")
    try:
        futures = {pool.submit(download, url, dest, max_bytes): url for url, dest in pairs}
        for fut in as_completed(futures):
            try:
                fut.result()
            except StorageError as exc:
                if exc.transient:
                    raise
                failed[futures[fut]] = exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return failed
