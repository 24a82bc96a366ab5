"""The training loader, and where a rank's data stream stands: what a checkpoint keeps of it.

Each ``iter()`` (each epoch, and Lightning's extra ones on a restart) starts the stream at the
trainer's position, ``position() -> (epoch, batches of that epoch already trained)``, with fresh
workers that get it. Training batches carry their worker's position (``ldm.data.streams``); the
loader takes it off and keeps the latest of every worker, so that ``position_state()`` can say, for
the batches trained so far (Lightning fetches ahead of training), where each worker's stream was:
that is what a checkpoint stores, per rank, and what a resumed run starts its workers from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ldm.data.streams import POSITION_KEY, StreamStart, WorkerPosition, batches_of_worker

WorkerStates = Sequence[dict[str, Any] | None]


class TrainingLoader:
    """The training loader over ``stream`` (a ``ShardStream`` or ``FolderStream``).

    make_loader: stream -> a DataLoader over it (batch_size=None, the stream batches itself).
    num_workers: the DataLoader's workers (0: the main process, one stream).
    position: () -> (epoch, batches of it this rank trained on).
    start_states: (epoch, done) -> the per-worker states a checkpoint holds for that position, or None.
    """

    def __init__(
        self,
        stream: Any,
        make_loader: Callable[[Any], Iterable[Any]],
        num_workers: int,
        position: Callable[[], tuple[int, int]],
        start_states: Callable[[int, int], WorkerStates | None] | None = None,
    ):
        self.stream = stream
        self.make_loader = make_loader
        self.num_workers = max(num_workers, 1)
        self.position = position
        self.start_states = start_states or (lambda epoch, done: None)
        # (batch number in the epoch, its position) of the batches handed out lately: enough to
        # cover every worker's last batch before the trained count, however far Lightning fetched ahead
        self.history: deque[tuple[int, WorkerPosition]] = deque(maxlen=2 * self.num_workers + 8)
        self._iteration: tuple[int, int, list[dict[str, Any] | None]] | None = None  # (epoch, first number, states)
        self._consistent = True  # every batch came from the worker the round-robin order says

    def __iter__(self) -> Iterator[Any]:
        epoch, done = self.position()
        states = self.start_states(epoch, done)
        self.stream.start = StreamStart(epoch, done, states)
        self._iteration = (epoch, done, list(states) if states else [None] * self.num_workers)
        self.history.clear()
        self._consistent = True
        return self._batches(iter(self.make_loader(self.stream)), done)

    def _batches(self, batches: Iterator[Any], first: int) -> Iterator[Any]:
        for number, batch in enumerate(batches, start=first):
            position = batch.pop(POSITION_KEY, None) if isinstance(batch, dict) else None
            if position is not None:
                if position.worker != number % self.num_workers:
                    self._consistent = False
                self.history.append((number, position))
            yield batch

    def position_state(self) -> dict[str, Any]:
        """This rank's data position after the batches trained so far: {"epoch", "done", "workers":
        per logical worker its stream's state (None: at the epoch's start), or None when unknown}."""
        epoch, done = self.position()
        if self._iteration is None or self._iteration[0] != epoch or done < self._iteration[1]:
            states = self.start_states(epoch, done)  # not iterated since the restore (or a new epoch)
            return {"epoch": epoch, "done": done, "workers": list(states) if states else None}
        _, first, workers = self._iteration
        workers = list(workers)
        latest = [-1] * self.num_workers
        for number, position in self.history:
            if number < done:
                workers[position.worker] = position.state
                latest[position.worker] = number
        for worker in range(self.num_workers):
            made = batches_of_worker(worker, self.num_workers, done)
            last_needed = worker + (made - 1) * self.num_workers  # the worker's last batch before `done`
            if made and last_needed >= first and latest[worker] != last_needed:
                return {"epoch": epoch, "done": done, "workers": None}  # not seen: cannot say where it is
        if not self._consistent:
            return {"epoch": epoch, "done": done, "workers": None}
        return {"epoch": epoch, "done": done, "workers": workers}
