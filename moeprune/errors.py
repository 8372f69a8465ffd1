"""Exceptions raised by the moeprune library (the CLI turns them into exit codes)."""


class MoePruneError(Exception):
    """Base class: a problem with the user's input that the message explains how to fix."""


class UnknownFamilyError(MoePruneError):
    """The checkpoint's model_type is not one of the families under routers/."""


class DataError(MoePruneError):
    """Calibration data is missing, empty, binary, or too short."""


class PlanError(MoePruneError):
    """A pruning plan or budget is invalid for the model it targets."""


class OutputExistsError(MoePruneError):
    """The output folder exists and is not empty, and --overwrite was not given."""


class StatsError(MoePruneError):
    """A statistics artifact is corrupt or belongs to another model."""


class CheckpointError(MoePruneError):
    """A checkpoint folder is damaged or disagrees with its config.json (truncated shard, wrong shape)."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT or SIGTERM); ``signum`` says which.

    A KeyboardInterrupt, so every ``except BaseException`` cleanup (temporary outputs) runs for it
    exactly as for Ctrl-C; the CLI turns it into one line and exit status ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
