"""User-facing errors: one line that names the problem and says what to do."""


class HetinferError(Exception):
    """An error caused by the user's input or machine; the CLI prints it without a traceback."""


class ArtifactError(HetinferError):
    """A hetinfer artefact (profile, predictors, plan, store) is missing, corrupt or of another version."""
