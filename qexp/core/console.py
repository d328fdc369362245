"""Console output of qexp's command-line tools, through `logging`.

`console(prog)` is the logger a CLI speaks through: INFO lines go to stdout as they are
(reports, tables), WARNING and above to stderr (one-line errors such as
`qexp: config error: ...`). It does not propagate, so Hydra's job logging (which writes each
job's log file) never prints a line twice.
"""

from __future__ import annotations

import logging
import sys


class _StdStream(logging.StreamHandler):
    """A handler writing to whatever sys.stdout / sys.stderr is at the time of the record."""

    def __init__(self, which: str) -> None:
        self.which = which
        super().__init__()

    @property
    def stream(self):  # noqa: D102
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def console(prog: str) -> logging.Logger:
    """The console logger of CLI `prog` (created once; plain `%(message)s` lines)."""
    log = logging.getLogger(f"qexp.core.console.{prog}")
    if not log.handlers:
        out = _StdStream("stdout")
        out.addFilter(_Below(logging.WARNING))
        err = _StdStream("stderr")
        err.setLevel(logging.WARNING)
        for h in (out, err):
            h.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
