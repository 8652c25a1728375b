"""Errors of the media plane: each message names what is wrong and what to do."""


class MediaError(Exception):
    """Base of every error the media plane reports to a user."""


class SourceError(MediaError):
    """The source video cannot be encoded (not a video, truncated, zero-length, ...)."""


class EncodeError(MediaError):
    """An encode or a measurement failed even after its retries."""


class DiskFullError(MediaError):
    """The disk filled up while writing; nothing half-written was published."""


class PackagingError(MediaError):
    """The encoded media could not be packaged (misaligned segments, unreadable fMP4, ...)."""
