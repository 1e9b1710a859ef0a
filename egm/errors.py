"""What counts as a user's mistake (bad input) rather than a bug, in one place.

The ``egm`` command prints a user error as one line naming the file or field, with a non-zero
exit status and no traceback (``EGM_DEBUG=1`` shows it); every other exception is a bug and
keeps its traceback. A user error is one of :data:`USER_ERRORS`:

* :class:`InputError`, raised where input is checked at the edge (STYLE habit 7): a config
  value out of range (:func:`egm.config_checks.check_ranges`), a malformed manifest line
  (:class:`egm.data.manifest.ManifestError`), an unreadable weights file;
* ``OSError``: the file system or the network refused (a missing file or folder, a folder
  that is no checkpoint, no connection to the hub);
* ``argparse.ArgumentError``: jsonargparse could not parse the command line or a config file.

A plain ``ValueError`` is not one: Python raises it for bugs too (``a, b = [1]``).
"""

from __future__ import annotations

import argparse


class InputError(ValueError):
    """Bad input found at the edge; the message names the file or field and the value.

    A ``ValueError``, so code that catches ``ValueError`` keeps working.
    """


USER_ERRORS: tuple[type[BaseException], ...] = (InputError, OSError, argparse.ArgumentError)


def find_user_error(exc: BaseException) -> BaseException | None:
    """The first user error along ``exc``'s explicit causes (``raise ... from``), or None.

    Libraries that wrap an exception keep it as the cause: jsonargparse raises
    ``Does not validate against any of the Union subtypes`` *from* the error an ``__init__``
    raised, and its parse errors *from* the failed check. Implicit context (an exception raised
    while handling another) is not followed: that is a bug in the handler.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, USER_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def one_line(text: str) -> str:
    """``text`` with its whitespace (newlines included) collapsed: a terminal shows it whole."""
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """The message of a user error, in one line.

    A parse error of jsonargparse says where on its first line (``Parser key "trainer.max_steps":``)
    and what went wrong at the end of its chain of causes (``Expected a <class 'int'>. Got value:
    abc``). Going up from that end, a cause's message is kept with the headers that wrap it one
    line at a time (``Problem with given class_path 'egm.sft.SFTModule':``); a listing of the
    alternatives tried (``Does not validate against any of the Union subtypes ...``), which adds
    many lines, is where it stops.
    """
    if not isinstance(exc, argparse.ArgumentError) or exc.__cause__ is None:
        return one_line(exc)
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 100:
        chain.append(chain[-1].__cause__)
    i = len(chain) - 1
    while i > 0 and _wraps(chain[i - 1], chain[i]):
        i -= 1
    lines = str(exc).strip().splitlines()
    where, what = one_line(lines[0] if lines else ""), one_line(chain[i])
    if what.startswith(where):
        return what
    return f"{where} {what}" if where.endswith(":") else f"{where}: {what}"


def _wraps(outer: BaseException, inner: BaseException) -> bool:
    """``outer``'s message is ``inner``'s plus at most one line (a header)."""
    o, n = str(outer).strip(), str(inner).strip()
    return one_line(n) in one_line(o) and len(o.splitlines()) <= len(n.splitlines()) + 1
