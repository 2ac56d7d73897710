"""Paper tables: the YAML files load and hold only published numbers; records land in the right cells
with the right Δ and flag; missing cells print a run line that expands to exactly that job."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from test_record import make_record

import bench.cli as cli
from bench import papers
from bench.paper_tables import FLAG, NOT_RUN, build_paper_table, render_paper, write_paper_tables
from bench.papers import PaperSchemaError, load_paper, load_paper_file, paper_names
from bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
COPY = ROOT / "tests" / "data" / "published_values.txt"
PAPERS = ["clamp-vit", "mimiq", "mptq-vit", "psaq-vit", "psaq-vit-v2", "ptq4vit", "repq-vit", "spdfq"]


def copied_tokens() -> list[str]:
    return [ln.strip() for ln in COPY.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def rec(method, model, bits, seed, top1, *, dataset="full", profile="paper", method_args=None, task="cls",
        metric="top1", created="2026-12-01T00:00:00+00:00"):
    margs = f"[{','.join(f'{k}={v}' for k, v in sorted((method_args or {}).items()))}]" if method_args else ""
    return make_record(
        key=f"{task}-{method}{margs}-{model}-{bits}-{seed}-{dataset}-{profile}-{created}", task=task,
        job_id=f"{task}/{model}/{method}{margs}/{bits}/{seed}", dataset=dataset, method=method, model=model,
        weights="default", bits=bits, seed=seed, profile=profile, metrics={metric: top1}, created=created,
        **({"method_args": method_args} if method_args else {}),
    )


# --- the data ---------------------------------------------------------------------------------

def test_every_paper_loads_and_names_real_methods_and_models():
    assert paper_names() == PAPERS
    from methods.base import METHODS
    from tasks.cls import FULL_MODELS

    assert set(papers.REGISTERED_METHODS) <= set(METHODS.load_all())
    assert papers.FULL_MODELS["cls"] == FULL_MODELS
    tables = 0
    for name in PAPERS:
        paper = load_paper(name)
        assert paper.name == name and paper.tables
        for table in paper.tables:
            tables += 1
            assert table.source in paper.sources and table.task in ("cls", "det", "seg")
            for row in table.rows:
                assert row.runnable or not row.method_args
    assert tables == 25
    repq = load_paper("repq-vit")
    box = next(t for t in repq.tables if t.id == "coco-box")
    assert [c.model for c in box.columns] == list(papers.FULL_MODELS["det"])
    assert box.metric == "bbox_mAP" and box.rows[1].published["mrcnn_t"] == 36.1


def test_det_seg_model_names_match_the_tasks():
    det = pytest.importorskip("tasks.mm.det")
    seg = pytest.importorskip("tasks.mm.seg")
    assert papers.FULL_MODELS["det"] == tuple(det.FULL_MODELS)
    assert papers.FULL_MODELS["seg"] == tuple(seg.FULL_MODELS)


def test_every_number_is_a_published_one():
    published = {float(t) for t in copied_tokens()}
    count = 0
    for name in PAPERS:
        for table in load_paper(name).tables:
            for row in table.rows:
                for value in [*row.published.values(), *row.std.values()]:
                    assert value in published, (name, table.id, row.label, value)
                    count += 1
    assert count > 500


def test_tolerance_defaults():
    t = load_paper("psaq-vit").tables[0]
    assert [t.tolerance_for(b) for b in ("fp", "w8a8", "w6a6", "w5a5", "w4a8", "w4a4", "w3a3", "mp5")] == \
        [1.0, 1.0, 1.0, 2.5, 2.5, 2.5, 2.5, 2.5]


def test_package_includes_the_papers():
    from setuptools import find_packages

    assert "bench.papers" in find_packages(str(ROOT), include=["bench", "bench.*"])


# --- schema errors ------------------------------------------------------------------------------

GOOD = """\
paper: {stem}
title: t
sources:
  S: a source
tables:
  - id: t1
    caption: c
    source: S
    settings: {{task: cls, dataset: d, metric: top1}}
    columns:
      - {{id: a, model: deit_tiny_patch16_224}}
    rows:
      - label: r
        bits: w4a4
{row_kind}
        published: {{a: 1.0}}
