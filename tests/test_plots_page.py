"""`dvc plots show` and `dvc plots diff` as a user opens them: the page in headless Chromium with
every request off this machine refused, its charts drawn (in SVG, so the marks can be read back)."""

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, copy_repo, run

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright (pip install playwright)")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the repo with the committed plots, then the FID curve and the sampling speeds of
    the workspace changed (a second revision for `dvc plots diff`)."""
    repo = copy_repo(tmp_path_factory.mktemp("plots") / "repo")
    shutil.copytree(REPO / "plots", repo / "plots")
    run(["git", "add", "plots"], repo)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "plots"], repo)
    for name, column in (("fid_vs_nfe.csv", "fid"), ("speed.csv", "images_per_s")):
        table = pd.read_csv(repo / "plots" / "fid" / name)
        table[column] *= 1.5
        table.to_csv(repo / "plots" / "fid" / name, index=False)
    return repo


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_offline(browser, page_path: Path):
    """The page, opened with every request but file:// ones refused, once all its charts are drawn;
    (the page, the refused URLs)."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    refused: list[str] = []

    def route(request_route):
        if request_route.request.url.startswith("file://"):
            return request_route.continue_()
        refused.append(request_route.request.url)
        return request_route.abort()

    page.route("**/*", route)
    charts = len(re.findall(r"vegaEmbed\('#", page_path.read_text()))
    page.goto(page_path.as_uri())
    page.wait_for_function(f"document.querySelectorAll('.vega-embed svg.marks').length == {charts}", timeout=30_000)
    return page, refused


def chart(page, title: str):
    """The drawn chart whose title starts with `title`."""
    return page.locator(".vega-embed svg.marks").filter(has=page.locator(f"text=/^{re.escape(title)}/"))


def test_dvc_plots_show_draws_every_chart_with_no_network(repo, browser):
    run(["dvc", "plots", "show", "-o", "shown"], repo)
    page, refused = open_offline(browser, repo / "shown" / "index.html")
    assert not refused
    drawn, marks = page.locator(".vega-embed svg.marks"), ".mark-line.role-mark path, .mark-symbol.role-mark path"
    assert drawn.count() >= 9
    empty = [drawn.nth(index).evaluate("chart => chart.closest('[id]').id") for index in range(drawn.count())
             if drawn.nth(index).locator(marks).count() == 0]
    assert empty == ["plots_ar_train_csv"]  # every chart with its lines or points but the ar stage's: it skips on a KL latent
    knn = chart(page, "ssl: online kNN")
    assert knn.locator(".mark-symbol.role-mark path").count() == len(pd.read_csv(repo / "plots" / "ssl" / "eval.csv"))
    fid = chart(page, "fid: FID vs network evaluations")
    xs = [float(re.match(r"translate\(([-\d.]+),", point.get_attribute("transform"))[1])
          for point in fid.locator(".mark-symbol.role-mark path").all()]
    assert xs and min(xs) >= 6  # the points at 1 NFE clear of the y axis


def test_dvc_plots_diff_tells_the_revisions_apart_with_no_network(repo, browser):
    run(["dvc", "plots", "diff", "-o", "diffed"], repo)
    page, refused = open_offline(browser, repo / "diffed" / "index.html")
    assert not refused
    for title in ("fid: FID vs network evaluations", "fid: sampling throughput"):
        legend = chart(page, title).locator(".role-legend").filter(has=page.locator("text=revision"))
        symbols = legend.locator(".role-legend-symbol path").all()
        dashes = {symbol.get_attribute("stroke-dasharray") for symbol in symbols}
        assert len(symbols) == 2 and len(dashes) == 2, dashes
        for symbol in symbols:  # drawn strokes, not dots
            assert "A" not in symbol.get_attribute("d") and symbol.get_attribute("stroke") == "black"
