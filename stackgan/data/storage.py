"""Where a shard set lives, and how one of its files is opened: the ground floor of data access.

``data.shards`` (and every ``--shards``) may be

* a local folder (``shards/cub``) or ``file:///abs/folder``: files are read in place;
* ``http://host/path`` or ``https://...``: file ``name`` is ``<url>/<name>``;
* ``pipe:CMD``: a shell command that writes the file to stdout, with ``{name}`` where the
  file name goes, e.g. ``pipe:aws s3 cp s3://bucket/cub/{name} -``.

Remote files are streamed, never trusted whole: the shard cache (:mod:`.shardcache`) checks
each against its sha256 in ``metadata.json``. Errors name the file as the user knows it.
"""
from __future__ import annotations

import shlex
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..errors import StackGANError

HTTP_TIMEOUT_S = 60  # per socket operation; a stalled server is an error, not a hang


class ShardError(StackGANError, RuntimeError):
    """A shard folder or shard file that cannot be used (names the file)."""


class TransportError(ShardError):
    """A remote file could not be transferred (may succeed when tried again)."""


@dataclass(frozen=True)
class Store:
    """A shard set's location: ``kind`` is "local", "http" or "pipe"."""

    location: str  # as the user gave it
    kind: str
    base: str  # folder path, URL without the trailing slash, or the command template

    @property
    def remote(self) -> bool:
        return self.kind != "local"

    def where(self, name: str) -> str:
        """The file as the user knows it: path, URL or command (for messages)."""
        _check_name(name, self.location)
        if self.kind == "local":
            return str(Path(self.base) / name)
        if self.kind == "http":
            return f"{self.base}/{name}"
        return "pipe:" + self.base.replace("{name}", shlex.quote(name))

    def path(self, name: str) -> Path:
        """Local file of ``name`` (local stores only)."""
        if self.remote:
            raise ValueError(f"{self.location} is remote: its files go through the shard cache")
        return Path(self.base) / name

    def open(self, name: str) -> BinaryIO:
        """A readable binary stream of file ``name``; errors name it."""
        where = self.where(name)
        if self.kind == "local":
            try:
                return open(self.path(name), "rb")
            except FileNotFoundError:
                raise ShardError(f"{where} not found") from None
            except OSError as e:
                raise ShardError(f"{where}: cannot open ({e})") from e
        if self.kind == "http":
            try:
                return urllib.request.urlopen(where, timeout=HTTP_TIMEOUT_S)  # noqa: S310 -- user's URL
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    raise ShardError(f"{where} not found (HTTP 404)") from None
                raise TransportError(f"{where}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                raise TransportError(f"{where}: cannot connect ({getattr(e, 'reason', e)})") from None
        return _Pipe(self.base.replace("{name}", shlex.quote(name)), where)

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            try:
                return f.read()
            except OSError as e:
                raise TransportError(f"{self.where(name)}: read failed ({e})") from e


def parse(location: str | Path) -> Store:
    """The store of ``location`` (see the module docstring); a clear error for other forms."""
    loc = str(location)
    if loc.startswith("pipe:"):
        cmd = loc[len("pipe:"):].strip()
        if "{name}" not in cmd:
            raise ShardError(f"{loc}: a pipe: location needs {{name}} where the file name goes, "
                             "e.g. pipe:aws s3 cp s3://bucket/cub/{name} -")
        return Store(loc, "pipe", cmd)
    scheme = urlparse(loc).scheme if "://" in loc else ""
    if scheme in ("http", "https"):
        return Store(loc, "http", loc.rstrip("/"))
    if scheme == "file":
        return Store(loc, "local", url2pathname(urlparse(loc).path))
    if scheme:
        raise ShardError(f"{loc}: unsupported scheme {scheme!r} (a folder, file://, http(s):// or "
                         "pipe:CMD with {name}; for s3:// use pipe:aws s3 cp s3://.../{name} -)")
    return Store(loc, "local", loc)


def _check_name(name: str, location: str) -> None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts:
        raise ShardError(f"{location}/metadata.json: shard name {name!r} must be a relative path "
                         "inside the set")


class _Pipe:
    """stdout of a shell command as a binary stream; a failing command is an error on close."""

    def __init__(self, cmd: str, where: str):
        self.where = where
        self._err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=self._err)  # noqa: S602
        self.length = None  # size unknown in advance
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        self._eof = self._eof or not data or n < 0
        return data

    def close(self) -> None:
        """After the whole output: a failing command is an error. Before it: the command is stopped."""
        if not self._eof:
            self.proc.kill()
        self.proc.stdout.close()
        rc = self.proc.wait()
        self._err.seek(0)
        err = self._err.read().decode(errors="replace").strip()
        self._err.close()
        if rc != 0 and self._eof:
            raise TransportError(f"{self.where}: command exited with {rc}"
                                 + (f": {err.splitlines()[-1][:300]}" if err else ""))

    def __enter__(self) -> "_Pipe":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # an error is already on its way: do not mask it with the exit status
            self._eof = False
            self.close()
