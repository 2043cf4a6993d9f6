"""The one exception type for user mistakes."""


class UserError(Exception):
    """A mistake the user can fix: bad flag, missing data, unknown name.

    The CLI prints its message as one sentence and exits with status 2, without
    a traceback.
    """
