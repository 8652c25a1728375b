"""Live channels: contribution ingest over SRT, a live ladder as CMAF, low-latency HLS.

``playlist`` (LL-HLS playlists and the blocking-reload rule) and ``track`` (fragments grouped
into parts and segments within a DVR window) are pure cores; ``ingest`` (ffmpeg and the files),
``origin`` (HTTP with blocking reloads), ``feed`` (a test feed) and ``service`` are shells.
"""

from __future__ import annotations

from streamplane.live.feed import FeedSource, feed_args, srt_url
from streamplane.live.ingest import (
    Channel,
    ChannelSettings,
    LiveError,
    Rung,
    encoder_args,
    feed_problem,
    parse_rungs,
)
from streamplane.live.origin import cache_control, live_app
from streamplane.live.playlist import (
    BadReload,
    Part,
    Rendition,
    Segment,
    Window,
    master_playlist,
    media_playlist,
    reload_ready,
)
from streamplane.live.schedule import (
    LEAD_S,
    LIVE_S,
    Event,
    EventPlan,
    EventReadiness,
    GatewayNeeds,
    event_phase,
    gateway_needs,
    plan_event,
    read_events,
    readiness,
    warm_edges,
)
from streamplane.live.service import SyntheticOrigin, serve_channel
from streamplane.live.track import Fragment, TrackPackager

__all__ = [
    "LEAD_S",
    "LIVE_S",
    "BadReload",
    "Channel",
    "ChannelSettings",
    "Event",
    "EventPlan",
    "EventReadiness",
    "FeedSource",
    "Fragment",
    "GatewayNeeds",
    "LiveError",
    "Part",
    "Rendition",
    "Rung",
    "Segment",
    "SyntheticOrigin",
    "TrackPackager",
    "Window",
    "cache_control",
    "encoder_args",
    "event_phase",
    "feed_args",
    "feed_problem",
    "gateway_needs",
    "live_app",
    "master_playlist",
    "media_playlist",
    "parse_rungs",
    "plan_event",
    "read_events",
    "readiness",
    "reload_ready",
    "serve_channel",
    "srt_url",
    "warm_edges",
]
