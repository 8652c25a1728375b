"""Errors of the placement plane: each message names what is wrong and what to do about it."""


class PlacementError(Exception):
    """Base of every error the placement plane reports to a user."""


class InputError(PlacementError):
    """A servers file, a popularity list or a previous plan is malformed or inconsistent."""


class CatalogTooLargeError(PlacementError):
    """The catalog does not fit in the cluster's storage, even one copy of each title."""
