"""The one exception type for bad input: the CLI prints its message as a single line and exits 2."""


class WeightsmithError(Exception):
    """A refusal the user can act on. The message names the file, tensor or option and the fix."""
