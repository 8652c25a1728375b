"""Accounts: sign up, log in, refresh and log out, the account and its plan, the plans."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from streamplane.control.accounts import (
    AccountOut,
    Credentials,
    PlanIn,
    RefreshIn,
    SignupIn,
    TokensOut,
)
from streamplane.control.routes.body import JsonRoute
from streamplane.control.routes.deps import Me, plane_of

__all__ = ["AccountDetail", "AccountScreens", "router"]

router = APIRouter(tags=["accounts"], route_class=JsonRoute)


class AccountScreens(BaseModel):
    limit: int
    in_use: int
    sessions: list[dict[str, Any]]


class AccountDetail(BaseModel):
    account_id: str
    email: str
    plan: str
    screens: AccountScreens


@router.post("/v1/accounts", status_code=201, response_model=AccountOut)
async def sign_up(body: SignupIn, request: Request) -> AccountOut:
    """Create an account on a plan (default: ``control.default_plan``)."""
    plane = plane_of(request)
    return await plane.accounts.sign_up(body, plane.clock())


@router.post("/v1/auth/login", response_model=TokensOut)
async def log_in(body: Credentials, request: Request) -> TokensOut:
    """Exchange email and password for an access token and a refresh token."""
    plane = plane_of(request)
    return await plane.accounts.log_in(body, plane.clock())


@router.post("/v1/auth/refresh", response_model=TokensOut)
async def refresh(body: RefreshIn, request: Request) -> TokensOut:
    """Spend a refresh token for a new pair; a token presented twice revokes its login."""
    plane = plane_of(request)
    return await plane.accounts.refresh(body, plane.clock())


@router.post("/v1/auth/logout", status_code=204)
async def log_out(body: RefreshIn, request: Request) -> Response:
    """Revoke the refresh token and every token rotated from the same login."""
    plane = plane_of(request)
    await plane.accounts.log_out(body)
    return Response(status_code=204)


@router.get("/v1/account", response_model=AccountDetail)
async def account(me: Me, request: Request) -> dict[str, Any]:
    """The account, its plan, and the screens in use now."""
    plane = plane_of(request)
    return await plane.accounts.describe(me.account_id, plane.clock())


@router.put("/v1/account/plan", response_model=AccountOut)
async def change_plan(body: PlanIn, me: Me, request: Request) -> AccountOut:
    plane = plane_of(request)
    return await plane.accounts.change_plan(me.account_id, body)


@router.get("/v1/plans")
async def plans(request: Request) -> dict[str, dict[str, int]]:
    """Plan name -> its concurrent-screens limit."""
    plane = plane_of(request)
    return {name: {"screens": p.screens} for name, p in plane.settings.control.plans.items()}
