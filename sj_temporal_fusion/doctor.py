"""python -m sj_temporal_fusion.doctor [--json]: is this environment able to run the kernels?

Prints the versions that matter (torch and the CUDA it was built for, the driver, CuPy and the
CUDA it was built for, NVRTC, the host compiler and OpenMP), which build each device uses, then
compiles and runs the kernels on every device present (the CPU always, each CUDA device) on a
small random case against the pure-PyTorch reference, and on a GPU compares its forward pass with
the host build's bit for bit. Each known failure is named with its cause and the exact fix.

Exit status 0 only when every device passes; warnings (problems that do not stop this backend,
such as SpikingJelly's own cupy backend being broken) do not change it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import traceback
from typing import Optional

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
# NVRTC 13 emits code for sm_75 (Turing) and newer; NVRTC 12 for sm_50 and newer.
MIN_CAPABILITY = {13: (7, 5), 12: (5, 0)}
CASE = dict(T=13, N=1031)  # odd sizes: partial blocks and lanes


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str = ""
    cause: str = ""
    fix: str = ""


# ---------------------------------------------------------------- versions

def _cxx() -> str:
    return os.environ.get("CXX", "g++")


def _compiler_version(compiler: str) -> Optional[str]:
    path = shutil.which(compiler)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout else None


def _openmp_version(compiler: str) -> Optional[str]:
    """The _OPENMP date of ``compiler -fopenmp`` (201511 = OpenMP 4.5), None when unsupported."""
    path = shutil.which(compiler)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "-fopenmp", "-dM", "-E", "-x", "c++", os.devnull],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        if line.startswith("#define _OPENMP "):
            date = line.split()[-1]
            names = {"201511": "4.5", "201811": "5.0", "202011": "5.1", "202111": "5.2", "201307": "4.0"}
            return f"{date} (OpenMP {names.get(date, '?')})"
    return None


def _cupy_cuda_major(distributions: list[str]) -> Optional[int]:
    """The CUDA major CuPy was built for: from the wheel's name (cupy-cuda13x), else its runtime."""
    for name in distributions:
        if name.startswith("cupy-cuda") and name[9:-1].isdigit():
            return int(name[9:-1])
    try:
        from cupy.cuda import runtime
        return runtime.runtimeGetVersion() // 1000
    except Exception:  # noqa: BLE001 - CuPy absent or broken: reported elsewhere
        return None


def versions() -> dict:
    import numpy
    import torch

    from . import environment
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "numpy": numpy.__version__, "spikingjelly": environment.package_version("spikingjelly"),
            "sj_temporal_fusion": environment.package_version("sj-temporal-fusion"),
            "cupy_distributions": environment.cupy_distributions(), "cupy": None, "cupy_cuda": None,
            "driver": None, "nvrtc": None, "nvrtc_error": None, "host_compiler": _cxx(),
            "host_compiler_version": _compiler_version(_cxx()), "openmp": _openmp_version(_cxx())}
    try:
        import cupy
        info["cupy"] = cupy.__version__
        info["cupy_cuda"] = _cupy_cuda_major(info["cupy_distributions"])
        from cupy.cuda import runtime
        driver = runtime.driverGetVersion()
        info["driver"] = f"CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else None
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - a broken CuPy is a finding, not a crash
        info["cupy_error"] = _one_line(exc)
    if info["cupy"] is not None:
        try:
            from cupy.cuda import nvrtc
            major, minor = nvrtc.getVersion()
            info["nvrtc"] = f"{major}.{minor}"
        except Exception as exc:  # noqa: BLE001
            info["nvrtc_error"] = _one_line(exc)
    return info


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------- environment checks

