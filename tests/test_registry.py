"""Registry[T]: lazy built-ins, entry points (object and module form), did-you-mean, scoped entries."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from methods.base import METHODS
from methods.data import SOURCES
from methods.quant.registry import Registry, UnknownName
from tasks.base import TASKS


def test_builtins_are_listed_without_importing_them():
    """Listing names imports nothing heavy: a subprocess checks sys.modules."""
    code = textwrap.dedent("""
        import sys
        from methods.base import METHODS
        from tasks.base import TASKS
        names = METHODS.names() + TASKS.names()
        assert "mimiq" in names and "cls" in names, names
        loaded = [m for m in ("methods.mimiq", "methods.psaq_vit_v2", "tasks.cls") if m in sys.modules]
        assert not loaded, loaded
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownName, match=r"unknown method 'mimq'; valid: fp, .*; did you mean 'mimiq'\?"):
        METHODS.get("mimq")
    with pytest.raises(UnknownName, match="did you mean 'psaq-vit'"):
        SOURCES.get("psaq_vit")
    with pytest.raises(UnknownName, match=r"unknown task 'xyz'; valid: cls, det, seg$"):
        TASKS.get("xyz")


def test_scoped_registration_is_undone():
    reg: Registry[type] = Registry("thing")

    @reg.register("a")
    class A:
        pass

    assert A.name == "a"  # classes learn their registered name
    B = type("B", (), {})
    with reg.scoped():
        reg.add("b", B)
        assert reg.get("b") is B and reg.names() == ["a", "b"]
    assert reg.names() == ["a"]
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", int)
    reg.add("a", A)  # the same object again is fine (a module imported twice)


def test_validation_runs_at_registration():
    def must_be_int(name, obj):
        if obj is not int:
            raise ValueError(f"{name} must be int")

    reg: Registry[type] = Registry("thing", validate=must_be_int)
    with pytest.raises(ValueError, match="x must be int"):
        reg.add("x", str)
    assert "x" not in reg


def _install_entry_point(root: Path, group: str, name: str, value: str) -> None:
    """A minimal installed distribution (dist-info with entry_points.txt) under ``root``."""
    info = root / "toy_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")


def test_entry_point_object_and_module_forms(tmp_path, monkeypatch):
    (tmp_path / "toy_things.py").write_text("class Widget:\n    pass\n")
    _install_entry_point(tmp_path, "toy.things", "widget", "toy_things:Widget")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry[type] = Registry("thing", entry_point_group="toy.things")
    assert reg.names() == ["widget"]
    widget = reg.get("widget")
    assert widget.__name__ == "Widget" and widget.name == "widget"
