"""The compiler check before ``export --compile`` (``engine.aoti_toolchain``): a compiler whose
packages crash the process that loads them is found by a probe in a subprocess, reported in one
line, and passed over for ``/usr/bin/g++``; where none works, one error names each."""
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import engine.aoti_toolchain as tc
from finephys.errors import InputError


@pytest.fixture
def fresh_choice():
    tc._choose.cache_clear()
    yield
    tc._choose.cache_clear()


def test_candidates_put_cxx_or_the_default_first_and_the_system_gxx_after_where_it_differs():
    assert tc.candidates("/opt/gcc/bin/g++", "/usr/bin/g++", True) == ["/opt/gcc/bin/g++", tc.SYSTEM_GXX]
    assert tc.candidates(None, "/opt/gcc/bin/g++", True) == [None, tc.SYSTEM_GXX]
    assert tc.candidates(None, tc.SYSTEM_GXX, True) == [None]  # the default is the system compiler
    assert tc.candidates(None, None, False) == [None]
    assert tc.candidates("/opt/gcc/bin/g++", None, False) == ["/opt/gcc/bin/g++"]


def test_probe_names_a_crash_by_its_signal_a_failure_by_its_error_line_and_a_timeout(monkeypatch):
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    envs = []

    def fake(code, err=""):
        def run(*a, **k):
            envs.append(k["env"])
            return subprocess.CompletedProcess(a, code, "", err)
        return run

    monkeypatch.setattr(tc.subprocess, "run", fake(-11))
    assert tc.probe("cc", "cpu") == "its package crashed the process that loaded it (SIGSEGV)"
    assert envs[-1]["CXX"] == "cc"  # the candidate, not the caller's CXX
    monkeypatch.setattr(tc.subprocess, "run", fake(1, "Traceback ...\nInvalidCxxCompiler: none\n"))
    assert tc.probe(None, "cpu") == "failed: InvalidCxxCompiler: none"
    assert "CXX" not in envs[-1]  # Inductor's default
    monkeypatch.setattr(tc.subprocess, "run", fake(1, "torch._inductor.exc.InductorError: CppCompileError: x\n"
                                                      "  warning: y\n"))
    assert tc.probe("cc", "cpu") == "failed: torch._inductor.exc.InductorError: CppCompileError: x"
    monkeypatch.setattr(tc.subprocess, "run", fake(0))
    assert tc.probe("cc", "cpu") is None
    assert "TORCHINDUCTOR_VEC_ISA_OK" not in envs[-1]
    assert tc.probe("cc", "cuda") is None and envs[-1]["TORCHINDUCTOR_VEC_ISA_OK"] == "0"  # as the packages

    def slow(*a, **k):
        raise subprocess.TimeoutExpired(a, 5)

    monkeypatch.setattr(tc.subprocess, "run", slow)
    assert tc.probe("cc", "cpu", timeout=5) == "timed out after 5 s"


def test_what_a_crashed_probe_unpacked_is_removed_with_it(monkeypatch):
    """The package loader unpacks into ``$TMPDIR/aotinductor_*`` and removes that on a clean exit
    only: a probe whose package crashed its process must not leave it in the system temp folder."""
    left = []

    def crash(*a, **k):
        unpacked = Path(k["env"]["TMPDIR"]) / "aotinductor_x" / "probe"
        unpacked.mkdir(parents=True)
        left.append(unpacked)
        return subprocess.CompletedProcess(a, -11, "", "")

    monkeypatch.setattr(tc.subprocess, "run", crash)
    assert tc.probe("cc", "cpu").endswith("(SIGSEGV)")
    assert len(left) == 1 and not left[0].exists()


def test_a_crashing_cxx_is_passed_over_for_the_system_gxx_with_one_line(monkeypatch, tmp_path, fresh_choice):
    system = tmp_path / "g++"
    system.write_text("")
    monkeypatch.setattr(tc, "SYSTEM_GXX", str(system))
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    tried, both_running = [], threading.Barrier(2, timeout=10)

    def probe(cxx, device):
        tried.append(cxx)
        both_running.wait()  # the probes run at once (each is minutes-long on the lent GPU)
        return "its package crashed the process that loaded it (SIGSEGV)" if cxx == "/opt/gcc/bin/g++" else None

    monkeypatch.setattr(tc, "probe", probe)
    lines = []
    assert tc.package_compiler("cuda", lines.append) == str(system)
    assert sorted(tried) == sorted(["/opt/gcc/bin/g++", str(system)])
    assert lines == [f"compile: CXX=/opt/gcc/bin/g++: its package crashed the process that loaded it (SIGSEGV); "
                     f"linking packages with {system} instead"]
    assert tc.package_compiler("cuda", lines.append) == str(system) and len(tried) == 2  # chosen once a process


