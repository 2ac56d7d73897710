"""Published paper tables as data: one YAML file per paper in this package, loaded and schema-checked.

Each file holds the tables read in ``published_tables.md`` (the project's record of every published
number found, with its source): per table its caption, source key, settings, columns (models, named as
the harness's full models) and rows (a registered method that reproduces the row, or
``implementation: none`` for a row shown with its published values only). Cells the md marks
NOT FOUND are simply absent. ``bench tables --paper NAME`` renders them beside the harness's records
(:mod:`bench.paper_tables`).

A malformed file raises :class:`PaperSchemaError` with one message ``<file>:<line>: <what is wrong>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from methods.quant.bits import BitSpecError, parse_bits

PAPERS_DIR = Path(__file__).resolve().parent
TASK_NAMES = ("cls", "det", "seg")
# The methods a row may name (the built-in registry; tests check the two agree).
REGISTERED_METHODS = ("fp", "minmax-ptq", "noise-ptq", "psaq-vit", "psaq-vit-v2", "mimiq", "spdfq",
                      "mptq-vit")
# The harness's full-dataset models per task (tests check these against the tasks). A column may name
# another model (e.g. a timm name the harness does not run): it shows published values only.
FULL_MODELS = {
    "cls": ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
            "vit_small_patch16_224", "vit_base_patch16_224",
            "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224"),
    "det": ("mask-rcnn_swin-t", "mask-rcnn_swin-s", "cascade-mask-rcnn_swin-t", "cascade-mask-rcnn_swin-s"),
    "seg": ("upernet_swin-t", "upernet_swin-s"),
}
# Mini analogue of a full model, by name prefix (first match wins).
MINI_ANALOGUES = (
    ("cls", "vit_", "mini-vit"), ("cls", "deit_", "mini-deit"), ("cls", "swin_", "mini-swin"),
    ("det", "mask-rcnn_", "mini-mask-rcnn-swin"),
    ("det", "cascade-mask-rcnn_", "mini-cascade-mask-rcnn-swin"),
    ("seg", "upernet_", "mini-upernet-swin"),
)
SETTINGS_KEYS = {
    "task": "cls | det | seg", "dataset": "the evaluation set", "metric": "the record's metric name",
    "bits": "the bit specs of the table", "calibration": "size and source of the calibration data",
    "eval_transform": "the evaluation preprocessing", "quantized": "what is quantized",
    "granularity": "quantizer granularity", "pipeline": "the quantization pipeline",
    "seeds": "number of seeds behind each published cell", "note": "anything else the source says",
}
TOP_KEYS = {"paper", "title", "sources", "not_found", "notes", "tables"}
TABLE_KEYS = {"id", "caption", "source", "settings", "tolerance", "columns", "rows", "note"}
COLUMN_KEYS = {"id", "model", "label", "bits", "note"}
ROW_KEYS = {"label", "bits", "method", "method_args", "implementation", "source", "note", "published", "std"}
TOLERANCE_LOW_BITS, TOLERANCE_HIGH_BITS = 2.5, 1.0  # at <= 5 bits (the smaller of w / a), else


class PaperSchemaError(ValueError):
    """A malformed paper file: ``<file>:<line>: <what is wrong>`` (one line)."""


@dataclass(frozen=True)
class Column:
    id: str
    model: str
    label: str
    bits: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Row:
    label: str
    bits: str | None
    method: str | None  # None: implementation: none (published values only)
    method_args: dict[str, Any]
    published: dict[str, float]
    std: dict[str, float]
    source: str | None = None
    note: str | None = None

    @property
    def runnable(self) -> bool:
        return self.method is not None


@dataclass(frozen=True)
class Table:
    id: str
    caption: str
    source: str
    settings: dict[str, Any]
    columns: list[Column]
    rows: list[Row]
    tolerance: float | dict[str, float] | None = None
    note: str | None = None

    @property
    def task(self) -> str:
        return str(self.settings["task"])

    @property
    def metric(self) -> str:
        return str(self.settings["metric"])

    def cell_bits(self, row: Row, column: Column) -> str | None:
        return row.bits or column.bits

    def tolerance_for(self, bits: str | None) -> float:
        """The table's tolerance for a cell: its own (a number, or per bit spec), else the default
        ±1.0 at 6-8 bits and ±2.5 at 5 bits and below (the smaller of weight / activation bits)."""
        if isinstance(self.tolerance, (int, float)):
            return float(self.tolerance)
        if isinstance(self.tolerance, dict) and bits in self.tolerance:
            return float(self.tolerance[bits])
        return default_tolerance(bits)


@dataclass(frozen=True)
class Paper:
    name: str
    title: str
    sources: dict[str, str]
    tables: list[Table]
    not_found: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    path: Path | None = None


def default_tolerance(bits: str | None) -> float:
    if bits is None:
        return TOLERANCE_HIGH_BITS
    spec = parse_bits(bits)
    if spec.is_fp:
        return TOLERANCE_HIGH_BITS
    low = min(spec.mixed) if spec.is_mixed else min(b for b in (spec.w_bits, spec.a_bits) if b is not None)
    return TOLERANCE_LOW_BITS if low <= 5 else TOLERANCE_HIGH_BITS


def is_harness_model(task: str, model: str) -> bool:
    return model in FULL_MODELS.get(task, ())


def mini_analogue(task: str, model: str) -> str | None:
    for t, prefix, mini in MINI_ANALOGUES:
        if t == task and model.startswith(prefix):
            return mini
    return None


# --- YAML with line numbers ---------------------------------------------------------------------

class _Map(dict):
    line: int = 0
    key_lines: dict[str, int]


class _Seq(list):
    line: int = 0
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences remember their (1-based) lines; duplicate keys fail."""


