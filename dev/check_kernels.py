"""
Compile every CUDA kernel of llmc/cuda_layers.py and llmc/flash_attention.py with NVIDIA's runtime
compiler, NVRTC, as CuPy will on a GPU, but without one: each kernel source, for each activation dtype (float32, bfloat16) and each GPU
architecture asked for. Prints what ptxas says of each kernel: registers per thread, bytes spilled
to local memory, static shared memory, and for the flash attention kernels (the ones with many
registers), how many of their 128-thread blocks that leaves room for on one multiprocessor (the
"theoretical occupancy" a profiler reports).

    pip install nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-crt   # CUDA 13's NVRTC and headers
    pip install "nvidia-cuda-nvrtc-cu12==12.9.*" "nvidia-cuda-runtime-cu12==12.9.*" \
        "nvidia-cuda-nvcc-cu12==12.9.*"               # and CUDA 12's, beside them (optional)
    python dev/check_kernels.py                       # sm_80 (A100) and sm_90 (H100)
    python dev/check_kernels.py --arch 90 --only flash --cuda 12

Each NVRTC found is used, one per CUDA major version (CUDA 13's and 12's wheels can be installed
together), each with its own headers, since CuPy compiles with its own CUDA's NVRTC and the
register counts differ (CUDA 12.9's NVRTC gives the TF32 dq kernel 184 registers on sm_90, 13.5's
166: 2 blocks a multiprocessor instead of 3). The last line names the NVRTC versions checked.

Exit status 1 if a kernel source does not compile, if NVRTC warns, or if a kernel spills registers
(--allow-spills reports spills only); 2, with one error line, if no NVRTC, headers or kernel sources
are to be had.

Why: the CPU simulation of the tests (tests/cudasim) compiles the kernels with g++ against an
emulation of the CUDA headers, so it checks what they compute, not that NVIDIA's compiler takes them
(CUDA's own bfloat16 conversions, WMMA's real headers), and it says nothing of registers. This does,
with the options CuPy passes to NVRTC (CuPy's own list where CuPy is installed, GPU or not; else
C++17 and the CUDA headers) and, as CuPy does for a GPU its NVRTC knows, straight to the GPU's
machine code (-arch=sm_XX), which runs ptxas.

What the headers need: cuda_bf16.h comes with the CUDA runtime's headers (the nvidia-cuda-runtime
wheel); WMMA's mma.h, for the flash attention kernels, includes crt/mma.h, which CUDA 13's wheels
ship apart, in nvidia-cuda-crt, and CUDA 12's in nvidia-cuda-nvcc-cu12. A CUDA toolkit's include
directory has both (--include, or CUDA_PATH); where the headers lack crt/mma.h, the flash sources
are compiled as compile_flash_attention does, with an installed toolkit's headers of NVRTC's CUDA
version first, else CUDA 12's nvcc wheel's.
The AdamW ElementwiseKernel is not here: CuPy writes its source, from CuPy's own headers.

Without CuPy, those modules are imported through the CPU simulation in tests/cudasim, which gives
them the names they need at import; only the kernel sources are used.
"""

import argparse
import ctypes
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what one multiprocessor holds, by compute capability (A100; RTX 30xx; RTX 40xx, L4; H100): registers,
# shared memory, blocks, threads (CUDA's programming guide, "Technical Specifications")
SM_LIMITS = {"80": (65536, 164 * 1024, 32, 2048), "86": (65536, 100 * 1024, 16, 1536),
             "89": (65536, 100 * 1024, 24, 1536), "90": (65536, 228 * 1024, 32, 2048)}


def import_kernel_modules():
    # llmc's GPU modules: (cuda_common, flash_attention, cuda_layers). They import CuPy at the top;
    # without it, the simulation gives them what they need
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        import cupy  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "tests", "cudasim"))
    from llmc import cuda_common, cuda_layers, flash_attention
    return cuda_common, flash_attention, cuda_layers


# the name of each kernel a CUDA source defines
KERNEL_NAME = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")


def kernel_sources(modules):
    # every kernel source of the modules: their module-level strings that define a __global__
    # function, by name (in order), with the kernels each defines
    found = {}
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, str) and "__global__" in value:
                assert found.get(name, value) == value, f"two kernel sources named {name}"
                found[name] = value
    return {name: (value, KERNEL_NAME.findall(value)) for name, value in sorted(found.items())}


