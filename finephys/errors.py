"""The one exception type for bad user input.

Every check on something a user handed us (a file, a shape, a value, a path) raises
``InputError`` with one line that names what is wrong and what was expected. The CLI prints
that line and exits non-zero, without a traceback.
"""


class InputError(ValueError):
    """Bad user input; the message is one line naming the problem and the expectation."""
