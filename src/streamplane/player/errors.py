"""Errors of the player plane: each message names the file, the place in it and what is wrong."""


class PlayerError(Exception):
    """Base of every error the player plane reports to a user."""


class TraceError(PlayerError):
    """A network trace file is malformed (the message names the line or the period)."""


class ManifestError(PlayerError):
    """A simulator manifest or title.json cannot be used (the message names the field)."""


class AbrError(PlayerError):
    """An ABR algorithm name is unknown, or an algorithm returned a rung that does not exist."""