def _nvidia_dirs():
    # the directories of NVIDIA's pip wheels: nvidia/cu13 (CUDA 13) and nvidia/cuda_* (CUDA 12)
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry or ".", "nvidia")
        if os.path.isdir(base):
            dirs += sorted(glob.glob(os.path.join(base, "cu1*"))) + sorted(glob.glob(os.path.join(base, "cuda_*")))
    cuda_path = os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return dirs + [cuda_path]


def find_nvrtc():
    # libnvrtc.so from NVIDIA's wheels, else from a toolkit
    for d in _nvidia_dirs():
        for sub in ("lib", "lib64"):
            found = sorted(glob.glob(os.path.join(d, sub, "libnvrtc.so*")))
            if found:
                return found[-1]
    return None


def find_nvrtcs():
    # {CUDA major version: (libnvrtc.so, its CUDA headers)}, the first of each version found:
    # CUDA 13's wheels (NVRTC and headers in nvidia/cu13), CUDA 12's (nvidia/cuda_nvrtc, headers
    # in nvidia/cuda_runtime beside it), a toolkit. Both wheels' versions can be installed at once
    found = {}
    for d in _nvidia_dirs():
        for path in sorted(glob.glob(os.path.join(d, "lib*", "libnvrtc.so*")))[-1:]:
            match = re.search(r"libnvrtc\.so\.(\d+)", path)
            major = int(match.group(1)) if match else NVRTC(path).major
            include = next((inc for inc in (os.path.join(d, "include"),
                                            os.path.join(os.path.dirname(d), "cuda_runtime", "include"))
                            if os.path.exists(os.path.join(inc, "cuda_bf16.h"))), None)
            if include and major not in found:
                found[major] = (path, include)
    return found


def find_include():
    # the first include directory with cuda_bf16.h: NVIDIA's wheels' (CUDA 13's runtime and crt share
    # nvidia/cu13/include; CUDA 12's keep theirs in nvidia/cuda_runtime/include), else a toolkit's
    for d in _nvidia_dirs():
        inc = os.path.join(d, "include")
        if os.path.exists(os.path.join(inc, "cuda_bf16.h")):
            return inc
    return None


class NVRTC:
    # the few calls of NVRTC's C API we need, through ctypes
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.major, self.version = major.value, f"{major.value}.{minor.value}"

    def compile(self, source, options):
        # (ok, log): NVRTC's result, and its log, where ptxas writes its info lines (-Xptxas -v)
        prog = ctypes.c_void_p()
        status = self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None)
        if status != 0:
            return False, f"nvrtcCreateProgram failed ({status})"
        try:
            opts = [o.encode() for o in options]
            status = self.lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, log)
            return status == 0, log.value.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def parse_ptxas(log):
    # {kernel: (registers, spill store bytes, spill load bytes, static shared memory bytes)} from ptxas -v
    info = {}
    for match in re.finditer(r"Function properties for (\w+)\n(.*?)(?=Compiling entry|Function properties|\Z)", log, re.S):
        name, text = match.groups()
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        regs = re.search(r"Used (\d+) registers", text)
        smem = re.search(r"(\d+) bytes smem", text)
        info[name] = (int(regs.group(1)) if regs else 0, int(spills.group(1)) if spills else 0,
                      int(spills.group(2)) if spills else 0, int(smem.group(1)) if smem else 0)
    return info


