"""A request body as it arrives: in memory up to a threshold, then in a private temporary file.

Like ``tempfile.SpooledTemporaryFile``, but the file has a path (created by ``tempfile.mkstemp``,
mode 0600, in ``$TMPDIR``), so a decode process can open it and stream the image from disk: a body
of hundreds of MB costs the server the page cache, not its resident memory. The file is removed by
:meth:`SpooledBody.close` (the route's ``finally``), whatever happened to the request.
"""

from __future__ import annotations

import os
import tempfile


class SpooledBody:
    def __init__(self, spool_bytes: int, directory: str | None = None):
        self.spool_bytes, self.directory = int(spool_bytes), directory
        self.size = 0
        self.path: str | None = None
        self._buf = bytearray()
        self._file = None

    @property
    def spooled(self) -> bool:
        """True once the body went to its temporary file (``path``)."""
        return self.path is not None

    def write(self, chunk: bytes) -> None:
        if self._file is None and self.path is None and self.size + len(chunk) > self.spool_bytes:
            fd, self.path = tempfile.mkstemp(prefix="medpipe-body-", dir=self.directory)
            self._file = os.fdopen(fd, "wb")
            self._file.write(self._buf)
            self._buf = bytearray()
        if self._file is not None:
            self._file.write(chunk)
        else:
            self._buf += chunk
        self.size += len(chunk)

    def finish(self) -> "SpooledBody":
        """The whole body has arrived: flush the file so another process reads all of it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self

    def read(self) -> bytes:
        """The body as bytes (read back from the file when spooled)."""
        if self.path is None:
            return bytes(self._buf)
        self.finish()
        with open(self.path, "rb") as fh:
            return fh.read()

    def close(self) -> None:
        """Forget the body and remove its file. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._buf = bytearray()

    def __enter__(self) -> "SpooledBody":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