def test_no_working_compiler_is_one_error_naming_each(monkeypatch, tmp_path, fresh_choice):
    system = tmp_path / "g++"
    system.write_text("")
    monkeypatch.setattr(tc, "SYSTEM_GXX", str(system))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(tc.shutil, "which", lambda name: "/opt/gcc/bin/g++")
    monkeypatch.setattr(tc, "probe", lambda cxx, device: "failed: no" if cxx else "its package crashed (SIGSEGV)")
    with pytest.raises(InputError) as e:
        tc.package_compiler("cpu")
    assert str(e.value) == (f"--compile: no C++ compiler here builds AOTInductor packages that load (g++ on PATH "
                            f"(/opt/gcc/bin/g++): its package crashed (SIGSEGV); {system}: failed: no); set CXX "
                            "to a working g++ or export without --compile")


def test_the_default_compiler_is_passed_to_inductor_by_name(monkeypatch, fresh_choice):
    """Where the default works it is named ``g++`` (an empty $CXX must not reach Inductor)."""
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(tc, "probe", lambda cxx, device: None)
    lines = []
    assert tc.package_compiler("cpu", lines.append) == "g++" and lines == []


def test_every_package_is_linked_by_the_chosen_compiler(monkeypatch, tmp_path):
    import torch

    from engine import aoti

    seen = {}

    class Stop(Exception):
        pass

    def compile_and_package(exported, package_path, inductor_configs):
        seen.update(inductor_configs)
        raise Stop

    monkeypatch.setattr(torch.export, "export", lambda *a, **k: None)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    with pytest.raises(Stop):
        aoti._package(tmp_path, "unet", "k", None, (torch.zeros(1),), {}, {}, lambda s: None, "/usr/bin/g++")
    assert seen == {"aot_inductor.package_constants_in_so": False, "cpp.cxx": (None, "/usr/bin/g++")}
    # a GPU package's compile skips Inductor's probe of the host's vector instruction sets
    on_gpu = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(Stop):
        aoti._package(tmp_path, "unet", "k", None, (on_gpu,), {}, {}, lambda s: None, "/usr/bin/g++")
    assert seen["cpp.vec_isa_ok"] is False and seen["cpp.cxx"] == (None, "/usr/bin/g++")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None or not Path(tc.SYSTEM_GXX).exists(), reason="needs gcc and /usr/bin/g++")
def test_a_real_compiler_wrapper_that_links_a_crash_into_packages_is_caught(tmp_path, monkeypatch, fresh_choice):
    """A g++ wrapper that links an object whose constructor raises SIGSEGV into every shared
    library, as the lent GPU's wrapper linked a second libstdc++: the probe's package crashes its
    process, and the export's compiler falls back to /usr/bin/g++."""
    (tmp_path / "boom.c").write_text("#include <signal.h>\n"
                                     "__attribute__((constructor)) static void boom(void) { raise(SIGSEGV); }\n")
    subprocess.run(["gcc", "-fPIC", "-c", str(tmp_path / "boom.c"), "-o", str(tmp_path / "boom.o")], check=True)
    wrapper = tmp_path / "g++"
    wrapper.write_text("#!/bin/sh\n"
                       f'for a in "$@"; do [ "$a" = "-shared" ] && exec {tc.SYSTEM_GXX} "$@" {tmp_path / "boom.o"}; done\n'
                       f'exec {tc.SYSTEM_GXX} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    lines = []
    assert tc.package_compiler("cpu", lines.append) == tc.SYSTEM_GXX
    assert lines == [f"compile: CXX={wrapper}: its package crashed the process that loaded it (SIGSEGV); "
                     f"linking packages with {tc.SYSTEM_GXX} instead"]
