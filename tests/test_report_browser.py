"""The tiny study's report as a user sees it: opened in headless Chromium (Debian's, driven by Playwright)."""

import re
import shutil

import pytest

pytestmark = pytest.mark.integration
CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)


def test_report_renders_in_headless_chromium(tiny_study, artifacts):
    if CHROMIUM is None:
        pytest.fail("no Chromium on PATH: `make test` installs Debian's chromium and chromium-driver (apt-get)")
    from playwright.sync_api import sync_playwright

    html = tiny_study / "results/report/report.html"
    expected_images = len(re.findall(r'src="data:image/png;base64,', html.read_text()))
    problems = []
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
        page.goto(html.as_uri(), wait_until="load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => ({ok: e.complete, w: e.naturalWidth, h: e.naturalHeight, shown: e.width}))"
        )
        headers = page.eval_on_selector_all("table th", "els => els.map(e => e.textContent.trim())")
        title = page.title()
        page.screenshot(path=str(artifacts / "report.png"), full_page=True)
        browser.close()
    assert problems == [], problems  # no console errors, no failed requests (the report needs no network)
    assert len(images) == expected_images >= 20
    assert all(image["ok"] and image["w"] > 0 and image["h"] > 0 and image["shown"] > 0 for image in images), images
    # the summary table, under recommend's names for the same numbers
    for column in (
        "workload",
        "predicted b_opt",
        "recommended B",
        "as fast (within tolerance)",
        "data path",
        "time to target from the profile (s)",
        "time to target measured in training (s)",
        "stage",
    ):
        assert column in headers, headers  # fmt: skip
    assert title
    assert (artifacts / "report.png").stat().st_size > 50_000
