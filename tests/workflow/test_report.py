"""The demo run's Snakemake report, built and opened in headless Chromium (Debian's chromium).

Snakemake 9's report is one self-contained HTML file: a JavaScript app with every result embedded
as base64 data. So the checks load it in a real browser: the rendered page lists every category,
a scripted tour opens each category and each figure and records the images the app displays, and
a screenshot shows that something was drawn. Skipped where ``chromium`` is not on PATH (CI runs
``apt-get install -y --no-install-recommends chromium`` first).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import yaml

from ctgen.jobs.figure_list import FIGURES, LABEL_TABLES, TABLES
from ctgen.jobs.figures import WIDTH_IN
from tests.workflow.wf import snakemake

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.workflow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install -y chromium")]
# as the report sorts them (the tiny run has no radiologist-labelled reports: its labeller table is the agreement)
CATEGORIES = tuple(sorted({*FIGURES.values(), *(c for c, _ in TABLES.values()), LABEL_TABLES["label_agreement"]}))
WINDOW = (1280, 900)  # browser viewport (width, height) in pixels
# Injected before </body> of a copy of the report: opens every category and every figure in it
# (the eye buttons), then writes "category/filename/decoded width" of each displayed PNG into <pre id="tour">.
TOUR_JS = """<script>
(async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const link = (text) => [...document.querySelectorAll("a")].find((a) => a.textContent.trim() === text);
  const seen = [];
  await sleep(500);
  for (const category of CATEGORIES) {
    const back = link("Results");
    if (back) { back.click(); await sleep(300); }
    const cat = link(category);
    if (!cat) { seen.push(category + "/missing/0"); continue; }
    cat.click(); await sleep(300);
    const n = document.querySelectorAll('a[iconname="eye"]').length;
    for (let i = 0; i < n; i++) {
      document.querySelectorAll('a[iconname="eye"]')[i].click(); await sleep(300);
      for (const img of document.querySelectorAll('img[src^="data:image/png"]')) {
        const m = img.src.match(/filename=([^;]+);/);
        seen.push(category + "/" + (m ? m[1] : "?") + "/" + img.naturalWidth);
      }
    }
  }
  const out = document.createElement("pre");
  out.id = "tour";
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
})();
</script>"""


def chromium(page: Path, *args: str, budget_ms: int = 10_000) -> str:
    """Run headless Chromium on a local page; -> its stdout. The virtual-time budget lets the
    report's JavaScript app render (and timers run) before the DOM is dumped or the shot taken."""
    profile = page.parent / f".chromium-{page.stem}"  # a private profile: parallel runs do not collide
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           f"--virtual-time-budget={budget_ms}", *args, page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def rendered_text(dom: str) -> str:
    """The page's visible text: the DOM without scripts, styles and tags (embedded data excluded)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture(scope="module")
def demo_report(demo_run) -> Path:
    """The finished demo run's report.html (snakemake --report)."""
    snakemake(demo_run, "--report", "report.html")
    return demo_run / "report.html"


def test_report_renders_its_intro_and_every_category(demo_report):
    text = rendered_text(chromium(demo_report, "--dump-dom"))
    assert "ctgen: text-to-CT generation" in text  # workflow.rst, rendered by the app
    missing = [c for c in CATEGORIES if c not in text]
    assert not missing, f"categories not rendered: {missing}\n{text[:2000]}"


def test_report_embeds_every_figure_and_table_byte_for_byte(demo_report):
    html = demo_report.read_text()
    figures = demo_report.parent / "results/figures"
    for name in FIGURES:
        png = (figures / f"{name}.png").read_bytes()
        assert base64.b64encode(png).decode() in html, f"{name}.png is not embedded in the report"
    tables = demo_report.parent / "results/tables"
    for name in TABLES:  # every metric table, as a table (HTML) and as data (CSV), not only as a picture
        for kind in ("html", "csv"):
            data = (tables / f"{name}_table.{kind}").read_bytes()
            assert base64.b64encode(data).decode() in html, f"{name}_table.{kind} is not embedded in the report"
    agreement = (demo_report.parent / "results/reports/label_agreement.html").read_bytes()  # the labeller's, too
    assert base64.b64encode(agreement).decode() in html


def test_report_opens_with_the_faithfulness_figure_and_tables_name_n_and_profile(demo_report):
    dom = chromium(demo_report, "--dump-dom")
    text = rendered_text(dom)
    assert text.index("Faithfulness: are the findings") < text.index("About this run")  # the front page opens with it
    png = (demo_report.parent / "results/figures/faithfulness.png").read_bytes()
    first = re.search(r'<img[^>]*src="data:image/png[^"]*base64,([^"]+)"', dom)
    assert first, "the report shows no image"
    data = re.sub(r"\s|&#10;|&#13;", "", first.group(1))  # the URI is wrapped in lines (see ctgen.jobs.tables.write_intro)
    assert base64.b64decode(data) == png, "the first image of the report is not the faithfulness figure"
    assert CATEGORIES[0] == FIGURES["faithfulness"]  # and its category comes first
    html = demo_report.read_text().replace("&#64;", "@")  # docutils writes the @ of a literal as an entity
    for name in ("faithfulness", "distribution", "alignment"):  # each caption states n and profile
        caption = (demo_report.parent / f"results/report/{name}.rst").read_text()
        # "n = 6 (``net@hash``)", or "n = 6 (2 patients) (``net@hash``)" where the CIs resample patients or reports
        found = re.search(r"n = (\d+)(?: \(\d+ \w+\))? \(``([\w-]+@[0-9a-f]{8})``\)", caption)
        assert found, (name, caption)
        assert f"n = {found.group(1)}" in html and found.group(2) in html, f"the {name} caption is not in the report"


def test_every_figure_displays_in_its_category(demo_report, tmp_path):
    html = demo_report.read_text()
    tour = TOUR_JS.replace("CATEGORIES", json.dumps(CATEGORIES))
    end = html.rfind("</body>")
    page = tmp_path / "tour.html"
    page.write_text(html[:end] + tour + html[end:])
    dom = chromium(page, "--dump-dom", budget_ms=30_000)
    found = re.search(r'<pre id="tour">(.*?)</pre>', dom, flags=re.S)
    assert found, "the tour script did not finish"
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    shown = {entry.split("/")[1]: entry for entry in seen}
    assert set(shown) == {f"{n}.png" for n in FIGURES}, seen
    dpi = yaml.safe_load((demo_report.parent / "config.yaml").read_text())["figures"]["dpi"]
    for entry in seen:  # decoded by the browser at the size the figure was drawn
        assert int(entry.rsplit("/", 1)[1]) == round(WIDTH_IN * dpi), entry


def test_screenshot_of_the_report_is_not_blank(demo_report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(demo_report, f"--screenshot={shot}", budget_ms=15_000)
    img = mpimg.imread(shot)[..., :3]  # (rows, cols, RGB) in [0, 1]
    assert img.shape[:2] == (WINDOW[1], WINDOW[0])
    assert img.std() > 0.1, img.std()  # text, sidebar and DAG, not an empty page
