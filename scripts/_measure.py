"""What the benchmarks measure with: memory, a clock of executions, medians, paired ratios, the machine.

A library of ``scripts/bench.py``, its tfmot worker and ``scripts/bench_scale.py``, not a command (the
scripts' own folder is on ``sys.path`` when one runs ``python scripts/<name>.py``). It imports nothing heavy
at module level: the tfmot worker imports it under ``TF_USE_LEGACY_KERAS=1``.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence


# ------------------------------------------------------------------ memory
def status_mib(field: str) -> Optional[float]:
    """A ``/proc/self/status`` field given in kB (``"VmRSS"``, ``"VmHWM"``) in MiB; ``None`` where it is unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class MemoryProbe:
    """Resident-set-size readings of this process (Linux ``/proc``; ``None`` elsewhere).

    :meth:`reset_peak` resets the kernel's peak-RSS mark (``VmHWM``) to the
    current RSS by writing ``5`` to ``/proc/self/clear_refs``; :meth:`peak`
    reads it. Where the reset is refused, the peak is the process's lifetime
    peak and :attr:`resettable` is False.

    Args:
      reset: reset the peak mark now (and so learn whether it can be reset); with
        ``False`` the peak stays the process's own from its start.
    """

    def __init__(self, *, reset: bool = True):
        self.resettable = self._clear() if reset else False

    @staticmethod
    def _clear() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def rss(self) -> Optional[float]:
        """Current RSS in MiB."""
        return status_mib("VmRSS")

    def peak(self) -> Optional[float]:
        """Peak RSS in MiB since the last :meth:`reset_peak` (or process start)."""
        return status_mib("VmHWM")

    def reset_peak(self) -> None:
        """Resets the peak mark to the current RSS where the kernel allows it."""
        if self.resettable:
            self._clear()


def grown(after: Optional[float], before: Optional[float]) -> Optional[float]:
    """``after - before``, at least 0; ``None`` when either reading is missing."""
    return None if after is None or before is None else max(after - before, 0.0)


# ------------------------------------------------------------------ timing
class Clock:
    """Timestamps after each execution of a training call, and the call's own start.

    A mark is ``(wall time, steps done since the call began, process CPU time)``.
    """

    def __init__(self):
        self.start = 0.0
        self.marks: List[tuple] = []

    def begin(self) -> None:
        """Starts a training call: its time origin, no marks yet."""
        self.start, self.marks = time.perf_counter(), []

    def mark(self, steps: int) -> None:
        """Records the end of an execution, ``steps`` steps into the call."""
        self.marks.append((time.perf_counter(), steps, time.process_time()))

    def mark_execution(self, k: int) -> None:
        """Records the end of one more execution of ``k`` steps (Keras ``fit`` reports executions, not steps)."""
        self.mark((len(self.marks) + 1) * k)

    def steady(self) -> tuple:
        """(seconds, steps) from the end of the first execution to the end of the last."""
        (t0, s0, _), (t1, s1, _) = self.marks[0], self.marks[-1]
        return t1 - t0, s1 - s0

    def cpu(self) -> float:
        """Process CPU seconds (every thread) over the same window as :meth:`steady`."""
        return self.marks[-1][2] - self.marks[0][2]

    def intervals(self) -> List[float]:
        """Wall seconds of every execution after the first (the first, which compiles, has no start mark)."""
        return [b[0] - a[0] for a, b in zip(self.marks[:-1], self.marks[1:])]

    def first_step(self) -> Dict[str, float]:
        """``first_execution_s``: from the call to the first execution's end; ``first_step_s``: that less
        the steady time of all but one of its steps (tracing, compilation, the input's start and one step)."""
        t, steps, _ = self.marks[0]
        seconds = t - self.start
        steady_s, steady_steps = self.steady()
        per_step = steady_s / steady_steps if steady_steps else 0.0
        return {"first_execution_s": seconds, "first_step_s": max(seconds - (steps - 1) * per_step, 0.0)}


def timed_round(clock: Clock, mem: MemoryProbe, fit: Callable[[int], None], steps: int) -> Dict[str, float]:
    """Runs ``fit(steps)`` (which marks ``clock``) from a fresh clock and peak mark: one round's numbers.

    Returns:
      ``{"seconds", "steps", "cpu_seconds", "peak_step_mib"}`` over the steady window (every execution
      after the first); ``peak_step_mib`` is the rise of the peak RSS over the RSS before the round.
    """
    gc.collect()
    before = mem.rss()
    mem.reset_peak()
    clock.begin()
    fit(steps)
    seconds, timed = clock.steady()
    return {"seconds": seconds, "steps": timed, "cpu_seconds": clock.cpu(), "peak_step_mib": grown(mem.peak(), before)}


def fit_clock(callback_base: type, clock: Clock, k: int):
    """A Keras ``fit`` callback, a ``callback_base`` (Keras 3's or tf-keras's ``Callback``), that marks
    ``clock`` at the end of every execution of ``k`` steps."""

    class FitClock(callback_base):
        def on_train_batch_end(self, batch, logs=None):
            clock.mark_execution(k)

    return FitClock()


def trainer_clock(clock: Clock):
    """A :class:`trainer.callbacks.Callback` that marks ``clock`` at the end of every execution of the trainer."""
    from trainer.callbacks import Callback

    class TrainerClock(Callback):
        def on_train_begin(self, state):
            self.base = state.step

        def on_execution_end(self, state, step_before, step, logs):
            clock.mark(step - self.base)

    return TrainerClock()


# ------------------------------------------------------------------ summaries
def median(values: Sequence[Optional[float]]) -> Optional[float]:
    """The median of the values that are not ``None``; ``None`` when none is left."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(rounds: Mapping[str, Sequence[Any]], num: str, den: str,
                 value: Callable[[Any], float]) -> Optional[float]:
    """Median over rounds of ``value(num's round) / value(den's round)`` within each round.

    Cases run interleaved, so the two rounds of a pair saw the same machine; ``None`` when
    either case did not run.
    """
    if num not in rounds or den not in rounds:
        return None
    return median([value(a) / value(b) for a, b in zip(rounds[num], rounds[den])])


def machine() -> Dict[str, Any]:
    """The processor, logical CPUs, platform and the Python, TensorFlow and Keras versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import keras
    import tensorflow as tf

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__}
