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
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ldm.data.skips import OVERSIZED_MEMBER, STALLED_SHARD, TRUNCATED_SHARD, UNREADABLE_SHARD, DataCounts

TAR_BLOCK = 512
# a tar ends with two zero blocks; without them the file was cut (at a member boundary, or inside
# a header, where Python's tarfile would otherwise end silently)
END_OF_ARCHIVE = bytes(2 * TAR_BLOCK)
# bytes read past the end-of-archive marker to see the padding and the command's exit status
MAX_DRAIN = 1 << 20
# local files are read in chunks of this size by a helper thread (one hand-over per MiB: negligible)
LOCAL_CHUNK = 1 << 20
# ... and in chunks of this size where single samples are read at their offsets (a resume's buffer)
RANDOM_ACCESS_CHUNK = 64 << 10
# the largest member read by default: well above any training image (a 50-megapixel JPEG is
# 10-25 MB, a 4096x4096 RGB PNG at most 50 MB) yet far below what a loader worker can hold
DEFAULT_MAX_MEMBER_BYTES = 64 << 20


class UnreadableShard(OSError):
    """A local shard whose headers cannot be read (``member_index``)."""


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
        self.tail = (self.tail + data)[-len(END_OF_ARCHIVE) :]
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

    def __init__(self, path: str, timeout: float | None = None, chunk: int = LOCAL_CHUNK):
        super().__init__()
        self.path = path
        self.timeout = timeout
        self.chunk = chunk
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
        """The helper thread: open the file, then answer each requested size with a read (and each
        negative one, -1 - position, with a seek there)."""
        try:
            with open(self.path, "rb", buffering=0) as file:
                self.replies.put(b"")
                while (size := self.requests.get()) is not None:
                    if size < 0:
                        file.seek(-1 - size)
                        self.replies.put(b"")
                    else:
                        self.replies.put(file.read(size))
        except BaseException as error:  # noqa: BLE001 - handed to the reading thread
            self.replies.put(error)

    def seek(self, position: int) -> None:
        """Go to byte ``position`` of the file; the stream then counts its bytes from there."""
        if self.file is not None:
            self.file.seek(position)
        else:
            self.requests.put(-1 - position)
            self._reply()
        self.buffer, self.offset = b"", 0
        self.total, self.tail = 0, b""

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
            return self.file.read(self.chunk)
        self.requests.put(self.chunk)
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
            command,
            shell=isinstance(command, str),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            bufsize=0,
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
        return CommandStream(url[len("pipe:") :], read_timeout)
    if url.startswith("s3://"):
        return CommandStream(["aws", "s3", "cp", "--only-show-errors", url, "-"], read_timeout)
    if url.startswith("gs://"):
        return CommandStream(["gsutil", "-q", "cat", url], read_timeout)
    if url.startswith(("http://", "https://")):
        command = [
            "curl",
            "--fail",
            "--silent",
            "--show-error",
            "--location",
            "--connect-timeout",
            "30",
            "--retry",
            "3",
            url,
        ]
        return CommandStream(command, read_timeout)
    return LocalStream(local_path(url), read_timeout)


def local_path(url: str) -> str | None:
    """The file a local shard URL names (plain path or ``file:``), or None for a command or remote URL."""
    if url.startswith(("pipe:", "s3://", "gs://", "http://", "https://")):
        return None
    return re.sub(r"^file:(//)?", "", url)


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


class _Progress:
    """How far ``_samples`` got: members seen (a shard that broke after some is truncated, not unreadable)."""

    members = 0


def _samples(
    tar: tarfile.TarFile,
    url: str,
    counts: DataCounts,
    max_member_bytes: int | None,
    skip: int,
    base: int | None,
    progress: _Progress,
) -> Generator[dict[str, Any], None, dict[str, Any] | None]:
    """The samples of an open tar (stream mode), grouped by key, each yielded once the next key
    begins; the last one is returned, not yielded (it is complete only if the archive ends properly).
    With ``base`` (the byte position the tar was opened at, for a local uncompressed shard) each
    carries ``__offset__`` (where its first member's header starts) and ``__end__`` (where the next
    sample's does)."""
    current: dict[str, Any] | None = None
    oversized = False  # the current sample has an oversized member: counted, never yielded
    passed = 0  # complete samples passed over (``skip``)
    end = 0
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
                    if base is not None:
                        current["__end__"] = base + info.offset
                    yield current  # a new key began: the previous sample is complete
            current, oversized = {"__key__": key, "__url__": url}, False
            if base is not None:
                current["__offset__"] = base + info.offset
        progress.members += 1
        end = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK
        if max_member_bytes is not None and info.size > max_member_bytes:
            if not oversized and passed >= skip:
                counts.skip(OVERSIZED_MEMBER, f"{url}:{info.name}", f"{info.size} > {max_member_bytes} bytes")
            oversized = True  # (tarfile skips the member's stored bytes without keeping them)
            continue
        if not oversized and passed >= skip:  # (a passed-over member's bytes are skipped by tarfile)
            current[ext] = tar.extractfile(info).read()
    if current is None or oversized or passed < skip:  # (a valid tar with no member is not an error)
        return None
    if base is not None:
        current["__end__"] = base + end
    return current


