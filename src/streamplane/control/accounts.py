"""Accounts: sign up, log in (argon2), JWT access tokens, rotating refresh tokens, plans.

Access tokens are short-lived HS256 JWTs checked without the store (signed and checked here:
:func:`jwt_encode`, :func:`jwt_decode`, which accept only the one header this service writes).
Refresh tokens are
random secrets the store keeps only as SHA-256 digests; each is good for one refresh, which
returns a new pair. A refresh token presented a second time means two parties hold it, so the
whole family (every token rotated from the same login) is revoked.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import uuid
from collections.abc import Mapping
from typing import Any, Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, Field
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from streamplane.config import ControlSettings, Plan
from streamplane.control.errors import ApiError, unauthorised
from streamplane.control.store import Account, RefreshToken, Screen, Store, StoredText
from streamplane.jwt import InvalidJwt, jwt_decode, jwt_encode

__all__ = [
    "AccountOut",
    "Accounts",
    "Credentials",
    "InvalidJwt",
    "Principal",
    "RefreshIn",
    "SignupIn",
    "TokensOut",
    "jwt_decode",
    "jwt_encode",
]

_EMAIL_RE: Final = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s.]{1,63}")


class SignupIn(BaseModel):
    email: StoredText = Field(min_length=3, max_length=320, examples=["ada@example.com"])
    password: str = Field(min_length=8, max_length=1024)  # only its argon2 hash is stored
    plan: StoredText | None = Field(
        default=None, max_length=64, description="default: the default plan"
    )


class Credentials(BaseModel):
    email: StoredText = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class RefreshIn(BaseModel):
    refresh_token: StoredText = Field(min_length=1, max_length=256)


class PlanIn(BaseModel):
    plan: StoredText = Field(min_length=1, max_length=64)


class AccountOut(BaseModel):
    account_id: str
    email: str
    plan: str
    screens_limit: int


class TokensOut(BaseModel):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int  # seconds the access token is valid


class Principal(BaseModel):
    """Who an access token speaks for."""

    account_id: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Accounts:
    """Account operations over the store; ``clock`` is epoch seconds."""

    def __init__(self, store: Store, settings: ControlSettings, jwt_key: bytes) -> None:
        self._store = store
        self._settings = settings
        self._key = jwt_key
        self._hasher = PasswordHasher(
            time_cost=settings.password_time_cost, memory_cost=settings.password_memory_kib
        )
        # Verified against when the email is unknown, so that a miss costs what a hit costs.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def plan(self, name: str) -> Plan | None:
        return self._settings.plans.get(name)

    @property
    def plans(self) -> Mapping[str, Plan]:
        return self._settings.plans

    def _check_plan(self, name: str) -> Plan:
        plan = self._settings.plans.get(name)
        if plan is None:
            raise ApiError(
                422,
                "unknown_plan",
                f"no plan {name!r}; plans are {', '.join(sorted(self._settings.plans))}",
            )
        return plan

    async def sign_up(self, body: SignupIn, now: float) -> AccountOut:
        email = body.email.strip().lower()
        if not _EMAIL_RE.fullmatch(email):
            raise ApiError(422, "invalid_email", f"{body.email!r} is not an email address")
        plan_name = body.plan or self._settings.default_plan
        plan = self._check_plan(plan_name)
        password_hash = await asyncio.to_thread(self._hasher.hash, body.password)
        account_id = str(uuid.uuid4())
        try:
            async with self._store.write() as conn:
                await conn.execute(
                    insert(Account).values(
                        id=account_id,
                        email=email,
                        password_hash=password_hash,
                        plan=plan_name,
                        created_at=now,
                    )
                )
        except IntegrityError:
            raise ApiError(409, "email_taken", f"an account with {email} exists") from None
        return AccountOut(
            account_id=account_id, email=email, plan=plan_name, screens_limit=plan.screens
        )

    async def log_in(self, body: Credentials, now: float) -> TokensOut:
        email = body.email.strip().lower()
        async with self._store.read() as conn:
            row = (
                await conn.execute(
                    select(Account.id, Account.password_hash).where(Account.email == email)
                )
            ).first()
        stored = self._dummy_hash if row is None else row.password_hash
        try:
            await asyncio.to_thread(self._hasher.verify, stored, body.password)
        except (VerificationError, InvalidHashError):
            row = None
        if row is None:
            raise unauthorised("wrong email or password")
        return await self._issue(row.id, str(uuid.uuid4()), now)

    async def _issue(self, account_id: str, family: str, now: float) -> TokensOut:
        secret = secrets.token_urlsafe(32)
        async with self._store.write() as conn:
            await conn.execute(
                insert(RefreshToken).values(
                    id=_digest(secret),
                    account_id=account_id,
                    family=family,
                    expires_at=now + self._settings.refresh_ttl_s,
                    used_at=None,
                    revoked=False,
                )
            )
        return TokensOut(
            access_token=self.access_token(account_id, now),
            refresh_token=secret,
            expires_in=self._settings.access_ttl_s,
        )

    async def refresh(self, body: RefreshIn, now: float) -> TokensOut:
        """Rotate: the presented token is spent, a new pair is issued in the same family."""
        token_id = _digest(body.refresh_token)
        secret = secrets.token_urlsafe(32)
        outcome = "ok"
        async with self._store.write() as conn:
            row = (
                await conn.execute(
                    select(
                        RefreshToken.account_id,
                        RefreshToken.family,
                        RefreshToken.expires_at,
                        RefreshToken.used_at,
                        RefreshToken.revoked,
                    )
                    .where(RefreshToken.id == token_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                outcome = "unknown"
            elif row.revoked:
                outcome = "revoked"
            elif row.used_at is not None:
                outcome = "reused"
                await conn.execute(
                    update(RefreshToken)
                    .where(RefreshToken.family == row.family)
                    .values(revoked=True)
                )
            elif row.expires_at <= now:
                outcome = "expired"
            else:
                await conn.execute(
                    update(RefreshToken).where(RefreshToken.id == token_id).values(used_at=now)
                )
                await conn.execute(
                    insert(RefreshToken).values(
                        id=_digest(secret),
                        account_id=row.account_id,
                        family=row.family,
                        expires_at=now + self._settings.refresh_ttl_s,
                        used_at=None,
                        revoked=False,
                    )
                )
        if outcome == "reused":
            raise unauthorised(
                "this refresh token was already used; every token of this login is now revoked,"
                " log in again"
            )
        if outcome != "ok" or row is None:
            raise unauthorised(f"refresh token {outcome}; log in again")
        return TokensOut(
            access_token=self.access_token(row.account_id, now),
            refresh_token=secret,
            expires_in=self._settings.access_ttl_s,
        )

    async def log_out(self, body: RefreshIn) -> None:
        """Revoke the token's family: every refresh token rotated from the same login."""
        async with self._store.write() as conn:
            family = (
                await conn.execute(
                    select(RefreshToken.family).where(
                        RefreshToken.id == _digest(body.refresh_token)
                    )
                )
            ).scalar()
            if family is not None:
                await conn.execute(
                    update(RefreshToken).where(RefreshToken.family == family).values(revoked=True)
                )

    async def describe(self, account_id: str, now: float) -> dict[str, Any]:
        cutoff = now - self._settings.screen_timeout_s
        async with self._store.read() as conn:
            account = (
                await conn.execute(
                    select(Account.email, Account.plan).where(Account.id == account_id)
                )
            ).first()
            if account is None:
                raise unauthorised("the account no longer exists")
            screens = (
                await conn.execute(
                    select(
                        Screen.id, Screen.title, Screen.device, Screen.started_at, Screen.last_seen
                    )
                    .where(
                        Screen.account_id == account_id,
                        Screen.ended.is_(False),
                        Screen.last_seen >= cutoff,
                    )
                    .order_by(Screen.started_at)
                )
            ).all()
        plan = self.plan(account.plan)
        return {
            "account_id": account_id,
            "email": account.email,
            "plan": account.plan,
            "screens": {
                "limit": 0 if plan is None else plan.screens,
                "in_use": len(screens),
                "sessions": [
                    {
                        "session_id": s.id,
                        "title": s.title,
                        "device": s.device,
                        "started_at": s.started_at,
                        "last_seen": s.last_seen,
                    }
                    for s in screens
                ],
            },
        }

    async def change_plan(self, account_id: str, body: PlanIn) -> AccountOut:
        plan = self._check_plan(body.plan)
        async with self._store.write() as conn:
            result = await conn.execute(
                update(Account)
                .where(Account.id == account_id)
                .values(plan=body.plan)
                .returning(Account.email)
            )
            email = result.scalar()
        if email is None:
            raise unauthorised("the account no longer exists")
        return AccountOut(
            account_id=account_id, email=email, plan=body.plan, screens_limit=plan.screens
        )

    async def count(self) -> int:
        async with self._store.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(Account))).scalar_one())

    # -- tokens --------------------------------------------------------------------------------

    def access_token(self, account_id: str, now: float) -> str:
        claims = {
            "sub": account_id,
            "typ": "access",
            "iat": int(now),
            "exp": int(now) + self._settings.access_ttl_s,
        }
        return jwt_encode(claims, self._key)

    def session_token(self, account_id: str, session_id: str, expiry: int) -> str:
        """What a player heartbeats with: good for one playback session until ``expiry``."""
        claims = {"sub": account_id, "sid": session_id, "typ": "session", "exp": expiry}
        return jwt_encode(claims, self._key)

    def claims(self, token: str, now: float) -> dict[str, Any]:
        """The verified claims of an access or session token; 401 for anything else."""
        try:
            claims = jwt_decode(token, self._key)
        except InvalidJwt as err:
            raise unauthorised(f"invalid token: {err}") from None
        missing = [c for c in ("sub", "exp", "typ") if c not in claims]
        if missing:
            raise unauthorised(f"invalid token: no {', '.join(missing)} claim")
        exp = claims["exp"]
        if not isinstance(exp, int) or isinstance(exp, bool) or exp <= now:
            raise unauthorised("the token has expired; refresh it")
        if claims["typ"] not in ("access", "session") or not isinstance(claims["sub"], str):
            raise unauthorised("not an access token")
        return claims

    def principal(self, token: str, now: float) -> Principal:
        claims = self.claims(token, now)
        if claims["typ"] != "access":
            raise unauthorised("a session token only sends heartbeats; use an access token")
        return Principal(account_id=claims["sub"])