def environment_checks(info: dict, gpus: list[dict]) -> list[Check]:
    """Checks that need no kernel run. ``gpus``: [{'index', 'name', 'capability': (major, minor)}]."""
    checks = [kernel_sources_check()]
    torch_major = int(info["torch_cuda"].split(".")[0]) if info["torch_cuda"] else None
    wheels = info["cupy_distributions"]
    if len(wheels) > 1:
        keep = f"cupy-cuda{torch_major}x" if torch_major else wheels[-1]
        checks.append(Check("one CuPy wheel", FAIL, f"installed: {', '.join(wheels)}",
                            "several CuPy wheels share the import name 'cupy' and overwrite each other's "
                            "files, so which one loads is undefined",
                            f"pip uninstall -y {' '.join(wheels)} && pip install {keep}"))
    else:
        checks.append(Check("one CuPy wheel", OK if wheels else SKIP, wheels[0] if wheels else "CuPy not installed"))
    if info["cupy"] and torch_major and info["cupy_cuda"] and info["cupy_cuda"] != torch_major:
        checks.append(Check("CuPy's CUDA matches torch's", FAIL,
                            f"CuPy built for CUDA {info['cupy_cuda']}, torch for CUDA {info['torch_cuda']}",
                            "two CUDA runtimes in one process: CuPy's NVRTC and runtime differ from torch's, "
                            "and a driver new enough for one may be too old for the other",
                            f"pip uninstall -y cupy-cuda{info['cupy_cuda']}x && pip install "
                            f"'sj-temporal-fusion[cuda{torch_major}]'   (= cupy-cuda{torch_major}x)"))
    elif info["cupy"] and torch_major:
        checks.append(Check("CuPy's CUDA matches torch's", OK, f"CUDA {torch_major}"))
    if info.get("cupy_error"):
        checks.append(Check("CuPy importable", FAIL if gpus else WARN, info["cupy_error"],
                            "CuPy is installed but fails to import or to reach the CUDA runtime",
                            f"reinstall the CuPy wheel of torch's CUDA: pip install --force-reinstall "
                            f"cupy-cuda{torch_major or 13}x" + ("" if gpus else "; only GPU runs need it")))
    if info["cupy"]:
        checks.append(cupy_compile_api_check(bool(gpus)))
        if info["nvrtc_error"]:
            checks.append(Check("NVRTC loadable", FAIL if gpus else WARN, info["nvrtc_error"],
                                "CuPy compiles the GPU kernels with NVRTC at run time and cannot load it",
                                f"pip install nvidia-cuda-nvrtc-cu{info['cupy_cuda'] or torch_major or 13} "
                                f"(or point CUDA_PATH at a CUDA toolkit with lib64/libnvrtc.so)"
                                + ("" if gpus else "; only GPU runs need it")))
        else:
            checks.append(Check("NVRTC loadable", OK, f"NVRTC {info['nvrtc']}"))
    if info["host_compiler_version"] is None:
        checks.append(Check("C++ compiler", FAIL, f"CXX={_cxx()!r} not found",
                            "the CPU build compiles the kernels with a C++ compiler at first use",
                            "install g++ (Debian/Ubuntu: apt-get install g++) or set CXX to an existing "
                            "g++/clang++, e.g. export CXX=/usr/bin/g++"))
    else:
        checks.append(Check("C++ compiler", OK, info["host_compiler_version"]))
        if info["openmp"] is None:
            checks.append(Check("OpenMP", FAIL, f"{_cxx()} -fopenmp does not define _OPENMP",
                                "the host build is compiled with -fopenmp",
                                "install the compiler's OpenMP runtime (Debian/Ubuntu: apt-get install libgomp1; "
                                "clang: libomp-dev)"))
        else:
            checks.append(Check("OpenMP", OK, info["openmp"]))
    for gpu in gpus:
        checks.append(gpu_age_check(gpu, int((info["nvrtc"] or "13").split(".")[0])))
    checks.append(spikingjelly_cupy_check())
    return checks


def kernel_sources_check(csrc=None) -> Check:
    """Every file the builds read (temporal.cu, each registered model's header and what they
    #include, ``_nvrtc.kernel_sources``) is in the installed package's csrc/."""
    from . import _nvrtc
    where = _nvrtc.CSRC if csrc is None else csrc
    needed, missing = _nvrtc.kernel_sources(where)
    if not missing:
        return Check("kernel sources", OK, f"{len(needed)} files in {where}")
    return Check("kernel sources", FAIL, f"{len(missing)} of the {len(needed)} files missing from {where}",
                 f"sj_temporal_fusion's kernel sources are missing from {where}: {', '.join(missing)}; the "
                 f"package was built or installed without them, so every device fails at its first kernel build",
                 "reinstall sj-temporal-fusion from a wheel that holds csrc/ with its subfolders (python -m zipfile "
                 "-l <wheel> | grep csrc/ lists them) or from the checkout: pip install --force-reinstall --no-deps "
                 "<wheel or checkout>; a released wheel without them is a packaging bug: report it")


