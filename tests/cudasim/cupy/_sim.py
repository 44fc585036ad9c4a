"""The simulation's arrays and kernels (see the package's docstring)."""

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import weakref

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# compiled kernels, kept between runs (CUDASIM_CACHE to put them elsewhere)
BUILD = os.environ.get("CUDASIM_CACHE") or os.path.join(tempfile.gettempdir(), f"cudasim-{os.getuid()}")
SANITIZE = os.environ.get("CUDASIM_ASAN") == "1"  # compile kernels with AddressSanitizer (run python with its runtime preloaded)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def strict():
    # CUDASIM_STRICT=1: simt.h's SIM_STRICT (fragments spread over the lanes, lanes in changing
    # orders, static shared memory NaN); read at each launch, so that a test may change it
    return os.environ.get("CUDASIM_STRICT") == "1"


def seed():
    # CUDASIM_SEED: which layouts and orders the strict mode draws
    return int(os.environ.get("CUDASIM_SEED", "0"))

# ----------------------------------------------------------------------------
# arrays: NumPy's, with CuPy's .data.ptr and .get(); every buffer is recorded, so that the GEMMs can
# check that each matrix they read lies inside one


_buffers = {}  # id -> weak reference of every base array handed out


def _record(a):
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    if base.nbytes and id(base) not in _buffers:
        _buffers[id(base)] = weakref.ref(base, lambda _, key=id(base): _buffers.pop(key, None))
    return a


ALIGNMENT = 256  # CuPy's memory pool hands out 256-byte aligned blocks (NumPy only promises 16)


_padded = weakref.WeakValueDictionary()  # the buffers aligned() made, by id: what they hold starts aligned


def allocation_aligned(a):
    # whether the memory a lives in, as CuPy's pool would have handed it out, starts 256-byte aligned
    # (a itself may be a view from any offset into it, as in CuPy)
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root.ctypes.data % ALIGNMENT == 0 or _padded.get(id(root)) is root


