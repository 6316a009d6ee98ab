"""Build checks of plugins/ (CUDA kernels, TensorRT IPluginV3 wrappers, CMake) on a machine without a GPU.

* The kernel translation units compile with nvcc for Jetson Orin (sm_87) and Hopper (sm_90) in one nvcc call each
  (skipped only where nvcc is absent).
* CMake configures without TensorRT and says that the TensorRT wrapper was skipped.
* With TENSORRT_INCLUDE_DIR set (a directory holding NvInfer.h, see tools/fetch_trt_headers.md), CMake builds
  libstaticprune_plugins.so (+ the dynamic-loading variant and the host check); the host check runs, and the shared
  objects have no undefined symbols other than TensorRT's, CUDA's and the C/C++ runtime's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
KERNEL_SOURCES = [
    PLUGINS / "bipartiteMergePlugin" / "bipartiteMergeKernels.cu",
    PLUGINS / "tokenUnmergePlugin" / "tokenUnmergeKernels.cu",
]
INCLUDE_DIRS = [PLUGINS / "common", PLUGINS / "bipartiteMergePlugin", PLUGINS / "tokenUnmergePlugin"]
ARCHS = ("87", "90")  # Jetson Orin (JetPack 6, TensorRT 10.3) and Hopper


def _nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = Path(cuda_home) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    return nvcc


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernel_translation_unit_compiles_for_orin_and_hopper(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): cannot compile the CUDA kernels")
    cmd = [nvcc, "-c", "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v"]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd += [f"-I{d}" for d in INCLUDE_DIRS] + [source, "-o", tmp_path / (source.stem + ".o")]
    proc = _run(cmd)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
    assert "warning" not in log.lower(), log
    for arch in ARCHS:
        assert re.search(rf"Compiling entry function '\w+' for 'sm_{arch}'", log), f"no sm_{arch} code:\n{log}"
    # A few bytes of spill are ptxas's business; hundreds would mean a register blow-up (e.g. a local array).
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    assert spills and max(spills) <= 128, f"register spills:\n{log}"


def test_plugin_sources_have_no_placeholders():
    pattern = re.compile(r"\b(TODO|FIXME|XXX)\b|NotImplementedError")
    offenders = []
    for path in sorted(PLUGINS.rglob("*")):
        if path.is_file() and path.suffix in {".h", ".cuh", ".cu", ".cpp", ".txt", ".md", ".map"}:
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    if _nvcc() is None:
        pytest.skip("nvcc not found: CMake cannot enable the CUDA language")
    return cmake


def _cmake_env() -> dict:
    env = dict(os.environ)
    env.pop("TENSORRT_INCLUDE_DIR", None)  # passed explicitly, never picked up by accident
    nvcc = _nvcc()
    env.setdefault("CUDACXX", nvcc)
    return env


def test_cmake_configure_without_tensorrt_says_the_wrapper_is_skipped(tmp_path):
    cmake = _cmake()
    proc = _run([cmake, "-S", PLUGINS, "-B", tmp_path / "build"], env=_cmake_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "TensorRT wrapper SKIPPED" in log, log
    assert "architectures 87;90" in log, log


# Symbols a plugin library may leave to the process: TensorRT's C entry points and C++ API, the CUDA runtime and
# driver, and the C / C++ runtime (versioned GLIBC / GLIBCXX / CXXABI / GCC symbols and the usual weak hooks).
TENSORRT_C_SYMBOLS = {"getPluginRegistry", "getLogger", "getInferLibVersion", "createInferRuntime_INTERNAL",
                      "createInferBuilder_INTERNAL", "createInferRefitter_INTERNAL"}
WEAK_RUNTIME_HOOKS = {"_ITM_deregisterTMCloneTable", "_ITM_registerTMCloneTable", "__gmon_start__"}


def _foreign_undefined(library: Path) -> list[str]:
    proc = _run(["nm", "-D", "--undefined-only", library])
    assert proc.returncode == 0, proc.stderr
    foreign = []
    for line in proc.stdout.splitlines():
        name = line.split()[-1]
        base = name.split("@")[0]
        if re.search(r"@(GLIBC|GLIBCXX|CXXABI|GCC)_", name) or base in WEAK_RUNTIME_HOOKS:
            continue
        if "nvinfer" in base or base in TENSORRT_C_SYMBOLS:
            continue
        if re.match(r"_{0,2}cu", base):
            continue
        foreign.append(name)
    return foreign


def _exported(library: Path) -> set[str]:
    proc = _run(["nm", "-D", "--defined-only", library])
    assert proc.returncode == 0, proc.stderr
    return {line.split()[-1] for line in proc.stdout.splitlines()}


def test_cmake_builds_the_tensorrt_plugin_library(tmp_path, tensorrt_include_dir):
    include_dir = str(tensorrt_include_dir)
    cmake = _cmake()
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not found")
    build = tmp_path / "build"
    configure = _run([cmake, "-S", PLUGINS, "-B", build, f"-DTENSORRT_INCLUDE_DIR={include_dir}",
                      "-DSTATICPRUNE_BUILD_DYNAMIC_PLUGIN_LIB=ON"], env=_cmake_env())
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = _run([cmake, "--build", build, "-j", "2"], env=_cmake_env())
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr

    plugins = build / "libstaticprune_plugins.so"
    dynamic = build / "libstaticprune_plugins_dynamic.so"
    kernels = build / "libstaticprune_kernels.so"
    for library in (plugins, dynamic, kernels):
        assert library.exists(), library
        assert _foreign_undefined(library) == [], f"{library.name}: unexpected undefined symbols"

    c_api = {"staticprune_kernels_abi_version", "staticprune_bipartite_merge", "staticprune_bipartite_merge_out_tokens",
             "staticprune_bipartite_merge_workspace_size", "staticprune_bipartite_merge_thresholds",
             "staticprune_token_unmerge",
             # the plugin contract (plugins/common/staticprunePluginContract.h), which lint loads through ctypes
             "staticprune_plugin_contract_version", "staticprune_bipartite_merge_check_fields",
             "staticprune_bipartite_merge_output_shapes", "staticprune_token_unmerge_check_fields",
             "staticprune_token_unmerge_output_shapes"}
    assert _exported(kernels) == c_api
    assert _exported(plugins) == c_api  # static registration: nothing for loadLibrary to find
    assert _exported(dynamic) == c_api | {"getCreators", "setLoggerFinder"}

    check = _run([build / "staticprune_plugin_host_check"])
    assert check.returncode == 0, check.stdout + check.stderr
    assert re.search(r"\d+ checks, 0 failures", check.stdout), check.stdout
