"""Read one webdataset shard (a tar, local or streamed by a command) into raw samples, counting failures.

A raw sample is ``{"__key__": str, "__url__": str, "<ext>": bytes, ...}``: the tar members that share
a key (``000123.jpg``, ``000123.txt``, ``000123.json``), as webdataset groups them. Nothing here
raises on bad data: an unreadable, truncated or stalled shard is counted (``ldm.data.skips``) and
its iteration ends, so the caller goes on with the next shard.

URLs: a local path (or ``file:``), ``pipe:COMMAND`` (the command writes the tar to stdout, e.g.
``pipe:aws s3 cp s3://bucket/00001.tar -``), ``s3://`` (read with ``aws s3 cp URL -``), ``gs://``
(``gsutil cat URL``), ``http(s)://`` (``curl``). Every read (commands and local files alike) gets
``read_timeout`` seconds before the shard is abandoned (``ShardStalled``), so neither a hung download
nor a hung network file system hangs a loader worker.

Shards are untrusted: a member whose tar header declares more than ``max_member_bytes`` (a GNU
sparse member can declare a gigabyte in a 10 KB shard) is never read; its sample is skipped and
counted as ``oversized_member``.
"""

from __future__ import annotations

import os
import queue
import re
import select
import subprocess
import tarfile
import tempfile
import threading
from typing import Any, Callable, Iterator

from ldm.data.skips import OVERSIZED_MEMBER, STALLED_SHARD, TRUNCATED_SHARD, UNREADABLE_SHARD, DataCounts

TAR_BLOCK = 512
# a tar ends with two zero blocks; without them the file was cut (at a member boundary, or inside
# a header, where Python's tarfile would otherwise end silently)
END_OF_ARCHIVE = bytes(2 * TAR_BLOCK)
# bytes read past the end-of-archive marker to see the padding and the command's exit status
MAX_DRAIN = 1 << 20
# local files are read in chunks of this size by a helper thread (one hand-over per MiB: negligible)
LOCAL_CHUNK = 1 << 20
# the largest member read by default: well above any training image (a 50-megapixel JPEG is
# 10-25 MB, a 4096x4096 RGB PNG at most 50 MB) yet far below what a loader worker can hold
DEFAULT_MAX_MEMBER_BYTES = 64 << 20


class ShardStalled(OSError):
    """A shard (a command, or a local file on a hung file system) sent no data for ``read_timeout`` seconds."""


class _TrackedStream:
    """A readable stream that remembers how many bytes it gave and the last 1 KiB of them."""

    def __init__(self) -> None:
        self.total = 0
        self.tail = b""

    def _raw_read(self, size: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, size: int = -1) -> bytes:
        data = self._raw_read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-len(END_OF_ARCHIVE):]
        return data

    def ended_cleanly(self) -> bool:
        """Read what is left (up to ``MAX_DRAIN``) and say whether the stream ended like a whole tar."""
        drained = 0
        while drained < MAX_DRAIN:
            chunk = self.read(64 * 1024)
            if not chunk:
                break
            drained += len(chunk)
        else:
            return True  # much more data after the end-of-archive marker: not a truncation
        return self.total % TAR_BLOCK == 0 and self.tail == END_OF_ARCHIVE

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class LocalStream(_TrackedStream):
    """A local file. With a ``timeout``, the file is opened and read (``LOCAL_CHUNK`` at a time) by a
    helper thread, and waiting longer than ``timeout`` for it raises ``ShardStalled``: a read from a
    hung network file system (or a FIFO nobody writes) blocks in the kernel, where nothing else can
    interrupt it. The stuck thread is a daemon and is abandoned (with its file) if it never returns."""

    def __init__(self, path: str, timeout: float | None = None):
        super().__init__()
        self.path = path
        self.timeout = timeout
        self.buffer, self.offset = b"", 0
        self.file: Any = None
        if timeout is None:
            self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
            return
        self.requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=f"read {path}", daemon=True).start()
        self._reply()  # the open itself may hang (a FIFO, a dead NFS server)

    def _serve(self) -> None:
        """The helper thread: open the file, then answer each requested size with a read."""
        try:
            with open(self.path, "rb", buffering=0) as file:
                self.replies.put(b"")
                while (size := self.requests.get()) is not None:
                    self.replies.put(file.read(size))
        except BaseException as error:  # noqa: BLE001 - handed to the reading thread
            self.replies.put(error)

    def _reply(self) -> bytes:
        try:
            reply = self.replies.get(timeout=self.timeout)
        except queue.Empty:
            raise ShardStalled(f"no data for {self.timeout:g} s from {self.path}") from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _chunk(self) -> bytes:
        if self.file is not None:
            return self.file.read(LOCAL_CHUNK)
        self.requests.put(LOCAL_CHUNK)
        return self._reply()

    def _raw_read(self, size: int) -> bytes:
        if self.offset >= len(self.buffer):
            self.buffer, self.offset = self._chunk(), 0
        if size is None or size < 0:
            size = len(self.buffer) - self.offset  # (a short read is allowed; tarfile asks again)
        data = self.buffer[self.offset : self.offset + size]
        self.offset += len(data)
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        else:
            self.requests.put(None)  # the helper closes the file and ends (unless it is stuck)