def cupy_compile_api_check(have_gpu: bool) -> Check:
    """CuPy has the NVRTC bindings the GPU build compiles through (``_nvrtc.nvrtc_module``)."""
    from . import _nvrtc
    name = "CuPy's NVRTC bindings"
    try:
        _nvrtc.nvrtc_module()
    except _nvrtc.UnsupportedCuPy as exc:
        import cupy
        return Check(name, FAIL if have_gpu else WARN, f"CuPy {cupy.__version__}", exc.cause,
                     exc.fix + ("" if have_gpu else "; only GPU runs need it"))
    except Exception as exc:  # noqa: BLE001 - CuPy absent or broken: the import check names it
        return Check(name, SKIP, _one_line(exc))
    import cupy
    checked = " and ".join(_nvrtc.CHECKED_CUPY)
    newest = max(_nvrtc._version_tuple(v) for v in _nvrtc.CHECKED_CUPY)
    if _nvrtc._version_tuple(cupy.__version__)[0] > newest[0]:
        return Check(name, WARN, f"CuPy {cupy.__version__} has them but is newer than the versions checked ({checked})",
                     "a CuPy release the GPU build has not been run against",
                     f"if the GPU kernels fail to compile or load: {_nvrtc._cupy_fix()}")
    return Check(name, OK, f"CuPy {cupy.__version__} (checked: {checked})")


def gpu_age_check(gpu: dict, nvrtc_major: int) -> Check:
    need = MIN_CAPABILITY.get(nvrtc_major, MIN_CAPABILITY[13])
    cap = tuple(gpu["capability"])
    name = f"cuda:{gpu['index']} supported"
    if cap < need:
        return Check(name, FAIL, f"{gpu['name']} is sm_{cap[0]}{cap[1]}",
                     f"NVRTC {nvrtc_major} emits code for sm_{need[0]}{need[1]} and newer only",
                     "use a GPU of compute capability >= 7.5" if nvrtc_major >= 13 else
                     f"use a GPU of compute capability >= {need[0]}.{need[1]}"
                     + ("; or CUDA 12 (a CUDA 12 torch with 'sj-temporal-fusion[cuda12]'), whose NVRTC "
                        "still targets sm_50 and newer; or run on the CPU" if nvrtc_major >= 13 else ""))
    return Check(name, OK, f"{gpu['name']}, sm_{cap[0]}{cap[1]}")


def spikingjelly_cupy_check() -> Check:
    from .compat import NUMPY_INT_FIX, spikingjelly_uses_numpy_int
    where = spikingjelly_uses_numpy_int()
    if where is None:
        return Check("SpikingJelly's cupy backend", OK, "no removed NumPy alias in use")
    import numpy
    return Check("SpikingJelly's cupy backend", WARN, f"{where} uses np.int",
                 f"NumPy {numpy.__version__} removed np.int (1.24; CuPy 14 needs NumPy >= 2), so "
                 f"LIFNode(backend='cupy') raises AttributeError on its first launch",
                 NUMPY_INT_FIX)


# ---------------------------------------------------------------- kernel runs

def _case(dtype, device, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(CASE["T"], CASE["N"], generator=g, dtype=torch.float64) * 0.5 + 0.3)
    grad = torch.randn(CASE["T"], CASE["N"], generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype)


OPTIONS = dict(kind="lif", tau=1.25, decay_input=False, v_threshold=0.3, v_reset=0.0, store_v_seq=True)


def _run(x, grad):
    """(spikes, v_seq, grad_x) of the fused kernels."""
    from spikingjelly.activation_based import surrogate

    from . import lif_multi_step
    x = x.detach().clone().requires_grad_(True)
    spike, _, v_seq = lif_multi_step(x, surrogate_function=surrogate.Sigmoid(alpha=4.0), **OPTIONS)
    spike.backward(grad)
    return spike.detach(), v_seq.detach(), x.grad


def _reference(x, grad):
    from spikingjelly.activation_based import surrogate

    from .reference import lif_reference
    x64 = x.detach().double().cpu().requires_grad_(True)
    spike, _, v_seq = lif_reference(x64, surrogate_function=surrogate.Sigmoid(alpha=4.0), **OPTIONS)
    spike.backward(grad.double().cpu())
    return spike.detach(), v_seq.detach(), x64.grad


def compare_with_reference(device) -> list[str]:
    """Problems found running the kernels on ``device`` against the fp64 reference (fp64: spikes
    exact, v and grad to 1e-9; fp32: spikes within 0.1%, v and grad to 1e-3 where spikes agree)."""
    import torch
    problems = []
    for dtype, spike_frac, tol in ((torch.float64, 0.0, 1e-9), (torch.float32, 1e-3, 1e-3)):
        x, grad = _case(dtype, device)
        s, v, gx = (t.cpu().double() for t in _run(x, grad))
        rs, rv, rg = _reference(x, grad)
        mismatch = (s != rs).double().mean().item()
        same = (s == rs).all(dim=0)
        v_err = (v - rv)[:, same].abs().max().item() if same.any() else float("nan")
        g_err = ((gx - rg)[:, same].norm() / rg[:, same].norm().clamp_min(1e-30)).item() if same.any() else float("nan")
        name = str(dtype).replace("torch.", "")
        if mismatch > spike_frac:
            problems.append(f"{name}: spikes differ from the reference at {mismatch:.2%} of neuron-steps")
        if not v_err <= tol:
            problems.append(f"{name}: membrane potential off by {v_err:.3g} (> {tol:g})")
        if not g_err <= tol:
            problems.append(f"{name}: grad_x relative error {g_err:.3g} (> {tol:g})")
    return problems


