"""The web page in a real browser: headless Chromium (Debian's, with its chromedriver) driven by selenium against
a real uvicorn serving the tiny bundle with an API key. What the page shows is checked against what the API
stored, so a page that renders the wrong field, or nothing, fails."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 30


def _skip_without_a_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)",
                    allow_module_level=True)
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e .[dev])")


_skip_without_a_browser()
pytest.importorskip("fastapi")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from test_serve_api import KEY, LiveServer, _config  # noqa: E402

from edgeretina.dataset import read_labels  # noqa: E402

OTHER = {"referable": "negative", "negative": "referable", "ungradable": "referable"}


@pytest.fixture(scope="module")
def server(onnx_bundle, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api.key"
    key_file.write_text(KEY + "\n")
    with LiveServer(_config(onnx_bundle, tmp_path_factory.mktemp("serve") / "data", api_key_file=key_file)) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with a private, throwaway profile."""
    profile = tempfile.mkdtemp(prefix="edgeretina-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def _text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def _loaded_width(driver, element_id: str) -> int:
    """The picture's decoded width once it is loaded and shown (0 while it is not, or when it is hidden)."""
    return driver.execute_script("const i = document.getElementById(arguments[0]);"
                                 "return i.offsetParent !== null && i.complete ? i.naturalWidth : 0;", element_id)


def _history(driver) -> dict[str, list[str]]:
    """The history table's rows by file name: [time, file, outcome, grade, P(referable), origin]."""
    rows = driver.execute_script("return [...document.querySelectorAll('#history-table tbody tr')]"
                                 ".map(tr => [...tr.cells].map(td => td.textContent));")
    return {row[1]: row for row in rows if len(row) == 6}


def _filter(driver, screening: str) -> None:
    Select(driver.find_element(By.ID, "f-screening")).select_by_value(screening)
    driver.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()


def test_upload_shows_the_stored_result_and_the_history_filters_it(server, browser, phantom_test, tmp_path):
    # a client's name with markup in it: it must come back as text, never as elements
    name = "left eye <img src=x onerror=alert(1)>.jpg"
    photo = tmp_path / name
    shutil.copyfile(read_labels(phantom_test)[0].path, photo)
    browser.get(server.url + "/")
    # no key yet: the history answers 401, the page says so and asks for the key
    _wait(browser, lambda d: "401" in _text(d, "#history-table tbody"), "the history's 401")
    key_box = browser.find_element(By.ID, "api-key")
    assert key_box.is_displayed()
    key_box.send_keys(KEY + "\n")
    _wait(browser, lambda d: "401" not in _text(d, "#history-table tbody"), "the history with the key")
    assert _text(browser, "#service-state").startswith("ready")
    with server.client() as client:   # the page may run only its own script, and show only its own pictures
        policy = client.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "img-src 'self' blob:" in policy and "unsafe-inline" not in policy

    browser.find_element(By.ID, "file").send_keys(str(photo))
    _wait(browser, lambda d: _text(d, "#status") == f"{name}: graded", "the grade")
    result_id = _text(browser, "#result-id").rsplit(" · ", 1)[1]
    with server.client(headers={"X-API-Key": KEY}) as client:
        stored = client.get(f"/v1/results/{result_id}").json()
    assert stored["file_name"] == name and stored["origin"] == "serve"
    decision = browser.find_element(By.ID, "decision")
    assert decision.get_attribute("class") == f"decision {stored['screening']}"
    assert decision.text.lower().startswith(stored["screening"])
    summary = dict(row.split(" ", 1) for row in _text(browser, "#summary").splitlines())
    assert summary["Grade"] == f"{stored['grade']} — {stored['grade_name']}"
    assert summary["P(referable)"] == f"{100 * stored['referable_probability']:.1f} %"
    probabilities = _text(browser, "#probabilities").splitlines()
    assert probabilities == [f"{g} {n} {100 * p:.1f} %" for g, (n, p) in enumerate(
        zip(("No apparent retinopathy", "Mild non-proliferative DR", "Moderate non-proliferative DR",
             "Severe non-proliferative DR", "Proliferative DR"), stored["probabilities"]))]
    assert probabilities[stored["grade"]].startswith(f"{stored['grade']} {stored['grade_name']} ")
    neighbors = _text(browser, "#neighbors").splitlines()
    assert len(neighbors) == 1 + len(stored["neighbors"]) >= 2
    assert neighbors[1].startswith(f"{stored['neighbors'][0]['case_id']} {stored['neighbors'][0]['grade']} ")
    # the pictures come through fetch() with the key (a plain <img src> would get 401 and show nothing)
    _wait(browser, lambda d: _loaded_width(d, "card-img") > 0, "the report card")
    _wait(browser, lambda d: _loaded_width(d, "overlay-img") > 0, "the overlay")
    _wait(browser, lambda d: _loaded_width(d, "photo-img") > 0, "the photo")
    assert browser.find_elements(By.CSS_SELECTOR, "#status img, #result-id img, #history-table img") == []

    _wait(browser, lambda d: name in _history(d), "the history row")
    row = _history(browser)[name]
    assert row[1:] == [name, stored["screening"], str(stored["grade"]), summary["P(referable)"], "serve"]
    assert row[0] == stored["created"].replace("T", " ").split(".")[0]
    # the outcome filter: another outcome hides the row, its own shows it again (and only its kind)
    _filter(browser, OTHER[stored["screening"]])
    _wait(browser, lambda d: name not in _history(d), "the row filtered out")
    assert all(r[2] == OTHER[stored["screening"]] for r in _history(browser).values())
    _filter(browser, stored["screening"])
    _wait(browser, lambda d: name in _history(d), "the row filtered back in")
    assert all(r[2] == stored["screening"] for r in _history(browser).values())

    # not a photo: the service's 415 and its reason, as the page's error
    text = tmp_path / "notes.txt"
    text.write_text("not a fundus photograph\n")
    browser.find_element(By.ID, "file").send_keys(str(text))
    _wait(browser, lambda d: _text(d, "#status").startswith("notes.txt: 415"), "the 415")
    assert "not a photo this service grades" in _text(browser, "#status")
    assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
