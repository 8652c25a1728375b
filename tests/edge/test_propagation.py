"""Token propagation into HLS playlists and DASH MPDs, on byte strings."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from urllib.parse import parse_qsl, urlsplit

import m3u8
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamplane.edge import propagation
from streamplane.edge.propagation import Carry, carry, propagate, propagate_dash, propagate_hls
from streamplane.edge.tokens import MalformedToken, token_from_request
from streamplane.media import manifest
from tests.media.test_manifest import make_title

TOKEN = "exp=1700003600~acl=/tiny/*~id=s-1~kid=k1~hmac=" + "ab" * 32
T = f"__token__={TOKEN}"
CARRY = carry("__token__", TOKEN, "edge.example:8081")


def _token_of(uri: str) -> str | None:
    return token_from_request(urlsplit(uri).query, None)


# -- HLS, by example ---------------------------------------------------------------------------


def test_a_master_playlist_hands_the_token_to_its_variants_and_renditions() -> None:
    master = (
        b"#EXTM3U\n"
        b"#EXT-X-VERSION:7\n"
        b"#EXT-X-INDEPENDENT-SEGMENTS\n"
        b'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="en",LANGUAGE="en",DEFAULT=YES,'
        b'AUTOSELECT=YES,CHANNELS="2",URI="a/en/playlist.m3u8"\n'
        b'#EXT-X-STREAM-INF:BANDWIDTH=300000,CODECS="avc1.64000d,mp4a.40.2",AUDIO="aud"\n'
        b"v/180p/playlist.m3u8\n"
        b'#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=9000,URI="v/180p/iframes.m3u8"\n'
        b'#EXT-X-SESSION-DATA:DATA-ID="com.example.lyrics",URI="lyrics.json"\n'
        b'#EXT-X-CONTENT-STEERING:SERVER-URI="/steer?session=1",PATHWAY-ID="a"\n'
    )
    assert propagate_hls(master, CARRY) == (
        b"#EXTM3U\n"
        b"#EXT-X-VERSION:7\n"
        b"#EXT-X-INDEPENDENT-SEGMENTS\n"
        b'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="aud",NAME="en",LANGUAGE="en",DEFAULT=YES,'
        b'AUTOSELECT=YES,CHANNELS="2",URI="a/en/playlist.m3u8?' + T.encode() + b'"\n'
        b'#EXT-X-STREAM-INF:BANDWIDTH=300000,CODECS="avc1.64000d,mp4a.40.2",AUDIO="aud"\n'
        b"v/180p/playlist.m3u8?" + T.encode() + b"\n"
        b'#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=9000,URI="v/180p/iframes.m3u8?' + T.encode() + b'"\n'
        b'#EXT-X-SESSION-DATA:DATA-ID="com.example.lyrics",URI="lyrics.json?' + T.encode() + b'"\n'
        b'#EXT-X-CONTENT-STEERING:SERVER-URI="/steer?session=1&'
        + T.encode()
        + b'",PATHWAY-ID="a"\n'
    )


def test_a_low_latency_media_playlist_hands_it_to_every_part_hint_and_report() -> None:
    playlist = (
        b"#EXTM3U\r\n"
        b"#EXT-X-TARGETDURATION:4\r\n"
        b"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=3.0\r\n"
        b'#EXT-X-MAP:URI="init.mp4",BYTERANGE="720@0"\r\n'
        b'#EXT-X-KEY:METHOD=AES-128,URI="key.bin",IV=0x0123456789abcdef0123456789abcdef\r\n'
        b"#EXTINF:4.000000,\r\n"
        b"seg_1.m4s\r\n"
        b'#EXT-X-PART:DURATION=1.0,URI="seg_2.m4s",BYTERANGE="1000@0",INDEPENDENT=YES\r\n'
        b'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="seg_2.m4s",BYTERANGE-START=1000\r\n'
        b'#EXT-X-RENDITION-REPORT:URI="../540p/playlist.m3u8",LAST-MSN=2,LAST-PART=0\r\n'
    )
    out = propagate_hls(playlist, CARRY)
    t = T.encode()
    assert out.split(b"\r\n") == [
        b"#EXTM3U",
        b"#EXT-X-TARGETDURATION:4",
        b"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=3.0",
        b'#EXT-X-MAP:URI="init.mp4?' + t + b'",BYTERANGE="720@0"',
        b'#EXT-X-KEY:METHOD=AES-128,URI="key.bin?' + t + b'",IV=0x0123456789abcdef0123456789abcdef',
        b"#EXTINF:4.000000,",
        b"seg_1.m4s?" + t,
        b'#EXT-X-PART:DURATION=1.0,URI="seg_2.m4s?' + t + b'",BYTERANGE="1000@0",INDEPENDENT=YES',
        b'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="seg_2.m4s?' + t + b'",BYTERANGE-START=1000',
        b'#EXT-X-RENDITION-REPORT:URI="../540p/playlist.m3u8?' + t + b'",LAST-MSN=2,LAST-PART=0',
        b"",
    ]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("seg_1.m4s", f"seg_1.m4s?{T}"),
        ("/tiny/v/180p/seg_1.m4s", f"/tiny/v/180p/seg_1.m4s?{T}"),
        ("../a/seg_1.m4s?x=1&y", f"../a/seg_1.m4s?x=1&y&{T}"),
        ("seg_1.m4s?__token__=stale&x=1", f"seg_1.m4s?x=1&{T}"),
        ("seg_1.m4s?%5F%5Ftoken__=stale", f"seg_1.m4s?{T}"),  # the edge would decode the name
        ("seg_1.m4s#t=2", f"seg_1.m4s?{T}#t=2"),
        ("seg_1.m4s?#t=2", f"seg_1.m4s?{T}#t=2"),
        ("http://edge.example:8081/tiny/seg_1.m4s", f"http://edge.example:8081/tiny/seg_1.m4s?{T}"),
        ("HTTP://EDGE.example:8081/s.m4s", f"HTTP://EDGE.example:8081/s.m4s?{T}"),
        ("//edge.example:8081/tiny/seg_1.m4s", f"//edge.example:8081/tiny/seg_1.m4s?{T}"),
        # Elsewhere: another host, another port, another scheme, or not a URL at all.
        ("https://keys.example/k1", "https://keys.example/k1"),
        ("http://edge.example:8082/tiny/seg_1.m4s", "http://edge.example:8082/tiny/seg_1.m4s"),
        ("//cdn.example/seg_1.m4s", "//cdn.example/seg_1.m4s"),
        ("skd://key-42", "skd://key-42"),
        ("data:text/plain;base64,AAAA", "data:text/plain;base64,AAAA"),
        ("ftp://edge.example:8081/x", "ftp://edge.example:8081/x"),
        ("#only-a-fragment", "#only-a-fragment"),
        ("", ""),
    ],
)
def test_only_uris_back_to_this_edge_get_the_token(uri: str, expected: str) -> None:
    assert propagation.with_token(uri, CARRY) == expected


def test_default_ports_are_the_same_host() -> None:
    on_80 = carry("__token__", "t", "Edge.Example:80")
    assert on_80.host == "edge.example"
    assert (
        propagation.with_token("http://edge.example/a.m4s", on_80)
        == "http://edge.example/a.m4s?__token__=t"
    )
    assert propagation.with_token("http://edge.example:80/a.m4s", on_80).endswith("?__token__=t")
    # Without a Host header only relative references are this edge's.
    no_host = carry("__token__", "t")
    assert (
        propagation.with_token("http://edge.example/a.m4s", no_host) == "http://edge.example/a.m4s"
    )
    assert propagation.with_token("a.m4s", no_host) == "a.m4s?__token__=t"


def test_what_is_not_a_playlist_or_has_nothing_to_rewrite_comes_back_as_it_was() -> None:
    for body in (
        b"",
        b"not a playlist\nseg_1.m4s\n",
        b"\x00\x01binary",
        b"#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-ENDLIST\n",
        b"#EXTM3U\n#EXTINF:4,\nhttps://other.example/seg_1.m4s\n",
    ):
        assert propagate_hls(body, CARRY) is body
        assert propagate("/t/x.m3u8", body, CARRY) is body
    segment = b"#EXTM3U\nseg_1.m4s\n"  # a segment is never a manifest, whatever its bytes
    assert propagate("/t/seg_1.m4s", segment, CARRY) is segment


def test_a_byte_order_mark_and_lines_that_are_not_attribute_lists_are_kept() -> None:
    playlist = (
        b'\xef\xbb\xbf#EXTM3U\n#EXTINF:4,URI="title"\n# a comment URI="x"\n'
        b'#EXT-X-BROKEN:URI="a.m4s" trailing\n#EXT-X-MAP:URI="i.mp4",\nseg_1.m4s\n'
    )
    assert propagate_hls(playlist, CARRY) == (
        b'\xef\xbb\xbf#EXTM3U\n#EXTINF:4,URI="title"\n# a comment URI="x"\n'
        b'#EXT-X-BROKEN:URI="a.m4s" trailing\n#EXT-X-MAP:URI="i.mp4?'
        + T.encode()
        + b'",\nseg_1.m4s?'
        + T.encode()
        + b"\n"
    )


def test_the_token_is_escaped_so_it_cannot_break_out_of_a_uri() -> None:
    hostile = "a\"b,c\nd'e<f>g&h$i#j?k%l m"
    c = carry("__token__", hostile)
    out = propagate_hls(b'#EXTM3U\n#EXT-X-MAP:URI="init.mp4"\nseg_1.m4s\n', c)
    assert out == (
        b'#EXTM3U\n#EXT-X-MAP:URI="init.mp4?__token__=a%22b%2Cc%0Ad%27e%3Cf%3Eg%26h%24i%23j%3Fk%25l%20m"\n'
        b"seg_1.m4s?__token__=a%22b%2Cc%0Ad%27e%3Cf%3Eg%26h%24i%23j%3Fk%25l%20m\n"
    )
    assert _token_of(out.splitlines()[2].decode()) == hostile


def test_the_etag_of_a_rewritten_body_is_its_own() -> None:
    base = b'"65a1b2c3-1f4"'
    tagged = propagation.etag(base, CARRY)
    assert tagged.startswith(b'"65a1b2c3-1f4-t') and tagged.endswith(b'"') and tagged != base
    assert propagation.etag(base, CARRY) == tagged  # stable, so a 304 can answer it
    assert propagation.etag(base, carry("__token__", TOKEN + "x")) != tagged
    assert propagation.etag(base, carry("__token__", TOKEN, "other:1")) != tagged


def test_a_carry_needs_a_name_and_a_token() -> None:
    with pytest.raises(ValueError, match="name and a value"):
        carry("", "t")
    with pytest.raises(ValueError, match="name and a value"):
        carry("__token__", "")
    assert propagation.rewrites("/t/master.m3u8") and propagation.rewrites("/t/manifest.mpd")
    assert not propagation.rewrites("/t/v/1/seg_1.m4s")


def test_the_carry_of_a_request_comes_from_its_raw_query_and_host() -> None:
    query = f"x=1&__token__={TOKEN}".encode()
    assert propagation.carry_from_query("__token__", query, b"edge.example:8081") == CARRY
    assert propagation.carry_from_query("__token__", b"__token__=a%7Eb", None) == Carry(
        "__token__", "a~b"
    )
    assert propagation.carry_from_query("__token__", b"", None) is None
    assert propagation.carry_from_query("__token__", b"other=1", b"edge") is None
    with pytest.raises(MalformedToken):
        propagation.carry_from_query("__token__", b"__token__=a&__token__=b", None)


# -- DASH, by example --------------------------------------------------------------------------


def test_an_mpd_hands_the_token_to_its_templates_and_segment_urls() -> None:
    mpd = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static">\n'
        b"  <Location>https://cdn.example/tiny/manifest.mpd</Location>\n"
        b'  <Period id="0">\n'
        b'    <BaseURL serviceLocation="a">media/</BaseURL>\n'
        b'    <AdaptationSet id="0" contentType="video">\n'
        b'      <SegmentTemplate timescale="90000" initialization="v/$RepresentationID$/init.mp4"'
        b' media="v/$RepresentationID$/seg_$Number$.m4s" startNumber="1">\n'
        b'        <SegmentTimeline><S t="0" d="360000" r="2" /></SegmentTimeline>\n'
        b"      </SegmentTemplate>\n"
        b'      <Representation id="180p" bandwidth="300000" />\n'
        b"    </AdaptationSet>\n"
        b'    <AdaptationSet id="1" contentType="audio">\n'
        b'      <Representation id="en" bandwidth="64000">\n'
        b"        <BaseURL> a/en/audio.mp4 </BaseURL>\n"
        b'        <SegmentList><Initialization sourceURL="a/en/init.mp4"/>\n'
        b"          <SegmentURL media='a/en/seg_1.m4s?x=1&amp;y=2' mediaRange=\"0-99\"/>\n"
        b"        </SegmentList>\n"
        b'        <SegmentBase indexRange="0-9">'
        b'<RepresentationIndex sourceURL="a/en/sidx" /></SegmentBase>\n'
        b"      </Representation>\n"
        b"    </AdaptationSet>\n"
        b"  </Period>\n"
        b"</MPD>\n"
    )
    t = T.encode()
    assert propagate_dash(mpd, CARRY) == (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static">\n'
        b"  <Location>https://cdn.example/tiny/manifest.mpd</Location>\n"
        b'  <Period id="0">\n'
        b'    <BaseURL serviceLocation="a">media/</BaseURL>\n'
        b'    <AdaptationSet id="0" contentType="video">\n'
        b'      <SegmentTemplate timescale="90000" initialization="v/$RepresentationID$/init.mp4?'
        + t
        + b'" media="v/$RepresentationID$/seg_$Number$.m4s?'
        + t
        + b'" startNumber="1">\n'
        b'        <SegmentTimeline><S t="0" d="360000" r="2" /></SegmentTimeline>\n'
        b"      </SegmentTemplate>\n"
        b'      <Representation id="180p" bandwidth="300000" />\n'
        b"    </AdaptationSet>\n"
        b'    <AdaptationSet id="1" contentType="audio">\n'
        b'      <Representation id="en" bandwidth="64000">\n'
        b"        <BaseURL> a/en/audio.mp4?" + t + b" </BaseURL>\n"
        b'        <SegmentList><Initialization sourceURL="a/en/init.mp4?' + t + b'"/>\n'
        b"          <SegmentURL media='a/en/seg_1.m4s?x=1&amp;y=2&amp;"
        + t
        + b'\' mediaRange="0-99"/>\n'
        b"        </SegmentList>\n"
        b'        <SegmentBase indexRange="0-9">'
        b'<RepresentationIndex sourceURL="a/en/sidx?' + t + b'" /></SegmentBase>\n'
        b"      </Representation>\n"
        b"    </AdaptationSet>\n"
        b"  </Period>\n"
        b"</MPD>\n"
    )


def test_a_prefixed_mpd_and_the_token_in_a_template_are_escaped_for_xml_and_dash() -> None:
    mpd = (
        b'<dash:MPD xmlns:dash="urn:mpeg:dash:schema:mpd:2011"><dash:Period><dash:AdaptationSet>'
        b'<dash:SegmentTemplate media="$Number$.m4s" initialization="i.mp4"/>'
        b"</dash:AdaptationSet></dash:Period></dash:MPD>"
    )
    hostile = "x$Number$y\"z'&<>"
    out = propagate_dash(mpd, carry("__token__", hostile))
    template = ET.fromstring(out).find(".//{urn:mpeg:dash:schema:mpd:2011}SegmentTemplate")
    assert template is not None
    media = template.get("media")
    assert media == "$Number$.m4s?__token__=x%24Number%24y%22z%27%26%3C%3E"
    assert media.count("$") == 2  # the token adds no template identifier
    assert _token_of(media) == hostile


def test_the_packagers_own_manifests_are_rewritten_whole() -> None:
    # What media.manifest writes into a title package: every URI in it gets the token.
    title = make_title()
    master = manifest.hls_master(title).encode()
    out = m3u8.loads(propagate_hls(master, CARRY).decode())
    uris = [p.uri for p in out.playlists] + [m.uri for m in out.media if m.uri]
    assert uris and all(_token_of(u) == TOKEN for u in uris)
    mpd = propagate_dash(manifest.dash_mpd(title).encode(), CARRY)
    ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
    templates = ET.fromstring(mpd).findall(".//d:SegmentTemplate", ns)
    assert templates
    for template in templates:
        for name in ("media", "initialization"):
            assert _token_of(template.get(name, "")) == TOKEN


# -- properties ------------------------------------------------------------------------------

tokens_text = st.text(max_size=40).filter(bool)
names = st.sampled_from(["__token__", "hdnts", "token"])
path_pieces = st.text("abcXYZ019._-~!$'()*+,;=:@ ", min_size=1, max_size=8).filter(
    lambda s: s.strip() and not s.strip().startswith("#") and ":" not in s.split("/")[0]
)
relative = st.lists(path_pieces, min_size=1, max_size=3).map("/".join)
queries = st.lists(st.text("ab=&%2F_", max_size=6), max_size=3).map("&".join)
absolute_elsewhere = st.sampled_from(
    ["https://keys.example/k", "skd://k", "data:,x", "//cdn.example/s.m4s"]
)


@st.composite
def uris(draw: st.DrawFn) -> tuple[str, bool]:
    """(uri, whether it leads back to this edge)."""
    if draw(st.booleans()):
        return draw(absolute_elsewhere), False
    uri = draw(relative)
    query = draw(queries)
    if draw(st.booleans()):
        uri += "?" + query
    return uri, True


@st.composite
def playlists(draw: st.DrawFn) -> tuple[list[tuple[str, str, bool]], str]:
    """Lines of a playlist, each (kind, text, whether it is a URI to rewrite), and an eol."""
    lines: list[tuple[str, str, bool]] = [("tag", "#EXTM3U", False)]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["uri", "attr", "tag", "comment", "blank"]))
        if kind == "uri":
            uri, ours = draw(uris())
            lines.append(("uri", uri.strip(), ours))
        elif kind == "attr":
            uri, ours = draw(uris())
            tag = draw(st.sampled_from(["EXT-X-MAP", "EXT-X-PART", "EXT-X-MEDIA", "EXT-X-KEY"]))
            lines.append(("attr", f'#{tag}:A=1,URI="{uri}",B="x,y"', ours))
        elif kind == "tag":
            lines.append(("tag", draw(st.sampled_from(["#EXTINF:4.0,", "#EXT-X-ENDLIST"])), False))
        elif kind == "comment":
            lines.append(("comment", "# " + draw(st.text("ab =\"',", max_size=10)), False))
        else:
            lines.append(("blank", "", False))
    return lines, draw(st.sampled_from(["\n", "\r\n"]))


@given(playlists(), names, tokens_text)
def test_every_uri_line_and_attribute_gets_the_token_and_nothing_else_changes(
    playlist: tuple[list[tuple[str, str, bool]], str], name: str, token: str
) -> None:
    lines, eol = playlist
    body = eol.join(text for _, text, _ in lines).encode() + eol.encode()
    carried = carry(name, token)
    out = propagate_hls(body, carried).decode()
    out_lines = out.split(eol)
    assert out_lines[-1] == "" and len(out_lines) == len(lines) + 1  # no line added or split
    for (kind, text, ours), new in zip(lines, out_lines, strict=False):
        if kind == "uri":
            got = new
        elif kind == "attr":
            prefix, _, rest = new.partition('URI="')
            got, _, suffix = rest.partition('"')
            assert prefix + 'URI="' == text.partition('URI="')[0] + 'URI="'
            assert suffix == ',B="x,y"'
        else:
            assert new == text
            continue
        original = text if kind == "uri" else text.partition('URI="')[2].partition('"')[0]
        if not ours:
            assert got == original
            continue
        assert got.partition("?")[0] == original.partition("?")[0]
        params = parse_qsl(urlsplit(got).query, keep_blank_values=True)
        assert [v for k, v in params if k == name] == [token]
        kept = [kv for kv in parse_qsl(urlsplit(original).query, keep_blank_values=True)]
        assert [kv for kv in params if kv[0] != name] == [kv for kv in kept if kv[0] != name]
    # Rewriting what was rewritten changes nothing: the token is replaced, not repeated.
    assert propagate_hls(out.encode(), carried).decode() == out
    # The rendering from the cached template is the walk itself, for each token in turn.
    for again in (carried, carry(name, token + "2"), carried):
        assert propagate_hls(body, again) == propagation._walk_hls(body, again)


@given(
    st.lists(st.sampled_from(["media", "initialization", "index"]), min_size=1, unique=True),
    relative,
    names,
    tokens_text,
    st.sampled_from(['"', "'"]),
)
def test_every_template_url_gets_the_token_and_the_mpd_stays_well_formed(
    attrs: list[str], uri: str, name: str, token: str, quote_mark: str
) -> None:
    value = uri.replace("&", "&amp;").replace(
        quote_mark, "&quot;" if quote_mark == '"' else "&apos;"
    )
    values = " ".join(f"{a}={quote_mark}{value}{quote_mark}" for a in attrs)
    body = (
        f'<MPD xmlns="urn:mpeg:dash:schema:mpd:2011"><Period><AdaptationSet>'
        f'<SegmentTemplate timescale="1" {values} startNumber="1"/>'
        f'<Representation id="r" bandwidth="1"/></AdaptationSet></Period></MPD>'
    ).encode()
    carried = carry(name, token)
    out = propagate_dash(body, carried)
    template = ET.fromstring(out).find(".//{urn:mpeg:dash:schema:mpd:2011}SegmentTemplate")
    assert template is not None
    assert template.get("timescale") == "1" and template.get("startNumber") == "1"
    for attr in attrs:
        got = template.get(attr, "")
        assert got.partition("?")[0] == uri.partition("?")[0]
        assert got.count("$") == uri.count("$")
        assert [v for k, v in parse_qsl(urlsplit(got).query) if k == name] == [token]
    assert propagate_dash(out, carried) == out
    for again in (carried, carry(name, token + "2"), carried):
        assert propagate_dash(body, again) == propagation._walk_dash(body, again)


@given(st.binary(max_size=200), tokens_text)
def test_any_bytes_are_handled_without_error(body: bytes, token: str) -> None:
    carried = carry("__token__", token)
    for path in ("/t/x.m3u8", "/t/x.mpd"):
        out = propagate(path, body, carried)
        assert propagate(path, out, carried) == out


def test_large_manifests_and_ones_holding_nul_are_walked_directly_with_the_same_result() -> None:
    # Templates are for what is polled; a long VOD playlist is asked for once per session.
    segments = "".join(f"#EXTINF:4.0,\nseg_{n}.m4s\n" for n in range(1, 12_000))
    large = f'#EXTM3U\n#EXT-X-MAP:URI="init.mp4"\n{segments}#EXT-X-ENDLIST\n'.encode()
    assert len(large) > propagation._TEMPLATE_MAX
    out = propagate_hls(large, CARRY)
    assert out.count(T.encode()) == 12_000
    assert out == propagation._walk_hls(large, CARRY)
    with_nul = b'#EXTM3U\n# \0 \n#EXT-X-MAP:URI="init.mp4"\nseg_1.m4s\n'
    assert propagate_hls(with_nul, CARRY) == (
        b'#EXTM3U\n# \0 \n#EXT-X-MAP:URI="init.mp4?'
        + T.encode()
        + b'"\nseg_1.m4s?'
        + T.encode()
        + b"\n"
    )


def test_carry_is_hashable_for_the_hot_object_cache() -> None:
    assert {CARRY: 1}[carry("__token__", TOKEN, "EDGE.example:8081")] == 1
    assert isinstance(CARRY, Carry)
