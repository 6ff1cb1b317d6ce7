"""make gpu-wheels: the wheels and the data that scripts/gpu_check.sh needs on a bare CUDA machine (docs/gpu.md).

The project's requirements (with its launchers extra) are walked through this venv's installed metadata: a package
the GPU machine already has (scripts/gpu_machine_packages.txt, from the device README's KINDS.md) is not carried,
and its own requirements are that image's business; every other one is carried at the version this venv has (the
GPU then runs the versions the tests ran here), and its requirements are walked in turn. Wheels for CPython 3.12
manylinux x86-64 come from `pip download` as the device README shows; a package published only as source
(antlr4-python3-runtime 4.9.3, fvcore, iopath) is built here with `pip wheel`, which is right only for pure-Python
packages, so such a wheel must be tagged py3-none-any. Then Fashion-MNIST's four idx files are copied to
.data/fashion-mnist, the commit is written to .whl/code.txt for the report, and the sizes of what travels are
printed (the device tool takes at most 64 MiB).

    .venv/bin/python scripts/gpu_wheels.py [--fmnist /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT, EXTRAS = "convnext-roadmap", ("launchers",)
FMNIST = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
          "t10k-labels-idx1-ubyte.gz")  # fmt: skip
# the device README's pip download command: CPython 3.12, manylinux x86-64
PLATFORM = ["--python-version", "3.12", "--implementation", "cp"] + [
    a for p in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
    for a in ("--platform", f"{p}_x86_64")
]  # fmt: skip
# markers evaluated for the GPU machine, not this one
TARGET = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}  # fmt: skip
LIMIT_MIB = 64


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(path: Path = ROOT / "scripts" / "gpu_machine_packages.txt") -> set[str]:
    """Canonical names of the packages the GPU machine's python already has."""
    return {canonical(ln.strip()) for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")}


def needed(have: set[str], project: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{name: version in this venv} of every package the project needs that `have` lacks, requirements walked."""
    out: dict[str, str] = {}
    todo = [(r, extras) for r in md.requires(project) or []]
    while todo:
        spec, extra = todo.pop(0)
        req = Requirement(spec)
        name = canonical(req.name)
        if req.marker and not any(req.marker.evaluate({**TARGET, "extra": e}) for e in (*extra, "")):
            continue
        if name in have or name in out or name == canonical(project):
            continue
        out[name] = md.version(name)
        todo += [(r, ()) for r in md.requires(name) or []]
    return out


def fetch(name: str, version: str, dest: Path) -> Path:
    """The wheel of name==version for the GPU machine: downloaded, else built here from source (pure Python only)."""
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    spec = f"{name}=={version}"
    before = set(dest.glob("*.whl"))
    got = subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(dest), spec],
                         capture_output=True, text=True)  # fmt: skip
    if got.returncode != 0:  # published as source only: build it here
        built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), spec], capture_output=True, text=True)
        if built.returncode != 0:
            raise SystemExit(f"gpu-wheels: no wheel for {spec}: {got.stderr.strip()[-300:]} / {built.stderr[-300:]}")
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not new:
        raise SystemExit(f"gpu-wheels: pip left no wheel for {spec} in {dest}")
    wheel = new[0]
    tags = wheel.name[: -len(".whl")].split("-")[-3:]
    if tags[1:] != ["none", "any"] and not (tags[0] == "cp312" and "x86_64" in tags[2]):
        raise SystemExit(f"gpu-wheels: {wheel.name} is not a py3-none-any or cp312 x86-64 wheel")
    return wheel


def travelling_bytes(extra: list[Path]) -> int:
    """Bytes the device tool sends: tracked and untracked-not-ignored files, plus the carried folders."""
    ls = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, text=True)  # fmt: skip
    files = [ROOT / f for f in ls.stdout.split("\0") if f]
    files += [f for d in extra for f in d.rglob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    """Fill .whl/ and .data/fashion-mnist/, write .whl/code.txt, print what was carried and its size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist", help="folder of the four idx .gz files")
    args = ap.parse_args(argv)
    whl, data = ROOT / ".whl", ROOT / ".data" / "fashion-mnist"
    shutil.rmtree(whl, ignore_errors=True)  # one version of each: two stop the whole install there
    whl.mkdir()
    for name, version in sorted(needed(machine_packages()).items()):
        w = fetch(name, version, whl)
        print(f"  {w.name:70s} {w.stat().st_size / 1024:7.0f} KiB")
    data.mkdir(parents=True, exist_ok=True)
    missing = [f for f in FMNIST if not (Path(args.fmnist) / f).is_file()]
    if missing:
        raise SystemExit(f"gpu-wheels: {args.fmnist} lacks {', '.join(missing)} (make data, or --fmnist DIR)")
    for f in FMNIST:
        shutil.copyfile(Path(args.fmnist) / f, data / f)
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    (whl / "code.txt").write_text(sha.stdout.strip() + ("+dirty" if dirty else "") + "\n")
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (whl, data)}
    carried = [p for p in (whl, data, ROOT / "runs" / "gpu") if p.is_dir()]
    total = travelling_bytes(carried)
    print(f".whl: {len(list(whl.glob('*.whl')))} wheels, {_mib(sizes[whl])}; .data/fashion-mnist: {_mib(sizes[data])}")
    print(
        f"the device call sends {_mib(total)} of its {LIMIT_MIB} MiB (working tree + {', '.join(map(_rel, carried))})"
    )
    return 0 if total < LIMIT_MIB * 2**20 else 1


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


if __name__ == "__main__":
    sys.exit(main())
