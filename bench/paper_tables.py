"""Paper tables: the published tables of one paper (``bench/papers/<name>.yaml``) beside the harness's
records, in the paper's own layout (models as columns, bits × methods as rows).

Full dataset: each cell is ``ours / published / Δ`` (Δ = ours - published, ours a mean ± std over seeds
when there are several), flagged :data:`FLAG` when ``|Δ|`` exceeds the table's tolerance; ``not run``
when no record exists (``--commands`` prints the ``bench run`` line that fills it). A row with
``implementation: none`` shows its published value only. ``--dataset mini`` renders the runnable rows
on the mini analogue models, without published values (mini numbers are not comparable with them).
"""

from __future__ import annotations

import math
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from bench.grid import FP_METHOD, coerce_method_args
from bench.papers import Column, Paper, Row, Table, is_harness_model, mini_analogue
from bench.store import ResultStore, atomic_write_text, method_args_suffix
from bench.tables import FORMATS, MISSING, _latest, format_cell, format_texts, signed, to_latex

FLAG = "!"
NOT_RUN = "not run"
NO_MODEL = "n/a"  # a runnable row's column whose model the harness does not have
DEFAULT_PROFILE = {"full": "paper", "mini": "ci"}
FULL_NOTE = (
    f"Cells: ours / published / Δ (ours - published; ours = mean ± std over seeds, sample std, when there "
    f"are several). {FLAG} marks |Δ| > the table's tolerance (default ±1.0 at 6-8 bits, ±2.5 at 5 bits "
    f"and below, by the smaller of weight / activation bits). '{NOT_RUN}': no record yet (--commands "
    f"prints the run line); '{NO_MODEL}': the harness has no such model; rows with harness 'none' show "
    f"the published value only; {MISSING}: not published / not found."
)
MINI_NOTE = (
    "Mini analogue: the same rows on the harness's mini models (Fashion-MNIST / mini-coco / mini-ade), "
    "not the paper's models or data. No published column: mini numbers are not comparable with it."
)
RUN_HINT = ("# full runs read --data-root DIR (or $VITQ_DATA); add --weights FILE for a local checkpoint "
            "(one model per command)")


@dataclass
class Cell:
    text: str
    values: list[float]
    published: float | None = None
    published_std: float | None = None
    delta: float | None = None
    tolerance: float | None = None
    flagged: bool = False
    command: str | None = None


def published_text(value: float, std: float | None = None) -> str:
    """A published number with the decimals it was printed with (at least 2)."""
    def fmt(v: float) -> str:
        decimals = len(repr(float(v)).split(".")[1]) if "e" not in repr(float(v)) else 2
        return f"{v:.{max(2, decimals)}f}"
    return fmt(value) + (f" ± {fmt(std)}" if std is not None else "")


def method_label(row: Row) -> str:
    """The records' method label of a row: ``spdfq[data_source=noise]`` (as :func:`records_frame`)."""
    if row.method is None:
        return "none"
    margs = coerce_method_args(row.method, row.method_args) if row.method_args else {}
    return row.method + method_args_suffix(margs)


def run_command(table: Table, row: Row, model: str, bits: str, dataset: str, profile: str,
                results: str | None = None) -> str:
    """The ``python -m bench run`` line that fills one cell."""
    assert row.method is not None
    parts = ["python", "-m", "bench", "run", "--dataset", dataset, "--profile", profile,
             "--tasks", table.task,
             "--models", model, "--methods", row.method, "--bits", bits]
    seeds = table.settings.get("seeds")
    if dataset == "full" and isinstance(seeds, int) and seeds > 1 and row.method != FP_METHOD:
        parts += ["--seeds", ",".join(str(s) for s in range(seeds))]
    if row.method_args:
        margs = coerce_method_args(row.method, row.method_args)
        parts += ["--method-args", ",".join(f"{k}={v}" for k, v in margs.items())]
    if results:
        parts += ["--results", results]
    return shlex.join(parts)


def _values(df: pd.DataFrame, table: Table, method: str, model: str, bits: str) -> list[float]:
    col = f"metric.{table.metric}"
    if df.empty or col not in df:
        return []
    sel = df[(df["task"] == table.task) & (df["model"] == model) & (df["method"] == method)
             & (df["bits"] == bits) & (df["options"].fillna("") == "")]
    return [float(v) for v in sel[col].tolist() if v is not None and not math.isnan(v)]


def full_cell(df: pd.DataFrame, table: Table, row: Row, column: Column, profile: str,
              results: str | None = None) -> Cell:
    bits = table.cell_bits(row, column)
    pub, pub_std = row.published.get(column.id), row.std.get(column.id)
    pub_text = published_text(pub, pub_std) if pub is not None else None
    if not row.runnable or bits is None:
        return Cell(pub_text or MISSING, [], pub, pub_std)
    if not is_harness_model(table.task, column.model):
        return Cell(f"{NO_MODEL} / {pub_text}" if pub_text else NO_MODEL, [], pub, pub_std)
    values = _values(df, table, method_label(row), column.model, bits)
    if not values:
        cmd = run_command(table, row, column.model, bits, "full", profile, results)
        return Cell(f"{NOT_RUN} / {pub_text}" if pub_text else NOT_RUN, [], pub, pub_std, command=cmd)
    ours = format_cell(values, None)
    if pub is None:
        return Cell(f"{ours} / {MISSING}", values)
    delta = statistics.fmean(values) - pub
    tol = table.tolerance_for(bits)
    flagged = abs(delta) > tol
    text = f"{ours} / {pub_text} / {signed(delta)}" + (f" {FLAG}" if flagged else "")
    return Cell(text, values, pub, pub_std, delta, tol, flagged)


def _slice(df: pd.DataFrame, dataset: str, profile: str) -> pd.DataFrame:
    """The records of one dataset and profile, the newest per (method, model, weights, bits, seed)."""
    if df.empty:
        return df
    return _latest(df[(df["dataset"] == dataset) & (df["profile"] == profile)])


def _row_index(row: Row) -> str:
    return f"{row.bits} · {row.label}" if row.bits else row.label


def _mini_columns(table: Table) -> list[tuple[str, str | None, list[str]]]:
    """(mini model, column bits, the paper's labels it stands for), in the paper's order."""
    out: dict[tuple[str, str | None], list[str]] = {}
    for col in table.columns:
        mini = mini_analogue(table.task, col.model)
        if mini is not None:
            out.setdefault((mini, col.bits), []).append(col.label)
    return [(m, b, labels) for (m, b), labels in out.items()]


def build_paper_table(df: pd.DataFrame, table: Table, dataset: str, profile: str,
                      results: str | None = None) -> tuple[pd.DataFrame, list[dict[str, Any]], list[str]]:
    """(the display table, its cells as long rows for CSV, the run commands of its missing cells)."""
    long: list[dict[str, Any]] = []
    commands: list[str] = []
    df = _slice(df, dataset, profile)
    if dataset == "full":
        columns = [c.label for c in table.columns]
        rows = table.rows
    else:
        minis = _mini_columns(table)
        columns = [m if b is None else f"{m} {b}" for m, b, _ in minis]
        rows = [r for r in table.rows if r.runnable]
    index = pd.Index([_row_index(r) for r in rows], name="bits · method")
    out = pd.DataFrame(MISSING, index=index, columns=["harness", *columns])
    out["harness"] = [method_label(r) for r in rows]
    for row, idx in zip(rows, index, strict=True):
        if dataset == "full":
            for col in table.columns:
                cell = full_cell(df, table, row, col, profile, results)
                out.loc[idx, col.label] = cell.text
                if cell.command:
                    commands.append(cell.command)
                long.append(_long(table, row, col.model, col.label, cell, dataset, table.cell_bits(row, col)))
            continue
        for (mini, cbits, _), name in zip(_mini_columns(table), columns, strict=True):
            bits = row.bits or cbits
            values = _values(df, table, method_label(row), mini, bits) if bits else []
            cell = Cell(format_cell(values, None) if values else NOT_RUN, values)
            if not values and bits:
                cell.command = run_command(table, row, mini, bits, "mini", profile, results)
                commands.append(cell.command)
            out.loc[idx, name] = cell.text
            long.append(_long(table, row, mini, name, cell, dataset, bits))
    return out, long, commands


