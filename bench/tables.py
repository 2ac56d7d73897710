"""Result tables: one per (task, dataset, profile, metric), rendered as markdown, CSV and LaTeX.

Rows are methods, columns are model × bits plus one FP column per model. A cell is
``value (Δ)`` where Δ is the difference to the FP model stored in the records;
with several seeds it is ``mean ± std (Δ)`` (sample std, n-1), Δ from the mean.
"""

from __future__ import annotations

import io
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench.grid import FP_METHOD
from bench.store import ResultStore, atomic_write_text
from methods.quant.bits import BitSpecError, parse_bits

FORMATS = ("md", "csv", "tex")
MINI_NOTE = "Mini-dataset results: regression baselines for CI on the mini data, not paper numbers."
CELL_NOTE = "Cells: value (Δ to FP); mean ± std (sample std, n-1) over seeds when there are several."
COST_NOTE = (
    "Cost cells: model size of the quantized part in MB (2^20 bytes; quantized weights at their bits, "
    "everything else at 32) / GBOPs per image (Σ MACs · w-bits · a-bits) / average weight and "
    "activation bits (parameter- and element-weighted); means over seeds (a mixed-precision allocation "
    "may differ by seed)."
)
NOISE_ALPHA = 0.05
BEST_MARK, TIE_MARK = "*", "~"
NOISE_NOTE = (
    f"Per column, {BEST_MARK} marks the highest mean and {TIE_MARK} a method whose difference from it is "
    f"within noise: Welch's t-test over seeds, two-sided p >= {NOISE_ALPHA} (equal means if both have zero "
    "spread). Cells with fewer than 2 seeds carry no mark: one run cannot be compared."
)
MISSING = "—"


def _bits_order(name: str) -> tuple:
    try:
        b = parse_bits(name)
    except BitSpecError:
        return (1, 0, 0, name)
    if b.is_mixed:  # beside the uniform spec of the same budget
        return (0, sum(b.mixed), b.mixed[0], name)
    return (0, (b.w_bits or 32) + (b.a_bits or 32), b.w_bits or 32, name)


def _latest(df: pd.DataFrame) -> pd.DataFrame:
    """One record per (method, model, weights, bits, seed): the newest wins (e.g. over an older config)."""
    if "created" in df:
        df = df.sort_values("created", kind="stable", na_position="first")
    keys = ["method", "model", "weights", "bits", "seed"] + (["options"] if "options" in df else [])
    return df.drop_duplicates(keys, keep="last")


def _model_labels(df: pd.DataFrame) -> pd.Series:
    """The model name, plus the weights tag when one model appears with several weights."""
    multi = df.groupby("model")["weights"].transform("nunique") > 1
    label = df["model"].where(~multi, df["model"] + "@" + df["weights"].astype(str))
    if "options" in df:  # e.g. "mini-mask-rcnn-swin[quant_scope=all]" beside the backbone-only rows
        opts = df["options"].fillna("").astype(str)
        label = label.where(opts == "", label + "[" + opts + "]")
    return label


def format_cell(values: Sequence[float], fp: float | None) -> str:
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return MISSING
    mean = statistics.fmean(vals)
    text = f"{mean:.2f}"
    if len(vals) > 1:
        text += f" ± {statistics.stdev(vals):.2f}"
    if fp is not None and not math.isnan(fp):
        text += f" ({signed(mean - fp)})"
    return text


