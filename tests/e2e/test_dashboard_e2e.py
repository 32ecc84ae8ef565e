"""The dashboard in a real browser (headless Chromium) while a real map runs on the cluster.

One map of 200 small tasks, some failing, runs in another process; ``sheepdog
dashboard`` serves its database from a third. The browser watches the counts
rise, then checks the timeline (one mark per task, in the lane of the node that
ran it), a failure's traceback and output, and that the page refuses a request
without the token or from another machine. Screenshots of each page go to
``.cluster/ci-results/screenshots/<cluster>/`` (kept by CI; the docs show
copies of the Docker cluster's).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import delete_test_jobs, run, ssh_connect
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from sheepdog.poll import poll_until
from sheepdog.store import Storage

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / ".cluster" / "ci-results" / "screenshots"
TASKS = 200
#: Arguments ``a`` with ``a % FAIL_EVERY == FAIL_AT`` raise: tasks 8, 33, ... 183.
FAIL_EVERY, FAIL_AT = 25, 7
FAILED = [a + 1 for a in range(TASKS) if a % FAIL_EVERY == FAIL_AT]
WAIT_S = 600.0

SCRIPT = f"""\
import json, sys, sheepdog

def work(a):
    import socket, time
    host = socket.gethostname()
    print("arg %d on %s" % (a, host))
    time.sleep(0.5)  # long enough for the dashboard to see the counts rise
    if a % {FAIL_EVERY} == {FAIL_AT}:
        raise ValueError("arg %d fails on purpose" % a)
    return host

config = json.loads(sys.argv[1])
results = sheepdog.map(work, range({TASKS}), config, verbose=False)
with open(sys.argv[2], "w") as out:
    json.dump(results, out)
"""


@dataclass
class Watched:
    """The running map, the dashboard serving its database, and where to reach it."""

    config: dict[str, Any]
    map_proc: subprocess.Popen[str]
    results_file: Path
    url: str
    port: int
    request_id: int

    def page(self, path: str = "") -> str:
        base, _, query = self.url.partition("?")
        return f"{base}{path}?{query}"

    def results(self) -> list[str | None]:
        """The map's results, once it has finished (bounded wait)."""
        try:
            out, err = self.map_proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.map_proc.kill()
            raise
        assert self.map_proc.returncode == 0, (out, err)
        value: list[str | None] = json.loads(self.results_file.read_text())
        return value


def _request_id(dbfile: str) -> int | None:
    if not os.path.isfile(dbfile):
        return None
    with Storage(dbfile, create=False) as storage:
        ids = [r["id"] for r in storage.list_requests()]
    return ids[-1] if ids else None


