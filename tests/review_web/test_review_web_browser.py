"""The review flow in a real headless Chromium (Playwright) against the app served by WebServer."""
from __future__ import annotations

import pytest

from tests.conftest import TEST_OUTPUT
from tests.review_web.conftest import log_in

pytestmark = pytest.mark.integration

SHOTS = TEST_OUTPUT / "review_web"


def test_review_a_case_in_the_browser(browser_page, server, node):
    page, job_id = browser_page, node.job_ids[0]  # positive: Grad-CAM and circle
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.goto(f"{server}/queue")
    assert page.url.endswith("/login")
    log_in(page, server, "reviewer")
    page.wait_for_url(f"{server}/queue")
    assert page.locator("tbody tr").count() == 3
    page.screenshot(path=SHOTS / "01-queue.png", full_page=True)

    page.click(f"a[href='/cases/{job_id}']")
    page.wait_for_url(f"{server}/cases/{job_id}")
    page.wait_for_selector("#stage[data-ready='1']")
    page.screenshot(path=SHOTS / "02-case-heatmap-on.png", full_page=True)
    page.uncheck("#overlay-on")
    box = page.locator("#view").bounding_box()  # the 512 x 512 phantom fitted, centred
    side = min(box["width"], box["height"])
    page.mouse.click(box["x"] + box["width"] / 2 + side * 0.01, box["y"] + box["height"] / 2 - side * 0.25)
    assert abs(int(page.input_value("#row")) - 128) <= 1 and abs(int(page.input_value("#col")) - 261) <= 1
    page.check("input[name=nodule][value=present]")
    page.fill("textarea[name=comment]", "small nodule, right upper zone")
    page.screenshot(path=SHOTS / "03-case-heatmap-off-marked.png", full_page=True)
    page.check("#overlay-on")

    page.click("#verdict button[type=submit]")
    page.wait_for_url(f"{server}/queue")
    assert page.locator(f"a[href='/cases/{job_id}']").count() == 0
    assert page.locator("tbody tr").count() == 2
    page.screenshot(path=SHOTS / "04-queue-after-verdict.png", full_page=True)

    page.click("text=Log out")
    page.wait_for_url(f"{server}/login")
    log_in(page, server, "admin")
    page.wait_for_url(f"{server}/health")
    states = dict(zip(page.locator("#jobs-by-state td:first-child").all_inner_texts(),
                      page.locator("#jobs-by-state td.num").all_inner_texts()))
    assert states["SENT"] == "4" and states["FAILED_DELIVERY"] == "1" and states["SKIPPED"] == "1"
    assert page.inner_text("#open-reviews") == "3"  # one read is provisional: the case stays open
    assert page.locator("text=Re-send job").count() == 1
    page.screenshot(path=SHOTS / "05-health.png", full_page=True)