def within_noise(a: Sequence[float], b: Sequence[float], alpha: float = NOISE_ALPHA) -> bool | None:
    """Is the difference of the means of ``a`` and ``b`` within noise (Welch's t-test, p >= alpha)?
    None when either has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = statistics.stdev(a), statistics.stdev(b)
    if sa == 0.0 and sb == 0.0:
        return statistics.fmean(a) == statistics.fmean(b)
    from scipy.stats import ttest_ind  # local import: only tables with seeds need it

    return bool(ttest_ind(a, b, equal_var=False).pvalue >= alpha)


def noise_marks(cells: dict[str, list[float]]) -> dict[str, str]:
    """Per method of one column: BEST_MARK for the highest mean, TIE_MARK within noise of it, else ""."""
    tested = {m: v for m, v in cells.items() if len(v) >= 2}
    if len(tested) < 2:
        return {}
    best = max(tested, key=lambda m: statistics.fmean(tested[m]))
    marks = {best: BEST_MARK}
    for m, v in tested.items():
        if m != best and within_noise(v, tested[best]):
            marks[m] = TIE_MARK
    return marks


def signed(delta: float) -> str:
    """``+1.23`` / ``-1.23``; a difference that rounds to zero is ``+0.00``, never ``-0.00``."""
    return f"{0.0 if abs(delta) < 0.005 else delta:+.2f}"


def metric_names(df: pd.DataFrame) -> list[str]:
    return [c.removeprefix("metric.") for c in df.columns if c.startswith("metric.")]


def build_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The table for one metric of one (task, dataset, profile) slice of the records frame."""
    col, fp_col = f"metric.{metric}", f"fp.{metric}"
    df = _latest(df)
    df = df[df[col].notna()] if col in df else df.iloc[0:0]
    if df.empty:
        return pd.DataFrame()
    df = df.assign(label=_model_labels(df), fpv=df[fp_col] if fp_col in df else math.nan)
    models = sorted(df["label"].unique())
    bits = sorted(df.loc[df["method"] != FP_METHOD, "bits"].unique(), key=_bits_order)
    methods = sorted(m for m in df["method"].unique() if m != FP_METHOD) or [FP_METHOD]

    fp_ref: dict[str, float | None] = {}
    for model in models:
        rows = df[df["label"] == model]
        own = rows.loc[rows["method"] == FP_METHOD, col].tolist()  # the fp job's own metric
        ref = own or rows["fpv"].dropna().tolist()
        fp_ref[model] = statistics.fmean(ref) if ref else None

    columns = [f"{m} {b}" for m in models for b in ["FP", *bits]]
    table = pd.DataFrame(MISSING, index=pd.Index(methods, name="method"), columns=columns)
    for model in models:
        fp = fp_ref[model]
        table[f"{model} FP"] = MISSING if fp is None else f"{fp:.2f}"
        column: dict[str, dict[str, list[float]]] = {}
        for (method, b), cell in df[(df["label"] == model) & (df["method"] != FP_METHOD)].groupby(
            ["method", "bits"]
        ):
            ref = cell["fpv"].dropna()
            values = [float(v) for v in cell[col].tolist() if v is not None and not math.isnan(v)]
            column.setdefault(b, {})[method] = values
            fp_mean = statistics.fmean(ref) if len(ref) else None
            table.loc[method, f"{model} {b}"] = format_cell(values, fp_mean)
        for b, cells in column.items():
            for method, mark in noise_marks(cells).items():
                table.loc[method, f"{model} {b}"] += f" {mark}"
    return table


def _cost_cell(rows: pd.DataFrame) -> str:
    def mean(col: str) -> float | None:
        vals = [float(v) for v in rows[col].tolist() if v is not None and not math.isnan(v)] \
            if col in rows else []
        return statistics.fmean(vals) if vals else None

    size, gbops = mean("cost.size_mb"), mean("cost.bops")
    if size is None or gbops is None:
        return MISSING
    text = f"{size:.3f} / {gbops / 1e9:.3g}"
    w, a = mean("cost.w_avg_bits"), mean("cost.a_avg_bits")
    if w is not None or a is not None:
        text += f" / w{w or 32:.2f} a{a or 32:.2f}"
    return text


