"""The pipeline's one error: a stage failed; the message names the stage and the command to rerun."""


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and the command to rerun."""
