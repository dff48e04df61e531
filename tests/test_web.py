"""The web page at / driven end to end in a real headless Chromium (Debian's package, via Playwright)."""

import os
import shutil
from pathlib import Path

import pytest

from tests._server import Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("MEDPIPE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("MEDPIPE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "build" / "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MEDPIPE_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-extensions", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    s = Server(trained_run / "model", log=tmp_path_factory.mktemp("web") / "server.log").wait_ready()
    yield s
    s.stop()


def test_page_predicts_and_shows_heatmap(browser, server, data_dir, tmp_path):
    import pandas as pd

    image = pd.read_csv(data_dir / "records.csv")["path"].iloc[0]
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    assert page.title().startswith("medpipe")
    page.set_input_files("#file", image)
    page.wait_for_selector("body[data-state='done']", state="attached", timeout=60_000)

    label = page.inner_text("#label")
    served = __import__("json").loads(server.invoke(Path(image).read_bytes())[2])["predictions"][0]
    assert label.split(" ")[0] == served["label"]
    bars = page.query_selector_all("#bars .bar")
    assert len(bars) == len(served["probabilities"])
    assert page.query_selector("#bars .bar.top").get_attribute("data-cls") == served["label"]
    # the label given and, where the decision rule named another class than the most likely one, why
    why = page.inner_text("#why") if page.is_visible("#why") else ""
    if served["label"] != served["most_likely"]:
        assert "flagged by" in why and f"most likely: {served['most_likely']}" in why, why
        assert page.query_selector("#bars .bar.likely").get_attribute("data-cls") == served["most_likely"]
    else:
        assert why == "" and not page.query_selector_all("#bars .bar.likely")
    # The heatmap canvas holds the image plus a coloured overlay: it differs from the plain input canvas.
    diff = page.evaluate("""() => {
        const a = document.getElementById('input-canvas').getContext('2d').getImageData(0, 0, 224, 224).data;
        const b = document.getElementById('cam-canvas').getContext('2d').getImageData(0, 0, 224, 224).data;
        let d = 0, nonblank = 0;
        for (let i = 0; i < a.length; i += 4) { d += Math.abs(a[i] - b[i]) + Math.abs(a[i+1] - b[i+1]) + Math.abs(a[i+2] - b[i+2]); nonblank += a[i] + a[i+1] + a[i+2] > 0; }
        return {meanDiff: d / (a.length / 4), nonblank: nonblank};
    }""")
    assert diff["nonblank"] > 1000 and diff["meanDiff"] > 5
    assert all(u.startswith(server.url) or u.startswith("data:") for u in requests)  # no external assets
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "web_page_prediction.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # A file that is not an image: a clear message, no result change, no crash.
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("body[data-state='error']", state="attached", timeout=30_000)
    msg = page.inner_text("#error")
    assert "could not be used as an image" in msg and "allowed formats" in msg
    assert page.inner_text("#label") == "No result" and not page.query_selector_all("#bars .bar")
    page.screenshot(path=str(ARTIFACTS / "web_page_not_an_image.png"), full_page=True)
    page.close()
