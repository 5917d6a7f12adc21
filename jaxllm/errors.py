"""The one exception type a user's mistake raises."""


class JaxLLMError(ValueError):
    """Bad input: a missing or malformed file, an unsupported model, a value out of range.

    The message names the offending value and the limit it broke. The CLI prints it as one
    line and exits non-zero.
    """
