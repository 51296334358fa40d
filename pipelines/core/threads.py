"""Native thread budgets: how many cores a model fit may use.

Scikit-learn's gradient boosting and BLAS run OpenMP threads on every core, and an idle
OpenMP thread spins before it sleeps. Two trainings on one 2-core machine therefore fought
each other: 2.2-2.4x the time of running them in series. Each training holds a slot (a file
lock in the temp folder, released when the process ends, however it ends) while it runs,
and every fit gets the cores divided by the number of slots held at that moment, so a
training alone uses every core and two at once use half each. `train.threads` fixes the
number instead.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MAX_SLOTS = 64


def slots_folder() -> Path:
    """Where the slots are: one folder per machine (the temp folder's), or the one
    $LOOPLINE_TRAINING_SLOTS names (trainings that should count only each other)."""
    return Path(os.environ.get("LOOPLINE_TRAINING_SLOTS") or Path(tempfile.gettempdir()) / "loopline-training-slots")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _slot_files() -> list[Path]:
    folder = slots_folder()
    folder.mkdir(parents=True, exist_ok=True)
    return [folder / f"slot-{i:02d}.lock" for i in range(MAX_SLOTS)]


def _held(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


_MINE: list[Path] = []  # slots this process holds (a process may nest trainings)


@contextmanager
def training_slot() -> Iterator[None]:
    """Count this process among the trainings running on the machine while the block runs."""
    if _MINE:  # already counted (a flow task inside a training, the DVC stage inside `loopline run`)
        yield
        return
    for path in _slot_files():
        fh = open(path, "a")  # noqa: SIM115  (held open: the lock lives as long as the file handle)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        _MINE.append(path)
        try:
            yield
        finally:
            _MINE.remove(path)
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        return
    yield  # every slot taken: run uncounted rather than fail


def running_trainings() -> int:
    """Trainings running on this machine now, this one included."""
    others = sum(_held(p) for p in _slot_files() if p not in _MINE)
    return others + (1 if _MINE else 0)


def fit_threads(configured: int) -> int:
    """The threads a fit may use now: `configured` when set (train.threads > 0), else the
    cores divided among the running trainings."""
    if configured > 0:
        return configured
    return max(1, available_cores() // max(1, running_trainings()))


@contextmanager
def thread_budget(threads: int, torch_model: bool = False) -> Iterator[None]:
    """Bound OpenMP and BLAS (and, for a torch model, torch's intra-op pool) to `threads`
    inside the block."""
    import sys

    from threadpoolctl import threadpool_limits

    if torch_model:
        import torch
    else:
        torch = sys.modules.get("torch")  # type: ignore[assignment]  # bounded too when something loaded it
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=threads):
        if torch is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)
