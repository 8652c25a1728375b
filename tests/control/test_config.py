from __future__ import annotations

from pathlib import Path

import pytest

from streamplane.config import SettingsError, load_settings


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        """
[tokens]
signing_kid = "k2"
ttl_s = 60
[tokens.keys]
k1 = "00ff"
k2 = "abcd"

[control]
database_url = "sqlite+aiosqlite:///x.db"
port = 9000
[control.plans]
family = { screens = 5 }
"""
    )
    s = load_settings(
        path,
        {
            "STREAMPLANE_CONTROL_PORT": "9100",
            "STREAMPLANE_CONTROL_EDGE_TIMEOUT_S": "2.5",
            "STREAMPLANE_CONTROL_ORIGIN_URL": "http://origin:8000",
            "OTHER": "ignored",
        },
    )
    assert s.control.port == 9100  # the environment wins over the file
    assert s.control.edge_timeout_s == 2.5
    assert s.control.origin_url == "http://origin:8000"
    assert s.control.plans["family"].screens == 5
    assert s.tokens.ttl_s == 60
    assert s.tokens.signing_key() == ("k2", b"\xab\xcd")
    assert s.tokens.keyring() == {"k1": b"\x00\xff", "k2": b"\xab\xcd"}


def test_defaults_without_a_file() -> None:
    s = load_settings(None, {})
    assert s.control.database_url.startswith("sqlite+aiosqlite://")
    assert s.control.base_url() == "http://127.0.0.1:8080"


def test_json_values_from_the_environment() -> None:
    s = load_settings(None, {"STREAMPLANE_TOKENS_KEYS": '{"only": "0102"}'})
    assert s.tokens.signing_key() == ("only", b"\x01\x02")  # the only key signs


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[contrl]\nport = 1\n", {}, "unknown section [contrl]"),
        ("[control]\nprot = 1\n", {}, "prot"),
        ("[control]\nport = 'x'\n", {}, "port"),
        ("[control\n", {}, "not valid TOML"),
        ("", {"STREAMPLANE_CONTROL_PROT": "1"}, "no key 'prot'"),
        ("", {"STREAMPLANE_TOKENS_KEYS": "{bad"}, "not valid JSON"),
        ("[control]\nlive_warm_every_s = 0\n", {}, "live_warm_every_s"),
        ("[realtime]\nadmission_poll_s = 0\n", {}, "admission_poll_s"),
        ("[realtime]\ntotal_processes = -2\n", {}, "total_processes"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        load_settings(path, env)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no such settings file"):
        load_settings(tmp_path / "nope.toml", {})


def test_signing_key_problems() -> None:
    two = load_settings(None, {"STREAMPLANE_TOKENS_KEYS": '{"a": "00", "b": "01"}'})
    with pytest.raises(SettingsError, match="signing_kid is not set"):
        two.tokens.signing_key()
    absent = load_settings(
        None, {"STREAMPLANE_TOKENS_KEYS": '{"a": "00"}', "STREAMPLANE_TOKENS_SIGNING_KID": "z"}
    )
    with pytest.raises(SettingsError, match=r"'z' is not in tokens\.keys"):
        absent.tokens.signing_key()
    odd = load_settings(None, {"STREAMPLANE_TOKENS_KEYS": '{"a": "abc"}'})
    with pytest.raises(SettingsError, match=r"tokens\.keys\.a"):
        odd.tokens.keyring()


def test_trusted_proxies_from_the_environment_and_bad_ones_named() -> None:
    from streamplane.control import create_app

    s = load_settings(
        None,
        {
            "STREAMPLANE_CONTROL_TRUSTED_PROXIES": '["10.0.0.0/8", "2001:db8::/32"]',
            "STREAMPLANE_CONTROL_TRUSTED_PROXY_HEADER": "forwarded",
            "STREAMPLANE_TOKENS_KEYS": '{"k": "00"}',
        },
    )
    assert s.control.trusted_proxies == ("10.0.0.0/8", "2001:db8::/32")
    assert s.control.trusted_proxy_header == "forwarded"
    with pytest.raises(SettingsError, match="trusted_proxy_header"):
        load_settings(None, {"STREAMPLANE_CONTROL_TRUSTED_PROXY_HEADER": "x-real-ip"})
    bad = load_settings(
        None,
        {
            "STREAMPLANE_CONTROL_TRUSTED_PROXIES": '["10.0.0.0/8", "lb.example"]',
            "STREAMPLANE_TOKENS_KEYS": '{"k": "00"}',
        },
    )
    with pytest.raises(SettingsError, match=r"control\.trusted_proxies: 'lb\.example'"):
        create_app(bad)
