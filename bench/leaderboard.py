"""Leaderboard: a static, self-contained HTML site built from the records (``bench leaderboard``).

The site (default ``<results>/leaderboard/``) opens from ``file://`` with no network: pages are rendered
from the jinja2 templates in ``bench/templates/leaderboard/``, tables are sorted and filtered by the
vendored list.js (``bench/static/leaderboard/``), and every record JSON, plot, per-layer bit map and
synthetic-image gallery it shows is copied in beside the pages.

Provenance badge of a method: the weakest level among its components' ``provenance`` entries, with
``code-verified`` > ``paper`` > ``reconstructed``; ``choice`` components (the harness's own decisions
where the paper is silent) do not lower it. A method whose components are all choices gets
``choice``; one without entries (``fp``) gets none. The tooltip counts the components per level.
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from bench import paper_tables as pt
from bench.api import UsageError
from bench.grid import FP_METHOD
from bench.papers import load_paper, paper_names
from bench.store import ResultStore, records_frame
from bench.tables import MINI_NOTE, MISSING, _bits_order, _latest, _model_labels, format_cell, signed
from methods.quant.bits import BitSpecError, parse_bits

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates" / "leaderboard"
STATIC = HERE / "static" / "leaderboard"
MARKER = ".vitq-leaderboard"  # an --out directory holding this file may be replaced on a rebuild
LEVELS = ("code-verified", "paper", "reconstructed")  # strongest first; "choice" does not rank
ENV_FIELDS = ("git_commit", "git_dirty", "vitq_bench", "python", "torch", "timm", "platform",
              "cpu_capability", "torch_threads", "device", "device_name")
BANNER = (f"{MINI_NOTE} Mini numbers are measured on tiny models and Fashion-MNIST scenes "
          "(mini-coco / mini-ade): they are not comparable with paper numbers.")
PRIMARY_METRIC = {"cls": "top1", "det": "bbox_mAP", "seg": "mIoU"}


@dataclass
class Entry:
    """One leaderboard row: the newest records of one (task, dataset, profile, method, model, bits)."""

    task: str
    dataset: str
    profile: str
    method: str  # the table label, "mimiq[lr=0.001]" for a --method-args run
    base_method: str
    model: str
    bits: str
    metric: str
    values: list[float]
    fp: float | None
    records: list[dict[str, Any]] = field(default_factory=list)

    def mean(self, name: str) -> float | None:
        vals = [float(r["cost"][name]) for r in self.records if (r.get("cost") or {}).get(name) is not None]
        return statistics.fmean(vals) if vals else None

    @property
    def value(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def avg_bits(self) -> float:
        """Mean of the average weight and activation bits (32 for FP; from the spec without costs)."""
        if self.bits == "fp" or self.base_method == FP_METHOD:
            return 32.0
        w, a = self.mean("w_avg_bits"), self.mean("a_avg_bits")
        if w is None or a is None:
            try:
                b = parse_bits(self.bits)
            except BitSpecError:
                return math.nan
            w = w or (sum(b.mixed) / 2 if b.is_mixed else b.w_bits or 32)
            a = a or (sum(b.mixed) / 2 if b.is_mixed else b.a_bits or 32)
        return (w + a) / 2


def provenance_badge(provenance: Mapping[str, str]) -> tuple[str, str]:
    """(badge, tooltip): the weakest ranked level among the components (see the module docstring)."""
    levels = Counter(str(v).split(":")[0].strip() for v in provenance.values())
    if not levels:
        return "", ""
    ranked = [lv for lv in LEVELS if levels.get(lv)]
    badge = ranked[-1] if ranked else "choice"
    return badge, ", ".join(f"{n} {lv}" for lv, n in sorted(levels.items()))


def method_facts(name: str, record: Mapping[str, Any]) -> tuple[bool, dict[str, str]]:
    """(data-free, provenance) of a method from the registry; the record's method_info if unregistered."""
    from methods.base import get_method
    from methods.quant.registry import UnknownName

    info = record.get("method_info") or {}
    try:
        cls = get_method(name)
    except (UnknownName, ImportError):
        return bool(info.get("data_free")), dict(info.get("provenance") or {})
    return bool(cls.data_free), dict(cls.provenance)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (smaller or equal x, larger or equal y, one strictly),
    by increasing x: the accuracy-vs-size front."""
    front = []
    for i, (x, y) in enumerate(points):
        if any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points):
            continue
        front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def primary_metric(task: str, records: Iterable[Mapping[str, Any]]) -> str:
    try:
        from tasks.base import TASKS

        return TASKS.get(task).primary_metric
    except Exception:  # an unregistered (plugin) task: its first metric
        return PRIMARY_METRIC.get(task) or next(iter(next(iter(records))["metrics"]))


def build_entries(records: Sequence[dict[str, Any]]) -> list[Entry]:
    """The rows of every task, newest record per (method, model, weights, bits, seed, options)."""
    if not records:
        return []
    by_key = {r["key"]: r for r in records}
    df = _latest(records_frame(records))
    df = df.assign(label=_model_labels(df))
    entries = []
    for (task, dataset, profile), part in df.groupby(["task", "dataset", "profile"], sort=True):
        metric = primary_metric(task, [by_key[k] for k in part["key"]])
        col = f"metric.{metric}"
        if col not in part:
            continue
        fp_own = part[part["method"] == FP_METHOD].groupby("label")[col].mean().to_dict()
        for (method, model, bits), cell in part.groupby(["method", "label", "bits"], sort=True):
            recs = [by_key[k] for k in cell["key"]]
            values = [float(v) for v in cell[col].tolist() if v is not None and not math.isnan(v)]
            fps = [float(v) for v in cell.get(f"fp.{metric}", pd.Series(dtype=float)).dropna()]
            fp = fp_own.get(model) if method == FP_METHOD else (statistics.fmean(fps) if fps else
                                                                fp_own.get(model))
            entries.append(Entry(task, dataset, profile, method, recs[0]["method"], model, bits, metric,
                                 values, fp, sorted(recs, key=lambda r: r["seed"])))
    return entries


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _artifact(store: ResultStore, record: Mapping[str, Any], path: str | None) -> Path | None:
    """The file a record names, else the same name under ``<results>/artifacts/<key>/`` (a moved results
    directory)."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p
    alt = store.root / "artifacts" / record["key"] / p.name
    return alt if alt.is_file() else None


