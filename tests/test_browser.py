"""End to end in a real browser: a small run, its landscape and HTML report, rendered by headless Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them) and ``selenium``; without
chromium the test is skipped. The screenshot is kept as ``test-artifacts/report.png``.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest
import torch

from swalab.lab.config import load_config
from swalab.lab.runner import run_experiment
from swalab.report import build_report, compute_landscape
from swalab.report.windows import evaluate_windows

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]


def _small_run(out: Path) -> Path:
    """SGD, SWA and SWAG on MNIST-1D: 2 seeds of 5 epochs, trajectories kept, 3 averaged snapshots."""
    cfg = load_config(
        "mnist1d",
        [
            "seeds=[0, 1]",
            "train.epochs=5",
            "train.save_trajectory=true",
            "train.threads=1",
            "methods=[{method: sgd}, {method: swa, options: {swa_lr: 0.05, swa_start: 3}},"
            " {method: swag, options: {swa_lr: 0.05, swa_start: 3, n_samples: 3}}]",
        ],
    )
    run_experiment(
        cfg,
        out,
        argv=["swalab", "run", "mnist1d", "(tests/test_browser.py)"],
        log=lambda _: None,
        progress=False,
    )
    return out


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_html_report_renders_in_chromium(tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    torch.set_num_threads(1)
    run = _small_run(tmp_path / "run")
    compute_landscape(
        run, grid=5, rays=2, ray_points=4, line_points=5, log=lambda _: None, progress=False
    )
    compute_landscape(
        run,
        seed=1,
        what=["line", "rays", "ensemble", "bn"],
        rays=2,
        ray_points=4,
        line_points=5,
        log=lambda _: None,
        progress=False,
    )  # the claims pair seeds 0 and 1
    # posthoc.run: auto is the swa run, which kept snapshots: its window map joins the report
    evaluate_windows(run, starts=[1, 3], ends=[4, 5], log=lambda _: None)
    report = build_report(run, html_page=True, formats=("png", "svg", "pdf"), log=lambda _: None)
    assert report["missing"] == []
    page = report["html"]
    assert (
        "http://" not in page.read_text() and "https://" not in page.read_text()
    )  # nothing external

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.get(page.as_uri())
        assert driver.title == "swalab report: mnist1d"

        # the Claims section comes first: seven claims (claim 1 once per SWA budget), each with a verdict
        assert driver.find_elements("tag name", "h2")[0].text == "Claims"
        assert "Post-hoc SWA windows" in [h.text for h in driver.find_elements("tag name", "h2")]
        tables = driver.find_elements("css selector", "table.results")
        assert tables, "no table"
        claims = tables[0].find_elements("css selector", "tbody tr")
        ids = [r.find_elements("tag name", "td")[0].text.split(".")[0] for r in claims]
        # claim 2: both ray protocols, and the curvature of seed 0 (all pieces there)
        assert ids == [
            "1",
            "2",
            "2 (raw rays)",
            "2 (Hessian top eigenvalue)",
            "2 (Hessian trace)",
            "3a",
            "3b",
            "3c",
            "4a",
            "4b",
            "5",
            "6",
            "6b",
            "7",
        ]
        header = [h.text for h in tables[0].find_elements("css selector", "thead th")]
        column = next(i for i, h in enumerate(header) if h.lower().startswith("verdict"))
        verdicts = [r.find_elements("tag name", "td")[column].text for r in claims]
        assert set(verdicts) <= {"supported", "contradicted", "undecided", "no input"}
        no_input = {ids.index("4b"), ids.index("5"), ids.index("7")}
        assert {i for i, v in enumerate(verdicts) if v == "no input"} == no_input, verdicts
        # 4b: no FGE in this run; 5: no fixed-LR ablation; 7: a 5-epoch SWA run has one start in
        # the band

        # the results tables: one row per method, the paired difference of SWA to SGD
        rows = tables[1].find_elements("css selector", "tbody tr")
        assert [r.find_elements("tag name", "td")[0].text for r in rows] == ["sgd", "swa", "swag"]
        assert rows[1].find_elements("tag name", "td")[3].text == "sgd"

        # every results table also as CSV and booktabs LaTeX, linked under it
        captions = [t.find_element("tag name", "caption").text for t in tables]
        assert captions[-2:] == [
            "Wall-clock time of the runs (a resumed run: the time of its last process). A run's "
            "time includes the epochs it shares with the other runs of its seed (trained once), "
            "so the last row adds each seed's longest run, not every run",
            "Environment (meta.json)",
        ]
        time_rows = tables[-2].find_elements("css selector", "tbody tr")
        first_cells = [r.find_elements("tag name", "td")[0].text for r in time_rows]
        assert first_cells == ["sgd", "swa", "swag", "all (each seed's longest run)"]
        links = [a.get_attribute("href") for a in driver.find_elements("css selector", "p.files a")]
        names = [Path(link.removeprefix("file://")).name for link in links]
        tables_in_order = (
            "claims",
            "test_accuracy",
            "test_loss",
            "test_ece",
            "solutions",
            "width",
            "layer_norms",
            "curvature",
            "ensemble",
            "run_times",
        )
        assert names == [f"table_{t}.{ext}" for t in tables_in_order for ext in ("csv", "tex")]
        for link in links:
            text = Path(link.removeprefix("file://")).read_text()
            heads = (
                "claim,",
                "method,",
                "solution,",
                "directions,",
                "tensor,",
                "Δ",
                "% needs \\usepackage{booktabs}",
            )
            assert text.startswith(heads), link
            assert "\\toprule" in text or link.endswith(".csv")

        # every figure decoded: as many images as the report has figures, each with a non-zero size
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        expected = {
            "learning_curves",
            "own_models",
            "lr_schedules",
            "line",
            "rays_protocols",
            "rays",
            "width",
            "plane",
            "plane_init",
            "snapshots",
            "reliability",
            "window_map",
        }
        assert {alt for alt, *_ in images} == expected
        assert len(images) == len(report["figures"])
        for alt, complete, width, height in images:
            assert complete and width > 0 and height > 0, f"figure {alt} did not decode"
        # each figure's SVG and PDF linked from its caption, and valid files of their kind
        vector = [
            a.get_attribute("href") for a in driver.find_elements("css selector", "figcaption a")
        ]
        assert sorted(Path(v).name for v in vector) == sorted(
            f"{alt}.{ext}" for alt, *_ in images for ext in ("svg", "pdf")
        )
        for v in vector:
            head = Path(v.removeprefix("file://")).read_bytes()[:200]
            assert head.startswith(b"%PDF-") if v.endswith(".pdf") else b"<svg" in head, v
        # an SVG figure renders in the browser too
        driver.get((page.parent / "plane.svg").as_uri())
        box = driver.execute_script(
            "const r = document.documentElement.getBoundingClientRect(); "
            "return [r.width, r.height];"
        )
        assert box[0] > 100 and box[1] > 100
        driver.get(page.as_uri())

        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth;"
        )
        assert overflow <= 0, f"the page is {overflow} px wider than the window"

        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], f"console errors: {errors}"

        # a full-page screenshot, kept as a test artifact
        size = driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];"
        )
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
            },
        )
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "report.png").write_bytes(base64.b64decode(shot["data"]))
        driver.save_screenshot(str(ARTIFACTS / "report-top.png"))
    finally:
        driver.quit()
