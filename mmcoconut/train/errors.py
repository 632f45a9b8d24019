"""Run-stopping errors of training (exit code 1); configuration errors are mmcoconut.config.ConfigError (exit 2)."""


class TrainError(RuntimeError):
    """A run-stopping condition with a clear one-line message (exit code 1). `agreed`: every rank raises it at
    the same point (reported once, by rank 0)."""

    def __init__(self, msg: str, agreed: bool = True):
        super().__init__(msg)
        self.agreed = agreed
