"""Errors of the steering plane: each message names what is wrong and what to do about it."""


class SteeringError(Exception):
    """Base of every error the steering plane reports."""


class PrefixError(SteeringError, ValueError):
    """A prefix is not an IPv4 or IPv6 network in CIDR notation, or has host bits set."""


class AddressError(SteeringError, ValueError):
    """A client address is not an IPv4 or IPv6 address."""


class RouteError(SteeringError, ValueError):
    """A route is malformed: bad prefix, empty site, unknown relation, negative MED..."""


class CzmapError(SteeringError):
    """A coverage-zone file is not in Apache Traffic Control's czmap.json layout."""


class GeoError(SteeringError):
    """The GeoLite2 database cannot be opened."""


class BgpError(SteeringError):
    """The BGP feed cannot start or run."""


class ExabgpNotFound(BgpError):
    """The ``exabgp`` program is not installed where the feed looks for it."""


class BgpMessageError(SteeringError, ValueError):
    """A line from ExaBGP's JSON API is not a message the feed understands."""
