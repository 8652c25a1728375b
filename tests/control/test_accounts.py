"""Accounts: sign up, log in, token rotation and its theft detection."""

from __future__ import annotations

from .conftest import Control


async def _signup(control: Control, email: str, plan: str | None = None) -> int:
    body = {"email": email, "password": "correct horse"}
    if plan is not None:
        body["plan"] = plan
    r = await control.client.post("/v1/accounts", json=body)
    return r.status_code


async def _login(control: Control, email: str, password: str = "correct horse") -> dict[str, str]:
    r = await control.client.post("/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_sign_up_and_log_in(control: Control) -> None:
    r = await control.client.post(
        "/v1/accounts", json={"email": "Ada@Example.com", "password": "correct horse"}
    )
    assert r.status_code == 201
    body = r.json()
    assert body["email"] == "ada@example.com"  # one account per address, whatever the case
    assert body["plan"] == "standard" and body["screens_limit"] == 2
    assert await _signup(control, "ADA@example.com") == 409
    tokens = await _login(control, "ada@example.com")
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 900
    me = await control.client.get(
        "/v1/account", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert me.status_code == 200
    assert me.json()["email"] == "ada@example.com"
    assert me.json()["screens"] == {"limit": 2, "in_use": 0, "sessions": []}


async def test_bad_sign_ups_and_log_ins(control: Control) -> None:
    assert await _signup(control, "not-an-email") == 422
    assert await _signup(control, "x@example.com", plan="gold") == 422
    r = await control.client.post("/v1/accounts", json={"email": "y@example.com", "password": "s"})
    assert r.status_code == 422 and "password" in r.json()["detail"]
    assert await _signup(control, "z@example.com") == 201
    for email, password in (("z@example.com", "wrong password"), ("nobody@example.com", "x")):
        r = await control.client.post("/v1/auth/login", json={"email": email, "password": password})
        assert r.status_code == 401
        assert r.json()["detail"] == "wrong email or password"  # the same for both


async def test_access_tokens_expire(control: Control) -> None:
    auth = await control.account()
    assert (await control.client.get("/v1/account", headers=auth)).status_code == 200
    control.clock.advance(901)
    r = await control.client.get("/v1/account", headers=auth)
    assert r.status_code == 401 and "expired" in r.json()["detail"]


async def test_refresh_rotates_and_a_reused_token_revokes_the_login(control: Control) -> None:
    assert await _signup(control, "r@example.com") == 201
    first = await _login(control, "r@example.com")
    r = await control.client.post(
        "/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )
    assert r.status_code == 200
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    me = await control.client.get(
        "/v1/account", headers={"Authorization": f"Bearer {second['access_token']}"}
    )
    assert me.status_code == 200
    # the spent token again: refused, and the token rotated from it dies with it
    r = await control.client.post(
        "/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
    )
    assert r.status_code == 401 and "already used" in r.json()["detail"]
    r = await control.client.post(
        "/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}
    )
    assert r.status_code == 401
    # another login is a family of its own
    third = await _login(control, "r@example.com")
    r = await control.client.post(
        "/v1/auth/refresh", json={"refresh_token": third["refresh_token"]}
    )
    assert r.status_code == 200


async def test_log_out_and_expiry_of_refresh_tokens(control: Control) -> None:
    assert await _signup(control, "o@example.com") == 201
    tokens = await _login(control, "o@example.com")
    r = await control.client.post(
        "/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]}
    )
    assert r.status_code == 204
    r = await control.client.post(
        "/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert r.status_code == 401
    later = await _login(control, "o@example.com")
    control.clock.advance(30 * 86400 + 1)
    r = await control.client.post(
        "/v1/auth/refresh", json={"refresh_token": later["refresh_token"]}
    )
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    r = await control.client.post("/v1/auth/refresh", json={"refresh_token": "made-up"})
    assert r.status_code == 401


async def test_plans_are_listed(control: Control) -> None:
    r = await control.client.get("/v1/plans")
    assert r.json() == {
        "basic": {"screens": 1},
        "standard": {"screens": 2},
        "premium": {"screens": 4},
    }
