"""The web playground in real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
type a prompt, watch the answer stream in, check it equals the model's own greedy answer."""

import os
import shutil
import tempfile

import pytest
from selenium import webdriver  # noqa: E402  (a dev requirement)

import lmforge
from lmforge.deploy.batching import Engine
from lmforge.deploy.server import BackgroundServer, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "playground-key"

# CI installs the browser (.ci/run), so there a missing browser fails; elsewhere the test is skipped.
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)) and not os.environ.get("CI"),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium must never fetch a driver or a browser
    profile = tempfile.mkdtemp(prefix="lmforge-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_playground_chat_streams_the_greedy_answer(browser, tiny_lm_dirs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    lm = lmforge.load(tiny_lm_dirs["chat"])
    engine = Engine(lm.model, lm.tokenizer, lm.eos_ids, max_batch=4)
    system, question = "You answer in one word.", "What is the capital of France?"
    expected = lm.generate([{"role": "system", "content": system}, {"role": "user", "content": question}],
                           max_new_tokens=40)
    with BackgroundServer(create_app(lm, engine, model_id="tiny-chat", api_key=KEY)) as srv:
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 30)
        assert "lmforge playground" in browser.title
        key = browser.find_element(By.ID, "api_key")
        key.send_keys(KEY)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-chat")
        browser.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                               "t.dispatchEvent(new Event('input'))")
        tokens = browser.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("40")
        browser.find_element(By.ID, "system").send_keys(system)
        browser.find_element(By.ID, "prompt").send_keys(question, Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
        text = browser.execute_script("return arguments[0].querySelector('.content').textContent", reply)
        assert "error" not in reply.get_attribute("class"), text
        assert text == expected
        assert int(reply.get_attribute("data-chunks")) > 1  # it arrived in pieces, not in one go
        assert browser.find_element(By.ID, "status").text.startswith("done")
        user = browser.find_element(By.CSS_SELECTOR, ".msg.user .content").text
        assert user == question

        # a second turn carries the history; a wrong key shows OpenAI's 401 message in the page
        key.clear()
        key.send_keys("wrong")
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        browser.find_element(By.ID, "prompt").send_keys("And of Italy?", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == 2)
        last = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert "error" in last.get_attribute("class") and "Incorrect API key" in last.text
