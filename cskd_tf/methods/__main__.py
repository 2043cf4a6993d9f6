r"""Prints the README's methods table, or writes it between the README's markers.

    python -m cskd_tf.methods                     # the table, on standard output
    python -m cskd_tf.methods --readme=README.md  # between <!-- methods:begin/end -->
"""

from absl import flags

from cskd_tf import cli, methods

BEGIN_MARKER = "<!-- methods:begin -->"
END_MARKER = "<!-- methods:end -->"
_README = flags.DEFINE_string("readme", None, "Write the table into this README's block.")


def main(argv):
    cli.no_arguments(argv)
    table = methods.markdown_table()
    if _README.value is None:
        print(table, end="")
        return
    from cskd_tf import report  # pylint: disable=g-import-not-at-top

    changed = report.update_readme(_README.value, table, BEGIN_MARKER, END_MARKER)
    print(f"{_README.value}: methods table {'updated' if changed else 'up to date'}.")


if __name__ == "__main__":
    cli.run(main)
