"""When the callback takes a snapshot: a validated description, resolved once per run."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """The training steps at which susceptibilities are estimated (the union of all rules).

    Attributes:
        every: every ``every`` optimizer steps (``every, 2*every, ...``).
        steps: explicit optimizer steps.
        log_spaced: about this many steps spaced evenly in ``log(step)`` between 1 and the
            run's last step; developmental changes are fastest early, so this is the default.
        on_save: at every checkpoint save (the result is also written into the checkpoint).
        at_start: at step 0, before the first update.
        at_end: after the last step.
    """

    every: int | None = None
    steps: tuple[int, ...] = ()
    log_spaced: int | None = None
    on_save: bool = False
    at_start: bool = False
    at_end: bool = False

    def __post_init__(self) -> None:
        for name in ("every", "log_spaced"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"Schedule.{name} must be a positive integer or None, "
                                 f"got {value!r}")
        steps = tuple(self.steps)
        bad = [s for s in steps if not isinstance(s, (int, np.integer)) or s < 0]
        if bad:
            raise ValueError(f"Schedule.steps must be non-negative integers, got {bad}")
        object.__setattr__(self, "steps", tuple(sorted(set(int(s) for s in steps))))

    def planned_steps(self, max_steps: int) -> set[int]:
        """The steps in ``0..max_steps`` chosen by ``every``, ``steps``, ``log_spaced``,
        ``at_start`` and ``at_end`` (checkpoint saves are decided as they happen)."""
        planned = {s for s in self.steps if s <= max_steps}
        if self.every:
            planned.update(range(self.every, max_steps + 1, self.every))
        if self.log_spaced and max_steps >= 1:
            points = np.geomspace(1, max_steps, num=self.log_spaced)
            planned.update(int(round(p)) for p in points)
        if self.at_start:
            planned.add(0)
        if self.at_end:
            planned.add(max_steps)
        return planned

    def check(self, max_steps: int, saves: bool = True) -> None:
        """Raise ``ValueError`` if the schedule selects no step of a ``max_steps`` run
        (``saves``: whether the run saves checkpoints at all); warn if ``on_save`` is set
        in a run that never saves."""
        selects_saves = self.on_save and saves
        if not selects_saves and not self.planned_steps(max_steps):
            saving = "" if saves else ", which saves no checkpoint"
            raise ValueError(f"The snapshot schedule {self} selects no step of this run "
                             f"(steps 0..{max_steps}{saving}); add steps, lower `every`, or "
                             "set log_spaced / on_save / at_end")
        if self.on_save and not saves:
            warnings.warn("Schedule(on_save=True) in a run with save_strategy='no' takes no "
                          "snapshot at saves (there are none); set a save_strategy or "
                          "schedule steps", stacklevel=3)

    @classmethod
    def coerce(cls, value: Schedule | int | Iterable[int] | None) -> Schedule:
        """A :class:`Schedule` from shorthand: an int means ``every``, a list ``steps``,
        None the default (16 log-spaced steps and the end)."""
        if value is None:
            return cls(log_spaced=16, at_end=True)
        if isinstance(value, Schedule):
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return cls(every=int(value))
        if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
            return cls(steps=tuple(value))
        raise TypeError(f"schedule must be a Schedule, an int (every N steps) or a list of "
                        f"steps, got {value!r}")