def _long(table: Table, row: Row, model: str, column: str, cell: Cell, dataset: str,
          bits: str | None) -> dict[str, Any]:
    vals = cell.values
    return {
        "table": table.id, "dataset": dataset, "metric": table.metric, "row": row.label, "bits": bits,
        "harness": method_label(row), "column": column, "model": model,
        "ours_mean": statistics.fmean(vals) if vals else None,
        "ours_std": statistics.stdev(vals) if len(vals) > 1 else None, "n_seeds": len(vals),
        "published": cell.published if dataset == "full" else None,
        "published_std": cell.published_std if dataset == "full" else None,
        "delta": cell.delta, "tolerance": cell.tolerance, "flagged": cell.flagged, "cell": cell.text,
        "command": cell.command,
    }


def _settings_line(table: Table) -> str:
    parts = [f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in table.settings.items()]
    return "; ".join(parts).rstrip(".")


def render_paper(paper: Paper, df: pd.DataFrame, dataset: str = "full", profile: str | None = None,
                 formats: Sequence[str] = FORMATS, results: str | None = None,
                 ) -> tuple[dict[str, str], list[str]]:
    """Markdown / LaTeX / CSV texts of every table of ``paper``, and the run commands of missing cells."""
    profile = profile or DEFAULT_PROFILE[dataset]
    df = _slice(df, dataset, profile)
    mini = dataset == "mini"
    head = f"{paper.title}: " + ("mini analogue" if mini else "published tables vs full-dataset records")
    md = [f"## {head} (profile {profile})\n"]
    tex = [f"% {head} (profile {profile})"]
    if mini:
        md.append(f"> {MINI_NOTE}\n")
        tex.append(f"% {MINI_NOTE}")
    long: list[dict[str, Any]] = []
    commands: list[str] = []
    for table in paper.tables:
        frame, cells, cmds = build_paper_table(df, table, dataset, profile, results)
        commands += cmds
        title = f"{paper.name} · {table.id}" + (" · mini analogue" if mini else "")
        md.append(f"### {title}\n")
        md.append(f"{table.caption}  ")
        md.append(f"Source: [{table.source}] {paper.sources[table.source]}.  ")
        md.append(f"Settings: {_settings_line(table)}.  ")
        if mini:
            stands = "; ".join(f"{m} for {', '.join(labels)}" for m, _, labels in _mini_columns(table))
            md.append(f"Mini analogues: {stands}.  ")
        else:
            md.append("Models: " + ", ".join(f"{c.label} = {c.model}" for c in table.columns) + ".  ")
        notes = [table.note] + [f"{r.label}: {r.note}" for r in table.rows
                                if r.note and (r.runnable or not mini)]
        notes += [f"{r.label}: source [{r.source}]" for r in table.rows if r.source]
        if any(notes):
            md.append("Notes: " + " ".join(n for n in notes if n) + "\n")
        else:
            md.append("")
        if frame.empty:
            md.append("_(no rows the harness can run: published-only table)_\n")
            continue
        md.append(tabulate(frame, headers="keys", tablefmt="pipe", disable_numparse=True) + "\n")
        tex.append(f"% {title}: {table.caption}\n{to_latex(frame)}")
        long += [{"paper": paper.name, **c} for c in cells]
    if paper.not_found:
        md.append("Not found (left empty, never filled from elsewhere): "
                  + "; ".join(paper.not_found) + ".\n")
    if paper.notes:
        md.append("Paper notes: " + " ".join(paper.notes) + "\n")
    note = MINI_NOTE if mini else FULL_NOTE
    md.append(f"_{note}_\n")
    tex.append(f"% {note}")
    texts = format_texts(md, tex, pd.DataFrame(long), MINI_NOTE if mini else None, formats)
    return texts, list(dict.fromkeys(commands))


def write_paper_tables(store: ResultStore, paper: Paper, dataset: str = "full", profile: str | None = None,
                       formats: Sequence[str] = FORMATS, results: str | None = None,
                       ) -> tuple[dict[str, str], list[Path], list[str]]:
    """Render and write ``<results>/tables/paper_<name>_<dataset>.<fmt>``; (texts, paths, commands)."""
    texts, commands = render_paper(paper, store.dataframe(), dataset, profile, formats, results)
    paths = []
    for fmt, text in texts.items():
        path = store.root / "tables" / f"paper_{paper.name}_{dataset}.{fmt}"
        atomic_write_text(path, text)
        paths.append(path)
    return texts, paths, commands