def blocks_per_sm(arch, threads, regs, smem):
    # how many blocks of `threads` fit on one multiprocessor, by registers (allocated per warp, in
    # units of 256) and by shared memory (1 KB reserved per block), whichever runs out first
    if arch not in SM_LIMITS:
        return None
    sm_regs, sm_smem, sm_blocks, sm_threads = SM_LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = sm_regs // (regs_per_warp * warps)
    by_smem = sm_smem // (smem + 1024) if smem else sm_blocks
    return min(by_regs, by_smem, sm_blocks, sm_threads // threads)


def compiler_options(include):
    # what CuPy passes NVRTC for a RawKernel: with CuPy installed (a GPU or not), its own list (C++17,
    # its bundled CCCL and its headers, then the CUDA headers it finds); else, or with --include, the
    # two that matter to our kernels, C++17 and the CUDA headers. Either way -ftz=true, which CuPy's
    # compile_with_cache always adds (denormals flushed to zero: fewer instructions)
    if include is None:
        try:
            from cupy._core.core import assemble_cupy_compiler_options
            return "CuPy's", list(assemble_cupy_compiler_options(())) + ["-ftz=true"]
        except (ImportError, AttributeError, RuntimeError):  # no CuPy, the simulation, or no CUDA headers
            include = find_include()
            if include is None:
                raise RuntimeError("no CUDA headers found (cuda_bf16.h): pip install nvidia-cuda-runtime") from None
    return "our", ["--std=c++17", f"-I{include}", "-ftz=true"]


def check(arches=("80", "90"), dtypes=("float32", "bfloat16"), only=None, nvrtc=None, include=None, lend_crt=None):
    # compiles every kernel source (those whose name contains `only`) for every (arch, dtype) with
    # nvrtc (an NVRTC, found if not given), with CuPy's options, or with the headers of `include` where
    # given; returns ((whose, options), rows, errors): a row per kernel, (arch, dtype, source, kernel,
    # regs, spill stores, spill loads, smem), and a line per failure (a source that does not compile,
    # a warning, a kernel ptxas did not report). lend_crt: whether a toolkit's or wheel's crt/mma.h
    # may be added to the headers (default: where `include` is not given)
    cuda_common, flash_attention, _ = modules = import_kernel_modules()
    if nvrtc is None:
        path = find_nvrtc()
        if path is None:
            raise RuntimeError("no NVRTC found (libnvrtc.so): pip install nvidia-cuda-nvrtc")
        nvrtc = NVRTC(path)
    whose, base_options = compiler_options(include)
    sources = {name: source for name, source in kernel_sources(modules).items()
               if not only or only.lower() in name.lower()}
    # as compile_flash_attention does where CuPy's headers lack WMMA's crt/mma.h: a CUDA toolkit's
    # headers, or CUDA 12's nvcc wheel's, of this NVRTC's version first (not where --include chose
    # the headers)
    lend_crt = include is None if lend_crt is None else lend_crt
    toolkit = flash_attention._crt_include(nvrtc.major) if lend_crt else None
    rows, errors = [], []
    for arch in arches:
        for dtype in dtypes:
            for name, (source, kernels) in sources.items():
                options = base_options + [f"-arch=sm_{arch}", "-Xptxas", "-v"]
                ok, log = nvrtc.compile(cuda_common._FLOATX[dtype] + source, options)
                if not ok and '"crt/mma.h"' in log and toolkit:
                    ok, log = nvrtc.compile(cuda_common._FLOATX[dtype] + source, [f"-I{toolkit}"] + options)
                    print(f"note: {name} ({dtype}, sm_{arch}) needs crt/mma.h: compiled with {toolkit} first")
                if not ok:
                    errors.append(f"{name} ({dtype}, sm_{arch}) does not compile:\n{log.strip()}")
                    continue
                warnings = [line for line in log.splitlines() if "warning" in line and "spill" not in line]
                errors += [f"{name} ({dtype}, sm_{arch}): {w.strip()}" for w in warnings]
                info = parse_ptxas(log)
                for kernel in kernels:
                    if kernel not in info:
                        errors.append(f"{name} ({dtype}, sm_{arch}): ptxas said nothing of {kernel}")
                        continue
                    rows.append((arch, dtype, name, kernel) + info[kernel])
    return (whose, base_options), rows, errors


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    parser = argparse.ArgumentParser(
        description="Compile every CUDA kernel of llmc's GPU modules with NVRTC, as CuPy would, without a GPU.",
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["80", "90"], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--only", help="only the sources whose name contains this (e.g. flash, layernorm)")
    parser.add_argument("--nvrtc", help="path of libnvrtc.so (default: NVIDIA's wheels, then CUDA_PATH)")
    parser.add_argument("--include", help="the CUDA headers' directory (default: CuPy's choice where CuPy is "
                                          "installed, else NVIDIA's wheels, then CUDA_PATH)")
    parser.add_argument("--allow-spills", action="store_true", help="report spilled registers, do not fail on them")
    parser.add_argument("--cuda", nargs="+", type=int, help="the CUDA major versions whose NVRTC to use, of "
                                                                "those installed (default: each found)")
    args = parser.parse_args()
    if args.nvrtc or args.include:  # one NVRTC, as asked
        if args.cuda:
            fail("--cuda chooses among the NVRTCs found: not with --nvrtc or --include")
        nvrtc_path = args.nvrtc or find_nvrtc()
        runs = [(nvrtc_path, args.include, None)]
    else:  # each CUDA version's NVRTC found, with its own headers (the first as CuPy would have it)
        found = find_nvrtcs()
        missing = [major for major in args.cuda or () if major not in found]
        if missing:
            fail(f"--cuda {missing[0]}: no NVRTC of CUDA {missing[0]} found: pip install "
                 + ("nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12" if missing[0] == 12 else
                    "nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-crt"))
        runs = [(path, None if include == find_include() else include, True)
                for major, (path, include) in sorted(found.items(), reverse=True) if major in (args.cuda or found)]
        nvrtc_path = runs[0][0] if runs else None
    if nvrtc_path is None:
        fail("no NVRTC found (libnvrtc.so): pip install nvidia-cuda-nvrtc, or set CUDA_PATH or --nvrtc")
    if (args.include or find_include()) is None:
        fail("no CUDA headers found (cuda_bf16.h): pip install nvidia-cuda-runtime nvidia-cuda-crt, "
             "or set CUDA_PATH or --include")
    if args.include and not os.path.exists(os.path.join(args.include, "cuda_bf16.h")):
        fail(f"--include {args.include} has no cuda_bf16.h: expected a CUDA include directory")
    try:
        modules = import_kernel_modules()
    except ImportError as e:  # no CuPy, and the simulation needs g++ and ml_dtypes
        fail(f"cannot import llmc's GPU modules for their kernel sources ({e})")
    flash_attention = modules[1]
    names = list(kernel_sources(modules))
    if args.only and not any(args.only.lower() in name.lower() for name in names):
        fail(f"--only {args.only}: no kernel source's name contains it (they are {', '.join(names)})")
    compiled, failed, spills, versions = 0, 0, 0, []
    for nvrtc_path, include, lend_crt in runs:
        try:
            nvrtc = NVRTC(nvrtc_path)
        except (OSError, AttributeError) as e:  # not there, or not NVRTC
            fail(f"--nvrtc {nvrtc_path} is not a loadable NVRTC library ({e})")
        (whose, options), rows, errors = check(args.arch, args.dtype, args.only, nvrtc, include, lend_crt)
        print(f"NVRTC {nvrtc.version} ({nvrtc_path}), {whose} options: {' '.join(options)}")
        print(f"{'arch':6s} {'dtype':9s} {'kernel':42s} {'regs':>5s} {'spill st/ld':>12s} {'smem':>7s} "
              f"{'blocks/SM':>9s}")
        for arch, dtype, _, kernel, regs, spill_st, spill_ld, smem in rows:
            fit = None
            # (the flash kernels with 4 warps a block)
            if kernel in flash_attention.FLASH_KERNELS and kernel != "flash_attention_delta_kernel":
                fit = blocks_per_sm(arch, flash_attention.FLASH_WARPS * 32, regs, smem)
            print(f"sm_{arch:3s} {dtype:9s} {kernel:42s} {regs:5d} {f'{spill_st}/{spill_ld}':>12s} {smem:7d} "
                  f"{'-' if fit is None else fit:>9}")
            spills += spill_st > 0 or spill_ld > 0
        for error in errors:
            print(f"error: NVRTC {nvrtc.version}: {error}", file=sys.stderr)
        compiled, failed, versions = compiled + len(rows), failed + len(errors), versions + [nvrtc.version]
    print(f"{compiled} kernels compiled, {failed} errors, {spills} spilling registers")
    print(f"NVRTC versions checked: {', '.join(versions)}")
    sys.exit(1 if failed or (spills and not args.allow_spills) else 0)


if __name__ == "__main__":
    main()
