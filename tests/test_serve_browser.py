"""A real browser (Debian's headless Chromium, driven by Selenium through /usr/bin/chromedriver)
opens /submit, uploads an attack, follows the status page, which refreshes itself without any
JavaScript until the submission is scored, and finds the row on the leaderboard at /. The server
scores the first EXAMPLES test images (`--num_eval_examples`), to keep it short."""

import os
import re

import numpy as np
import pytest
from serving_helpers import (
    Server,
    add_participant,
    mnist_test_set,
    npy_bytes,
    open_database,
    random_sign_attack,
    stop_servers_after_each_test,  # noqa: F401 (an autouse fixture)
    upload,
)

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EXAMPLES = 1000


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: install Debian's chromium and "
                    "chromium-driver (.ci/run does)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def test_a_browser_submits_follows_the_status_page_and_finds_the_row(tmp_path, browser):
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    state = tmp_path / "state"
    server = Server(state, f"--num_eval_examples={EXAMPLES}").wait_ready()
    db = open_database(state_dir=state)
    name, token = add_participant(db, "Ada <Lovelace>")
    test_images = mnist_test_set()[0][:EXAMPLES]
    attack = tmp_path / "my attack.npy"
    np.save(attack, random_sign_attack(test_images, seed=7))
    # A wrong token: the form again, saying so (the file read to its end first, so that the
    # browser shows the answer rather than a broken connection).
    browser.get(f"{server.url}/submit")
    browser.find_element(By.NAME, "token").send_keys("not-" + token)
    browser.find_element(By.NAME, "file").send_keys(str(attack))
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 60).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, "p.error"))
    assert browser.find_element(By.CSS_SELECTOR, "p.error").text == "unknown token"
    # Two jobs ahead in the queue: the status page is first seen waiting.
    _, other = add_participant(db)
    for seed in (8, 9):
        ahead = upload(server.url, other, npy_bytes(random_sign_attack(test_images, seed)))
        assert ahead.status_code == 202, ahead.text
    browser.get(f"{server.url}/submit")
    assert browser.execute_script("return document.scripts.length") == 0
    browser.find_element(By.NAME, "token").send_keys(token)
    browser.find_element(By.NAME, "file").send_keys(str(attack))
    Select(browser.find_element(By.NAME, "track")).select_by_value("black-box")
    browser.find_element(By.NAME, "attack").send_keys("Random signs")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 60).until(lambda driver: "/submissions/" in driver.current_url)
    status_url = browser.current_url
    assert re.fullmatch(rf"{server.url}/submissions/[0-9a-f]{{24}}/[A-Za-z0-9_-]{{32}}",
                        status_url)
    seen = set()

    def scored(driver):
        """The page reloads itself: an element read during a reload is gone (missing, stale, or
        in Chromium's own words not in the document), and is read again at the next poll."""
        try:
            seen.add(driver.find_element(By.ID, "status").text)
        except WebDriverException as error:
            gone = isinstance(error, (NoSuchElementException, StaleElementReferenceException)) \
                or "does not belong to the document" in str(error)
            if not gone:
                raise
        return "scored" in seen

    WebDriverWait(browser, 120, poll_frequency=0.2).until(scored)
    assert browser.current_url == status_url
    assert seen & {"queued", "scoring"}, seen  # it refreshed itself from a waiting state
    accuracy = browser.find_element(By.ID, "accuracy").text
    assert re.fullmatch(r"\d+\.\d\d%", accuracy), accuracy
    assert "my attack.npy" in browser.page_source and "Ada &lt;Lovelace&gt;" in \
        browser.page_source
    browser.get(f"{server.url}/")
    tables = browser.find_elements(By.TAG_NAME, "table")
    assert [heading.text for heading in browser.find_elements(By.TAG_NAME, "h2")] == \
        ["White-box leaderboard", "Black-box leaderboard"]
    rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in tables[1].find_elements(By.CSS_SELECTOR, "tbody tr")]
    ours = [row for row in rows if row[1] == name]
    assert len(ours) == 1 and ours[0][0] == "Random signs" and ours[0][2] == accuracy, rows
    assert any(row[0] == "No attack (clean test images)" for row in rows), rows
    white_box = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                 for row in tables[0].find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert all(row[1] != name for row in white_box)
    server.stop()
    db.dispose()
