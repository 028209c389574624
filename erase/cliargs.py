"""Argument-parsing pieces shared by the command-line tools; light, so `--help` stays fast."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind):
    """An argparse type: a number of `kind` greater than zero."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{text}'") from None
        if not value > 0 or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse
