"""Errors the runtime reports in plain words (the CLI prints them without a traceback)."""


class RuntimeUserError(RuntimeError):
    """Something about the workspace, a pack or an input that the user can fix."""


class PackRejected(RuntimeUserError):
    """A pack failed validation; the pack that was serving keeps serving."""


class InputError(RuntimeUserError, ValueError):
    """An input given to ``predict`` does not fit the loaded modalities."""
