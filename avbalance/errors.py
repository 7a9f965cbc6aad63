"""The one exception type the CLI turns into a clear message instead of a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user can fix.

    The CLI prints ``str(err)`` (one paragraph, saying what is wrong and what to do) and
    exits with ``exit_code``. Programming errors stay ordinary exceptions.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