DENORMAL_COLUMNS = 16


def compare_gpu_with_host(device) -> list[str]:
    """Forward pass (spikes, v_seq) on ``device`` against the host build, bit for bit. The last
    ``DENORMAL_COLUMNS`` neurons get one tiny input and then zeros, so v decays through the
    subnormal range (x 0.2 per step): a build that flushes subnormals to zero (CuPy appends
    ``-ftz=true`` to RawModule's options) differs there from the host build, which keeps them."""
    import torch
    problems = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x, grad = _case(dtype, "cpu", seed=1)
        x[:, -DENORMAL_COLUMNS:] = 0
        x[0, -DENORMAL_COLUMNS:] = torch.logspace(-30, -37, DENORMAL_COLUMNS, dtype=torch.float64).to(dtype)
        hs, hv, _ = _run(x, grad)
        gs, gv, _ = _run(x.to(device), grad.to(device))
        gs, gv = gs.cpu(), gv.cpu()
        for part, cols in (("", slice(None, -DENORMAL_COLUMNS)), (" in the subnormal range", slice(-DENORMAL_COLUMNS, None))):
            if not (torch.equal(gs[:, cols], hs[:, cols]) and torch.equal(gv[:, cols], hv[:, cols])):
                problems.append(
                    f"{str(dtype).replace('torch.', '')}: GPU forward differs from the host build{part} "
                    f"({(gs[:, cols] != hs[:, cols]).sum().item()} spikes, {(gv[:, cols] != hv[:, cols]).sum().item()} v values)"
                    + (": the GPU build flushes subnormals to zero (CuPy adds -ftz=true)" if part else ""))
    return problems


KNOWN_ERRORS = (
    # (substring of the error, cause, fix)
    ("host build of the LIF kernels failed", "the C++ compiler rejected the host build (log above)",
     "use g++ >= 9 with OpenMP (apt-get install g++), or set CXX to one"),
    ("CuPy is not installed", "the GPU kernels run through CuPy, which is missing",
     "pip install 'sj-temporal-fusion[cuda13]' (CUDA 13 torch) or '[cuda12]' (CUDA 12 torch)"),
    ("nvrtc", "CuPy cannot load or run NVRTC",
     "pip install nvidia-cuda-nvrtc-cu13 (cu12 for CUDA 12), matching CuPy's CUDA"),
    ("insufficient", "the NVIDIA driver is older than the CUDA CuPy was built for",
     "update the driver, or install the CuPy (and torch) of the CUDA your driver supports: cupy-cuda12x"),
    ("UNSUPPORTED_PTX_VERSION", "the NVIDIA driver is older than the NVRTC that compiled the kernels",
     "update the driver, or use cupy-cuda12x with a CUDA 12 torch"),
    ("NO_BINARY_FOR_GPU", "no machine code for this GPU's architecture",
     "use a GPU of compute capability >= 7.5 with CUDA 13, or CUDA 12 for older GPUs"),
    ("invalid value for --gpu-architecture", "NVRTC cannot compile for this GPU's architecture",
     "use a GPU of compute capability >= 7.5 with CUDA 13, or CUDA 12 for older GPUs"),
)


def explain(exc: BaseException, device: str = "cpu") -> tuple[str, str]:
    """(cause, fix) of a failed kernel run, from the error and what the doctor found."""
    from . import _nvrtc
    text = f"{type(exc).__name__}: {exc}"
    sources = kernel_sources_check()
    if sources.status == FAIL:
        return sources.cause, sources.fix
    if isinstance(exc, _nvrtc.UnsupportedCuPy):
        return exc.cause, exc.fix
    if isinstance(exc, _nvrtc.NVRTCCompileError):
        return "NVRTC rejected the kernels (its log is in the traceback)", "report it with the output of --json"
    if device == "cpu" and _compiler_version(_cxx()) is None:
        return "no C++ compiler for the host build", (
            f"CXX={_cxx()!r} does not exist: install g++ (Debian/Ubuntu: apt-get install g++) or set CXX "
            f"to an existing compiler")
    for needle, cause, fix in KNOWN_ERRORS:
        if needle.lower() in text.lower():
            return cause, fix
    return "unexpected error (traceback in the JSON output)", "report it with the output of --json"


