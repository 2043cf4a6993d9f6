"""What every command line of cskd_tf shares: one `error:` line and an exit status, never a traceback."""

import sys

from absl import app
from absl import flags

from cskd_tf.errors import UserError


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err).removeprefix("ERROR:: ")  # absl's prefix for unreadable flagfiles.
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run(main):
    """`absl.app.run(main)`, with a user's mistake exiting 2 and a diverged run exiting 1.

    Args:
      main: callable(argv). Raises `UserError` for a mistake of the user's (wrong
        flag value, missing data, ...) and `FloatingPointError` when training
        diverged; either prints its message as one `error:` line.
    """

    def main_with_errors(argv):
        try:
            main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except FloatingPointError as err:  # A diverged run: not the user's typo, but no crash.
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    app.run(main_with_errors, flags_parser=_parse_flags)


def no_arguments(argv):
    """Raises UserError if `argv` holds anything but the program name."""
    if len(argv) > 1:
        raise UserError(
            f"Unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)."
        )
