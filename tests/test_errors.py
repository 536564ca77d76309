"""A reconfx error keeps the exception it came from: one line by default, the whole chain of
causes with RECONFX_DEBUG=1."""

from __future__ import annotations

from reconfx.cli import main
from tests.support import write_spec


def failing_spec(tmp_path, monkeypatch):
    (tmp_path / "broken_factory.py").write_text(
        "def build():\n    return {}['missing key']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_spec(tmp_path, "broken", model={"factory": "broken_factory:build"},
                      inputs=[{"name": "x", "shape": [2, 4]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["fc"]})


def test_an_error_is_one_line_by_default(tmp_path, monkeypatch, capsys):
    spec = failing_spec(tmp_path, monkeypatch)
    monkeypatch.delenv("RECONFX_DEBUG", raising=False)
    assert main(["compile", str(spec), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "factory 'broken_factory:build' raised KeyError" in err[0]


def test_reconfx_debug_shows_the_cause_the_error_kept(tmp_path, monkeypatch, capsys):
    spec = failing_spec(tmp_path, monkeypatch)
    monkeypatch.setenv("RECONFX_DEBUG", "1")
    assert main(["compile", str(spec), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "KeyError: 'missing key'" in err and "broken_factory.py" in err
    assert "The above exception was the direct cause of the following exception" in err
    assert err.splitlines()[-1].startswith("reconfx: error: ")
