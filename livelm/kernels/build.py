"""Compiling the C++ CPU kernels on first use with torch's extension builder: visibly,
once per machine, and safely when runs overlap or a build is killed.

- **Visible.** A build that takes more than a moment says so on stderr (a WARNING-level
  line, shown by default): what is compiling, that it happens once, and how long it took.
- **One build at a time.** Each extension's build directory has a lock file that a
  builder holds with ``flock`` for the whole build. The kernel releases it when the process
  exits, however it exits, so it can never be left held: a second run waits (and says so)
  for the first one's build and then loads it.
- **No stuck builds.** torch's own build lock (``<build dir>/lock``, a plain file) stays
  behind when a build is killed, and every later ``load`` would wait for it forever.
  Holding the ``flock``, livelm knows no one else is building, so a ``lock`` file found
  then is stale: it is removed (said in the log) and the build runs.
- **No compiler.** Without a C++ compiler or ninja, or with ``LIVELM_DISABLE_CPP_KERNELS=1``,
  :func:`build_extension` gives None and callers take their pure-torch path, which
  computes the same results; one line says so, once per process.
- **Quick to load.** After a build, a stamp next to it records a hash of every source and
  header, the flags, the Python and torch versions, and the built module's file. A later
  load whose hash matches imports that file directly, without torch's builder (its ninja
  check alone took ~0.1 s of every start-up); anything else goes through the builder.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("livelm")

SOURCES = Path(__file__).parent / "csrc"

# A load that has not finished after this long is compiling: say so.
_SAY_COMPILING_AFTER_S = 1.5
_LOCK_NAME = ".livelm-build.lock"
_TORCH_LOCK_NAME = "lock"  # torch.utils.file_baton's lock file in the build directory

# -fopenmp only when compiling: linking it would pull in the system libgomp next to torch's
# bundled copy, and two OpenMP pools spinning on the same cores made every torch op ~100x
# slower. Unlinked, the GOMP symbols resolve to torch's own.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]


class KernelBuildUnavailable(RuntimeError):
    """This machine cannot compile the kernels (no C++ compiler or no ninja)."""


def build_directory(name: str) -> Path:
    """Where torch builds and caches extension ``name``: ``$TORCH_EXTENSIONS_DIR/<name>``,
    or ``~/.cache/torch_extensions/py<ver>_<cpu|cuXY>/<name>`` (torch's own layout, so a
    build made before livelm managed the lock is reused)."""
    import torch
    import torch._appdirs

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accel = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        # torch.utils.cpp_extension.get_default_build_root()'s path, without importing that
        # module (~0.13 s of every start-up, only needed to build).
        base = os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions"))
        root = os.path.join(base, f"{py}_{accel}")
    return Path(root) / name


@functools.cache
def missing_build_tool() -> str | None:
    """What this machine lacks to compile the kernels (None when it can): the C++ compiler
    torch would call (``$CXX``, else ``c++``) or ninja."""
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install g++)"
    if not is_ninja_available():
        return "no ninja (pip install ninja)"
    return None


@contextlib.contextmanager
def exclusive_build(name: str, directory: Path) -> Iterator[None]:
    """Hold extension ``name``'s build lock (waiting, and saying so, while another process
    builds it), then clear torch's lock file if an interrupted build left one."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / _LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for another process to finish compiling livelm's %s kernels", name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            stale = directory / _TORCH_LOCK_NAME
            if stale.exists():
                # Every livelm build holds the flock while torch's lock file exists, so one
                # found now was left by a build that was killed.
                logger.warning("removed a stale build lock left by an interrupted build (%s)", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _say_if_slow(name: str) -> Iterator[None]:
    """Log a line when loading ``name`` takes long enough to be a compile, and its time."""
    start = time.monotonic()
    said = threading.Event()

    def say() -> None:
        said.set()
        logger.warning("compiling livelm's %s kernels for this CPU (first run only; about a minute "
                       "per module on 2 cores)...", name)

    timer = threading.Timer(_SAY_COMPILING_AFTER_S, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if said.is_set():
            logger.warning("compiled %s in %.0f s (cached for later runs)", name, time.monotonic() - start)


def compile_extension(name: str, source: str, extra_cflags: tuple[str, ...] = (),
                      sources_dir: Path = SOURCES) -> ModuleType:
    """Compile (or load the cached build of) ``<sources_dir>/<source>`` as module ``name``
    for this CPU, one process at a time; raises when it cannot be built
    (:class:`KernelBuildUnavailable` when a build tool is missing). ``extra_cflags`` add to
    the shared flags."""
    directory = build_directory(name)
    flags = [*_CFLAGS, *extra_cflags]
    stamp = _build_stamp(sources_dir, source, flags)
    module = _load_stamped(name, directory, stamp)
    if module is not None:
        return module
    missing = missing_build_tool()
    if missing is not None:
        raise KernelBuildUnavailable(missing)
    from torch.utils.cpp_extension import load

    with exclusive_build(name, directory), _say_if_slow(name):
        module = load(name=name, sources=[str(sources_dir / source)], extra_cflags=flags,
                      build_directory=str(directory), verbose=False)
    _write_stamp(directory, stamp, module)
    return module


_STAMP_NAME = ".livelm-build.json"


def _build_stamp(sources_dir: Path, source: str, flags: list[str]) -> str:
    """A hash of everything the build of ``source`` depends on: every file beside it (the
    headers it includes), the flags, the Python and torch versions."""
    import torch

    h = hashlib.sha256()
    for path in sorted(sources_dir.iterdir()):
        if path.is_file() and path.suffix in (".cpp", ".h", ".hpp", ".cc"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(json.dumps([source, flags, sys.version, torch.__version__]).encode())
    return h.hexdigest()


def _load_stamped(name: str, directory: Path, stamp: str) -> ModuleType | None:
    """The module a build recorded under ``stamp``, imported directly; None when there is
    none (or it cannot be imported), and the builder then runs."""
    try:
        record = json.loads((directory / _STAMP_NAME).read_text())
        if record.get("stamp") != stamp:
            return None
        path = Path(record["file"])
        module_name = path.name.split(".")[0]  # torch names later versions name_v1, ...
        if not module_name.startswith(name) or path.parent != directory:
            return None
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        logger.debug("no stamped build of %s to load directly (%s)", name, e)
        return None
    sys.modules.setdefault(module_name, module)
    return module


def _write_stamp(directory: Path, stamp: str, module: ModuleType) -> None:
    file = getattr(module, "__file__", None)
    if not file:
        return
    try:
        tmp = directory / f"{_STAMP_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"stamp": stamp, "file": str(Path(file).resolve())}))
        os.replace(tmp, directory / _STAMP_NAME)
    except OSError as e:  # a read-only cache: every start goes through the builder
        logger.debug("cannot write the build stamp of %s: %s", directory, e)


_said_unavailable = threading.Event()


def build_extension(name: str, source: str, what: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType | None:
    """:func:`compile_extension`, or None when the kernels are disabled or cannot be built;
    ``what`` names the code that then takes its torch path. A missing compiler is said in
    one line per process, not once per module."""
    if os.environ.get("LIVELM_DISABLE_CPP_KERNELS") == "1":
        logger.info("C++ CPU kernels disabled by LIVELM_DISABLE_CPP_KERNELS; %s uses torch ops", what)
        return None
    try:
        return compile_extension(name, source, extra_cflags)
    except KernelBuildUnavailable as e:
        if not _said_unavailable.is_set():
            _said_unavailable.set()
            logger.warning("livelm's C++ CPU kernels cannot be built here: %s; running on the "
                           "slower torch path (same results)", e)
        return None
    except Exception as e:  # a failed compile, missing headers: the torch path still works
        logger.warning("C++ CPU kernels unavailable (%s); %s uses the slower torch path", e, what)
        return None