def _mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    seen = set()
    for key_node, _ in node.value:  # duplicates among the keys written here (a merge may be overridden)
        if key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise _Problem(key_node.start_mark.line + 1, f"duplicate key {key_node.value!r}")
            seen.add(key_node.value)
    loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor) first, then the explicit ones
    out = _Map()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


class _Problem(Exception):
    def __init__(self, line: int, what: str) -> None:
        super().__init__(what)
        self.line, self.what = line, what


def _line(obj: Any, key: str | None = None, default: int = 1) -> int:
    if key is not None and isinstance(obj, _Map) and key in obj.key_lines:
        return obj.key_lines[key]
    return getattr(obj, "line", default) or default


def _need(obj: Any, kind: type | tuple[type, ...], what: str, line: int) -> Any:
    if not isinstance(obj, kind) or isinstance(obj, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Problem(line, f"{what} must be a {names}, got {type(obj).__name__} {obj!r}")
    return obj


def _keys(obj: _Map, allowed: set[str] | dict, required: tuple[str, ...], what: str) -> None:
    for key in obj:
        if key not in allowed:
            raise _Problem(_line(obj, key),
                           f"unknown key {key!r} in {what}; allowed: {', '.join(sorted(allowed))}")
    for key in required:
        if key not in obj:
            raise _Problem(_line(obj), f"{what} is missing {key!r}")


def _text(obj: _Map, key: str, what: str, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise _Problem(_line(obj), f"{what} is missing {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise _Problem(_line(obj, key), f"{what}: {key} must be a non-empty string, got {value!r}")
    return value


def _bits(value: Any, line: int, what: str) -> str:
    if not isinstance(value, str):
        raise _Problem(line, f"{what}: bits must be a bit spec string like w4a4, got {value!r}")
    try:
        return parse_bits(value).name
    except BitSpecError as e:
        raise _Problem(line, f"{what}: {e}") from e


def _number(value: Any, line: int, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Problem(line, f"{what} must be a number (or null when not found), got {value!r}")
    return float(value)


def _cells(obj: _Map, key: str, columns: dict[str, Column], what: str) -> dict[str, float]:
    if key not in obj or obj[key] is None:
        return {}
    cells = _need(obj[key], dict, f"{what}: {key}", _line(obj, key))
    out = {}
    for col, value in cells.items():
        line = _line(cells, col)
        if col not in columns:
            raise _Problem(line, f"{what}: {key} names column {col!r}, not one of {', '.join(columns)}")
        if value is not None:
            out[str(col)] = _number(value, line, f"{what}: {key}.{col}")
    return out


def _column(obj: Any, line: int, where: str) -> Column:
    obj = _need(obj, dict, f"{where}: a column", line)
    _keys(obj, COLUMN_KEYS, ("id", "model"), f"{where} column")
    bits = _bits(obj["bits"], _line(obj, "bits"), f"{where} column") if "bits" in obj else None
    cid = _text(obj, "id", f"{where} column")
    return Column(cid, _text(obj, "model", f"{where} column"), _text(obj, "label", where, False) or cid,
                  bits, _text(obj, "note", where, False))


def _row(obj: Any, line: int, where: str, columns: dict[str, Column]) -> Row:
    obj = _need(obj, dict, f"{where}: a row", line)
    _keys(obj, ROW_KEYS, ("label", "published"), f"{where} row")
    label = _text(obj, "label", f"{where} row")
    what = f"{where} row {label!r}"
    has_method, has_impl = "method" in obj, "implementation" in obj
    if has_method == has_impl:
        raise _Problem(_line(obj), f"{what} needs exactly one of 'method' (a registered method) "
                                   "or 'implementation: none'")
    method = None
    if has_method:
        method = _text(obj, "method", what)
        if method not in REGISTERED_METHODS:
            raise _Problem(_line(obj, "method"),
                           f"{what}: method {method!r} is not registered; valid: "
                           f"{', '.join(REGISTERED_METHODS)} (else implementation: none)")
    elif obj["implementation"] != "none":
        raise _Problem(_line(obj, "implementation"), f"{what}: implementation must be 'none'")
    margs = obj.get("method_args") or {}
    _need(margs, dict, f"{what}: method_args", _line(obj, "method_args"))
    if margs and method is None:
        raise _Problem(_line(obj, "method_args"), f"{what}: method_args need a method")
    bits = _bits(obj["bits"], _line(obj, "bits"), what) if "bits" in obj else None
    for col in columns.values():  # a published-only row may leave bits unknown (the source does)
        if (bits is not None and col.bits is not None) or (bits is None and col.bits is None and method):
            raise _Problem(_line(obj), f"{what}: give bits on the row or on every column, not both / neither "
                                       f"(column {col.id!r})")
    published = _cells(obj, "published", columns, what)
    std = _cells(obj, "std", columns, what)
    for col in std:
        if col not in published:
            raise _Problem(_line(obj, "std"), f"{what}: std.{col} without a published value")
    return Row(label, bits, method, dict(margs), published, std,
               _text(obj, "source", what, False), _text(obj, "note", what, False))


def _table(obj: Any, line: int, where: str, sources: dict[str, str], seen: set[str]) -> Table:
    obj = _need(obj, dict, f"{where}: a table", line)
    _keys(obj, TABLE_KEYS, ("id", "caption", "source", "settings", "columns", "rows"), f"{where} table")
    tid = _text(obj, "id", f"{where} table")
    if tid in seen:
        raise _Problem(_line(obj, "id"), f"duplicate table id {tid!r}")
    seen.add(tid)
    where = f"table {tid!r}"
    caption = _text(obj, "caption", where)
    source = _text(obj, "source", where)
    if source not in sources:
        raise _Problem(_line(obj, "source"), f"{where}: source {source!r} is not a key of 'sources'")
    settings = _need(obj["settings"], dict, f"{where}: settings", _line(obj, "settings"))
    _keys(settings, SETTINGS_KEYS, ("task", "dataset", "metric"), f"{where} settings")
    if settings["task"] not in TASK_NAMES:
        raise _Problem(_line(settings, "task"), f"{where}: task must be one of {', '.join(TASK_NAMES)}")
    for b in settings.get("bits") or []:
        _bits(b, _line(settings, "bits"), where)
    cols_seq = _need(obj["columns"], list, f"{where}: columns", _line(obj, "columns"))
    if not cols_seq:
        raise _Problem(_line(obj, "columns"), f"{where}: columns is empty")
    columns: dict[str, Column] = {}
    for i, c in enumerate(cols_seq):
        col = _column(c, cols_seq.item_lines[i], where)
        if col.id in columns:
            raise _Problem(cols_seq.item_lines[i], f"{where}: duplicate column id {col.id!r}")
        columns[col.id] = col
    rows_seq = _need(obj["rows"], list, f"{where}: rows", _line(obj, "rows"))
    rows = [_row(r, rows_seq.item_lines[i], where, columns) for i, r in enumerate(rows_seq)]
    for src in {r.source for r in rows} - {None}:
        if src not in sources:
            raise _Problem(_line(obj, "rows"), f"{where}: row source {src!r} is not a key of 'sources'")
    tolerance = obj.get("tolerance")
    if tolerance is not None:
        tl = _line(obj, "tolerance")
        if isinstance(tolerance, dict):
            tolerance = {_bits(k, tl, where): _number(v, tl, f"{where}: tolerance")
                         for k, v in tolerance.items()}
        else:
            tolerance = _number(tolerance, tl, f"{where}: tolerance")
    return Table(tid, caption, source, {k: v for k, v in settings.items()}, list(columns.values()), rows,
                 tolerance, _text(obj, "note", where, False))


def _paper(data: Any, path: Path) -> Paper:
    data = _need(data, dict, "the file", 1)
    _keys(data, TOP_KEYS, ("paper", "title", "sources", "tables"), "the file")
    name = _text(data, "paper", "the file")
    if name != path.stem:
        raise _Problem(_line(data, "paper"), f"paper {name!r} does not match the file name {path.stem!r}")
    sources = _need(data["sources"], dict, "sources", _line(data, "sources"))
    for key, text in sources.items():
        if not isinstance(text, str) or not text.strip():
            raise _Problem(_line(sources, key), f"source {key!r} needs a description string")
    tables_seq = _need(data["tables"], list, "tables", _line(data, "tables"))
    seen: set[str] = set()
    tables = [_table(t, tables_seq.item_lines[i], "tables", sources, seen) for i, t in enumerate(tables_seq)]
    lists = {}
    for key in ("not_found", "notes"):
        items = _need(data.get(key) or [], list, key, _line(data, key))
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise _Problem(items.item_lines[i], f"{key}: each entry must be a string, got {item!r}")
        lists[key] = [str(s) for s in items]
    return Paper(name, _text(data, "title", "the file"), dict(sources), tables, path=path, **lists)


def load_paper_file(path: str | Path) -> Paper:
    """Load and check one paper file; :class:`PaperSchemaError` names the file, line and problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PaperSchemaError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
        return _paper(data, path)
    except _Problem as e:
        raise PaperSchemaError(f"{path}:{e.line}: {e.what}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PaperSchemaError(f"{path}:{line}: invalid YAML: {problem}") from None


def paper_names(directory: Path = PAPERS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_paper(name: str, directory: Path = PAPERS_DIR) -> Paper:
    """The paper ``name``; KeyError (listing the known names) when there is no such file."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown paper {name!r}; known: {', '.join(paper_names(directory))}")
    return load_paper_file(path)


__all__ = ["Column", "Paper", "PaperSchemaError", "Row", "Table", "default_tolerance", "is_harness_model",
           "load_paper", "load_paper_file", "mini_analogue", "paper_names"]
