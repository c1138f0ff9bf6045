"""Save a screenshot of a report's per-token explorer, with a query token clicked (docs/report.png).

    python -m bif_fast demo && python docs/screenshot.py bif_fast_report/index.html docs/report.png

Needs what the browser test needs (Debian's chromium and chromium-driver, and selenium); it opens the page
the way that test does.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from tests.test_report_browser import open_page  # noqa: E402


def main(page: str, out: str, query: int = 0, token: int = 6) -> None:
    with tempfile.TemporaryDirectory() as user_dir:
        driver = open_page(Path(page), user_dir, width=1000, height=1700)
        try:
            Select(driver.find_element(By.ID, "query-select")).select_by_value(str(query))
            explorer = driver.find_element(By.ID, "query-select")
            driver.execute_script("arguments[0].scrollIntoView()", explorer)
            tokens = driver.find_elements(By.CSS_SELECTOR, "#query-view span.tok")
            tokens[min(token, len(tokens) - 1)].click()
            driver.save_screenshot(out)
        finally:
            driver.quit()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
