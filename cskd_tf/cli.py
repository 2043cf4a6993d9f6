"""What every command line of cskd_tf shares: one `error:` line and an exit status, never a traceback.

Exit statuses:

* 0: done;
* 1: a crash, a diverged run, or a fault of the machine (`Fault`: a disk that fills up,
  a lost worker);
* 2: a mistake of the user's (`UserError`), answered before anything is written;
* 3 (`EXIT_STOPPED`): stopped by a signal (SIGTERM, SIGINT, SIGUSR1; `Stopped`), the state
  saved where it could be: rerunning the same command resumes.
"""

import sys

from absl import app
from absl import flags

from cskd_tf.errors import UserError

# Not 128 + the signal's number, which a shell reports for a process the signal killed:
# this process handled the signal, saved and exited, and one status for the three signals
# lets a job script tell "stopped, rerun me" from "killed".
EXIT_STOPPED = 3


class Stopped(Exception):
    """A run that stopped on a signal; the message says where and what was saved (exit 3)."""


class Fault(Exception):
    """A failure of the machine, not of the code or the user: a file that cannot be written,
    a lost worker. The message names it and the last intact checkpoint (exit 1)."""


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = str(err).removeprefix("ERROR:: ")  # absl's prefix for unreadable flagfiles.
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run(main):
    """`absl.app.run(main)`, with each way to fail exiting with its status and one line.

    Args:
      main: callable(argv). Raises `UserError` for a mistake of the user's (wrong
        flag value, missing data, ...; exit 2), `FloatingPointError` when training
        diverged or `Fault` for a failure of the machine (exit 1), `Stopped` when
        a signal stopped it (exit 3); each prints its message as one `error:`
        line. A `KeyboardInterrupt` that reaches here exits 3 too.
    """

    def main_with_errors(argv):
        try:
            main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except (FloatingPointError, Fault) as err:  # Not the user's typo, but no crash either.
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except Stopped as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_STOPPED)
        except KeyboardInterrupt:
            print("error: interrupted by Ctrl-C.", file=sys.stderr)
            sys.exit(EXIT_STOPPED)

    app.run(main_with_errors, flags_parser=_parse_flags)


def no_arguments(argv):
    """Raises UserError if `argv` holds anything but the program name."""
    if len(argv) > 1:
        raise UserError(
            f"Unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)."
        )