@pytest.fixture(scope="module")
def watched(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Watched]:
    tmp = tmp_path_factory.mktemp("dashboard")
    config = dict(cluster, dbfile=str(tmp / "sheepdog.sqlite"))
    script = tmp / "watched_map.py"
    script.write_text(SCRIPT)
    results_file = tmp / "results.json"
    map_proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(config), str(results_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
    )
    dashboard: subprocess.Popen[str] | None = None
    try:
        def submitted() -> bool:
            assert map_proc.poll() is None, map_proc.communicate()
            return _request_id(config["dbfile"]) is not None

        assert poll_until(submitted, timeout_s=120, interval_s=0.2), "no request stored"
        dashboard = subprocess.Popen(
            [sys.executable, "-m", "sheepdog", "dashboard", "--dbfile", config["dbfile"],
             "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert dashboard.stdout is not None
        printed = [dashboard.stdout.readline() for _ in range(3)]
        url = next((line.strip() for line in printed if "token=" in line), "")
        assert url.startswith("http://127.0.0.1:"), (printed, dashboard.stderr)
        port = int(url.split(":")[2].split("/")[0])
        request_id = _request_id(config["dbfile"])
        assert request_id is not None
        yield Watched(config, map_proc, results_file, url, port, request_id)
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.communicate(timeout=30)
        if map_proc.poll() is None:
            map_proc.kill()
        map_proc.communicate()
        delete_test_jobs(cluster, config["dbfile"])


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium from Debian's packages (ci/test installs them)."""
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "apt-get install chromium chromium-driver (see ci/test)"
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1300", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest) -> Path:
    """Where this cluster's screenshots go: a folder per --cluster; no run hides another's."""
    choice = str(request.config.getoption("--cluster"))
    folder = SCREENSHOTS / ("ssh" if choice.startswith("ssh://") else choice)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shot(driver: webdriver.Chrome, path: Path, *, whole_page: bool = False) -> None:
    """Save the window, or the page's content alone (a short page leaves the window blank)."""
    if whole_page:
        assert driver.find_element(By.TAG_NAME, "body").screenshot(str(path)), path
    else:
        assert driver.save_screenshot(str(path)), path


def _finished_on_page(driver: webdriver.Chrome) -> tuple[int, str]:
    """Done plus failed tasks as the page shows them now, and the state it shows."""
    counts = driver.execute_script(
        "var n = {}; document.querySelectorAll('span.count').forEach(function (c) {"
        " n[c.dataset.state] = Number(c.querySelector('.n').textContent); });"
        " var s = document.getElementById('state'); return [n, s ? s.textContent : ''];")
    return counts[0].get("done", 0) + counts[0].get("error", 0), counts[1]


def test_the_counts_rise_while_the_map_runs(
        watched: Watched, browser: webdriver.Chrome, shots: Path) -> None:
    browser.get(watched.page(f"requests/{watched.request_id}"))
    assert _finished_on_page(browser)[1] == "running"
    seen: list[int] = []
    failures_while_running: list[str] = []

    def all_in() -> bool:
        finished, state = _finished_on_page(browser)
        if not seen or finished != seen[-1]:
            seen.append(finished)
            if 0 < finished < TASKS and len(seen) == 3:
                _shot(browser, shots / "request-running.png")
        if state == "running":
            failures_while_running.extend(browser.execute_script(
                "return Array.from(document.querySelectorAll('div.failure'))"
                ".map(function (d) { return d.dataset.type; });"))
        return state == "finished"

    assert poll_until(all_in, timeout_s=WAIT_S, interval_s=0.25), seen
    watched.results()
    # The page's own polling moved it: several values on the way, each above the last.
    between = [n for n in seen if 0 < n < TASKS]
    assert len(between) >= 2, seen
    assert seen == sorted(seen) and seen[-1] == TASKS, seen
    # Failures appear as they happen, not only once the map is over.
    assert "ValueError" in failures_while_running, seen


def test_the_timeline_has_one_mark_per_task_on_its_node(
        watched: Watched, browser: webdriver.Chrome, shots: Path) -> None:
    results = watched.results()
    browser.get(watched.page(f"requests/{watched.request_id}"))
    marks = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg.timeline rect.task')).map("
        "function (r) { return [Number(r.dataset.task), r.dataset.lane,"
        " r.getAttribute('class')]; });")
    assert sorted(m[0] for m in marks) == list(range(1, TASKS + 1))
    assert sorted(m[0] for m in marks if m[2] == "task failed") == FAILED
    with Storage(watched.config["dbfile"], create=False) as storage:
        outputs = {i: storage.get_task(watched.request_id, i)["stdout"] for i in FAILED}
    for index, lane, _ in marks:
        # A lane is a worker (host:pid:array task) or, with many workers, a node.
        node = lane.split(":")[0]
        ran_on = results[index - 1] or outputs[index].split(" on ")[1].strip()
        assert node == ran_on, (index, lane, ran_on)
    assert len({lane.split(":")[0] for _, lane, _ in marks}) >= 1
    _shot(browser, shots / "request.png")


def test_a_failed_tasks_traceback_and_output_are_shown(
        watched: Watched, browser: webdriver.Chrome, shots: Path) -> None:
    watched.results()
    browser.get(watched.page(f"requests/{watched.request_id}"))
    group = browser.find_element(By.CSS_SELECTOR, "div.failure[data-type='ValueError']")
    first = FAILED[0]
    assert f"× {len(FAILED)}" in group.text
    traceback = group.find_element(By.CSS_SELECTOR, ".traceback pre").text
    assert f"ValueError: arg {first - 1} fails on purpose" in traceback
    assert "Traceback" in traceback
    stdout = group.find_element(By.CSS_SELECTOR, ".stdout pre").text
    assert stdout.startswith(f"arg {first - 1} on ")
    commands = [c.text for c in browser.find_elements(By.CSS_SELECTOR, ".cmd code")]
    assert any(c.startswith(f"sheepdog rerun {watched.request_id} --failed") for c in commands)
    browser.execute_script("arguments[0].scrollIntoView();", group)
    _shot(browser, shots / "failures.png")


def test_the_requests_page_lists_the_map(
        watched: Watched, browser: webdriver.Chrome, shots: Path) -> None:
    watched.results()
    browser.get(watched.page())
    row = browser.find_element(By.CSS_SELECTOR, f"tr[data-request='{watched.request_id}']")
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "work"
    assert cells[3] == "finished"
    assert cells[4:7] == [str(TASKS), str(TASKS - len(FAILED)), str(len(FAILED))]
    _shot(browser, shots / "requests.png", whole_page=True)


def test_without_the_token_or_from_another_machine_it_is_refused(
        watched: Watched, browser: webdriver.Chrome, cluster: dict[str, Any]) -> None:
    browser.get(watched.page().split("?")[0])
    assert "forbidden" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(watched.page(f"requests/{watched.request_id}").split("?")[0] + "?token=wrong")
    assert "forbidden" in browser.find_element(By.TAG_NAME, "body").text
    # The cluster's head node reaches this machine by this name (its workers call back to
    # it). A head node that is this machine (the native cluster) resolves it to loopback:
    # it knocks at this machine's own non-loopback address instead, which is no loopback.
    probe = ("import socket, sys\n"
             "ip = socket.gethostbyname(sys.argv[1])\n"
             "if ip.startswith('127.'):\n"
             "    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "    u.connect(('10.255.255.255', 1))  # picks the route; sends nothing\n"
             "    ip = u.getsockname()[0]\n"
             "s = socket.socket()\n"
             "s.settimeout(10)\n"
             "try:\n"
             "    s.connect((ip, int(sys.argv[2])))\n"
             "    print('connected', ip)\n"
             "except ConnectionRefusedError:\n"
             "    print('refused', ip)\n"
             "except OSError as exc:\n"
             "    print('unreachable', ip, exc)\n")
    client = ssh_connect(cluster)
    try:
        status, out, err = run(client, f"python3 -c {shlex.quote(probe)} "
                                        f"{shlex.quote(cluster['localhost'])} {watched.port}")
    finally:
        client.close()
    assert status == 0, err
    said, ip = out.split()[:2]
    assert not ip.startswith("127.") and ip != "0.0.0.0", out
    assert said == "refused", out