def aligned(a):
    # a itself, or a copy of it at a 256-byte aligned address when it owns memory that is not
    if a.nbytes == 0 or isinstance(a.base, np.ndarray) or a.ctypes.data % ALIGNMENT == 0:
        return a
    buffer = np.empty(a.nbytes + ALIGNMENT, dtype=np.uint8)
    _padded[id(buffer)] = buffer
    start = -buffer.ctypes.data % ALIGNMENT
    copy = buffer[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    copy[...] = a
    return copy


def wrap(a):
    return _record(aligned(np.asarray(a)).view(ndarray))


def check_range(ptr, nbytes, what):
    for ref in list(_buffers.values()):
        base = ref()
        if base is not None and base.ctypes.data <= ptr and ptr + nbytes <= base.ctypes.data + base.nbytes:
            return
    raise AssertionError(f"{what}: [{ptr:#x}, +{nbytes}) is outside every allocated buffer")


class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


def refusing_bfloat16(method):
    """NumPy's sorting `method`, refusing bfloat16 arrays as CuPy 14.2 does."""
    def sorting(a, *args, **kwargs):
        if a.dtype == BFLOAT16:
            raise NotImplementedError(f"cupy.{method.__name__} of bfloat16: Thrust has no bfloat16 (CuPy 14.2)")
        return method(a, *args, **kwargs)
    return sorting


class ndarray(np.ndarray):
    @property
    def data(self):
        return _Pointer(self.ctypes.data)

    def get(self):
        return np.array(self, copy=True).view(np.ndarray)

    def __array_finalize__(self, obj):
        _record(self)

    def __matmul__(self, other):
        # CuPy's product of two bfloat16 arrays is bfloat16 (cuBLAS: float32 sums, rounded once);
        # NumPy's, with ml_dtypes, would be float32. CuPy 14.2 multiplies bfloat16 matrices, not
        # batches of them: its 3-D matmul takes them for integers (_routines_linalg.pyx) and fails.
        if self.dtype == BFLOAT16 and getattr(other, "dtype", None) == BFLOAT16:
            if self.ndim > 2 or other.ndim > 2:
                raise TypeError("data type 'E' not understood (CuPy 14.2: batched matmul of bfloat16)")
            product = np.matmul(np.asarray(self, np.float64), np.asarray(other, np.float64))
            return wrap(product.astype(np.float32).astype(BFLOAT16))
        return np.ndarray.__matmul__(self, other)

    # CuPy 14.2 sorts through Thrust, which has no bfloat16 (cupy/cuda/thrust.pyx): so no sort or
    # partition (a full sort for GPT-2's vocabulary) of a bfloat16 array
    sort = refusing_bfloat16(np.ndarray.sort)
    argsort = refusing_bfloat16(np.ndarray.argsort)
    partition = refusing_bfloat16(np.ndarray.partition)
    argpartition = refusing_bfloat16(np.ndarray.argpartition)


# ----------------------------------------------------------------------------
# compiling: g++, one shared library per source, cached by its hash


def compile_library(source, tag):
    os.makedirs(BUILD, exist_ok=True)
    digest = hashlib.sha1((source + str(SANITIZE)).encode()).hexdigest()[:16]
    library = os.path.join(BUILD, f"{tag}_{digest}.so")
    if not os.path.exists(library):
        # (written under a name of its own, then renamed: processes may compile the same kernel at once)
        tmp = f"{library}.{os.getpid()}"
        with open(tmp + ".cpp", "w") as f:
            f.write(source)
        flags = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if SANITIZE else ["-O2"]
        subprocess.run(["g++", "-std=c++20", "-shared", "-fPIC", "-ffp-contract=off", *flags, "-o", tmp, tmp + ".cpp"],
                       check=True)
        os.replace(tmp, library)
        os.remove(tmp + ".cpp")
    return ctypes.CDLL(library)


# ----------------------------------------------------------------------------
# RawKernel: the kernel's source with simt.h before it, and a launcher per kernel

_SCALARS = {"int": (ctypes.c_int, np.int32), "float": (ctypes.c_float, np.float32),
            "long long": (ctypes.c_longlong, np.int64)}
_POINTEES = {"int": np.dtype(np.int32), "float": np.dtype(np.float32), "long long": np.dtype(np.int64)}


class RawKernel:
    def __init__(self, code, name, options=(), backend="nvrtc", **kwargs):
        assert f'extern "C" __global__ void {name}(' in code, name
        self.code, self.name = code, name
        self.libraries, self.parameters = {}, None  # compiled, by strict()
        # floatX, where the source defines it (cuda_layers.py's kernels): float or __nv_bfloat16
        self.floatX = BFLOAT16 if "typedef __nv_bfloat16 floatX;" in code else np.dtype(np.float32)

    def _compile(self, strict):
        signatures = re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', self.code)
        source = re.sub(r"extern __shared__ float (\w+)\[\];", r"float* \1 = sim_dynamic_shared;", self.code)
        source = source.replace("#include <cuda_bf16.h>", "")  # simt.h has its own __nv_bfloat16
        source = source.replace("#include <mma.h>", "")  # and its own nvcuda::wmma
        launchers = []
        for kernel, parameters in signatures:
            types = [" ".join(p.split()[:-1]) for p in parameters.replace("\n", " ").split(",")]
            if kernel == self.name:
                self.parameters = types
            arguments = ", ".join(f"*({t}*)args[{i}]" for i, t in enumerate(types))
            launchers.append(f'extern "C" void launch_{kernel}(unsigned gx, unsigned gy, unsigned bx, unsigned by, '
                             f'long long smem, void** args) {{ sim_run_grid(gx, gy, bx, by, smem, [&]() {{ '
                             f'{kernel}({arguments}); }}); }}')
        with open(os.path.join(HERE, "simt.h")) as f:
            prelude = ("#define SIM_STRICT 1\n" if strict else "") + f.read()
        self.libraries[strict] = compile_library(prelude + source + "\n" + "\n".join(launchers) + "\n", "raw")

    def compile(self, log_stream=None):
        if strict() not in self.libraries:
            self._compile(strict())

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        assert isinstance(grid, tuple) and isinstance(block, tuple) and isinstance(args, tuple)
        self.compile()
        library = self.libraries[strict()]
        assert len(self.parameters) == len(args), (self.name, self.parameters, args)
        holders = []
        for t, a in zip(self.parameters, args):
            if "*" in t:
                assert isinstance(a, ndarray), (self.name, t, type(a))
                assert a.flags.c_contiguous, (self.name, "a RawKernel ignores strides: pass contiguous arrays")
                pointee = t.replace("const ", "").replace("*", "").strip()
                expected = self.floatX if pointee == "floatX" else _POINTEES[pointee]
                assert a.dtype == expected, (self.name, t, a.dtype)
                holders.append(ctypes.c_void_p(a.ctypes.data))
            else:
                c_type, np_type = _SCALARS[t]
                assert type(a) is np_type, (self.name, t, type(a), "a kernel's scalar must have its C type exactly")
                holders.append(c_type(a.item()))
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        g = [max(1, x) for x in (grid + (1, 1))[:3]]
        b = [max(1, x) for x in (block + (1, 1))[:3]]
        assert g[2] == 1 and b[2] == 1, "3-D grids and blocks are not simulated"
        if strict():
            ctypes.c_ulonglong.in_dll(library, "sim_seed").value = seed()
        getattr(library, f"launch_{self.name}")(ctypes.c_uint(g[0]), ctypes.c_uint(g[1]), ctypes.c_uint(b[0]),
                                                     ctypes.c_uint(b[1]), ctypes.c_longlong(shared_mem), argv)


# ----------------------------------------------------------------------------
# ElementwiseKernel: "float32 x, float32 y" in, "float32 z" out, an operation per element

_ELEMENT_TYPES = {"float32": ("float", np.float32)}  # (AdamW's: all it needs)


def _parameters(spec):
    # [(type, name)] of "float32 x, float32 y, ..."
    return [tuple(p.split()) for p in spec.split(",")]


class ElementwiseKernel:
    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                 no_return=False, return_tuple=False, **kwargs):
        assert set(kwargs) <= {"options", "loop_prep", "after_loop"}, kwargs
        self.ins, self.outs = _parameters(in_params), _parameters(out_params)
        self.operation, self.name, self.preamble = operation, name, preamble
        names = [n for _, n in self.ins + self.outs]
        assert "i" not in names and len(set(names)) == len(names)
        self.libraries = {}  # compiled, by which arguments are arrays (the others are scalars)

    def _source(self, is_array):
        before, per_element = [], []
        for k, ((t, n), array) in enumerate(zip(self.ins + self.outs, is_array)):
            c = _ELEMENT_TYPES[t][0]
            const = "const " if k < len(self.ins) else ""
            if array:
                before.append(f"{c}* ARRAY_{k} = ({c}*)(*(void**)&args[{k}]);")
                per_element.append(f"{const}{c}& {n} = ARRAY_{k}[i];")
            else:
                before.append(f"const {c} {n} = *({c}*)(*(void**)&args[{k}]);")
        return ("#include <math.h>\n#include <stddef.h>\n" + self.preamble + "\n"
                f'extern "C" void {self.name}(long long n, void** args) {{\n' + "\n".join(before) +
                "\nfor (ptrdiff_t i = 0; i < n; i++) {\n" + "\n".join(per_element) + "\n" + self.operation + "\n}\n}\n")

    def __call__(self, *args):
        # (the outputs are always given, as AdamW gives them)
        nin = len(self.ins)
        assert len(args) == nin + len(self.outs), (self.name, len(args))
        shapes = {a.shape for a in args if isinstance(a, ndarray)}
        assert len(shapes) == 1, (self.name, shapes)  # (CuPy would broadcast; nothing here needs it)
        shape = shapes.pop()
        buffers = []
        for k, ((t, n), a) in enumerate(zip(self.ins + self.outs, args)):
            expected = _ELEMENT_TYPES[t][1]
            if isinstance(a, ndarray):
                assert a.dtype == expected, (self.name, n, a.dtype)
                if k >= nin:
                    assert a.flags.c_contiguous, (self.name, n)
                    buffers.append(a)
                else:
                    buffers.append(np.ascontiguousarray(a))  # CuPy follows strides: a contiguous copy, the same values
            else:
                assert type(a) is expected, (self.name, n, type(a))
                buffers.append(np.array(a, dtype=expected))
        argv = (ctypes.c_void_p * len(buffers))(*[b.ctypes.data for b in buffers])
        is_array = tuple(isinstance(a, ndarray) for a in args)
        if is_array not in self.libraries:
            self.libraries[is_array] = compile_library(self._source(is_array), "ew")
        getattr(self.libraries[is_array], self.name)(ctypes.c_longlong(int(np.prod(shape))), argv)
        outs = args[nin:]
        return outs[0] if len(outs) == 1 else tuple(outs)
