"""Argument-parsing pieces shared by the command-line tools; light, so `--help` stays fast."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from erase.errors import EraseError
from prompts import MAX_SEED


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults; a flag whose default is 'unset' (None, off, empty) explains itself in
    its help instead of ending with '(default: None)'."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def positive(kind):
    """An argparse type: a number of `kind` greater than zero."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{text}'") from None
        if not value > 0 or not math.isfinite(value):  # NaN compares false; inf is no setting
            raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text}")
        return value

    return parse


def finite(text: str) -> float:
    """An argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**32 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {text}")
    return value


def add_generation_batch(group, flag: str) -> None:
    """`flag` (--batch-size, --gen-batch-size): images per generation call (erase/batching.py)."""
    group.add_argument(
        flag,
        type=positive(int),
        default=None,
        help="images per generation call (default: 32 on a CUDA GPU, 8 on the CPU); a batch that "
        "runs out of GPU memory is halved and retried, and the images do not depend on it",
    )


def set_config_defaults(parser: argparse.ArgumentParser, config) -> None:
    """Every optional flag's default from the run's config dataclass (`config`, made with its
    defaults), so that a default is written once, in the config, and --help shows it."""
    optional = {
        action.dest
        for action in parser._actions
        if not action.required and action.default is not argparse.SUPPRESS
    }
    parser.set_defaults(**{name: value for name, value in vars(config).items() if name in optional})


def run_command(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    work: Callable[[argparse.Namespace], None],
) -> int:
    """A console entry point: parse `argv`, then `work(args)`; --help and usage errors exit as
    argparse says, a user error (EraseError, or a full disk) is one stderr line and exit code 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed on one line
        return int(exit_request.code or 0)
    try:
        work(args)
    except EraseError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk is the user's to fix, wherever it is met
        from erase.artifact import no_space, one_line

        if not no_space(error, "."):
            raise
        print(
            f"{parser.prog}: error: the disk is full ({one_line(error)}): free space and run "
            "again; outputs are written atomically, so an earlier one is unchanged.",
            file=sys.stderr,
        )
        return 2
    return 0