class Site:
    """Files of the site being built under ``root`` (a temp dir until :func:`write_site` moves it)."""

    def __init__(self, root: Path, store: ResultStore) -> None:
        self.root, self.store = root, store
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                                      autoescape=True, undefined=jinja2.StrictUndefined)

    def page(self, name: str, template: str, **context: Any) -> None:
        html = self.env.get_template(template).render(page=name, **context)
        (self.root / name).write_text(html, encoding="utf-8")

    def copy(self, src: Path, rel: str) -> str:
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(src, dest)
        return rel

    def record_link(self, record: Mapping[str, Any]) -> str:
        return self.copy(self.store.path(record["key"]), f"records/{record['key']}.json")


def _num(value: float | None, fmt: str) -> tuple[str, str]:
    """(display text, sort value) of a number; missing is (—, "")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING, ""
    return format(value, fmt), repr(float(value))


def _row(site: Site, e: Entry) -> dict[str, Any]:
    data_free, prov = method_facts(e.base_method, e.records[0])
    badge, tip = provenance_badge(prov)
    value = e.value
    delta = None if value is None or e.fp is None or e.base_method == FP_METHOD else value - e.fp
    size, bops = e.mean("size_mb"), e.mean("bops")
    env = e.records[0].get("environment") or {}
    return {
        "method": (e.method, e.method), "model": (e.model, e.model), "bits": (e.bits, e.bits),
        "dataset": (e.dataset, e.dataset), "profile": (e.profile, e.profile),
        "value": (format_cell(e.values, None), "" if value is None else repr(value)),
        "delta": (MISSING if delta is None else signed(delta), "" if delta is None else repr(delta)),
        "size": _num(size, ".3f"), "gbops": _num(None if bops is None else bops / 1e9, ".3g"),
        "datafree": ("yes" if data_free else "no",) * 2, "seeds": (str(len(e.values)), str(len(e.values))),
        "provenance": (badge or MISSING, badge), "provenance_tip": tip,
        "commit": (str(env.get("git_commit") or "")[:10], str(env.get("git_commit") or "")),
        "links": [(f"s{r['seed']}", site.record_link(r)) for r in e.records],
        "mini": e.dataset == "mini",
    }


COLUMNS = [("method", "method"), ("model", "model"), ("bits", "bits"), ("dataset", "dataset"),
           ("profile", "profile"), ("value", "{metric}"), ("delta", "Δ to FP"), ("size", "size (MB)"),
           ("gbops", "GBOPs"), ("datafree", "data-free"), ("seeds", "seeds"),
           ("provenance", "provenance"), ("commit", "commit")]


def _plots(site: Site, task: str, entries: list[Entry]) -> list[dict[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    out = []
    slices: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        if e.value is not None:
            slices.setdefault((e.dataset, e.profile), []).append(e)
    for (dataset, profile), part in sorted(slices.items()):
        metric = part[0].metric
        for model in sorted({e.model for e in part}):
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            rows = [e for e in part if e.model == model]
            for method in sorted({e.method for e in rows}):
                pts = sorted((e.avg_bits, e.value) for e in rows if e.method == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", label=method)
            ax.set(xlabel="average bits ((w + a) / 2; FP = 32)", ylabel=metric, xscale="log", title=model)
            xs = [e.avg_bits for e in rows if not math.isnan(e.avg_bits)]
            ticks = [t for t in (2, 3, 4, 5, 6, 8, 12, 16, 32) if xs and min(xs) <= t <= max(xs)]
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.legend(fontsize=7, ncol=2)
            rel = f"plots/{_safe(f'{task}_{dataset}_{profile}_{model}')}_bits.png"
            fig.savefig(site.root / rel, dpi=90, bbox_inches="tight")
            plt.close(fig)
            out.append({"src": rel, "caption": f"{metric} vs bits: {model} ({dataset}, profile {profile})",
                        "mini": dataset == "mini"})
        sized = [e for e in part if e.mean("size_mb") is not None]
        if not sized:
            continue
        points = [(e.mean("size_mb") or 0.0, e.value or 0.0) for e in sized]
        front = pareto_front(points)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for model in sorted({e.model for e in sized}):
            xs = [p for p, e in zip(points, sized, strict=True) if e.model == model]
            ax.scatter([p[0] for p in xs], [p[1] for p in xs], s=14, label=model)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1)
        ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=60, facecolors="none",
                   edgecolors="k", label="Pareto front")
        ax.set(xlabel="model size (MB)", ylabel=metric, xscale="log", title=f"{task}: {metric} vs size")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.legend(fontsize=7)
        rel = f"plots/{_safe(f'{task}_{dataset}_{profile}')}_pareto.png"
        fig.savefig(site.root / rel, dpi=90, bbox_inches="tight")
        plt.close(fig)
        names = "; ".join(f"{sized[i].method} {sized[i].model} {sized[i].bits}" for i in front)
        out.append({"src": rel, "caption": f"{metric} vs model size ({dataset}, profile {profile}); "
                    f"Pareto front: {names}", "mini": dataset == "mini"})
    return out


def _layer_maps(site: Site, entries: list[Entry]) -> list[dict[str, Any]]:
    maps = []
    for e in entries:
        for r in e.records:
            src = _artifact(site.store, r, (r.get("plots") or {}).get("layer_bits"))
            if src is not None:
                maps.append({"src": site.copy(src, f"plots/{r['key']}_layer_bits.png"),
                             "caption": f"{e.method} · {e.model} · {e.bits} · seed {r['seed']} ({e.dataset})",
                             "json": site.record_link(r), "mini": e.dataset == "mini"})
    return maps


def _galleries(site: Site, entries: list[Entry]) -> list[dict[str, Any]]:
    """Per data-free method and model: the synthetic-image galleries (one per seed and label)."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in entries:
        if e.base_method == FP_METHOD or not method_facts(e.base_method, e.records[0])[0]:
            continue
        g = groups.setdefault((e.method, e.model, e.dataset), {
            "method": e.method, "model": e.model, "dataset": e.dataset, "task": e.task, "images": [],
            "mini": e.dataset == "mini"})
        seen = {(i["seed"], i["label"]) for i in g["images"]}
        for r in e.records:
            for label, path in sorted((r.get("galleries") or {}).items()):
                src = _artifact(site.store, r, path)
                if src is None or (r["seed"], label) in seen:
                    continue
                seen.add((r["seed"], label))
                g["images"].append({"src": site.copy(src, f"galleries/{r['key']}_{_safe(label)}.png"),
                                    "label": label, "seed": r["seed"], "json": site.record_link(r)})
    return [groups[k] for k in sorted(groups)]


