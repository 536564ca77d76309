"""The demo's figures in the README come from the demo: `make demo`'s recipe, run here into a
temporary folder, reaches exactly the test accuracies the README quotes (slow: about 40 s)."""

import re
from pathlib import Path

import pytest
import yaml

from reconfx.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_readme_quotes_what_the_demo_reaches(tmp_path):
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"reached test accuracy (\d\.\d{4}) \(left\) / (\d\.\d{4}) \(right\)",
                       readme)
    assert quoted, "the README no longer quotes the demo's accuracies"
    spec = yaml.safe_load((ROOT / "specs" / "multidigits.yaml").read_text())
    spec["export"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(path), "--quiet"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    got = [re.search(rf"\| {task} \| accuracy \| (\d\.\d{{4}}) \|", report).group(1)
           for task in ("left", "right")]
    assert got == [quoted.group(1), quoted.group(2)]