def build_cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Size (MB) / GBOPs / average bits per method × (model, bits) of one slice (records with costs)."""
    df = _latest(df)
    if "cost.bops" not in df:
        return pd.DataFrame()
    df = df[df["cost.bops"].notna()]
    if df.empty:
        return pd.DataFrame()
    df = df.assign(label=_model_labels(df))
    models = sorted(df["label"].unique())
    bits = sorted(df.loc[df["method"] != FP_METHOD, "bits"].unique(), key=_bits_order)
    methods = sorted(m for m in df["method"].unique() if m != FP_METHOD) or [FP_METHOD]
    columns = [f"{m} {b}" for m in models for b in ["FP", *bits]]
    table = pd.DataFrame(MISSING, index=pd.Index(methods, name="method"), columns=columns)
    for model in models:
        rows = df[df["label"] == model]
        fp_rows = rows[rows["method"] == FP_METHOD]
        table[f"{model} FP"] = _cost_cell(fp_rows) if len(fp_rows) else MISSING  # FP: no average bits
        for (method, b), cell in rows[rows["method"] != FP_METHOD].groupby(["method", "bits"]):
            table.loc[method, f"{model} {b}"] = _cost_cell(cell)
    return table


def _slices(df: pd.DataFrame) -> Iterable[tuple[str, pd.DataFrame]]:
    for profile, part in df.groupby("profile", sort=True, dropna=False):
        yield str(profile), part


def _tex(text: str) -> str:
    text = re.sub(r"([_%&#$])", r"\\\1", str(text))
    return text.replace(" ± ", r" $\pm$ ").replace(MISSING, "--")


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (tabulate's latex formats would escape the $\\pm$ we need)."""
    header = [_tex(table.index.name or ""), *map(_tex, table.columns)]
    lines = [
        rf"\begin{{tabular}}{{l{'r' * len(table.columns)}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join([_tex(idx), *map(_tex, row)]) + r" \\" for idx, row in table.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def render(df: pd.DataFrame, task: str, dataset: str, formats: Sequence[str] = FORMATS) -> dict[str, str]:
    """Markdown / CSV / LaTeX text for every (profile, metric) table of one task and dataset."""
    df = df[(df["task"] == task) & (df["dataset"] == dataset)]
    md: list[str] = []
    tex: list[str] = []
    csv_parts: list[pd.DataFrame] = []
    note = MINI_NOTE if dataset == "mini" else None
    if note:
        md.append(f"> {note}\n")
        tex.append(f"% {note}")
    for profile, part in _slices(df):
        tables = [(metric, build_table(part, metric)) for metric in metric_names(part)]
        tables.append(("size_mb/gbops/avg_bits", build_cost_table(part)))
        for metric, table in tables:
            if table.empty:
                continue
            title = f"{task} · {dataset} · {metric} (profile {profile})"
            md.append(f"### {title}\n")
            md.append(tabulate(table, headers="keys", tablefmt="pipe", disable_numparse=True) + "\n")
            tex.append(f"% {title}\n{to_latex(table)}")
            flat = table.replace(MISSING, "").reset_index()
            flat.insert(0, "metric", metric)
            flat.insert(0, "profile", profile)
            flat.insert(0, "dataset", dataset)
            flat.insert(0, "task", task)
            csv_parts.append(flat)
    md.append(f"_{CELL_NOTE} {NOISE_NOTE} {COST_NOTE}_\n")
    tex.append(f"% {CELL_NOTE} {NOISE_NOTE} {COST_NOTE}")
    csv = pd.concat(csv_parts, ignore_index=True).fillna("") if csv_parts else None
    return format_texts(md, tex, csv, note, formats)


def format_texts(md: list[str], tex: list[str], csv: pd.DataFrame | None, csv_note: str | None,
                 formats: Sequence[str]) -> dict[str, str]:
    """The requested formats' texts from markdown lines, LaTeX parts and one CSV frame (with an
    optional ``# note`` line first)."""
    out: dict[str, str] = {}
    if "md" in formats:
        out["md"] = "\n".join(md)
    if "tex" in formats:
        out["tex"] = "\n\n".join(tex) + "\n"
    if "csv" in formats:
        buf = io.StringIO()
        if csv_note:
            buf.write(f"# {csv_note}\n")
        if csv is not None:
            csv.to_csv(buf, index=False)
        out["csv"] = buf.getvalue()
    return out


def write_tables(
    store: ResultStore,
    task: str | None = None,
    dataset: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[tuple[str, str, dict[str, str], list[Path]]]:
    """Render and write ``<results>/tables/<task>_<dataset>.<fmt>``; returns (task, dataset, texts, paths)."""
    df = store.dataframe()
    if df.empty:
        return []
    pairs = sorted(
        {
            (t, d)
            for t, d in zip(df["task"], df["dataset"], strict=True)
            if (task is None or t == task) and (dataset is None or d == dataset)
        }
    )
    out_dir = store.root / "tables"
    written = []
    for t, d in pairs:
        texts = render(df, t, d, formats)
        paths = []
        for fmt, text in texts.items():
            path = out_dir / f"{t}_{d}.{fmt}"
            atomic_write_text(path, text)
            paths.append(path)
        written.append((t, d, texts, paths))
    return written
