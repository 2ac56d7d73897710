"""The leaderboard site from hand-made records: cells, self-containment, links, Pareto front; and the
site in headless Chromium (sort, filter, images) when chromium and chromedriver are installed."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image
from test_record import make_record

from bench.cli import main
from bench.leaderboard import pareto_front, provenance_badge, write_site
from bench.store import ResultStore

FP = 80.0
PROV = {"weights": "code-verified: x.py:1-9", "activations": "reconstructed: from the text",
        "ci": "choice: fast"}


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (32, 16)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.putpixel((0, 0), (255, 255, 255))
    img.save(path)
    return str(path)


def rec(root: Path, method: str, model: str, bits: str, seed: int, top1: float, data_free: bool = False,
        cost: dict | None = None, **over) -> dict:
    key = f"{method}-{model}-{bits}-{seed}".replace("[", "_").replace("]", "_")
    return make_record(
        key=key, job_id=f"cls/{model}/{method}/{bits}/{seed}", task="cls", dataset="mini", method=method,
        model=model, bits=bits, seed=seed, metrics={"top1": top1, "top5": top1 + 10},
        fp_metrics={"top1": FP, "top5": FP + 10},
        method_info={"data_free": data_free, "provenance": {} if method == "fp" else PROV},
        environment={"git_commit": "abcdef0123456789", "torch": "2.14.1", "cpu_capability": "AVX2",
                     "platform": "Linux-test"},
        cost=cost, **over)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    store = ResultStore(tmp_path / "results")
    art = store.root / "artifacts"
    c4 = {"macs": 1e6, "bops": 16e6, "w_avg_bits": 4.0, "a_avg_bits": 4.0, "size_mb": 0.5}
    c8 = {"macs": 1e6, "bops": 64e6, "w_avg_bits": 8.0, "a_avg_bits": 8.0, "size_mb": 1.0}
    records = [
        rec(store.root, "fp", "m1", "fp", 0, FP, cost={"macs": 1e6, "bops": 1024e6, "size_mb": 4.0}),
        rec(store.root, "alpha", "m1", "w4a4", 0, 70.0, cost=c4),
        rec(store.root, "alpha", "m1", "w4a4", 1, 71.0, cost=c4),
        rec(store.root, "alpha", "m1", "w4a4", 2, 73.0, cost=c4),
        rec(store.root, "alpha", "m1", "w8a8", 0, 79.5, cost=c8),
        rec(store.root, "zeta", "m1", "w4a4", 0, 60.0, data_free=True, cost=c4,
            galleries={"zeta_calibration": _png(art / "zeta-m1-w4a4-0" / "zeta_calibration.png",
                                                (0, 90, 200))}),
        rec(store.root, "zeta", "m1", "w8a8", 0, 78.0, data_free=True, cost=c8),  # no gallery file
        rec(store.root, "alpha", "m1", "mp5", 0, 75.0,
            cost={"macs": 1e6, "bops": 30e6, "w_avg_bits": 5.0, "a_avg_bits": 5.0, "size_mb": 0.6},
            plots={"layer_bits": _png(art / "alpha-m1-mp5-0" / "layer_bits.png", (200, 40, 40))}),
    ]
    for r in records:
        store.write(r)
    # the artifacts moved with the results dir: the record's absolute path is stale, the name resolves
    moved = tmp_path / "moved"
    shutil.copytree(store.root, moved)
    shutil.rmtree(store.root)
    index = write_site(ResultStore(moved))
    assert index == moved / "leaderboard" / "index.html"
    return index.parent


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.rows:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_pareto_front_by_hand():
    pts = [(1.0, 50.0), (2.0, 70.0), (2.0, 60.0), (3.0, 65.0), (4.0, 80.0), (0.5, 40.0), (4.0, 80.0)]
    # (2, 60) is dominated by (2, 70); (3, 65) by (2, 70); the duplicate (4, 80) points both stay
    assert pareto_front(pts) == [5, 0, 1, 4, 6]
    assert pareto_front([]) == []


def test_provenance_badge_rule():
    assert provenance_badge(PROV)[0] == "reconstructed"
    assert provenance_badge({"a": "code-verified: x", "b": "choice: y"}) == ("code-verified",
                                                                            "1 choice, 1 code-verified")
    assert provenance_badge({"a": "paper: p", "b": "code-verified"})[0] == "paper"
    assert provenance_badge({"a": "choice: only"})[0] == "choice"
    assert provenance_badge({}) == ("", "")


def test_site_cells_links_and_self_contained(site: Path):
    pages = sorted(site.glob("*.html"))
    names = {p.name for p in pages}
    assert {"index.html", "task-cls.html", "gallery.html", "records.html", "paper-spdfq.html"} <= names
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert 'id="mini-banner"' in text, page.name  # every page shows mini results here
        assert not re.search(r"https?://", text), page.name
        for ref in _parse(page).refs:
            assert (site / ref.split("#")[0]).is_file(), f"{page.name}: {ref}"
    for asset in [p for p in site.glob("static/**/*") if p.is_file() and p.suffix in (".js", ".css")]:
        assert not re.search(r"(src|href)\s*=\s*['\"]?https?://|url\(\s*['\"]?https?://",
                             asset.read_text(encoding="utf-8")), asset
    rows = {(r[0], r[2]): r for r in _parse(site / "task-cls.html").rows if len(r) > 12}
    header = next(r for r in _parse(site / "task-cls.html").rows if r and r[0] == "method")
    col = {name: i for i, name in enumerate(header)}
    a4 = rows[("alpha", "w4a4")]
    # 70, 71, 73: mean 71.33, sample std 1.53 (as tests/test_tables.py); Δ = 71.33 - 80
    assert a4[col["top1"]] == "71.33 ± 1.53 mini"
    assert a4[col["Δ to FP"]] == "-8.67"
    assert a4[col["size (MB)"]] == "0.500" and a4[col["GBOPs"]] == "0.016"
    assert a4[col["data-free"]] == "no" and a4[col["seeds"]] == "3"
    assert a4[col["provenance"]] == "reconstructed" and a4[col["commit"]] == "abcdef0123"
    assert a4[col["records"]] == "s0 s1 s2"
    assert rows[("zeta", "w4a4")][col["data-free"]] == "yes"
    assert rows[("fp", "fp")][col["Δ to FP"]] == "—" and rows[("fp", "fp")][col["top1"]] == "80.00 mini"
    assert len(list((site / "records").glob("*.json"))) == 8
    task = (site / "task-cls.html").read_text(encoding="utf-8")
    assert "plots/alpha-m1-mp5-0_layer_bits.png" in task and "_pareto.png" in task and "_bits.png" in task
    # sizes 0.5 / 0.6 / 1.0 / 4.0 MB; zeta (60, 78) is dominated at 0.5 and 1.0 MB
    assert "Pareto front: alpha m1 w4a4; alpha m1 mp5; alpha m1 w8a8; fp m1 fp" in task
    gallery = (site / "gallery.html").read_text(encoding="utf-8")
    assert "galleries/zeta-m1-w4a4-0_zeta_calibration.png" in gallery and "alpha" not in gallery
    records = (site / "records.html").read_text(encoding="utf-8")
    assert "Linux-test" in records and "AVX2" in records


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["leaderboard", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no result records")
    store = ResultStore(tmp_path)
    store.write(rec(tmp_path, "fp", "m1", "fp", 0, FP))
    assert main(["leaderboard", "--results", str(tmp_path), "--dataset", "huge"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown dataset 'huge'")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a site")
    assert main(["leaderboard", "--results", str(tmp_path), "--out", str(tmp_path / "other")]) == 2
    assert (tmp_path / "other" / "keep.txt").is_file()
    capsys.readouterr()
    for _ in range(2):  # a rebuild replaces the site it made
        assert main(["leaderboard", "--results", str(tmp_path)]) == 0
        assert capsys.readouterr().out.strip() == f"leaderboard: {tmp_path / 'leaderboard' / 'index.html'}"


# ------------------------------------------------------------------ browser (headless Chromium)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium / chromedriver not installed (scripts/setup.sh installs them as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _column(driver, name: str) -> list[str]:
    cells = driver.find_elements("css selector", f"#board tbody tr td.{name}")
    return [c.text for c in cells if c.is_displayed()]


def test_site_in_browser(site: Path, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    browser.get((site / "task-cls.html").as_uri())
    shot = tmp_path / "task-cls.png"
    browser.save_screenshot(str(shot))
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "blank screenshot"

    before = _column(browser, "value")
    first = [float(t.split()[0]) for t in before]
    assert first != sorted(first)  # the page's own order (model, bits, method), not by value
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="value"]').click()
    after = _column(browser, "value")
    nums = [float(t.split()[0]) for t in after]
    assert after != before and nums == sorted(nums)  # numeric order, ascending
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="value"]').click()
    nums = [float(t.split()[0]) for t in _column(browser, "value")]
    assert nums == sorted(nums, reverse=True)

    n = len(_column(browser, "method"))
    browser.find_element(By.CSS_SELECTOR, "#board input.search").send_keys("zeta")
    methods = _column(browser, "method")
    assert 0 < len(methods) < n and set(methods) == {"zeta"}
    assert browser.find_element(By.CSS_SELECTOR, "#board .count").text == f"{len(methods)} / {n} rows"

    for page in sorted(site.glob("*.html")):
        browser.get(page.as_uri())
        broken = browser.execute_script(
            "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
            ".map(i => i.getAttribute('src'))")
        assert broken == [], f"{page.name}: images not loaded: {broken}"
        hrefs = browser.execute_script(
            "return Array.from(document.links).map(a => a.href)")
        for href in hrefs:
            assert href.startswith("file://"), href
            assert Path(unquote(href.removeprefix("file://").split("#")[0])).is_file(), f"{page.name}: {href}"
