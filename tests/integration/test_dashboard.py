"""The live dashboard end to end: `qt up` (which starts `qt web`), Debian's Chromium driven by Playwright.

A plan proposed from the CLI appears on the page with its two permits and its result, without a reload; the
kill switch refuses a flip without the operator token, flips with it, and the next plan shows the Governor's
deny. The screenshot in the README is the one this test takes (QT_SCREENSHOT names where to write it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from programs import Up, program_env, qt

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("QT_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return program_env(tmp_path)


@pytest.fixture
def up(env: dict[str, str]) -> Iterator[Up]:
    running = Up(env)
    try:
        running.wait_for("is up")
        yield running
    finally:
        running.stop()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (make test installs it)")
def test_plans_permits_and_the_kill_switch_live_in_the_browser(up: Up, env: dict[str, str], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url = f"http://127.0.0.1:{env['QT_WEB__PORT']}/"
    token = (Path(env["QT_STATE_DIR"]) / "secrets" / "web-operator.token").read_text().strip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
            expect(page.get_by_test_id("kill-state")).to_have_text("OFF")
            expect(page.get_by_test_id("store-nodes")).to_have_text("store · one server")  # no Sentinels
            # P3.3's and Apply's user-data streams, from their heartbeats (the Governor has none: no pill)
            streams = page.locator("#services [data-role='stream']")
            expect(streams).to_have_count(2, timeout=15_000)
            for service in ("brain", "apply"):
                stream = streams.filter(has_text=f"{service} stream")
                expect(stream).to_have_text(f"{service} stream · healthy", timeout=15_000)
                expect(stream).to_have_class("pill ok")

            # a close proposed from the CLI shows up with both permits and its result
            done = qt("propose", "BTCUSDT", "--action", "FULL_CLOSE", "--wait", env=env)
            assert done.returncode == 0, done.stdout + done.stderr
            row = page.locator("tr[data-outcome='executed']").filter(has_text="BTCUSDT")
            expect(row).to_have_count(1, timeout=10_000)
            expect(row.locator("[data-slot='governor']")).to_contain_text("policy_passed")
            expect(row.locator("[data-slot='p33']")).to_contain_text("sanity_checks_passed")
            expect(row.locator("[data-slot='outcome']")).to_contain_text("executed 0.010")

            # the kill switch: refused without the token, flipped with it
            page.get_by_test_id("kill-button").click()
            expect(page.get_by_test_id("kill-msg")).to_contain_text("operator token required")
            expect(page.get_by_test_id("kill-state")).to_have_text("OFF")
            page.get_by_test_id("token").fill(token)
            page.get_by_test_id("kill-button").click()
            expect(page.get_by_test_id("kill-state")).to_have_text("ON · denying", timeout=10_000)
            status = qt("status", "--json", env=env)
            assert '"kill_switch": true' in status.stdout

            # and the next plan is denied by the Governor, on the page too
            denied = qt("propose", "SOLUSDT", "--action", "PARTIAL_CLOSE", "--pct", "25", "--wait", env=env)
            assert denied.returncode == 1 and "kill_switch_on" in denied.stdout
            row = page.locator("tr[data-outcome='permit_denied']").filter(has_text="SOLUSDT")
            expect(row).to_have_count(1, timeout=10_000)
            expect(row.locator("[data-slot='governor']")).to_contain_text("kill_switch_on")
            expect(row.locator("[data-slot='outcome']")).to_contain_text("by Governor")
            expect(page.get_by_test_id("ratio")).not_to_have_text("–")

            shot = Path(os.environ.get("QT_SCREENSHOT") or tmp_path / "dashboard.png")
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