def _paper_pages(site: Site, df: pd.DataFrame, datasets: list[str], common: dict[str, Any]) -> list[dict]:
    papers = []
    for name in paper_names():
        paper = load_paper(name)
        sections = []
        for dataset in datasets:
            profile = pt.DEFAULT_PROFILE[dataset]
            for table in paper.tables:
                frame, _, _ = pt.build_paper_table(df, table, dataset, profile)
                if dataset == "mini":
                    models = "; ".join(f"{m} for {', '.join(ls)}" for m, _, ls in pt._mini_columns(table))
                else:
                    models = ", ".join(f"{c.label} = {c.model}" for c in table.columns)
                sections.append({
                    "title": f"{table.id} · {dataset}" + (" (mini analogue)" if dataset == "mini" else ""),
                    "caption": table.caption, "source": f"[{table.source}] {paper.sources[table.source]}",
                    "settings": pt._settings_line(table), "models": models, "profile": profile,
                    "html": None if frame.empty else frame.to_html(classes="paper", border=0),
                    "mini": dataset == "mini",
                    "note": pt.MINI_NOTE if dataset == "mini" else pt.FULL_NOTE})
        page = f"paper-{_safe(name)}.html"
        site.page(page, "paper.html.j2", paper=paper, sections=sections, not_found=paper.not_found,
                  mini=any(s["mini"] for s in sections), **common)
        papers.append({"name": name, "title": paper.title, "page": page})
    return papers


