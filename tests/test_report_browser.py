"""The report's per-token explorer in a real headless Chromium (Debian's chromium and chromium-driver, driven
through selenium; ``.ci/run`` installs all three): the elements are there, they show the data the page
embeds, and clicks do what the page says. ``BIF_FAST_SCREENSHOT=PATH`` also saves the page as a PNG there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
except ImportError:
    webdriver = None
if webdriver is None or not (CHROMIUM and DRIVER):
    missing = "selenium is not installed" if webdriver is None else "Chromium and ChromeDriver are not installed"
    if os.environ.get("BIF_FAST_REQUIRE_BROWSER") == "1":  # CI's browser step: a skip would hide the test
        raise RuntimeError(f"BIF_FAST_REQUIRE_BROWSER=1 but {missing}")
    pytest.skip(f"{missing} (.ci/run installs Debian's chromium and chromium-driver, and selenium)",
                allow_module_level=True)  # fmt: skip

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from bif_fast.report import explorer_data, write_report  # noqa: E402
from tests.test_report import synthetic_token_result  # noqa: E402


def open_page(path, user_dir, width: int = 1100, height: int = 1400):
    """Chromium on a local file with no network of its own (the flags keep it from calling out)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={user_dir}", f"--window-size={width},{height}"]  # fmt: skip
    for flag in flags:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-explorer"))
    return driver


def _fmt(v: float) -> str:
    return f"{v:+.3f}"


def test_explorer_renders_the_data_and_clicks_inspect_tokens(tmp_path):
    res, train, query = synthetic_token_result(n_train=9, n_query=3, seed=2)
    page = write_report(res, train, query, tmp_path / "report")
    data = explorer_data(res, train, query)
    driver = open_page(page, tmp_path / "chromium")
    try:
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-explorer") == "ready"
        queries = Select(driver.find_element(By.ID, "query-select"))
        assert len(queries.options) == len(query)
        queries.select_by_value("1")
        block = data["blocks"][1][0]
        passages = Select(driver.find_element(By.ID, "passage-select"))
        labels = [f"passage {b['i']} ({_fmt(b['score'])})" for b in data["blocks"][1]]
        assert [o.text for o in passages.options] == labels
        # Both directions of the pair: the query coloured by the passage, the passage by the query.
        qview, pview = driver.find_element(By.ID, "query-view"), driver.find_element(By.ID, "passage-view")
        assert qview.text == "".join(query[1]) and pview.text == "".join(train[block["i"]])
        qtoks = qview.find_elements(By.CSS_SELECTOR, "span.tok")
        assert [int(s.get_attribute("data-pos")) for s in qtoks] == block["cols"]
        assert [s.get_attribute("title") for s in qtoks] == [_fmt(v) for v in block["colSum"]]
        strongest = max(range(len(block["colSum"])), key=lambda k: abs(block["colSum"][k]))
        rgb = "214, 39, 40" if block["colSum"][strongest] > 0 else "31, 119, 180"
        assert f"rgb({rgb})" in qtoks[strongest].get_attribute("style")  # full colour at the largest |value|
        assert len(pview.find_elements(By.CSS_SELECTOR, "span.tok")) == len(block["rows"])
        heat = driver.find_element(By.ID, "heatmap")
        assert (int(heat.get_attribute("data-rows")), int(heat.get_attribute("data-cols"))) == (
            len(block["rows"]), len(block["cols"]))  # fmt: skip
        assert int(heat.get_attribute("width")) >= len(block["cols"]) * 2
        # Clicking a query token lists its top training tokens over the whole training set.
        qtoks[2].click()
        top = driver.find_elements(By.CSS_SELECTOR, "#token-top li")
        want = data["queries"][1]["top"][data["queries"][1]["positions"].index(block["cols"][2])]
        assert [li.find_element(By.CLASS_NAME, "score").text for li in top] == [_fmt(v) for _, _, v in want]
        assert [li.text.split()[2] for li in top] == [str(i) for i, _, _ in want]  # "+0.123 passage I ..."
        assert "selected" in qtoks[2].get_attribute("class")
        # Another passage, then a click on one of its tokens: the query tokens it moves with most.
        passages.select_by_index(len(data["blocks"][1]) - 1)
        last = data["blocks"][1][-1]
        assert pview.text == "".join(train[last["i"]])
        pview.find_elements(By.CSS_SELECTOR, "span.tok")[0].click()
        items = driver.find_elements(By.CSS_SELECTOR, "#token-top li")
        top = [li.find_element(By.CLASS_NAME, "score").text for li in items]
        assert len(top) == min(data["topTokens"], len(last["cols"]))
        assert top == sorted(top, key=float, reverse=True)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        shot = os.environ.get("BIF_FAST_SCREENSHOT") or str(tmp_path / "report.png")
        assert driver.save_screenshot(shot)
        assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
