"""The benchmarks' one rule for bad input: a usage error that names the flag, the value and what
is allowed, raised while the arguments are parsed or checked, before anything is measured or any
process is spawned.

Argparse types (:func:`positive_int`, :func:`non_negative_int`, :func:`positive_ints`,
:func:`names_list`, :func:`model_name`, :func:`out_file`) check one value; the checks between
values (:func:`check_divides`, :func:`usage_errors` around the library's own ``ValueError``
checks) take the parser and end in ``parser.error``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from parallel.distributed import divisors


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use {what}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; use {what}")
    return value


def positive_int(text: str) -> int:
    """Argparse type: an integer >= 1 (a size, a count, a number of repetitions)."""
    return _int(text, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """Argparse type: an integer >= 0 (0 meaning none)."""
    return _int(text, 0, "an integer >= 0 (0: none)")


def positive_ints(text: str) -> list[int]:
    """Argparse type: a comma list of integers >= 1, at least one (``1024,4096``)."""
    what = "a comma list of integers >= 1, such as 1024,4096"
    values = [_int(x.strip(), 1, what) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} lists no value; use {what}")
    return values


def names_list(allowed: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """Argparse type: a comma list of ``allowed`` names, at least one; ``what`` names one item
    (``kernel``) for the message: ``unknown kernel(s) ['fwdd']; use a comma list of fwd,dkdv``."""
    allowed = tuple(allowed)

    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in allowed]
        if bad or not names:
            head = f"unknown {what}(s) {bad}" if bad else f"{text!r} lists no {what}"
            raise argparse.ArgumentTypeError(f"{head}; use a comma list of {','.join(allowed)}")
        return names

    return parse


def model_names() -> list[str]:
    """The model presets a benchmark can compose: ``models.PRESETS`` that have a Hydra config."""
    from models import PRESETS

    from ..core.paths import CONF_DIR

    return [name for name in PRESETS if (CONF_DIR / "model" / f"{name}.yaml").is_file()]


def model_name(text: str) -> str:
    """Argparse type: a model preset (``--model``)."""
    names = model_names()
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown model preset {text!r}; use one of {', '.join(names)}")
    return text


def out_file(text: str) -> Path:
    """Argparse type: a path to write a file to (``--out``); not an existing directory."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give the path of a file in it, such as "
                                         f"{path / 'results.csv'}")  # fmt: skip
    return path


def _nearest(values: Iterable[int], target: int) -> list[int]:
    """The closest of ``values`` below and above ``target`` (one when it is on one side only)."""
    values = sorted(set(values))
    below = [v for v in values if v <= target]
    above = [v for v in values if v >= target]
    return sorted({*below[-1:], *above[:1]})


def check_divides(parser: argparse.ArgumentParser, flag: str, value: int, of_flag: str, of_value: int) -> None:
    """``parser.error`` unless ``value`` (given as ``flag``) divides ``of_value`` (``of_flag``),
    naming the nearest values of either that would."""
    if of_value % value == 0:
        return
    fits = " or ".join(map(str, _nearest(divisors(of_value), value)))
    multiples = " or ".join(map(str, _nearest([m for m in (of_value // value * value, (of_value // value + 1) * value)
                                               if m > 0], of_value)))  # fmt: skip
    parser.error(f"{flag} {value} does not divide {of_flag} {of_value}; use a divisor of {of_value} for {flag} "
                 f"(nearest: {fits}) or a multiple of {value} for {of_flag} (nearest: {multiples})")  # fmt: skip


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser, context: str = "") -> Iterator[None]:
    """Turn the ``ValueError`` of a library check run inside into ``parser.error``, after
    ``context`` (the flags and values it was about)."""
    try:
        yield
    except ValueError as exc:
        parser.error(f"{context}: {exc}" if context else str(exc))


def error_text(exc: BaseException, limit: int = 300) -> str:
    """A failed measurement's ``error`` cell: the exception's type and first line."""
    first = str(exc).splitlines()[0][:limit] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"
