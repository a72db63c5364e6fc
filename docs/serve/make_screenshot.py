"""Take docs/serve/web-page.png: the service's page after grading a negative and then a referable phantom photo.

    .venv/bin/python docs/serve/make_screenshot.py [--bundle demo-run/bundle] [--labels demo-run/test/labels.csv]
                                                   [--out docs/serve/web-page.png]

Serves the bundle on a free loopback port in this process (a throwaway results store), opens the page in
headless Chromium (Debian's /usr/bin/chromium and chromedriver) at 1280x1000, grades one grade-0 and one
grade-3 photo of the labels through the page's file input, and saves the window. Stops, writing nothing,
when the last photo does not come out referable (a different bundle: pick other photos with --labels).
Needs `make demo` (the bundle and its test photos), the [serve] extra and selenium.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from edgeretina.dataset import read_labels
from edgeretina.serve.app import create_app
from edgeretina.serve.config import ServeConfig

WINDOW = (1280, 1000)
WAIT_S = 60


@contextmanager
def serving(bundle: Path, data: Path):
    """The service on 127.0.0.1:<free port>, in a thread, loaded; yields its URL."""
    app = create_app(ServeConfig(bundle=bundle, port=0, data=data))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the service did not start")
        time.sleep(0.05)
    if not app.state.service.wait_loaded(WAIT_S) or app.state.service.state != "ready":
        raise SystemExit(f"the bundle did not load: {app.state.service.reason}")
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def chromium(profile: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()


def grade_on_page(driver, photo: Path) -> str:
    """Choose `photo` in the page's file input; wait for its result, pictures and history row; its outcome."""
    driver.find_element(By.ID, "file").send_keys(str(photo.resolve()))
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "status").text == f"{photo.name}: graded", f"grading {photo.name}")
    wait.until(lambda d: d.execute_script(
        "return ['card-img', 'overlay-img', 'photo-img'].every(id => document.getElementById(id).naturalWidth > 0)"
        " && [...document.querySelectorAll('#history-table tbody td')].some(td => td.textContent === arguments[0])",
        photo.name), "the pictures and the history row")
    return driver.find_element(By.ID, "decision").get_attribute("class").split()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("demo-run/bundle"))
    parser.add_argument("--labels", type=Path, default=Path("demo-run/test/labels.csv"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("web-page.png"))
    args = parser.parse_args()
    labeled = read_labels(args.labels)
    photos = [next(Path(item.path) for item in labeled if item.grade == grade) for grade in (0, 3)]
    work = Path(tempfile.mkdtemp(prefix="edgeretina-screenshot-"))
    try:
        with serving(args.bundle, work / "data") as url, chromium(work / "profile") as driver:
            driver.get(url + "/")
            outcomes = [grade_on_page(driver, photo) for photo in photos]
            if outcomes[-1] != "referable":
                print(f"{photos[-1].name} came out {outcomes[-1]}, not referable: no screenshot", file=sys.stderr)
                return 1
            # the page as a 1280 px wide screen shows it, the history under the result included
            height = max(WINDOW[1], driver.execute_script("return document.documentElement.scrollHeight"))
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": WINDOW[0], "height": height, "deviceScaleFactor": 1, "mobile": False})
            driver.save_screenshot(str(args.out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} ({', '.join(f'{p.name}: {o}' for p, o in zip(photos, outcomes))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
