"""Building the kernels safely (issue 21): a build killed mid-way, runs that start
together, and a machine without a compiler. Each case runs real processes on a real
(tiny) extension, in a build directory of its own, under a timeout: a hang fails the test
instead of stalling the suite."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from livelm.kernels import build

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # a tiny build takes ~3 s; a hang is what this guards against

pytestmark = pytest.mark.skipif(build.missing_build_tool() is not None,
                                reason=f"needs a compiler: {build.missing_build_tool()}")


def run_python(code: str, ext_dir: Path, *args: str, **env: str) -> subprocess.Popen:
    """Start ``code`` (with ``sys.argv[1:] == args``) in a fresh interpreter building into
    ``ext_dir``."""
    environ = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=environ, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


BUILD_TINY = f"""
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    from pathlib import Path
    from livelm.kernels import build
    module = build.compile_extension("livelm_tiny", "tiny_module.cpp", sources_dir=Path({str(DATA)!r}))
    print("BUILT", module.__name__, flush=True)
"""

# Takes the build lock and torch's lock file as a build in progress does, then waits to be
# killed (or, given a hold time, finishes normally).
FAKE_BUILD = """
    import sys, time
    from pathlib import Path
    from livelm.kernels import build
    directory = build.build_directory("livelm_tiny")
    with build.exclusive_build("livelm_tiny", directory):
        (directory / "lock").touch()  # torch's baton, as during a real build
        print("BUILDING", flush=True)
        time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 600)
        (directory / "lock").unlink()
"""


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"hung: {proc.communicate()[0]}")
    assert proc.returncode == 0, out
    return out


def wait_for_line(proc: subprocess.Popen, marker: str) -> None:
    for line in proc.stdout:
        if marker in line:
            return
    pytest.fail(f"the process ended before printing {marker!r}")


def test_a_killed_build_leaves_nothing_that_blocks_the_next_run(tmp_path) -> None:
    builder = run_python(FAKE_BUILD, tmp_path)
    wait_for_line(builder, "BUILDING")
    os.kill(builder.pid, signal.SIGKILL)  # Ctrl-C's worst case: no cleanup at all
    builder.wait(timeout=30)
    assert (tmp_path / "livelm_tiny" / "lock").exists()  # what used to hang every later run
    out = finish(run_python(BUILD_TINY, tmp_path))
    assert "BUILT livelm_tiny" in out and "removed a stale build lock" in out, out
    assert not (tmp_path / "livelm_tiny" / "lock").exists()


def test_a_second_run_waits_for_the_first_build(tmp_path) -> None:
    hold_s = 4.0
    builder = run_python(FAKE_BUILD, tmp_path, str(hold_s))
    wait_for_line(builder, "BUILDING")
    start = time.monotonic()
    out = finish(run_python(BUILD_TINY, tmp_path))
    waited = time.monotonic() - start
    finish(builder)
    assert "waiting for another process to finish compiling" in out, out
    assert "BUILT livelm_tiny" in out and "stale" not in out, out
    assert waited >= hold_s - 1.0  # it waited for the other build rather than racing it


def test_without_a_compiler_the_torch_path_serves_and_says_so_once(tmp_path, llama_dir) -> None:
    code = f"""
        import logging, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
        from livelm import LLM, SamplingParams
        llm = LLM({str(llama_dir)!r}, max_model_len=128, num_kv_blocks=16)
        out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        print("TOKENS", len(out[0].outputs[0].token_ids), flush=True)
    """
    out = finish(run_python(code, tmp_path, CXX=str(tmp_path / "no-such-c++")))
    assert "TOKENS 8" in out, out
    said = [line for line in out.splitlines() if line.startswith("LOG ") and "cannot be built" in line]
    assert len(said) == 1 and "no C++ compiler" in said[0] and "torch path" in said[0], out
    assert not list(tmp_path.glob("*/*.so"))  # nothing was compiled


# Builds (or loads) the tiny extension from the sources in argv[2]; with argv[1] ==
# "no-builder", torch's extension builder is unusable, so only a stamped build can load.
LOAD_STAMPED = """
    import sys
    from pathlib import Path
    import torch.utils.cpp_extension as cpp
    from livelm.kernels import build
    if sys.argv[1] == "no-builder":
        cpp.load = None
    module = build.compile_extension("livelm_tiny", "tiny_module.cpp", sources_dir=Path(sys.argv[2]))
    print("LOADED", module.__name__, flush=True)
"""


def test_a_stamped_build_loads_directly_until_a_source_or_header_changes(tmp_path) -> None:
    sources = tmp_path / "src"
    shutil.copytree(DATA, sources)
    ext = tmp_path / "ext"
    assert "LOADED livelm_tiny" in finish(run_python(LOAD_STAMPED, ext, "builder", str(sources)))
    assert (ext / "livelm_tiny" / ".livelm-build.json").exists()
    # Unchanged: imported straight from the stamp, torch's builder never called.
    assert "LOADED livelm_tiny" in finish(run_python(LOAD_STAMPED, ext, "no-builder", str(sources)))
    # A header beside the source changed: the stamp no longer matches, the builder runs.
    (sources / "tiny_extra.h").write_text("// changed\n")
    proc = run_python(LOAD_STAMPED, ext, "no-builder", str(sources))
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "'NoneType' object is not callable" in out, out
    assert "LOADED livelm_tiny" in finish(run_python(LOAD_STAMPED, ext, "builder", str(sources)))


def test_a_slow_load_says_it_is_compiling(monkeypatch, caplog) -> None:
    monkeypatch.setattr(build, "_SAY_COMPILING_AFTER_S", 0.05)
    with caplog.at_level(logging.WARNING, logger="livelm"), build._say_if_slow("livelm_probe"):
        time.sleep(0.3)
    assert "compiling livelm's livelm_probe kernels" in caplog.text
    assert "compiled livelm_probe in" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="livelm"), build._say_if_slow("livelm_probe"):
        pass  # a cached load: no word
    assert caplog.text == ""
