"""The errors of bad input that the command line reports as one line (no traceback): each message names
the file or argument and the field. Imports nothing, so every layer may raise them."""


class ConfigError(ValueError):
    """A configuration that cannot describe a Mixtral model; the message names the source and the field."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the tensor or field."""


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit the model; the message names the file."""
