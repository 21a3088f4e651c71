"""The review flow in a real headless Chromium (Playwright) against the app served by WebServer."""
from __future__ import annotations

import shutil

import pytest

from review_web.server import WebServer
from tests.conftest import TEST_OUTPUT
from tests.review_web.conftest import PASSWORD

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = TEST_OUTPUT / "review_web"


@pytest.fixture
def browser_page():
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 960})
        page.set_default_timeout(15000)
        yield page
        browser.close()


@pytest.fixture
def server(node):
    web = WebServer(node.settings, node.sessions, node.index)
    web.start()
    yield f"http://{node.settings.web.host}:{node.settings.web.port}"
    web.stop()


def log_in(page, base: str, username: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")


def test_review_a_case_in_the_browser(browser_page, server, node):
    page, job_id = browser_page, node.job_ids[0]  # positive: Grad-CAM and circle
    page.goto(f"{server}/queue")
    assert page.url.endswith("/login")
    log_in(page, server, "reviewer")
    page.wait_for_url(f"{server}/queue")
    assert page.locator("tbody tr").count() == 3
    page.screenshot(path=SHOTS / "01-queue.png", full_page=True)

    page.click(f"a[href='/cases/{job_id}']")
    page.wait_for_url(f"{server}/cases/{job_id}")
    page.wait_for_function("document.getElementById('base').naturalWidth > 0 && "
                           "document.getElementById('overlay').naturalWidth > 0")
    page.screenshot(path=SHOTS / "02-case-heatmap-on.png", full_page=True)
    page.uncheck("#heatmap")
    assert page.locator("#overlay").is_hidden()
    page.fill("#window", "180")  # a range input: fill sets its value and fires input
    page.fill("#level", "80")
    assert "contrast(1.8)" in page.eval_on_selector("#base", "e => e.style.filter")
    box = page.locator("#base").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.25)
    assert page.input_value("#row") == "128" and page.input_value("#col") == "256"
    page.check("input[name=nodule][value=present]")
    page.fill("textarea[name=comment]", "small nodule, right upper zone")
    page.screenshot(path=SHOTS / "03-case-heatmap-off-marked.png", full_page=True)
    page.check("#heatmap")
    assert page.locator("#overlay").is_visible()

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
