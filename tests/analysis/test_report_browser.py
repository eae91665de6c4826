"""report.html in headless Chromium (Playwright driving the system's
Chromium): it loads from a file with every network request refused, logs no
console error and throws no page error, draws its token maps, shows a
patch's routing on hover and the setting of a frontier point on hover.

Skipped where Chromium or Playwright is missing (`make report-check`
installs both; CI installs Chromium before `make test`). With
VMOE_REPORT=path/to/report.html it checks that page instead of a tiny
model's, and VMOE_SCREENSHOTS=DIR keeps two screenshots there: the top of
the page (report_top.png) and the token maps with a patch hovered
(report_hover.png); docs/img/ has the demo's, from `make report-check`.
"""
from __future__ import annotations

import os
import re
import shutil

import pytest
from helpers import calibrated_report

CHROMIUM = os.environ.get("VMOE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (make report-check installs it)"),
              pytest.mark.slow]


def _report(trained, tmp_path) -> str:
    given = os.environ.get("VMOE_REPORT")
    if given:
        return os.path.abspath(given)
    return calibrated_report(trained, tmp_path)


def test_the_report_in_headless_chromium(trained, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    path = _report(trained, tmp_path)
    errors: list[str] = []
    fetched: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def refuse(route):  # a self-contained page fetches nothing
                fetched.append(route.request.url)
                route.abort()
            page.route("http*://**/*", refuse)
            page.goto(f"file://{path}", wait_until="load")
            shots = os.environ.get("VMOE_SCREENSHOTS") or str(tmp_path)
            page.screenshot(path=os.path.join(shots, "report_top.png"))
            canvases = page.locator("#maps canvas")
            assert canvases.count() >= 4  # four maps per image
            canvases.first.hover(position={"x": 40, "y": 40})  # scrolled into view, then the pointer moves
            tip = page.locator("#tip")
            text = tip.text_content() or ""
            assert tip.is_visible() and re.match(r"patch \(\d+, \d+\): vanilla (kept|dropped), BPR ", text), text
            circles = page.locator("svg circle")
            if circles.count():  # a calibrated model: each point names its setting on hover
                assert "K=" in (circles.first.locator("title").text_content() or "")
            page.screenshot(path=os.path.join(shots, "report_hover.png"))
        finally:
            browser.close()
    assert errors == [] and fetched == []
