"""Tables from hand-made records: exact cells, Δ to FP, mean ± std over seeds."""

from __future__ import annotations

import csv
import io
import math

import pytest
from test_record import make_record

from bench.store import ResultStore, records_frame
from bench.tables import MINI_NOTE, build_table, format_cell, render, write_tables

FP = {"m1": 80.0, "m2": 70.0}


def rec(method, model, bits, seed, top1, profile="ci", dataset="mini", created="2025-01-02T00:00:00+00:00"):
    return make_record(
        key=f"{method}-{model}-{bits}-{seed}-{profile}-{dataset}-{created}", task="cls", dataset=dataset,
        method=method, model=model, weights="default", bits=bits, seed=seed, profile=profile,
        metrics={"top1": top1, "top5": top1 + 15.0}, fp_metrics={"top1": FP[model], "top5": FP[model] + 15.0},
        created=created,
    )


RECORDS = [
    rec("fp", "m1", "fp", 0, 80.0),
    rec("fp", "m2", "fp", 0, 70.0),
    rec("A", "m1", "w4a4", 0, 70.0),
    rec("A", "m1", "w4a4", 1, 71.0),
    rec("A", "m1", "w4a4", 2, 73.0),
    rec("A", "m1", "w8a8", 0, 79.96),
    rec("A", "m2", "w4a4", 0, 60.0),
    rec("A", "m2", "w4a4", 1, 61.0),
    rec("B", "m1", "w4a4", 0, 75.5),
    rec("B", "m1", "w4a4", 0, 10.0, created="2024-12-31T00:00:00+00:00"),  # older rerun: the newer one wins
    rec("B", "m2", "w4a4", 0, 69.999),  # rounds to a zero difference: "+0.00", never "-0.00"
    rec("A", "m1", "w4a4", 0, 50.0, profile="paper"),  # other profile: its own table
    rec("A", "m1", "w4a4", 0, 1.0, dataset="full"),  # other dataset: not in the mini tables
]

COLUMNS = ["m1 FP", "m1 w4a4", "m1 w8a8", "m2 FP", "m2 w4a4", "m2 w8a8"]
# By hand: A/m1/w4a4 = 70, 71, 73 -> mean 71.3333; deviations -1.3333, -0.3333, 1.6667;
# squares 1.7778 + 0.1111 + 2.7778 = 4.6667; / (n-1) = 2.3333; sqrt = 1.5275. Δ = 71.3333 - 80 = -8.67.
# A/m2/w4a4 = 60, 61 -> mean 60.5, std sqrt(0.5) = 0.7071, Δ = -9.5.
EXPECTED_TOP1 = {
    "A": ["80.00", "71.33 ± 1.53 (-8.67)", "79.96 (-0.04)", "70.00", "60.50 ± 0.71 (-9.50)", "—"],
    "B": ["80.00", "75.50 (-4.50)", "—", "70.00", "70.00 (+0.00)", "—"],
}


def _md_rows(md: str, section: str) -> dict[str, list[str]]:
    """Cells of the pipe table under the given '### ...' heading."""
    lines = md.split(section, 1)[1].split("###", 1)[0].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    rows["__header__"] = header
    return rows


def test_format_cell_by_hand():
    assert format_cell([70.0], 80.0) == "70.00 (-10.00)"
    assert format_cell([70.0, 71.0, 73.0], 80.0) == "71.33 ± 1.53 (-8.67)"
    assert format_cell([81.234], None) == "81.23"
    assert format_cell([], 80.0) == "—"
    assert format_cell([79.999], 80.0) == "80.00 (+0.00)"
    assert format_cell([1.0, math.nan], 0.5) == "1.00 (+0.50)"


def test_build_table_cells():
    df = records_frame(RECORDS)
    part = df[(df["dataset"] == "mini") & (df["profile"] == "ci")]
    table = build_table(part, "top1")
    assert list(table.columns) == COLUMNS
    assert list(table.index) == ["A", "B"]  # fp is the FP column, not a row
    for method, cells in EXPECTED_TOP1.items():
        assert list(table.loc[method]) == cells
    top5 = build_table(part, "top5")
    assert top5.loc["A", "m1 w4a4"] == "86.33 ± 1.53 (-8.67)" and top5.loc["A", "m1 FP"] == "95.00"


