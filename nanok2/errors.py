"""Errors that mean "your input is wrong", as opposed to a bug in nanok2.

Library code raises these with a message that names what was wrong and where (the tensor, the file,
the key, the known alternatives); the `nanok2` command prints the message alone, without a traceback.
"""


class NanoK2Error(ValueError):
    """Bad input: a wrong config, a truncated checkpoint, a malformed request, an unknown name."""


class ConfigError(NanoK2Error):
    """A model config or preset that is unknown or inconsistent."""


class CheckpointError(NanoK2Error):
    """A checkpoint that is missing, truncated, corrupt, or does not match the model config."""