"""


@pytest.mark.parametrize("row_kind, line, what", [
    ("        implementation: some", 15, "implementation must be 'none'"),
    ("        method: gdfq", 15, "method 'gdfq' is not registered"),
    ("        notes: x", 15, "unknown key 'notes'"),
    ("        method: fp\n        method: fp", 16, "duplicate key 'method'"),
    ("        method: [fp", 16, "invalid YAML"),
])
def test_malformed_file_names_file_and_line(tmp_path, row_kind, line, what):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.format(stem="bad", row_kind=row_kind))
    with pytest.raises(PaperSchemaError) as e:
        load_paper_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: ") and what in msg and "\n" not in msg


def test_other_schema_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.format(stem="p", row_kind="        method: fp").replace("{a: 1.0}", "{b: 1.0}"))
    with pytest.raises(PaperSchemaError, match=rf"^{re.escape(str(path))}:16: .*column 'b'"):
        load_paper_file(path)
    path.write_text(GOOD.format(stem="p", row_kind="        method: fp").replace("{a: 1.0}", "{a: x}"))
    with pytest.raises(PaperSchemaError, match=r":16: .*must be a number"):
        load_paper_file(path)
    path.write_text(GOOD.format(stem="other", row_kind="        method: fp"))
    with pytest.raises(PaperSchemaError, match=r":1: paper 'other' does not match the file name 'p'"):
        load_paper_file(path)
    ok = tmp_path / "ok.yaml"
    ok.write_text(GOOD.format(stem="ok", row_kind="        method: fp"))
    assert load_paper_file(ok).tables[0].rows[0].published == {"a": 1.0}


# --- cells from records -------------------------------------------------------------------------

FULL_RECORDS = [
    rec("fp", "deit_tiny_patch16_224", "fp", 0, 72.21),
    rec("psaq-vit", "deit_tiny_patch16_224", "w4a8", 0, 65.0),
    rec("psaq-vit", "deit_tiny_patch16_224", "w4a8", 1, 66.0),
    rec("psaq-vit", "swin_tiny_patch4_window7_224", "w4a8", 0, 68.0),
    rec("psaq-vit", "deit_small_patch16_224", "w8a8", 0, 76.0),
    rec("psaq-vit", "deit_base_patch16_224", "w8a8", 0, 77.5),
    rec("psaq-vit", "deit_base_patch16_224", "w8a8", 0, 10.0, created="2026-11-01T00:00:00+00:00"),  # older
    rec("psaq-vit", "deit_small_patch16_224", "w4a8", 0, 1.0, profile="ci"),  # not the paper profile
    rec("psaq-vit", "mini-deit", "w4a8", 0, 70.0, dataset="mini", profile="ci"),
    rec("psaq-vit", "mini-deit", "w4a8", 1, 72.0, dataset="mini", profile="ci"),
    rec("spdfq", "deit_tiny_patch16_224", "w4a4", 0, 17.0, method_args={"data_source": "noise"}),
]
# By hand. DeiT-T W4A8: 65, 66 -> mean 65.50, std sqrt(0.5) = 0.71, Δ = 65.50 - 65.57 = -0.07 (tol 2.5).
# Swin-T W4A8: 68.00 - 71.79 = -3.79 > 2.5: flagged. DeiT-S W8A8: 76.00 - 76.92 = -0.92 <= 1.0.
# DeiT-B W8A8: the newer record 77.50 - 79.10 = -1.60 > 1.0: flagged. FP DeiT-T: 72.21 - 72.21 = +0.00.
EXPECTED_README = {
    "fp · FP": ["fp", "72.21 / 72.21 / +0.00", "not run / 79.85", "not run / 81.85", "not run / 81.35",
                "not run / 83.20"],
    "w4a8 · PSAQ-ViT": ["psaq-vit", "65.50 ± 0.71 / 65.57 / -0.07", "not run / 73.23", "not run / 77.05",
                        f"68.00 / 71.79 / -3.79 {FLAG}", "not run / 75.14"],
    "w8a8 · PSAQ-ViT": ["psaq-vit", "not run / 71.56", "76.00 / 76.92 / -0.92",
                        f"77.50 / 79.10 / -1.60 {FLAG}",
                        "not run / 75.35", "not run / 76.64"],
}


@pytest.fixture
def store(tmp_path):
    s = ResultStore(tmp_path)
    for r in FULL_RECORDS:
        s.write(r)
    return s


def _md_rows(md: str, section: str) -> dict[str, list[str]]:
    lines = [ln for ln in md.split(section, 1)[1].split("\n###", 1)[0].splitlines() if ln.startswith("|")]
    rows = {"__header__": [c.strip() for c in lines[0].strip("|").split("|")]}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_full_cells_by_hand(store):
    texts, paths, commands = write_paper_tables(store, load_paper("psaq-vit"), "full")
    assert sorted(p.name for p in paths) == ["paper_psaq-vit_full.csv", "paper_psaq-vit_full.md",
                                              "paper_psaq-vit_full.tex"]
    md = (store.root / "tables" / "paper_psaq-vit_full.md").read_text()
    rows = _md_rows(md, "### psaq-vit · readme")
    assert rows["__header__"] == ["bits · method", "harness",
                                  "DeiT-T", "DeiT-S", "DeiT-B", "Swin-T", "Swin-S"]
    for label, cells in EXPECTED_README.items():
        assert rows[label] == cells
    synq = _md_rows(md, "### psaq-vit · synq-rerun")
    assert synq["w4a8 · PSAQ-ViT"][1] == "65.50 ± 0.71 / 65.57 ± 0.10 / -0.07"
    assert synq["w4a8 · SYNQ"] == ["none", "65.90 ± 0.07", "72.28 ± 0.34", "70.76 ± 1.61",
                                   "75.82 ± 0.54"]
    fdd = _md_rows(md, "### psaq-vit · fdd-rerun")
    assert fdd["w4a8 · Noise"][:2] == ["psaq-vit[data_source=noise]", "not run / 0.474"]
    assert r"65.50 $\pm$ 0.71 / 65.57 / -0.07" in texts["tex"]
    csv = texts["csv"].splitlines()
    assert "readme,full,top1,PSAQ-ViT,w4a8,psaq-vit,Swin-T,swin_tiny_patch4_window7_224,68.0,,1,71.79," in \
        "\n".join(csv)
    # commands of the SYNQ table cover its 5 seeds
    assert any("--models deit_small_patch16_224 --methods psaq-vit --bits w4a8 --seeds 0,1,2,3,4" in c
               for c in commands)


def test_method_args_row_and_published_only_row(store):
    paper = load_paper("spdfq")
    table = next(t for t in paper.tables if t.id == "w4a4")
    frame, _, _ = build_paper_table(store.dataframe(), table, "full", "paper")
    assert frame.loc["w4a4 · Gaussian noise", "DeiT-T"] == "17.00 / 17.43 / -0.43"
    assert frame.loc["w4a4 · Gaussian noise", "Swin-B"] == "n/a / 30.14"  # no harness Swin-B
    assert frame.loc["w4a4 · SMI", "DeiT-T"] == "30.14" and frame.loc["w4a4 · SMI", "harness"] == "none"
    assert frame.loc["w4a4 · Real images", "DeiT-T"] == NOT_RUN  # runnable, nothing published


def _expand(line: str):
    argv = shlex.split(line)
    assert argv[:4] == ["python", "-m", "bench", "run"]
    args = cli.build_parser().parse_args(argv[3:])
    return cli.plan_from_args(args).jobs()


@pytest.mark.parametrize("cell, expected_job", [
    (("psaq-vit", "readme", "w4a8 · PSAQ-ViT", "DeiT-S"), "cls/deit_small_patch16_224/psaq-vit/w4a8/0"),
    (("spdfq", "w4a4", "w4a4 · PSAQ-ViT V2", "DeiT-B"),
     "cls/deit_base_patch16_224/spdfq[data_source=psaq-vit-v2]/w4a4/0"),
    (("spdfq", "ablation-components", "w4a4 · none", "DeiT-S"),
     "cls/deit_small_patch16_224/spdfq[use_apa=False,use_msr=False,use_sl=False]/w4a4/0"),
    (("mimiq", "ablation-summary", "w4a4 · MimiQ without the inter-head similarity loss (synthesis)",
      "ViT-B"),
     "cls/vit_base_patch16_224/mimiq[ih_weight=0.0]/w4a4/0"),
])
def test_missing_cell_command_expands_to_that_job(store, cell, expected_job):
    name, table_id, row_label, column = cell
    paper = load_paper(name)
    table = next(t for t in paper.tables if t.id == table_id)
    frame, cells, _ = build_paper_table(store.dataframe(), table, "full", "paper", results=str(store.root))
    assert frame.loc[row_label, column].startswith(NOT_RUN)
    row = next(r for r in table.rows if f"{r.bits} · {r.label}" == row_label)
    col = next(c for c in table.columns if c.label == column)
    (command,) = [c["command"] for c in cells if c["row"] == row.label and c["bits"] == row.bits
                  and c["column"] == column]
    assert f"--results {store.root}" in command
    jobs = _expand(command)
    quantized = [j for j in jobs if not j.is_fp]
    assert [j.job_id for j in quantized] == [expected_job]
    assert [j.job_id for j in jobs if j.is_fp] == [f"cls/{col.model}/fp/fp/0"]  # its FP reference
    assert all(j.dataset == "full" and j.profile == "paper" for j in jobs)


def test_fp_cell_command_is_one_fp_job(tmp_path):
    table = load_paper("repq-vit").tables[0]
    _, _, commands = build_paper_table(ResultStore(tmp_path).dataframe(), table, "full", "paper")
    fp = [c for c in commands if "--methods fp" in c]
    assert len(fp) == 7
    assert [j.job_id for j in _expand(fp[0])] == ["cls/vit_small_patch16_224/fp/fp/0"]


def test_mini_analogue(store):
    texts, commands = render_paper(load_paper("psaq-vit"), store.dataframe(), "mini")
    md = texts["md"]
    assert "mini analogue" in md and "not comparable" in md
    rows = _md_rows(md, "### psaq-vit · readme · mini analogue")
    assert rows["__header__"] == ["bits · method", "harness", "mini-deit", "mini-swin"]
    assert rows["w4a8 · PSAQ-ViT"] == ["psaq-vit", "71.00 ± 1.41", NOT_RUN]
    assert rows["w8a8 · PSAQ-ViT"] == ["psaq-vit", NOT_RUN, NOT_RUN]
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert not any(" / " in ln for ln in table_lines)  # no published column
    assert "65.57" not in md and "73.23" not in md
    assert not any("SYNQ" in ln or "FDD |" in ln for ln in table_lines)  # published-only rows are left out
    assert "deit_tiny_patch16_224" not in "\n".join(table_lines)
    assert ("python -m bench run --dataset mini --profile ci --tasks cls --models mini-swin "
            "--methods psaq-vit --bits w4a8") in commands


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_unknown_paper(tmp_path, capsys):
    assert cli.main(["tables", "--paper", "nope", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: unknown paper 'nope'; known: {', '.join(PAPERS)}\n"


def test_cli_malformed_paper(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.format(stem="bad", row_kind="        method: gdfq"))
    monkeypatch.setattr(cli, "load_paper", lambda name: load_paper_file(bad))
    assert cli.main(["tables", "--paper", "bad", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}:15: ")


def test_cli_paper_tables_and_commands(store, capsys):
    assert cli.main(["tables", "--paper", "psaq-vit", "--results", str(store.root), "--commands",
                     "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert "65.50 ± 0.71 / 65.57 / -0.07" in out
    assert (store.root / "tables" / "paper_psaq-vit_full.md").is_file()
    assert not (store.root / "tables" / "paper_psaq-vit_full.csv").exists()
    lines = [ln for ln in out.splitlines() if ln.startswith("python -m bench run")]
    assert ("python -m bench run --dataset full --profile paper --tasks cls "
            f"--models deit_small_patch16_224 --methods psaq-vit --bits w4a8 --results {store.root}") in lines
    assert len(lines) == len(set(lines))
    argv = ["tables", "--paper", "psaq-vit", "--dataset", "medium", "--results", str(store.root)]
    assert cli.main(argv) == 2


def test_dense_cell_commands_expand_to_their_jobs(tmp_path):
    pytest.importorskip("mmdet")
    pytest.importorskip("mmseg")
    box = next(t for t in load_paper("psaq-vit-v2").tables if t.id == "abstract-coco-box")
    seg = next(t for t in load_paper("psaq-vit-v2").tables if t.id == "abstract-ade20k")
    empty = ResultStore(tmp_path).dataframe()
    (det_cmd,) = build_paper_table(empty, box, "full", "paper")[2]
    (seg_cmd,) = build_paper_table(empty, seg, "full", "paper")[2]
    assert [j.job_id for j in _expand(det_cmd)] == ["det/cascade-mask-rcnn_swin-s/fp/fp/0",
                                                    "det/cascade-mask-rcnn_swin-s/psaq-vit-v2/w8a8/0"]
    assert [j.job_id for j in _expand(seg_cmd)] == ["seg/upernet_swin-s/fp/fp/0",
                                                    "seg/upernet_swin-s/psaq-vit-v2/w8a8/0"]
    records = ResultStore(tmp_path)
    records.write(rec("psaq-vit-v2", "cascade-mask-rcnn_swin-s", "w8a8", 0, 49.5, task="det",
                      metric="bbox_mAP"))
    frame, _, _ = build_paper_table(records.dataframe(), box, "full", "paper")
    # 49.50 - 50.9 = -1.40 > 1.0 at 8 bits: flagged; the published 50.9 keeps 2 decimals
    cell = frame.loc["w8a8 · PSAQ-ViT V2", "Cascade Mask R-CNN Swin-S (inferred)"]
    assert cell == f"49.50 / 50.90 / -1.40 {FLAG}"
