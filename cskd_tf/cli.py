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


# The flags that ask for help; absl's own answer to them lists the flags of the main module
# only, which for a console command (`cskd-train`) or `tools/*.py` is not where they are defined,
# and exits 1.
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def _help(main, argv):
    """Prints the command's help to stdout and exits 0, if `argv` asks for it."""
    asked = next((a for a in argv[1:] if a in (*HELP_FLAGS, "--")), None)
    if asked in (None, "--"):  # After "--" come arguments, not flags.
        return
    module = sys.modules.get(main.__module__)
    by_module = flags.FLAGS.flags_by_module_dict()
    names = [main.__module__, getattr(module, "__file__", None), sys.argv[0]]
    defined = next((name for name in names if by_module.get(name)), None)
    doc = (getattr(module, "__doc__", None) or "").strip()
    if asked == "--helpfull" or defined is None:
        listed = flags.FLAGS.get_help()
    else:
        listed = flags.FLAGS.module_help(defined)
    print(f"{doc}\n\nFlags:\n{listed}" if doc else f"Flags:\n{listed}")
    sys.exit(0)


def run(main):
    """`absl.app.run(main)`, with each way to fail exiting with its status and one line.

    `--help` (or `-h`) prints the command's docstring and its own flags and exits 0,
    `--helpfull` every flag.

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

    _help(main, sys.argv)
    app.run(main_with_errors, flags_parser=_parse_flags)


def no_arguments(argv):
    """Raises UserError if `argv` holds anything but the program name."""
    if len(argv) > 1:
        raise UserError(
            f"Unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)."
        )
