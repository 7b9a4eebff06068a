"""The audit report renders in headless Chromium, offline: its plots and its item table are there."""

import json

from concord.tools.cli import main

CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")


def test_the_report_renders_with_plots_and_items_in_headless_chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    assert main(["audit", "--example", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in CHROMIUM_ARGS:
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get((tmp_path / "report.html").as_uri())
        assert driver.title.startswith("Concord systems audit")
        for plot_id in ("plot-kind", "plot-owner", "plot-age"):
            plot = driver.find_element(By.ID, plot_id)
            assert plot.size["width"] > 100 and plot.size["height"] > 20, plot_id
            bars = plot.find_elements(By.CSS_SELECTOR, "rect.bar")
            assert bars and all(float(b.get_attribute("width")) >= 0 for b in bars)
        kinds = driver.find_element(By.ID, "plot-kind").find_elements(By.CSS_SELECTOR, "rect.bar")
        assert len(kinds) == len(doc["summary"]["by_kind"])
        rows = driver.find_elements(By.CSS_SELECTOR, "#items tr.item")
        assert len(rows) == doc["summary"]["items"] > 0
        first = doc["items"][0]
        assert first["kind"] in rows[0].text and first["entity_id"] in rows[0].text and "billing:" in rows[0].text
        assert driver.find_element(By.ID, "kpi-items").text == str(doc["summary"]["items"])
        # nothing loaded from anywhere: the page is one file
        resources = driver.execute_script("return performance.getEntriesByType('resource').length")
        assert resources == 0
        driver.save_screenshot(str(tmp_path / "shot.png"))
        assert (tmp_path / "shot.png").stat().st_size > 10_000
    finally:
        driver.quit()
