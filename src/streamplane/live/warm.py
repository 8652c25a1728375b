"""Warming an edge before a scheduled event: what its first viewers will ask for. Pure.

A viewer joining a live channel asks, in order, for the master playlist, a media playlist, its
initialisation segment, and the parts from the one it joins at (PART-HOLD-BACK behind the live
edge) onward. The control plane asks each planned edge for exactly these while the event is
warming (``control/warm.py``), through the edge as a viewer would, so the edge's cache takes
them from the origin then: the first viewers' requests for them are edge hits, and the origin
is not asked by every edge at the same moment when the audience arrives. Preload hints and
blocking reloads name objects that do not exist yet: there is nothing to fetch for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamplane.player.live import join_part, parse_live_playlist, parse_variants

__all__ = ["EdgeWarmth", "master_targets", "media_targets"]


def master_targets(master: str) -> list[str]:
    """The media playlists a master playlist lists (its variants, then its audio and subtitle
    renditions), as written in it. ManifestError when it is not a master playlist."""
    uris = [v.uri for v in parse_variants(master)]
    for line in master.splitlines():
        if line.startswith("#EXT-X-MEDIA:"):
            _, found, rest = line.partition('URI="')
            if found:
                uris.append(rest.partition('"')[0])
    return list(dict.fromkeys(uris))


def media_targets(media: str) -> list[str]:
    """What a viewer joining now fetches after this LL-HLS media playlist: its
    initialisation segment, then the parts from the one it joins at to the newest, as written
    in it. ManifestError when it is not a low-latency media playlist."""
    playlist = parse_live_playlist(media)
    targets = [playlist.map_uri] if playlist.map_uri else []
    joined = join_part(playlist)
    if joined is not None:
        at = playlist.parts.index(joined)
        targets += [part.uri for part in playlist.parts[at:]]
    return targets


@dataclass(frozen=True)
class EdgeWarmth:
    """The last warming of one edge for one channel."""

    edge: str
    at: float  # UNIX seconds of the round
    objects: int  # fetched through the edge, every answer 200
    failed: tuple[str, ...]  # what the edge could not give (the object and why)

    @property
    def warm(self) -> bool:
        return self.objects > 0 and not self.failed

    @property
    def why(self) -> str:
        if self.failed:
            return f"{len(self.failed)} not fetched: " + "; ".join(self.failed[:3])
        if not self.objects:
            return "nothing to fetch yet"
        return f"{self.objects} objects fetched through the edge"
