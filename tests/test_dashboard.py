"""The dashboard in headless Chromium, against a real scheduler, two workers and redis-server.

Needs the system's Chromium (`apt-get install -y chromium`) and the Python package playwright
(no browser download). Without them the test skips, except under CI=true, where it fails.
Screenshots (overview-running.png, job-running.png, job-succeeded.png) go to $RELAY_SCREENSHOTS,
or to the test's temporary folder.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import IN_CI, Procs, tiny_spec, wait_for
from test_relay_e2e import Cluster

pytestmark = pytest.mark.e2e

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "dashboard-test-token"


def _unavailable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"{why}, and CI must run the dashboard test")
    pytest.skip(f"{why}: dashboard test skipped")


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    exe = os.environ.get("RELAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _unavailable("chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watcher:
    """Collects what must not happen on the page: script errors, console errors, failed requests.
    401 answers are allowed while `expect_401` is set (the test withholds the token on purpose)."""

    def __init__(self, page: Any) -> None:
        self.problems: list[str] = []
        self.expect_401 = False
        self.seen_401 = 0
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("console", self._console)
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.method} {r.url}: {r.failure}"))
        page.on("response", self._response)

    def _console(self, msg: Any) -> None:
        if msg.type not in ("error", "warning"):
            return
        if self.expect_401 and "status of 401" in msg.text:
            return  # the browser's own log line for the refused request
        self.problems.append(f"console {msg.type}: {msg.text} ({msg.location.get('url', '')})")

    def _response(self, r: Any) -> None:
        if r.status == 401 and self.expect_401:
            self.seen_401 += 1
        elif r.status >= 400:
            self.problems.append(f"HTTP {r.status}: {r.request.method} {r.url}")


def _step(page: Any, job_id: str) -> int:
    return int(page.locator(f'.job-row[data-id="{job_id}"] .job-progress').get_attribute("data-step"))


def test_dashboard_follows_a_job(procs: Procs, redis_url: str, tiny_data: dict[str, Path], browser: Any, tmp_path: Path) -> None:
    procs.env["RELAY_API_TOKEN"] = TOKEN  # changes need it; the CLI sends it, the page must ask for it
    # Steps of at least half a second: the job must still run while the page is clicked through
    # (a 2-step chunk of tiny data takes a fraction of a second).
    slow = {"RELAY_THROTTLE_STEP_S": "0.5"}
    cluster = Cluster(procs, redis_url, {"w1": ([], slow), "w2": ([], slow)})
    shots = Path(os.environ.get("RELAY_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    # 240x240 inputs and 2-step chunks: 5 epochs of 4 steps in 10 chunks.
    spec = tiny_spec(tiny_data, height=240, width=240, epochs=5, chunk_steps=2)
    job_id = cluster.submit(spec)

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    watch = Watcher(page)
    page.goto(cluster.api + "/")
    row = page.locator(f'.job-row[data-id="{job_id}"]')
    row.wait_for(timeout=30_000)
    assert page.locator("#jobs").is_visible()
    assert page.locator('.queue[data-queue="cpu"] .queue-depth').inner_text().isdigit()
    wait_for(lambda: page.locator(".worker-row").count() == 2, 30, "two workers in the table")
    assert {page.locator(".worker-row").nth(i).get_attribute("data-node") for i in range(2)} == {"w1", "w2"}

    # Running: the progress the page shows moves on by itself.
    wait_for(lambda: row.locator(".job-state").inner_text() == "running" and _step(page, job_id) > 0, 120,
             "the job to run and commit a chunk")
    first = _step(page, job_id)
    wait_for(lambda: _step(page, job_id) > first, 60, f"the shown progress to move past step {first}", every=0.25)
    second = _step(page, job_id)
    assert row.locator(".job-state").inner_text() == "running", "the job ended before it could be watched"
    assert f"step {second}/20" in row.locator(".job-progress").inner_text()
    assert row.locator(".job-loss").inner_text() != "–"
    wait_for(lambda: page.locator(".worker-doing a").count() >= 1, 30, "a worker shown busy with the job")
    page.screenshot(path=str(shots / "overview-running.png"), full_page=True)

    # The job page; pausing needs the token the page does not have yet: it asks, keeps and sends it.
    row.locator(".job-link").click()
    page.wait_for_url(f"**/#/jobs/{job_id}")
    page.locator("#job-state").wait_for()
    page.locator("#loss-chart path.line").first.wait_for(timeout=30_000)
    page.screenshot(path=str(shots / "job-running.png"), full_page=True)
    watch.expect_401 = True
    page.locator("#pause").click()
    page.locator("#token-dialog[open]").wait_for(timeout=10_000)
    page.fill("#token-input", TOKEN)
    page.click("#token-save")
    wait_for(lambda: page.locator("#job-state").inner_text() == "paused", 30, "the page to show the job paused")
    watch.expect_401 = False
    assert watch.seen_401 == 1
    assert page.evaluate("localStorage.getItem('relay.apiToken')") == TOKEN
    assert cluster.get(f"/api/jobs/{job_id}")["state"] == "paused"
    page.locator("#resume").click()  # the saved token goes along: no second question
    wait_for(lambda: page.locator("#job-state").inner_text() in ("running", "queued", "succeeded"), 30, "the job resumed")
    assert not page.locator("#token-dialog[open]").is_visible()

    page.locator("#job-state.state-succeeded").wait_for(timeout=300_000)
    miou = page.locator("#miou")
    miou.wait_for(timeout=30_000)
    report = cluster.get(f"/api/jobs/{job_id}/report")
    assert float(miou.inner_text()) == pytest.approx(report["mean_iou"], abs=5e-5)
    assert 0.0 <= float(page.locator("#pixel-accuracy").inner_text()) <= 1.0
    ious = [float(t) for t in page.locator("#per-class .iou-value").all_inner_texts()]
    assert ious and ious == sorted(ious, reverse=True)
    page.wait_for_function("() => { const i = document.querySelector('#predictions'); return i && i.complete && i.naturalWidth > 0; }",
                           timeout=30_000)

    job = cluster.get(f"/api/jobs/{job_id}")
    assert page.locator(".chunk-row").count() == len(job["history"]) == 10
    assert {page.locator(".chunk-row").nth(i).get_attribute("data-worker") for i in range(10)} == {h["worker"] for h in job["history"]}
    assert page.locator("#timeline .attempt").count() >= 11  # ten chunks and the evaluation
    assert page.locator("#loss-chart .epochs line").count() == 4  # boundaries between 5 epochs
    assert page.locator("#lr-chart path.line").count() == 1 and page.locator("#ips-chart path.line").count() >= 1
    assert "20/20" in page.locator("#job-progress-box .progress-text").inner_text()
    assert page.eval_on_selector("#download", "a => a.href") == f"{cluster.api}/api/jobs/{job_id}/weights?epoch=5"
    assert any("paused by user" in t for t in page.locator("#events li").all_inner_texts())
    page.screenshot(path=str(shots / "job-succeeded.png"), full_page=True)

    # A browser without the token still sees everything (reads are open): the picture loads by URL.
    fresh = browser.new_page(viewport={"width": 1360, "height": 900})
    other = Watcher(fresh)
    fresh.goto(f"{cluster.api}/#/jobs/{job_id}")
    fresh.wait_for_function("() => { const i = document.querySelector('#predictions'); return i && i.complete && i.naturalWidth > 0; }",
                            timeout=30_000)
    fresh.locator("a.back").click()  # a hash route: no reload, no request cut short
    fresh.locator(f'.job-row[data-id="{job_id}"] .job-state.state-succeeded').wait_for(timeout=10_000)
    problems = watch.problems + other.problems
    assert not problems, "\n".join(problems)


def test_dashboard_asks_for_the_token_when_reads_need_it(procs: Procs, browser: Any) -> None:
    """RELAY_API_TOKEN_READS: the page itself loads, then asks for the token and shows the queue."""
    api = procs.start_scheduler(env={"RELAY_API_TOKEN": TOKEN, "RELAY_API_TOKEN_READS": "true"})  # embedded: no broker needed
    assert httpx.get(api + "/api/jobs", timeout=5).status_code == 401
    page = browser.new_page()
    watch = Watcher(page)
    watch.expect_401 = True
    page.goto(api + "/")
    page.locator("#token-dialog[open]").wait_for(timeout=15_000)
    page.fill("#token-input", TOKEN)
    page.click("#token-save")
    page.locator("#jobs tr.empty").wait_for(timeout=15_000)  # "No jobs yet": the reads went through
    page.locator('.queue[data-queue="cpu"]').wait_for()
    assert watch.seen_401 >= 1
    assert not watch.problems, "\n".join(watch.problems)


def test_dashboard_new_job_form_lost_worker_and_unserved_queue(procs: Procs, redis_url: str, tiny_data: dict[str, Path],
                                                               browser: Any, tmp_path: Path) -> None:
    """A job submitted through the form (after a refused try) runs to succeeded; a SIGKILLed worker
    shows as lost; work waiting on a queue no live worker consumes is flagged."""
    procs.env["RELAY_DATA_ROOTS"] = json.dumps([str(tiny_data["train"].parent)])
    cluster = Cluster(procs, redis_url)
    shots = Path(os.environ.get("RELAY_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    watch = Watcher(page)
    page.goto(cluster.api + "/")
    page.locator("#new-job-link").click()
    page.locator("#field-train").wait_for(timeout=30_000)
    options = page.eval_on_selector_all("#list-files option", "os => os.map(o => o.value)")
    assert str(tiny_data["train"]) in options and str(tiny_data["val"]) in options
    assert page.input_value("#field-epochs") == "20" and page.input_value("#field-batch_size") == "16"
    assert page.is_checked("#field-pretrained")

    page.fill("#field-train", str(tiny_data["train"]))
    page.fill("#field-val", str(tiny_data["val"]))
    page.fill("#field-epochs", "0")
    page.click("#submit-job")
    page.locator("#error-epochs:not(:empty)").wait_for(timeout=15_000)
    assert "greater than or equal to 1" in page.inner_text("#error-epochs")
    assert "not submitted" in page.inner_text("#new-job-message")
    watch.problems = [p for p in watch.problems if "HTTP 422" not in p and "status of 422" not in p]
    page.screenshot(path=str(shots / "new-job-refused.png"), full_page=True)

    for field, value in (("epochs", "2"), ("batch_size", "4"), ("height", "64"), ("width", "64"), ("name", "from-form"),
                         ("val_every", "1")):
        page.fill(f"#field-{field}", value)
    page.uncheck("#field-pretrained")
    page.click("#submit-job")
    page.wait_for_url("**/#/jobs/*", timeout=15_000)
    job_id = page.url.rsplit("/", 1)[1]
    page.locator("#job-state.state-succeeded").wait_for(timeout=300_000)
    job = cluster.get(f"/api/jobs/{job_id}")
    assert job["state"] == "succeeded" and job["spec"]["name"] == "from-form" and job["spec"]["epochs"] == 2
    assert job["spec"]["pretrained"] is False and job["progress"]["step"] == 8
    # The validation curve: a point per epoch, beside the loss.
    page.locator("#val-miou-chart path.line").wait_for(timeout=30_000)
    assert page.locator("#val-miou-chart .dots circle").count() == 2
    assert page.locator("#val-acc-chart .dots circle").count() == 2
    assert [v["epoch"] for v in cluster.get(f"/api/jobs/{job_id}/validation")] == [1, 2]
    page.screenshot(path=str(shots / "job-validation-curve.png"), full_page=True)

    # A worker killed outright leaves its last heartbeat behind: shown as lost, with when.
    procs.kill(cluster.workers["w2"])
    page.locator("a.back").click()
    lost = page.locator('.worker-row.lost[data-node="w2"]')
    lost.wait_for(timeout=60_000)
    assert "no heartbeat since" in lost.locator(".worker-lost-at").inner_text()
    assert page.locator('.worker-row:not(.lost)[data-node="w1"]').count() == 1

    # No live worker on the gpu queue: a job waiting there is flagged.
    gpu = cluster.submit(tiny_spec(tiny_data), "--queue", "gpu")
    warning = page.locator('.queue-warning[data-queue="gpu"]')
    warning.wait_for(timeout=30_000)
    assert "no live worker consumes it" in warning.inner_text()
    page.screenshot(path=str(shots / "overview-lost-worker.png"), full_page=True)
    assert cluster.get(f"/api/jobs/{gpu}")["state"] == "queued"
    queue = cluster.get("/api/queue")
    assert [w["node"] for w in queue["lost_workers"]] == ["w2"] and queue["warnings"][0]["queue"] == "gpu"
    assert not watch.problems, "\n".join(watch.problems)
