"""A real stack (control plane + 2 edges holding the tiny title) and Debian's Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from streamplane.stack import LocalStack
from tests.e2e.browser import ARGS, CHROMIUM, TITLE


@pytest.fixture(scope="module")
def stack(tiny_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Per module: a test may kill one of its edges."""
    with LocalStack(tiny_package.parent, tmp_path_factory.mktemp("stack"), edges=2) as s:
        s.fill([TITLE])
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Per module: Playwright's sync API keeps an event loop running while it is open, which
    would break the asyncio tests that run after this folder."""
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh context (its own storage and device id); uncaught page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