def read_shard(
    url: str,
    counts: DataCounts,
    read_timeout: float | None = 300.0,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
    skip: int = 0,
    offset: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one shard; count and stop at the first problem.

    ``skip``: the first ``skip`` samples (of those that would be yielded) are passed over without
    their members' bytes being read or kept, and without counting oversized members again: a resumed
    stream re-opens a shard at the sample it had reached (tar parsing only, no decoding).
    ``offset``: start reading a local uncompressed shard at this byte (a sample's ``__offset__`` or
    ``__end__``, which samples of such shards carry): a resumed stream goes straight there.

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
        if offset:
            stream.seek(offset)
    except ShardStalled as error:
        counts.skip(STALLED_SHARD, url, str(error))
        return
    except Exception as error:  # noqa: BLE001 - any failure to open is an unreadable shard
        counts.skip(UNREADABLE_SHARD, url, _describe(error))
        return
    progress, last = _Progress(), None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|" if offset else "r|*")  # type: ignore[call-overload]
        compressed = getattr(tar.fileobj, "comptype", "tar") != "tar"
        local = isinstance(stream, LocalStream) and not compressed
        last = yield from _samples(tar, url, counts, max_member_bytes, skip, (offset or 0) if local else None, progress)
        if progress.members and not compressed and not stream.ended_cleanly():
            raise tarfile.ReadError("no end-of-archive marker")
    except ShardStalled as error:
        counts.skip(STALLED_SHARD, url, str(error))
        return
    except Exception as error:  # noqa: BLE001 - a broken shard must not end the run
        if progress.members or not offset:  # (from an offset, the shard may simply be read to its end)
            counts.skip(TRUNCATED_SHARD if progress.members else UNREADABLE_SHARD, url, _describe(error))
        return
    finally:
        stream.close()
    if last is not None:
        yield last


@dataclass(frozen=True)
class MemberEntry:
    """A regular member of a local uncompressed tar: its name and where its bytes lie."""

    name: str
    offset: int  # of its data (past the header)
    size: int


def member_index(path: str | os.PathLike) -> Iterator[MemberEntry]:
    """The regular members of a local uncompressed tar, from their headers alone (tarfile seeks over
    the data): for readers that list inputs first and read each later at its offset (a sampling job's
    init images). A file that is not an uncompressed tar raises ``UnreadableShard``."""
    try:
        with tarfile.open(path, mode="r:") as tar:  # "r:": offsets into a compressed tar would be meaningless
            for info in tar:
                if info.isreg():
                    yield MemberEntry(info.name, info.offset_data, info.size)
    except tarfile.TarError as error:
        raise UnreadableShard(f"{path}: not a readable uncompressed tar ({error})") from None


def read_samples_at(
    url: str,
    offsets: Iterable[int],
    read_timeout: float | None = 300.0,
    max_member_bytes: int | None = DEFAULT_MAX_MEMBER_BYTES,
) -> dict[int, dict[str, Any]]:
    """The samples that start at ``offsets`` (their ``__offset__``) of a local uncompressed shard,
    each read on its own (a seek, its members' headers and bytes): a resumed stream's buffer, without
    reading the shard. A sample that cannot be read is left out; nothing is counted (it was counted
    when it was first read, if it was bad then)."""
    found: dict[int, dict[str, Any]] = {}
    try:
        stream = LocalStream(local_path(url) or url, read_timeout, chunk=RANDOM_ACCESS_CHUNK)
    except Exception:  # noqa: BLE001 - the caller reports what is missing
        return found
    counts = DataCounts()
    try:
        for offset in sorted(set(offsets)):
            stream.seek(offset)
            try:
                tar = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]
                samples = _samples(tar, url, counts, max_member_bytes, 0, offset, _Progress())
                try:
                    sample = next(samples)
                except StopIteration as end:  # the shard's last sample (its end was read before)
                    sample = end.value
            except Exception:  # noqa: BLE001
                continue
            if sample is not None and sample["__offset__"] == offset:
                found[offset] = sample
    finally:
        stream.close()
    return found


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