def write_site(store: ResultStore, out: Path | None = None, dataset: str | None = None) -> Path:
    """Build the site under ``out`` (default ``<results>/leaderboard``); returns the index.html path."""
    records = [r for r in store.records() if dataset is None or r.get("dataset") == dataset]
    if not records:
        raise UsageError(f"no result records under {store.runs_dir}"
                         + (f" for dataset {dataset}" if dataset else "") + ": run `bench run` first")
    out = Path(out) if out is not None else store.root / "leaderboard"
    if out.exists() and not (out / MARKER).is_file():
        raise UsageError(f"{out} exists and is not a leaderboard site: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(Site(tmp, store), records)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


def _build(site: Site, records: list[dict[str, Any]]) -> None:
    root = site.root
    (root / MARKER).write_text("built by `python -m bench leaderboard`; replaced on every rebuild\n")
    (root / "plots").mkdir()
    shutil.copytree(STATIC, root / "static")
    entries = build_entries(records)
    tasks = sorted({e.task for e in entries})
    datasets = sorted({e.dataset for e in entries})
    nav = ([("index.html", "overview")] + [(f"task-{_safe(t)}.html", t) for t in tasks]
           + [("gallery.html", "galleries"), ("records.html", "records")])
    papers = [{"name": n, "page": f"paper-{_safe(n)}.html"} for n in paper_names()]
    common = {"nav": nav, "papers": papers, "banner": BANNER}
    columns = [(k, label) for k, label in COLUMNS]
    for task in tasks:
        part = [e for e in entries if e.task == task]
        part.sort(key=lambda e: (e.dataset, e.profile, e.model, _bits_order(e.bits), e.method))
        metric = ", ".join(sorted({e.metric for e in part}))
        cols = [(k, label.format(metric=metric)) for k, label in columns]
        site.page(f"task-{_safe(task)}.html", "task.html.j2", task=task, metric=metric, columns=cols,
                  rows=[_row(site, e) for e in part], plots=_plots(site, task, part),
                  layer_maps=_layer_maps(site, part), mini=any(e.dataset == "mini" for e in part), **common)
    galleries = _galleries(site, entries)
    site.page("gallery.html", "gallery.html.j2", groups=galleries,
              mini=any(g["mini"] for g in galleries), **common)
    env_rows = []
    for r in sorted(records, key=lambda r: r["job_id"]):
        env = r.get("environment") or {}
        env_rows.append({"job_id": r["job_id"], "dataset": r["dataset"], "profile": r["profile"],
                         "created": r.get("created") or "", "json": site.record_link(r),
                         **{k: "" if env.get(k) is None else str(env.get(k)) for k in ENV_FIELDS}})
    site.page("records.html", "records.html.j2", rows=env_rows, env_fields=ENV_FIELDS,
              mini=any(r["dataset"] == "mini" for r in records), **common)
    df = records_frame(records)
    paper_datasets = [d for d in ("full", "mini") if d in datasets or d == "full"]  # published: always full
    paper_pages = _paper_pages(site, df, paper_datasets, common)
    summary = [{"task": t, "page": f"task-{_safe(t)}.html",
                "rows": sum(e.task == t for e in entries),
                "records": sum(len(e.records) for e in entries if e.task == t),
                "datasets": ", ".join(sorted({e.dataset for e in entries if e.task == t}))} for t in tasks]
    envs = Counter((str((r.get("environment") or {}).get("git_commit") or "")[:10],
                    str((r.get("environment") or {}).get("torch") or ""),
                    str((r.get("environment") or {}).get("cpu_capability") or "")) for r in records)
    site.page("index.html", "index.html.j2", summary=summary, paper_pages=paper_pages,
              envs=sorted(envs.items()), n_records=len(records), mini="mini" in datasets, **common)