def test_render_markdown_csv_tex(tmp_path):
    store = ResultStore(tmp_path)
    for r in RECORDS:
        store.write(r)
    written = write_tables(store, task="cls", dataset="mini")
    assert [(t, d) for t, d, _, _ in written] == [("cls", "mini")]
    paths = sorted(p.name for p in (tmp_path / "tables").iterdir())
    assert paths == ["cls_mini.csv", "cls_mini.md", "cls_mini.tex"]

    md = (tmp_path / "tables" / "cls_mini.md").read_text()
    assert MINI_NOTE in md and "not paper numbers" in md
    rows = _md_rows(md, "### cls · mini · top1 (profile ci)")
    assert rows["__header__"] == ["method", *COLUMNS]
    for method, cells in EXPECTED_TOP1.items():
        assert rows[method] == cells
    paper = _md_rows(md, "### cls · mini · top1 (profile paper)")
    assert paper["A"] == ["80.00", "50.00 (-30.00)"]
    assert "(-79.00)" not in md  # the full-dataset record stays out of the mini tables

    text = (tmp_path / "tables" / "cls_mini.csv").read_text()
    assert text.startswith(f"# {MINI_NOTE}\n")
    table = list(csv.DictReader(io.StringIO(text.split("\n", 1)[1])))
    a = next(r for r in table if r["method"] == "A" and r["metric"] == "top1" and r["profile"] == "ci")
    assert [a[c] for c in COLUMNS] == [c.replace("—", "") for c in EXPECTED_TOP1["A"]]
    assert a["task"] == "cls" and a["dataset"] == "mini"

    tex = (tmp_path / "tables" / "cls_mini.tex").read_text()
    assert (
        r"A & 80.00 & 71.33 $\pm$ 1.53 (-8.67) & 79.96 (-0.04) & 70.00 & 60.50 $\pm$ 0.71 (-9.50) & -- \\"
        in tex
    )
    assert r"\toprule" in tex and r"\bottomrule" in tex


def test_full_dataset_has_no_mini_note_and_formats_filter():
    texts = render(records_frame(RECORDS), "cls", "full", formats=("md",))
    assert set(texts) == {"md"} and MINI_NOTE not in texts["md"]
    assert "1.00 (-79.00)" in texts["md"]


@pytest.mark.parametrize("records", [[], [rec("fp", "m1", "fp", 0, 80.0)]])
def test_degenerate_inputs(tmp_path, records):
    store = ResultStore(tmp_path)
    for r in records:
        store.write(r)
    written = write_tables(store)
    if not records:
        assert written == []
    else:  # only the FP model: one row "fp" with the FP column
        md = written[0][2]["md"]
        assert _md_rows(md, "### cls · mini · top1 (profile ci)")["fp"] == ["80.00"]


def test_welch_noise_marks_on_known_samples():
    from bench.tables import BEST_MARK, TIE_MARK, noise_marks, within_noise

    a = [70.0, 71.0, 73.0]
    # by hand: b = 72, 74, 76: se^2 = 2.3333/3 + 4/3 = 2.1111, t = -2.6667/1.4530 = -1.835, Welch df 3.74,
    # two-sided p ~ 0.15 -> within noise; c = 75, 76, 77: se^2 = 0.7778 + 0.3333, t = -4.427, df 3.45,
    # p ~ 0.016 -> a real difference.
    assert within_noise(a, [72.0, 74.0, 76.0]) is True
    assert within_noise(a, [75.0, 76.0, 77.0]) is False
    assert within_noise(a, [80.0]) is None  # one seed: not tested
    assert within_noise([5.0, 5.0], [5.0, 5.0]) is True and within_noise([5.0, 5.0], [6.0, 6.0]) is False
    marks = noise_marks({"A": a, "B": [72.0, 74.0, 76.0], "C": [75.0, 76.0, 77.0], "D": [90.0]})
    assert marks == {"C": BEST_MARK, "B": TIE_MARK}  # A is significantly below C; D has one seed


def test_table_cells_carry_noise_marks():
    recs = [rec("fp", "m1", "fp", 0, 80.0)]
    recs += [rec("A", "m1", "w4a4", s, v) for s, v in enumerate([70.0, 71.0, 73.0])]
    recs += [rec("B", "m1", "w4a4", s, v) for s, v in enumerate([72.0, 74.0, 76.0])]
    recs += [rec("C", "m1", "w4a4", s, v) for s, v in enumerate([50.0, 50.5, 51.0])]
    table = build_table(records_frame(recs), "top1")
    assert table.loc["B", "m1 w4a4"] == "74.00 ± 2.00 (-6.00) *"
    assert table.loc["A", "m1 w4a4"] == "71.33 ± 1.53 (-8.67) ~"
    assert table.loc["C", "m1 w4a4"] == "50.50 ± 0.50 (-29.50)"
    assert "Welch" in render(records_frame(recs), "cls", "mini")["md"]
