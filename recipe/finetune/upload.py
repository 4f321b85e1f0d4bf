"""Cloud storage for finetuning: data read from and results written to gs:// or s3:// (the [cloud] extra).

Training always happens in a local folder; a remote `-o` is checked before training (the filesystem package is
installed and the location is writable) so a finished run never fails at the upload.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError

log = logging.getLogger(__name__)

REMOTE_SCHEMES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs"}
CACHE_ROOT = Path.home() / ".cache" / "recipe" / "finetune"


def scheme(uri: str) -> str | None:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else None


def is_remote(uri: str) -> bool:
    return scheme(uri) in REMOTE_SCHEMES


def filesystem(uri: str) -> Any:
    """The fsspec filesystem for `uri`; a ConfigError naming the missing package when the extra is not installed."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(uri)[0]
    except ImportError as error:
        package = REMOTE_SCHEMES.get(scheme(uri) or "", "fsspec")
        raise ConfigError(
            f"{uri}: reading or writing {scheme(uri)}:// needs {package}; pip install -c constraints/cpu.txt "
            f"'.[train,cloud]' (or install {package})"
        ) from error


def local_staging_dir(uri: str, kind: str) -> Path:
    """A stable local folder for a remote location, so a rerun with --resume finds its checkpoints again."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[-1]).strip("_")[-80:]
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return CACHE_ROOT / kind / f"{readable}-{digest}"


def check_writable(uri: str) -> None:
    """Write and delete a marker under `uri` now, rather than learn about missing credentials after training."""
    fs = filesystem(uri)
    marker = uri.rstrip("/") + "/.recipe-write-check"
    try:
        fs.pipe(marker, b"")
        fs.rm(marker)
    except Exception as error:  # each backend raises its own auth/permission errors
        raise ConfigError(f"{uri}: cannot write there: {error}") from error


def upload_directory(local_dir: Path, uri: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Copy the files under `local_dir` to `uri`, skipping top-level entries named in `exclude`; returns the URIs."""
    fs = filesystem(uri)
    written = []
    for path in sorted(local_dir.rglob("*")):
        relative = path.relative_to(local_dir)
        if path.is_dir() or relative.parts[0] in exclude:
            continue
        target = uri.rstrip("/") + "/" + relative.as_posix()
        fs.put_file(str(path), target)
        written.append(target)
    log.info("uploaded %d files to %s", len(written), uri)
    return written


def download_directory(uri: str, local_dir: Path, names: tuple[str, ...]) -> Path:
    """Fetch the files `names` that exist directly under `uri` (e.g. train.jsonl, val.jsonl) into `local_dir`."""
    fs = filesystem(uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    found = 0
    for name in names:
        source = uri.rstrip("/") + "/" + name
        if fs.exists(source):
            fs.get_file(source, str(local_dir / name))
            found += 1
    if not found:
        raise ConfigError(f"{uri}: none of {', '.join(names)} found there")
    return local_dir
