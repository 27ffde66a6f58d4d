"""report.html opened in a real browser — Debian's Chromium, driven by Playwright: every plot
loads and has ink where it stands, nothing is fetched, and the page logs no error."""
import io
from pathlib import Path

import matplotlib.image
import pytest

from clsjob.config import ClassifyConfig, validate
from clsjob.run.pipeline import run_classify
from helpers import LABELS, sample_texts, write_shards

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (`make test` "
                                       "installs it where it runs as root with apt)")


def labelled_run(model, inp, out, baseline=None):
    return run_classify(validate({
        "input": {"path": str(inp), "label_column": "label"},
        "backend": {"model": str(model), "max_length": 64, "dtype": "float32"},
        "output": {"path": str(out), "rows_per_part": 50},
        **({"monitor": {"baseline": str(baseline)}} if baseline else {})}, model=ClassifyConfig))


def test_every_plot_renders_in_chromium(qwen_model, ray_cluster, tmp_path):
    for day, seed in (("d1", 0), ("d2", 3)):
        write_shards(tmp_path / day, [{"text": sample_texts(120, seed=seed),
                                       "label": [LABELS[(i * 5 + seed) % 3] for i in range(120)]}])
    labelled_run(qwen_model, tmp_path / "d1", tmp_path / "out1")
    labelled_run(qwen_model, tmp_path / "d2", tmp_path / "out2", baseline=tmp_path / "out1")
    page_file = tmp_path / "out2" / "report.html"
    text = page_file.read_text()
    # Self-contained: the images are inline and nothing is fetched or run at view time.
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert text.count('src="data:image/png;base64,') == 6

    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(page_file.as_uri())
        ids = page.eval_on_selector_all("figure", "figures => figures.map(f => f.id)")
        assert ids == ["confusion", "f1", "reliability", "confidence", "coverage", "drift"]
        inked = {}
        for fid in ids:
            image = page.locator(f"#{fid} img")
            assert image.evaluate("i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100"), fid
            pixels = matplotlib.image.imread(io.BytesIO(image.screenshot()), format="png")
            # Share of the plot's pixels that are not near-white: axes, bars, text.
            inked[fid] = float((pixels[..., :3].mean(axis=2) < 0.85).mean())
        browser.close()
    assert errors == []
    assert all(share > 0.02 for share in inked.values()), inked
