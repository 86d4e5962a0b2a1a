"""The dispatcher's web dashboard in a real headless Chromium, against real processes.

A dispatcher started with --http-port 0 serves the page; executors run tasks through a
client; Selenium reads the page's numbers (the elements with a data-field attribute) and
compares them with /api/status. With FALCONET_SCREENSHOT=PATH set, test_docs_screenshot
runs a longer, livelier load and saves the page there (docs/dashboard.png comes from it).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster_helpers import wait_until

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:
    pytest.skip("selenium is not installed (pip install 'falconet[test]')", allow_module_level=True)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)

#: The status keys the page shows, each in an element whose data-field names it.
CHECKED = ("submitted_total", "tasks.done", "tasks.failed", "executors", "slots", "busy", "queued")
VIEWPORT = (1280, 900)


# ---------------------------------------------------------------- helpers


@pytest.fixture
def browser(tmp_path: Path):
    """A headless Chromium of its own profile, with a 1280x900 page; quit (with its driver) after."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        width, height = VIEWPORT
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def start_dispatcher(cluster, *extra: str) -> str:
    """Start the cluster's dispatcher with its web server on a free port; its base URL."""
    cluster.start_dispatcher(extra=("--http-port", "0", *extra))
    return cluster.http_url


def fetch(url: str, token: str = "") -> dict:
    """GET a JSON document, with the token as a bearer when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as reply:
        return json.load(reply)


def http_status(url: str) -> int:
    """The HTTP status code of a GET without credentials."""
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def shown(driver, name: str) -> str | None:
    """The text of the element whose data-field is name (even while it is hidden).

    Read by script, in one turn of the page's event loop: the page rebuilds its tables on
    every update, so an element found by Selenium may be gone when it is read.
    """
    return driver.execute_script(
        "const e = document.querySelector(`[data-field='${arguments[0]}']`);"
        "return e === null ? null : e.textContent.trim();", name)


def table_rows(driver, table: str) -> list[dict]:
    """The rows of a table: each its text and its cells by data-col (or data-field), and its key."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll(`#${arguments[0]} tbody tr`), (tr) => ({
            key: tr.dataset.executor || "", text: tr.textContent,
            cells: Object.fromEntries(Array.from(tr.querySelectorAll("[data-col], [data-field]"),
                                                 (td) => [td.dataset.col || td.dataset.field, td.textContent])),
        }));""", table)


def shown_int(driver, name: str) -> int | None:
    """The number the element shows ("1,025" is 1025); None when it shows none ("–")."""
    text = (shown(driver, name) or "").replace(",", "")
    return int(text) if text.isdigit() else None


def looked_up(status: dict, key: str) -> object:
    """status["tasks"]["done"] for "tasks.done"."""
    for part in key.split("."):
        status = status[part]
    return status


def page_matches_api(driver, base: str, settled, timeout_s: float = 20.0) -> dict:
    """Wait until /api/status is settled(status) and the page shows its numbers; that status.

    The page lags by up to a poll, and the status may come from a snapshot of about a second.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        status = fetch(f"{base}/api/status")
        page = {key: shown_int(driver, key) for key in CHECKED}
        api = {key: looked_up(status, key) for key in CHECKED}
        if (settled(status) and page == api) or time.monotonic() > deadline:
            assert settled(status), f"the status never settled: {api}"
            assert page == api, "the page's numbers differ from /api/status"
            return status
        time.sleep(0.2)


def screenshot(driver, when: str) -> None:
    """Save the whole page, 1280 wide, to $FALCONET_SCREENSHOT if set (the docs' picture)."""
    path = os.environ.get("FALCONET_SCREENSHOT")
    if not path:
        return
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": VIEWPORT[0], "height": height, "deviceScaleFactor": 1, "mobile": False})
    assert driver.save_screenshot(path), f"could not write the screenshot ({when}) to {path}"


# ---------------------------------------------------------------- the tests


