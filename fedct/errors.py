"""The one exception type the CLI turns into a one-line error and exit code 2."""


class FedctError(Exception):
    """Bad input or an impossible request; the message names the file, key or value at fault."""
