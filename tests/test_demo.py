"""The demo's figures in the docs come from the demo: `make demo`'s recipe, run here into a
temporary folder, reaches test accuracies within the spread the docs quote over seeds and
machines (slow: about 40 s)."""

import re
from pathlib import Path

import pytest
import yaml

from reconfx.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_readme_quotes_what_the_demo_reaches(tmp_path):
    page = " ".join((ROOT / "docs" / "getting-started.md").read_text().split())
    quoted = re.search(r"reaches test accuracy (\d\.\d{4})–(\d\.\d{4}) \(left\) and "
                       r"(\d\.\d{4})–(\d\.\d{4}) \(right\)", page)
    assert quoted, "docs/getting-started.md no longer quotes the demo's spread"
    low_left, high_left, low_right, high_right = map(float, quoted.groups())
    spec = yaml.safe_load((ROOT / "specs" / "multidigits.yaml").read_text())
    spec["export"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["run", str(path), "--quiet"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    got = [re.search(rf"\| {task} \| accuracy \| (\d\.\d{{4}}) \|", report).group(1)
           for task in ("left", "right")]
    left, right = map(float, got)
    assert low_left <= left <= high_left and low_right <= right <= high_right, got
