"""Errors a user can act on. None of them is worth retrying: the same input fails the same way."""


class PrestoError(Exception):
    """Base class: a deterministic failure caused by the user's input, params or data."""


class ParamsError(PrestoError):
    """params.yaml (or an override) holds an unknown key, a wrong type or an impossible value."""


class InputError(PrestoError):
    """An input file or folder cannot be used (missing, unreadable, wrong format)."""


class DivergenceError(PrestoError):
    """Training produced NaN/Inf or diverged; the last good checkpoint is kept."""
