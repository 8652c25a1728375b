"""The edge (data plane): serve segments to viewers, checking signed URLs first.

``tokens`` is a pure core shared with the control plane, which signs what the edge verifies.
"""

from __future__ import annotations

from streamplane.edge.eviction import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    EvictionPolicy,
    LruPolicy,
    PolicyName,
    S3FifoPolicy,
    make_policy,
)
from streamplane.edge.report import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    FLEET_HEARTBEAT_PATH,
    EdgeHeartbeat,
    HeartbeatReply,
)
from streamplane.edge.tokens import (
    DEFAULT_TOKEN_NAME,
    ExpiredToken,
    ForgedToken,
    Grant,
    GrantCache,
    MalformedToken,
    MissingToken,
    NotYetValid,
    PathNotAllowed,
    TokenError,
    WrongClient,
    check_grant,
    grant_allows,
    key_from_hex,
    sign,
    signed_url,
    token_from_request,
    verify,
)

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_S",
    "DEFAULT_POLICY",
    "DEFAULT_TOKEN_NAME",
    "FLEET_HEARTBEAT_PATH",
    "POLICY_NAMES",
    "EdgeHeartbeat",
    "EvictionPolicy",
    "ExpiredToken",
    "ForgedToken",
    "Grant",
    "GrantCache",
    "HeartbeatReply",
    "LruPolicy",
    "MalformedToken",
    "MissingToken",
    "NotYetValid",
    "PathNotAllowed",
    "PolicyName",
    "S3FifoPolicy",
    "TokenError",
    "WrongClient",
    "check_grant",
    "grant_allows",
    "key_from_hex",
    "make_policy",
    "sign",
    "signed_url",
    "token_from_request",
    "verify",
]
