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