def test_page_shows_a_run_as_the_status_api_does(cluster, browser):
    base = start_dispatcher(cluster)
    names = ("ex-a", "ex-b", "ex-c")
    for name in names:
        cluster.start_executor(name, 2)
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == set(names), what="three executors")
        browser.get(base + "/")
        futures = client.submit_commands(["sleep 0.02"] * 600)
        failing = client.submit_command("echo 'input data-7.csv: no such file' >&2; exit 7")
        wait_until(lambda: (shown_int(browser, "updated") or 0) >= 3, what="three updates during the run")
        assert all(f.result(timeout=120).ok for f in futures)
        assert failing.result(timeout=60).exit_code == 7

        status = page_matches_api(browser, base, lambda s: (s["tasks"]["done"], s["tasks"]["failed"],
                                                             s["queued"], s["busy"]) == (600, 1, 0, 0))
        rows = {row["key"]: row["cells"]["host"] for row in table_rows(browser, "executors")}
        assert rows == {e["id"]: e["host"] for e in status["executor_table"]}
        assert set(rows) == set(names)
        failures = wait_until(lambda: table_rows(browser, "failures"), what="the failed task in the failures panel")
        assert [f["cells"]["exit_code"] for f in failures] == ["7"]
        assert "input data-7.csv: no such file" in failures[0]["text"]
        assert "No provisioner reporting" in browser.find_element(By.ID, "fleet").text
        assert not browser.find_element(By.ID, "banner").is_displayed()
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, "the page logged errors (a Content-Security-Policy refusal, say)"

    cluster.kill("dispatcher", signal.SIGKILL)
    banner = browser.find_element(By.ID, "banner")
    wait_until(banner.is_displayed, what="the banner saying the dispatcher is not answering")
    assert "not answering" in banner.text


def test_token_is_required_and_taken_from_the_address(cluster, browser):
    base = start_dispatcher(cluster, "--http-token", "secret")
    cluster.start_executor("ex-a", 2)
    assert http_status(f"{base}/") == 401
    assert http_status(f"{base}/api/status") == 401
    assert http_status(f"{base}/api/dashboard") == 401
    assert fetch(f"{base}/api/status", token="secret")["dispatcher_id"]
    with cluster.client() as client:
        wait_until(lambda: cluster.registered(client) == {"ex-a"}, what="the executor")

        browser.get(base + "/")
        wait_until(lambda: any(e.is_displayed() for e in browser.find_elements(By.CSS_SELECTOR, "input[type=password]")),
                   what="a form asking for the token")
        assert shown(browser, "executors") in (None, "–") and shown(browser, "updated") in (None, "0")
        assert not any(e.is_displayed() for e in browser.find_elements(By.ID, "data"))

        browser.get(base + "/?token=secret")
        wait_until(lambda: (shown_int(browser, "updated") or 0) >= 2, what="updates with the token")
        assert "token" not in browser.current_url
        assert not browser.find_element(By.ID, "login").is_displayed()
        assert shown_int(browser, "executors") == 1


@pytest.mark.skipif(not os.environ.get("FALCONET_SCREENSHOT"), reason="set FALCONET_SCREENSHOT=PATH to take it")
def test_docs_screenshot(cluster, browser):
    """A minute of waves of work on a provisioned fleet, some failing, some unschedulable."""
    base = start_dispatcher(cluster)
    cluster._spawn("provisioner", ["provisioner", "--dispatcher", cluster.client_address,
                                   "--min-executors", "2", "--max-executors", "4", "--slots", "2",
                                   "--interval", "1", "--idle-release", "600", "--stop-grace", "1"])
    with cluster.client() as client:
        wait_until(lambda: len(cluster.registered(client)) == 2, what="--min-executors executors")
        browser.get(base + "/")
        client.submit_command("true", cpus=16)  # no executor has 16 cpus: unschedulable
        errors = ["echo 'Traceback (most recent call last):' >&2; echo 'ValueError: bad row 812' >&2; exit 1",
                  "echo 'samtools: cannot open ref.fa' >&2; exit 2"]
        for wave in range(12):
            batch = client.submit_commands([f"sleep 0.{(i * 7 + wave) % 9 + 1}" for i in range(40 + 30 * (wave % 4))])
            if wave % 3 == 1:
                batch.append(client.submit_command(errors[wave % 2]))
            wait_until(lambda b=batch: sum(f.done() for f in b) >= 0.8 * len(b), timeout_s=60, what="a wave")
        wait_until(lambda: (shown_int(browser, "updated") or 0) >= 60, timeout_s=120, what="a minute of history")
        screenshot(browser, "during a run")
