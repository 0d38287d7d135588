"""One exception type for problems the user can fix, printed as one paragraph (exit code 2).

Scripts wrap their stage in `exit_on_user_error`, so a bad config, a missing file or a malformed
record never shows a traceback: it shows what is wrong, where, and how to fix it.
"""

from __future__ import annotations

import functools
import signal
import sys
import textwrap
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input or machine, with the place it was found and the fix."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"Fix: {self.fix}")
        return " ".join(p.rstrip() for p in parts)


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorator for script entry points: a UserError becomes one paragraph on stderr and exit 2; a
    Ctrl-C that no stage handles itself (loading weights, tokenizing) one line and exit 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(
                textwrap.fill("error: " + e.paragraph(), width=100, break_on_hyphens=False, break_long_words=False),
                file=sys.stderr,
            )
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            # stages publish only what is complete (atomic.py): what was cut short is simply not there
            print(
                "\ninterrupted (Ctrl-C): nothing unfinished was published; run the same command again "
                "(`make train` continues from its newest complete checkpoint)",
                file=sys.stderr,
            )
            sys.exit(128 + signal.SIGINT)

    return wrapper