class CommandStream(_TrackedStream):
    """The stdout of a command; a read that waits ``timeout`` seconds for data raises ``ShardStalled``,
    a non-zero exit status (other than SIGPIPE's 141) raises ``OSError`` with the end of its stderr."""

    def __init__(self, command: str | list[str], timeout: float | None):
        super().__init__()
        self.command = command
        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command never blocks on it
        self.process = subprocess.Popen(
            command, shell=isinstance(command, str), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.stderr, bufsize=0,
        )
        self.fd = self.process.stdout.fileno()

    def _raw_read(self, size: int) -> bytes:
        size = size if size and size > 0 else 1 << 20
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            self.close()
            raise ShardStalled(f"no data for {self.timeout:g} s from {self._name()}")
        data = os.read(self.fd, size)
        if not data:
            status = self.process.wait()
            if status not in (0, 141):  # 141: SIGPIPE after we stopped reading
                raise OSError(f"{self._name()} exited with status {status}: {self._stderr_tail()}")
        return data

    def _name(self) -> str:
        return self.command if isinstance(self.command, str) else " ".join(self.command)

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read()[-500:].decode("utf-8", "replace").strip()
        return " | ".join(text.splitlines()[-3:]) or "no message"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.stdout.close()
        self.process.wait()
        self.stderr.close()


def open_shard(url: str, read_timeout: float | None = 300.0) -> _TrackedStream:
    """Open ``url`` for reading (see the module docstring for the schemes)."""
    if url.startswith("pipe:"):
        return CommandStream(url[len("pipe:"):], read_timeout)
    if url.startswith("s3://"):
        return CommandStream(["aws", "s3", "cp", "--only-show-errors", url, "-"], read_timeout)
    if url.startswith("gs://"):
        return CommandStream(["gsutil", "-q", "cat", url], read_timeout)
    if url.startswith(("http://", "https://")):
        command = ["curl", "--fail", "--silent", "--show-error", "--location", "--connect-timeout", "30",
                   "--retry", "3", url]
        return CommandStream(command, read_timeout)
    if url.startswith("file:"):
        url = re.sub(r"^file:(//)?", "", url)
    return LocalStream(url, read_timeout)


def split_name(name: str) -> tuple[str | None, str | None]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``): the key is everything before the first dot of
    the file name, the extension (lower-cased) everything after it, as in webdataset."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def _is_meta(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("__") and base.endswith("__")


def read_shard(
    url: str,
    counts: DataCounts,
    read_timeout: float | None = 300.0,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    skip: int = 0,
) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one shard; count and stop at the first problem.

    ``skip``: the first ``skip`` samples (of those that would be yielded) are passed over without
    their members' bytes being read or kept, and without counting oversized members again: a resumed
    stream re-opens a shard at the sample it had reached (tar parsing only, no decoding).

    A shard that cannot be opened or yields no member counts as ``unreadable_shard``; one that
    breaks after some members as ``truncated_shard`` (its complete samples are yielded; the sample
    being read when it broke is dropped, since it may lack members: a sample is known to be complete
    only once the next key begins or the archive ends properly); a read that waits ``read_timeout``
    seconds as ``stalled_shard``. A sample with a member whose header declares more than
    ``max_member_bytes`` (None: no cap) is dropped without that member being read, counted once as
    ``oversized_member``.
    """
    try:
        stream = open_shard(url, read_timeout)
    except ShardStalled as error:
        counts.skip(STALLED_SHARD, url, str(error))
        return
    except Exception as error:  # noqa: BLE001 - any failure to open is an unreadable shard
        counts.skip(UNREADABLE_SHARD, url, _describe(error))
        return
    members = 0
    current: dict[str, Any] | None = None
    oversized = False  # the current sample has an oversized member: counted, never yielded
    passed = 0  # complete samples passed over (``skip``)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # type: ignore[call-overload]
        for info in tar:
            tar.members = []  # stream mode keeps every TarInfo otherwise: memory grows with the shard
            if not info.isreg() or _is_meta(info.name):
                continue
            key, ext = split_name(info.name)
            if key is None:
                continue
            if current is None or key != current["__key__"]:
                if current is not None and not oversized:
                    if passed < skip:
                        passed += 1
                    else:
                        yield current  # a new key began: the previous sample is complete
                current, oversized = {"__key__": key, "__url__": url}, False
            members += 1
            if max_member_bytes is not None and info.size > max_member_bytes:
                if not oversized and passed >= skip:
                    counts.skip(OVERSIZED_MEMBER, f"{url}:{info.name}", f"{info.size} > {max_member_bytes} bytes")
                oversized = True  # (tarfile skips the member's stored bytes without keeping them)
                continue
            if not oversized and passed >= skip:  # (a passed-over member's bytes are skipped by tarfile)
                current[ext] = tar.extractfile(info).read()
        compressed = getattr(tar.fileobj, "comptype", "tar") != "tar"
        if members and not compressed and not stream.ended_cleanly():
            raise tarfile.ReadError("no end-of-archive marker")
    except ShardStalled as error:
        counts.skip(STALLED_SHARD, url, str(error))
        return
    except Exception as error:  # noqa: BLE001 - a broken shard must not end the run
        counts.skip(TRUNCATED_SHARD if members else UNREADABLE_SHARD, url, _describe(error))
        return
    finally:
        stream.close()
    if current is not None and not oversized and passed >= skip:  # (a valid tar with no member is not an error)
        yield current


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