def run_device(device: str, build: str) -> dict:
    import time
    result = {"device": device, "build": build, "status": OK, "problems": [], "cause": "", "fix": ""}
    start = time.perf_counter()
    try:
        result["problems"] += compare_with_reference(device)
        if device.startswith("cuda"):
            result["problems"] += compare_gpu_with_host(device)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none ends the doctor
        result["status"] = FAIL
        result["error"] = _one_line(exc)
        result["traceback"] = traceback.format_exc()
        result["cause"], result["fix"] = explain(exc, device)
    if result["problems"]:
        result["status"] = FAIL
        result["cause"] = result["cause"] or "the kernels ran but gave wrong results"
        result["fix"] = result["fix"] or "report it with the output of --json"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def gpus() -> list[dict]:
    import torch
    if not torch.cuda.is_available():
        return []
    return [{"index": i, "name": torch.cuda.get_device_name(i), "capability": torch.cuda.get_device_capability(i)}
            for i in range(torch.cuda.device_count())]


def builds(info: dict, gpu_list: list[dict]) -> dict:
    try:
        from . import _host
        cache = f", cached in {_host.cache_dir()}"
    except (ImportError, AttributeError):  # the build module's layout is not the doctor's business
        cache = ""
    cpu = f"host build: {info['host_compiler_version'] or info['host_compiler'] + ' (NOT FOUND)'} with OpenMP{cache}"
    out = {"cpu": cpu}
    for gpu in gpu_list:
        major, minor = gpu["capability"]
        out[f"cuda:{gpu['index']}"] = (f"NVRTC {info['nvrtc'] or '(not loadable)'} via CuPy {info['cupy'] or '(absent)'}"
                                       f" -> sm_{major}{minor} machine code, compiled per variant at first use")
    return out


def diagnose(run_kernels: bool = True) -> dict:
    info = versions()
    gpu_list = gpus()
    checks = environment_checks(info, gpu_list)
    device_builds = builds(info, gpu_list)
    devices = [run_device(name, build) if run_kernels else {"device": name, "build": build, "status": SKIP}
               for name, build in device_builds.items()]
    ok = all(d["status"] in (OK, SKIP) for d in devices) and not any(c.status == FAIL for c in checks)
    return {"ok": ok, "versions": info, "gpus": [{**g, "capability": list(g["capability"])} for g in gpu_list],
            "checks": [dataclasses.asdict(c) for c in checks], "devices": devices}


def render(report: dict) -> str:
    v = report["versions"]
    lines = ["sj-temporal-fusion doctor", "",
             f"  python {v['python']}, torch {v['torch']} (CUDA {v['torch_cuda'] or 'none: CPU-only build'}), "
             f"numpy {v['numpy']}, SpikingJelly {v['spikingjelly']}, sj-temporal-fusion {v['sj_temporal_fusion']}",
             f"  CuPy {v['cupy'] or 'not installed'}"
             + (f" (built for CUDA {v['cupy_cuda']})" if v['cupy_cuda'] else "")
             + f", NVRTC {v['nvrtc'] or v['nvrtc_error'] or '-'}, driver {v['driver'] or 'none'}",
             f"  host compiler {v['host_compiler']}: {v['host_compiler_version'] or 'NOT FOUND'}, "
             f"OpenMP {v['openmp'] or 'none'}",
             "  GPUs: " + (", ".join(f"cuda:{g['index']} {g['name']} (sm_{g['capability'][0]}{g['capability'][1]})"
                                     for g in report["gpus"]) or "none"),
             "", "checks:"]
    for c in report["checks"]:
        lines.append(f"  [{c['status']:>4}] {c['name']}: {c['detail']}")
        if c["status"] in (FAIL, WARN):
            lines += [f"         cause: {c['cause']}", f"         fix:   {c['fix']}"]
    lines += ["", "devices:"]
    for d in report["devices"]:
        lines.append(f"  [{d['status']:>4}] {d['device']}: {d['build']}"
                     + (f" ({d['seconds']} s)" if "seconds" in d else ""))
        if d.get("error"):
            lines.append(f"         error: {d['error']}")
        for p in d.get("problems", []):
            lines.append(f"         {p}")
        if d["status"] == FAIL:
            lines += [f"         cause: {d['cause']}", f"         fix:   {d['fix']}"]
    lines += ["", "all devices pass" if report["ok"] else "NOT OK: see the causes and fixes above"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sj_temporal_fusion.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-run", action="store_true", help="versions and checks only; run no kernels")
    args = p.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    report = diagnose(run_kernels=not args.no_run)
    print(json.dumps(report, indent=1, default=str) if args.json else render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
