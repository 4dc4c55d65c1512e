"""Argument types shared by the training command lines (``training.train``, ``training.plot``, ``training.metrics``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["whole_number"]


def whole_number(least: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``least`` (``least`` 0: "0 or more")."""
    bound = "0 or more" if least == 0 else f"at least {least}"

    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = f"whole number ({bound})"  # argparse names the type in its "invalid ... value" message
    return parse
