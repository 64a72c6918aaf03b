"""The wheel bundle that bench/device/run installs on an offline GPU machine: what it must hold, and an emulated
GPU image to prove, on a CPU machine, that it is complete.

    python bench/device/bundle.py check [--dir .whl]          # every pinned wheel once, nothing else
    python bench/device/bundle.py host-needs [--dir .whl]     # NAME==VERSION of wheels this interpreter can't install
    python bench/device/bundle.py install-list [--dir .whl] [--host-dir .whl-host]
    python bench/device/bundle.py image-site SITE             # SITE: links to this interpreter's copies of the
                                                              # image's packages (image-packages.txt), no others

The bundle is built for the GPU image's interpreter (CPython 3.12, manylinux x86-64). A CPU machine with another
Python installs the same projects at the same versions; only a compiled wheel (pydantic-core) is swapped for its
build for this interpreter (`install-list`), so "the bundle is complete" carries over: the set of projects and
their versions is what is tested, the machine code of one of them is not.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WHEELS_TXT = HERE / "wheels.txt"
IMAGE_TXT = HERE / "image-packages.txt"
# Image packages the bundle carries on purpose (wheels.txt says why): ours come first on PYTHONPATH.
SHADOWED = {"typing-extensions"}


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _lines(path: Path) -> list[str]:
    return [s for line in path.read_text().splitlines() if (s := line.split("#", 1)[0].strip())]


def pinned() -> dict[str, str]:
    """{project: version} from wheels.txt (NAME==VERSION lines)."""
    out: dict[str, str] = {}
    for line in _lines(WHEELS_TXT):
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"{WHEELS_TXT}: {line!r} is not NAME==VERSION")
        out[canonical(name.strip())] = version.strip()
    return out


def image_packages() -> set[str]:
    return {canonical(n) for n in _lines(IMAGE_TXT)}


def wheel_files(folder: Path) -> list[tuple[str, str, Path]]:
    """(project, version, path) of every wheel directly in `folder`."""
    from packaging.utils import parse_wheel_filename

    out = []
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        out.append((canonical(name), str(version), path))
    return out


def check(folder: Path) -> list[str]:
    """Problems with the bundle in `folder`: a pinned wheel missing or at another version, a project twice (pip
    refuses to install two versions), a wheel not pinned, a pinned project the image already has."""
    want, have = pinned(), wheel_files(folder)
    problems = []
    seen: dict[str, str] = {}
    for name, version, path in have:
        if name in seen:
            problems.append(f"{name}: two wheels ({seen[name]} and {version}); keep one")
        seen[name] = version
        if name not in want:
            problems.append(f"{path.name}: not in {WHEELS_TXT.name}")
        elif want[name] != version:
            problems.append(f"{name}: {version} in {folder}, {want[name]} pinned")
    problems += [f"{name}=={v}: missing from {folder} (run bench/device/prepare)" for name, v in want.items()
                 if name not in seen]
    problems += [f"{name}: the GPU image has it already; carry it only for another version"
                 for name in want if name in image_packages() and name not in SHADOWED]
    return problems


def _supported(path: Path) -> bool:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    tags = parse_wheel_filename(path.name)[3]
    return any(t in tags for t in sys_tags())


def host_needs(folder: Path) -> list[str]:
    """NAME==VERSION of the bundle's wheels this interpreter cannot install (built for the image's Python)."""
    return [f"{name}=={version}" for name, version, path in wheel_files(folder) if not _supported(path)]


def install_list(folder: Path, host_folder: Path) -> list[Path]:
    """The bundle's wheels for this interpreter: each one as is, or the same project and version from
    `host_folder` where the bundle's build does not fit this Python."""
    host = {(n, v): p for n, v, p in wheel_files(host_folder)} if host_folder.is_dir() else {}
    out = []
    for name, version, path in wheel_files(folder):
        if _supported(path):
            out.append(path)
        elif (name, version) in host and _supported(host[(name, version)]):
            out.append(host[(name, version)])
        else:
            raise SystemExit(f"{path.name} does not install on this Python and {host_folder} has no "
                             f"{name}=={version} build for it: run bench/device/prepare")
    return out


def _closure(dists: dict[str, md.Distribution], roots: set[str], stop: set[str]) -> set[str]:
    """`roots` and what they require (Requires-Dist without extras, markers evaluated here), transitively,
    among the installed `dists`, never entering `stop`."""
    from packaging.requirements import Requirement

    out: set[str] = set()
    todo = [r for r in roots if r in dists and r not in stop]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonical(req.name)
            if dep in dists and dep not in stop and dep not in out:
                todo.append(dep)
    return out


def image_site(site: Path) -> tuple[list[str], list[str]]:
    """Fill `site` with links to this interpreter's installed copies of the image's packages (code and
    .dist-info, so that version checks through importlib.metadata work), and nothing else. A fresh
    interpreter whose only site folder is `site` then sees what the GPU image has (at this machine's versions)
    and none of what the bundle brings.

    This machine's copies may be newer than the image's and need a dependency the image's do not (say a newer
    huggingface-hub's); those dependencies are linked too, since the image's own copies run without them, but
    never a project of the bundle. Returns (image projects linked, dependencies added)."""
    dists = {canonical(d.metadata["Name"] or ""): d for d in md.distributions()}
    image = {n for n in image_packages() if n in dists}
    every = _closure(dists, image, stop=set(pinned()) - SHADOWED)  # the image has its own copy of those
    site.mkdir(parents=True, exist_ok=True)
    for name in sorted(every):
        dist = dists[name]
        root = Path(str(dist.locate_file("")))
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}
        for top in sorted(tops):
            src, dst = root / top, site / top
            if (src.exists() or src.is_symlink()) and not (dst.exists() or dst.is_symlink()):
                os.symlink(src, dst)
    return sorted(image), sorted(every - image)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["check", "host-needs", "install-list", "image-site"])
    ap.add_argument("site", nargs="?", help="image-site: the folder to fill")
    ap.add_argument("--dir", type=Path, default=REPO / ".whl")
    ap.add_argument("--host-dir", type=Path, default=REPO / ".whl-host")
    args = ap.parse_args()
    if args.what == "check":
        problems = check(args.dir)
        for p in problems:
            print(f"bundle: {p}", file=sys.stderr)
        size = sum(p.stat().st_size for p in args.dir.glob("*.whl"))
        print(f"{args.dir}: {len(wheel_files(args.dir))} wheels, {size / 2**20:.1f} MiB"
              + ("" if not problems else f", {len(problems)} problems"))
        sys.exit(1 if problems else 0)
    if args.what == "host-needs":
        print("\n".join(host_needs(args.dir)))
    elif args.what == "install-list":
        print("\n".join(str(p) for p in install_list(args.dir, args.host_dir)))
    else:
        if not args.site:
            ap.error("image-site needs SITE")
        image, extra = image_site(Path(args.site))
        print(f"linked {len(image)} image packages into {args.site}, and their local dependencies: {extra}")


if __name__ == "__main__":
    main()
