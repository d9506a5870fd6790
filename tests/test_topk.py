"""Tests of fastgpt::topk (kernels/topk.py, csrc/ops.cpp, csrc/topk.cu) against fastgpt.reference.topk.

Every result is compared exactly: indices equal the reference's (ties by lower index, NaN above
+inf, -0.0 == +0.0) and values are bit-identical to ``x`` at those indices.

* CPU op (always): the extension must build here and the tests assert "cpu-ext" ran.
* CUDA kernels without a GPU (always, needs g++): tests/topk_emu/driver.cpp compiles topk.cu's
  kernels and host launch sequence against a CPU emulation of the CUDA execution model (fibers,
  random schedules between barriers, strict warp checks, poisoned shared memory and workspace),
  under AddressSanitizer + UBSan; each case runs with two scheduling policies.
* nvcc compile-only check of topk.cu for sm_80 + sm_90 against the installed torch headers.
* CUDA (marked ``cuda``): the same comparisons on the GPU, big batches, strided inputs, CUDA graph
  capture and replay, opcheck and torch.compile.
"""

from __future__ import annotations

import inspect
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from fastgpt.reference import topk as reference_topk
from fastgpt.kernels import topk as topk_mod
from fastgpt.kernels.utils import launch_record

REPO = Path(__file__).resolve().parent.parent
EMU_DIR = REPO / "tests" / "topk_emu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
KINDS = ("randn", "dups", "special")
HAS_CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Inputs and comparison
# --------------------------------------------------------------------------------------------
def make_rows(rows: int, n: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """A (rows, n) CPU tensor. kinds: randn; dups (few distinct values: ties at every rank);
    special (NaN of both signs and several payloads, +-inf, +-0, denormals); equal (one value)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(rows, n, generator=g) * 3
    elif kind == "dups":
        x = torch.randint(-4, 4, (rows, n), generator=g).float() * 0.5
    elif kind == "equal":
        x = torch.full((rows, n), 1.25)
    elif kind == "special":
        x = torch.randn(rows, n, generator=g)
        u = torch.rand(rows, n, generator=g)
        tiny = torch.finfo(dtype).tiny
        x[u < 0.03] = float("nan")
        x[(u >= 0.03) & (u < 0.06)] = float("inf")
        x[(u >= 0.06) & (u < 0.09)] = float("-inf")
        x[(u >= 0.09) & (u < 0.12)] = 0.0
        x[(u >= 0.12) & (u < 0.15)] = -0.0
        x[(u >= 0.15) & (u < 0.17)] = tiny / 4  # denormal in every dtype
        x[(u >= 0.17) & (u < 0.19)] = -tiny / 4
    else:
        raise ValueError(kind)
    x = x.to(dtype)
    if kind == "special":
        # Negative NaNs and other payloads must rank like any NaN (above +inf).
        bits = x.view(BITS[dtype])
        nan = torch.isnan(x)
        flip = nan & (torch.rand(rows, n, generator=g) < 0.5)
        bits[flip] = -1  # all ones: a negative NaN with a full payload
        if dtype == torch.float32:
            bits[nan & ~flip & (torch.rand(rows, n, generator=g) < 0.5)] = 0x7F800001  # signalling
    return x


def assert_topk_equal(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor, ref=None) -> None:
    """values/indices (any device) equal the reference top-k of x, bit for bit."""
    x = x.cpu()
    if ref is None:
        ref = reference_topk(x, k)
    ref_values, ref_indices = ref[0][:, :k], ref[1][:, :k]
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert tuple(values.shape) == (x.shape[0], k) and tuple(indices.shape) == (x.shape[0], k)
    values, indices = values.cpu(), indices.cpu()
    if not torch.equal(indices, ref_indices):
        bad = (indices != ref_indices).nonzero()[:5].tolist()
        raise AssertionError(f"indices differ from the reference at (row, rank) {bad} (k={k}, shape={tuple(x.shape)})")
    expect = x.gather(1, ref_indices)
    assert torch.equal(values.view(BITS[x.dtype]), expect.view(BITS[x.dtype])), "values are not x[indices] bit for bit"


def k_values(n: int) -> list[int]:
    """k in {1, 5, 50, 256, 257, 1000, n}, capped at the row length, without repeats."""
    return sorted({min(k, n) for k in (1, 5, 50, 256, 257, 1000, n)})


@pytest.fixture(scope="module")
def ext():
    assert topk_mod.load_extension(), "the fastgpt_ops extension must build on this machine (g++ and ninja)"
    return topk_mod


# --------------------------------------------------------------------------------------------
# CPU op
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [7, 1000, 50257, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_matches_reference(ext, n, dtype):
    assert ext.topk_backend("cpu") == "cpu-ext"
    for rows in (1, 3):
        for kind in KINDS:
            x = make_rows(rows, n, dtype, kind, seed=n + rows)
            ref = reference_topk(x, n)
            for k in k_values(n):
                values, indices = ext.topk(x, k)
                assert launch_record()["topk"]["impl"] == "cpu-op"
                assert_topk_equal(x, k, values, indices, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_llama_vocab_widths(ext, dtype):
    """Qwen2's vocabulary, 151,936 (LLaMA 3's 128,256 is in test_cpu_matches_reference), at the
    sampler's k range (<= 256 and just past it), ties and special values included."""
    n = 151936
    for kind in ("dups", "special"):
        x = make_rows(2, n, dtype, kind, seed=n % 1000)
        ref = reference_topk(x, 300)
        for k in (1, 50, 256, 257):
            assert_topk_equal(x, k, *ext.topk(x, k), ref)


def test_cpu_equal_rows_and_full_k(ext):
    for dtype in DTYPES:
        x = make_rows(2, 5000, dtype, "equal", seed=0)
        for k in (1, 256, 4999, 5000):
            assert_topk_equal(x, k, *torch.ops.fastgpt.topk(x, k))


def test_cpu_strided_inputs(ext):
    base = make_rows(300, 40, torch.float32, "dups", seed=3)
    for x in (base.t(), base[:, ::3], base[::2, 5:35], base.t()[:, 100:250]):
        assert not x.is_contiguous()
        for k in (1, 7, x.shape[1]):
            assert_topk_equal(x, k, *ext.topk(x, k))
    expanded = torch.randn(1, 50).expand(4, 50)  # row stride 0
    assert_topk_equal(expanded, 10, *ext.topk(expanded, 10))


def test_cpu_empty_batch(ext):
    values, indices = ext.topk(torch.randn(0, 100), 5)
    assert values.shape == (0, 5) and indices.shape == (0, 5) and indices.dtype == torch.int64


def test_out_argument(ext):
    x = make_rows(3, 1000, torch.float16, "randn", seed=1)
    out = (torch.full((3, 50), float("nan"), dtype=torch.float16), torch.full((3, 50), -1, dtype=torch.int64))
    values, indices = ext.topk(x, 50, out=out)
    assert values is out[0] and indices is out[1]
    assert_topk_equal(x, 50, values, indices)
    with pytest.raises(ValueError, match="out\\[0\\]"):
        ext.topk(x, 50, out=(torch.empty(3, 49, dtype=torch.float16), out[1]))
    with pytest.raises(TypeError, match="out\\[1\\]"):
        ext.topk(x, 50, out=(out[0], torch.empty(3, 50, dtype=torch.int32)))
    with pytest.raises(TypeError, match="out must be"):
        ext.topk(x, 50, out=out[0])


def test_cpu_opcheck(ext):
    x = make_rows(3, 1000, torch.bfloat16, "dups", seed=2)
    torch.library.opcheck(torch.ops.fastgpt.topk.default, (x, 50))


def test_cpu_torch_compile_fullgraph(ext):
    # aot_eager: traces through the fake impl with fullgraph=True without inductor's C++ codegen.
    x = make_rows(2, 3000, torch.float32, "randn", seed=4)

    def f(t):
        values, indices = ext.topk(t, 20)
        return values * 2, indices

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    values, indices = compiled(x)
    assert_topk_equal(x, 20, values / 2, indices)


@pytest.mark.parametrize(
    "x, k, exc, match",
    [
        ("not a tensor", 1, TypeError, "x must be a torch.Tensor"),
        (torch.randn(10), 1, ValueError, "x must have 2 dimensions"),
        (torch.randn(2, 3, 4), 1, ValueError, "x must have 2 dimensions"),
        (torch.randn(2, 10, dtype=torch.float64), 1, TypeError, "x must have dtype"),
        (torch.ones(2, 10, dtype=torch.int32), 1, TypeError, "x must have dtype"),
        (torch.randn(2, 10), 0, ValueError, r"k must be in \[1, 10\]"),
        (torch.randn(2, 10), 11, ValueError, r"k must be in \[1, 10\]"),
        (torch.randn(2, 10), -3, ValueError, r"k must be in \[1, 10\]"),
        (torch.randn(2, 10), 2.0, TypeError, "k must be a Python int"),
        (torch.randn(2, 10), True, TypeError, "k must be a Python int"),
        (torch.randn(2, 10), torch.tensor(3), TypeError, "k must be a Python int"),
        (torch.randn(2, 10, device="meta"), 3, ValueError, "cpu or cuda"),
        (torch.randn(2, 0), 1, ValueError, r"k must be in \[1, 0\]"),
    ],
)
def test_bad_arguments_raise_before_the_op(ext, x, k, exc, match):
    with pytest.raises(exc, match=match):
        ext.topk(x, k)


def test_op_checks(ext):
    with pytest.raises(RuntimeError, match="k must be in \\[1, 10\\]"):
        torch.ops.fastgpt.topk(torch.randn(2, 10), 11)
    with pytest.raises(RuntimeError, match="k must be in \\[1, 10\\]"):
        torch.ops.fastgpt.topk(torch.randn(2, 10), 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fastgpt.topk(torch.ones(2, 10, dtype=torch.int64), 1)
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.fastgpt.topk(torch.randn(2, 3, 4), 1)


def test_fallback_warns_once(ext, monkeypatch):
    from torch.utils import cpp_extension

    def no_toolchain(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions (simulated)")

    monkeypatch.setattr(cpp_extension, "load", no_toolchain)
    monkeypatch.setattr(topk_mod, "_warned", False)
    topk_mod.load_extension.cache_clear()
    try:
        x = make_rows(2, 500, torch.float32, "special", seed=5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert topk_mod.topk_backend("cpu") == "torch-fallback"
            assert not topk_mod.extension_available("cpu")
            for k in (1, 17, 500):
                values, indices = topk_mod.topk(x, k)
                assert launch_record()["topk"]["impl"] == "torch"
                assert_topk_equal(x, k, values, indices)
                assert values.is_contiguous() and indices.is_contiguous()
            topk_mod.load_extension()
        ours = [w for w in caught if "fastgpt_ops" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "simulated" in str(ours[0].message)
    finally:
        topk_mod.load_extension.cache_clear()  # the next call loads the real build again
    monkeypatch.undo()
    assert topk_mod.topk_backend("cpu") == "cpu-ext"


# --------------------------------------------------------------------------------------------
# Background builds: the emulation driver and the nvcc check compile while the CPU tests run
# (about half of this file's CPU time on a 2-core machine).
# --------------------------------------------------------------------------------------------
class BackgroundJob:
    """A compile command started in the background; wait() returns (returncode, stderr)."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        self._file = open(log, "w")  # noqa: SIM115 -- closed in wait()/kill()
        self.proc = subprocess.Popen(cmd, stdout=self._file, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._file.close()
        return code, self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._file.close()


def _emulator_cmd(exe: Path, sanitize: bool) -> list[str]:
    flags = ["-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"] if sanitize else ["-O1"]
    return ["g++", "-std=c++17", "-g", "-w", *flags, f"-I{REPO / 'csrc'}", str(EMU_DIR / "driver.cpp"), "-o", str(exe)]


def _nvcc_cmd(obj: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{REPO / 'csrc'}"]
    std = "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"
    defines = [
        "-DTORCH_EXTENSION_NAME=fastgpt_ops",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    # The CPU wheel ships c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h
    # (it only sets export macros for Windows builds); skip that include when it is missing.
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in cpp_extension.include_paths()):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return (
        ["nvcc", "-c", str(REPO / "csrc" / "topk.cu"), "-o", str(obj), f"-std={std}", "-Xcompiler", "-fPIC"]
        + cpp_extension.COMMON_NVCC_FLAGS
        + topk_mod.nvcc_flags()
        + includes
        + defines
    )


NVCC_CHECK_ENABLED = shutil.which("nvcc") is not None and not HAS_CUDA
# On a GPU machine the real kernels run (and the lent GPU time is short): no emulation there.
EMULATOR_ENABLED = shutil.which("g++") is not None and not HAS_CUDA


@pytest.fixture(scope="module")
def background_builds(request, tmp_path_factory):
    """Start the builds that the selected tests need; yields {name: (job, output path)}."""
    selected = {item.name.split("[")[0] for item in request.session.items}
    out = tmp_path_factory.mktemp("topk_builds")
    jobs = {}
    if EMULATOR_ENABLED and "test_emulated_cuda_kernels" in selected:
        exe = out / "topk_emu_driver"
        jobs["emulator"] = (BackgroundJob(_emulator_cmd(exe, sanitize=True), out / "emu.log"), exe)
    if NVCC_CHECK_ENABLED and "test_nvcc_compiles_topk_cu" in selected:
        obj = out / "topk.o"
        jobs["nvcc"] = (BackgroundJob(_nvcc_cmd(obj), out / "nvcc.log"), obj)
    yield jobs
    for job, _ in jobs.values():
        job.kill()


@pytest.fixture(autouse=True)
def _start_background_builds(background_builds):
    """Every test of this file requests the builds, so they start with the first test."""


# --------------------------------------------------------------------------------------------
# CUDA kernels under the CPU emulation (no GPU needed)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulator(background_builds):
    if not EMULATOR_ENABLED:
        pytest.skip("the CUDA emulation needs g++ and runs only where there is no GPU (the kernels run there)")
    job, exe = background_builds["emulator"]
    code, log = job.wait()
    if code != 0:
        # No sanitizer runtime on this machine? Still test the logic, without ASan/UBSan.
        proc = subprocess.run(_emulator_cmd(exe, sanitize=False), capture_output=True, text=True)
        assert proc.returncode == 0, f"emulation driver does not compile:\n{proc.stderr[-4000:]}"
        warnings.warn(f"emulation driver built without sanitizers: {log[-500:]}")
    return exe


def run_emulated(exe: Path, x: torch.Tensor, k: int, seed: int, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n = x.shape
    rs, cs = x.stride()
    extent = (rows - 1) * rs + (n - 1) * cs + 1
    storage = x.as_strided((extent,), (1,), x.storage_offset())  # x's raw storage, in order
    (tmp / "in.bin").write_bytes(storage.contiguous().view(BITS[x.dtype]).numpy().tobytes())
    fmt = DTYPES.index(x.dtype)
    args = (fmt, rows, n, rs, cs, k, seed, tmp / "in.bin", tmp / "out.bin")
    cmd = [str(exe), *map(str, args)]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1", UBSAN_OPTIONS="halt_on_error=1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"emulated kernel failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    data = (tmp / "out.bin").read_bytes()
    nv = rows * k * x.element_size()
    values = torch.frombuffer(bytearray(data[:nv]), dtype=BITS[x.dtype]).view(x.dtype).reshape(rows, k)
    indices = torch.frombuffer(bytearray(data[nv:]), dtype=torch.int64).reshape(rows, k)
    return values, indices


def _emu_cases():
    """(id, x, ks, both_policies): every path of topk.cu, kept small (each run is a fresh process
    switching between fibers ~1 M times a second under ASan)."""
    f32, f16, bf16 = DTYPES
    cases = [
        # final kernel straight from x (n <= 4096): take-all (k = n) and radix paths
        ("n7-randn-f32", make_rows(3, 7, f32, "randn", 1), (1, 7), False),
        ("n7-special-bf16", make_rows(3, 7, bf16, "special", 2), (3,), False),
        ("n4096-dups-f16", make_rows(2, 4096, f16, "dups", 3), (256,), True),
        # one chunk round (last chunk partial / a single element), then the final kernel
        ("n4097-randn-f32", make_rows(1, 4097, f32, "randn", 4), (1,), False),
        ("n9000-special-f32", make_rows(2, 9000, f32, "special", 5), (5, 256), True),
        ("n9000-dups-bf16", make_rows(1, 9000, bf16, "dups", 6), (50,), False),
        ("n5000-equal-f16", make_rows(1, 5000, f16, "equal", 7), (256,), False),
        ("gpt2-row-f32", make_rows(1, 50257, f32, "randn", 8), (50,), False),
        # LLaMA 3's row (32 chunks, one round at k = 50); Qwen2's (38 chunks: two rounds at k = 256)
        ("llama3-row-bf16", make_rows(1, 128256, bf16, "dups", 15), (50,), False),
        ("qwen2-row-f16", make_rows(1, 151936, f16, "special", 16), (256,), False),
        # two chunk rounds; with k=200 the second round has a chunk holding only empty slots
        ("n70000-k256-f32", make_rows(1, 70000, f32, "dups", 9), (256,), False),
        ("n81970-k200-f16", make_rows(1, 81970, f16, "special", 10), (200,), True),
        # large k: composite + sort + gather
        ("large-k-special-f32", make_rows(2, 3000, f32, "special", 11), (257, 3000), False),
        ("large-k-dups-bf16", make_rows(2, 1000, bf16, "dups", 12), (700,), False),
        # strides: column stride 3 (a transposed view), row stride 6000
        ("strided-cols", make_rows(5000, 3, f32, "dups", 13).t(), (50, 600), False),
        ("strided-rows", make_rows(2, 6000, f16, "randn", 14)[:, 100:5100], (64,), False),
    ]
    return cases


@pytest.mark.parametrize("case", _emu_cases(), ids=lambda c: c[0])
def test_emulated_cuda_kernels(emulator, tmp_path, case):
    name, x, ks, both_policies = case
    ref = reference_topk(x, x.shape[1])
    base = zlib.crc32(name.encode()) % 100_000
    for i, k in enumerate(ks):
        # Even seeds: the "sweep" schedule; odd seeds: "warp ahead" (see tests/topk_emu/cuda_emu.h).
        seeds = (2 * (base + i), 2 * (base + i) + 1) if both_policies else (base + i,)
        for seed in seeds:
            values, indices = run_emulated(emulator, x, k, seed=seed, tmp=tmp_path)
            assert_topk_equal(x, k, values, indices, ref)


# --------------------------------------------------------------------------------------------
# nvcc compile-only check (no GPU needed)
# --------------------------------------------------------------------------------------------
def _cuda_elf_arches(obj: bytes) -> set[int]:
    """SM versions of the CUDA ELF images (e_machine 190) embedded in an object file."""
    arches, pos = set(), 0
    while (pos := obj.find(b"\x7fELF", pos + 1)) > 0:
        if len(obj) < pos + 52 or obj[pos + 4] != 2:  # 64-bit ELF header only
            continue
        if struct.unpack_from("<H", obj, pos + 18)[0] != 190:
            continue
        flags = struct.unpack_from("<I", obj, pos + 48)[0]
        arches.add((flags >> 8) & 0xFF if obj[pos + 8] >= 7 else flags & 0xFF)  # ABI v7+: sm in bits 8-15
    return arches


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the real extension build compiles topk.cu")
def test_nvcc_compiles_topk_cu(background_builds):
    """nvcc -c topk.cu for sm_80 + sm_90 with torch's extension flags (started in the background)."""
    job, obj = background_builds["nvcc"]
    code, log = job.wait()
    assert code == 0, f"nvcc failed:\n{' '.join(job.cmd)}\n{log[-6000:]}"
    assert {80, 90} <= _cuda_elf_arches(obj.read_bytes())


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
def _poison_allocator(rows: int, k: int, dtype: torch.dtype) -> None:
    """Free NaN / -1 filled blocks of the outputs' sizes, so that the op's at::empty outputs
    most likely reuse them: an element the kernel forgets to write then fails the comparison."""
    v = torch.full((rows, k), float("nan"), dtype=dtype, device="cuda")
    i = torch.full((rows, k), -1, dtype=torch.int64, device="cuda")
    del v, i


def _cuda_check(x_cpu: torch.Tensor, k: int, ref=None, x_cuda: torch.Tensor | None = None) -> None:
    x = x_cpu.cuda() if x_cuda is None else x_cuda
    _poison_allocator(x.shape[0], k, x.dtype)
    values, indices = torch.ops.fastgpt.topk(x, k)
    torch.cuda.synchronize()
    assert values.device == x.device and indices.device == x.device
    assert_topk_equal(x_cpu, k, values, indices, ref)


@pytest.mark.cuda
def test_cuda_backend_is_the_extension(ext):
    assert ext.topk_backend("cuda") == "cuda-ext"
    assert ext.extension_available("cuda")
    x = torch.randn(2, 1000, device="cuda")
    values, indices = ext.topk(x, 10)
    assert launch_record()["topk"]["impl"] == "cuda"
    assert values.is_cuda and indices.is_cuda


@pytest.mark.cuda
@pytest.mark.parametrize("n", [7, 1000, 4095, 4096, 4097, 50257, 128256, 151936, 262144])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(ext, n, dtype):
    for rows in (1, 3):
        for kind in KINDS:
            x = make_rows(rows, n, dtype, kind, seed=n * 7 + rows)
            ref = reference_topk(x, n)
            xc = x.cuda()
            for k in k_values(n):
                _cuda_check(x, k, ref, xc)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "rows, dtype",
    [(64, torch.float32), (64, torch.float16), (64, torch.bfloat16), (256, torch.float32), (256, torch.float16)],
    ids=str,
)
def test_cuda_big_batches(ext, rows, dtype):
    for kind in ("randn", "dups"):
        x = make_rows(rows, 50257, dtype, kind, seed=rows)
        ref = reference_topk(x, 1000)
        xc = x.cuda()
        for k in (1, 50, 256, 1000):
            _cuda_check(x, k, ref, xc)


@pytest.mark.cuda
def test_cuda_equal_rows_and_full_k(ext):
    for dtype in DTYPES:
        for n in (5000, 50257, 70000):
            x = make_rows(2, n, dtype, "equal", seed=0)
            ref = reference_topk(x, n)
            for k in (1, 50, 256, 257, n):
                _cuda_check(x, k, ref)


@pytest.mark.cuda
def test_cuda_row_lengths_around_the_block_sizes(ext):
    # Lengths around the 512-thread x 8 chunk and the 1024 x 4 final block, and the rounds' edges.
    for n in (31, 33, 511, 513, 1023, 1025, 8191, 8193, 65536 + 10, 81970, 16 * 4096 + 1):
        x = make_rows(2, n, torch.float32, "dups", seed=n)
        ref = reference_topk(x, n)
        for k in sorted({1, min(n, 200), min(n, 256), n}):
            _cuda_check(x, k, ref)


@pytest.mark.cuda
def test_cuda_strided_inputs(ext):
    base = make_rows(8, 60000, torch.float16, "randn", seed=1)
    base_cuda = base.cuda()
    views = [
        (base[:, 1000:51257], base_cuda[:, 1000:51257]),  # row stride 60000
        (base[::3], base_cuda[::3]),  # row stride 180000
        (base[:, ::7], base_cuda[:, ::7]),  # column stride 7
        (base[:, :5000].t(), base_cuda[:, :5000].t()),  # (5000, 8), column stride 60000
    ]
    for x_cpu, x_cuda in views:
        ref = reference_topk(x_cpu, x_cpu.shape[1])
        for k in sorted({1, min(50, x_cpu.shape[1]), min(300, x_cpu.shape[1])}):
            _cuda_check(x_cpu, k, ref, x_cuda)


@pytest.mark.cuda
def test_cuda_empty_batch_and_side_stream(ext):
    values, indices = torch.ops.fastgpt.topk(torch.randn(0, 100, device="cuda"), 5)
    assert values.shape == (0, 5) and indices.shape == (0, 5)
    x = make_rows(4, 50257, torch.float32, "randn", seed=2)
    xc = x.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        values, indices = ext.topk(xc, 50)
    stream.synchronize()
    assert_topk_equal(x, 50, values, indices)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [50, 1000])
def test_cuda_graph_capture_and_replay(ext, k):
    n = 50257
    static_x = make_rows(8, n, torch.float32, "randn", seed=3).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as PyTorch recommends
        for _ in range(2):
            ext.topk(static_x, k)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, indices = ext.topk(static_x, k)
    for seed in (10, 11):
        x = make_rows(8, n, torch.float32, "dups" if seed % 2 else "randn", seed=seed)
        static_x.copy_(x.cuda())
        values.fill_(float("nan"))
        indices.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert_topk_equal(x, k, values, indices)


@pytest.mark.cuda
def test_cuda_opcheck(ext):
    for dtype in DTYPES:
        x = make_rows(3, 5000, dtype, "dups", seed=4).cuda()
        torch.library.opcheck(torch.ops.fastgpt.topk.default, (x, 50))
    torch.library.opcheck(torch.ops.fastgpt.topk.default, (make_rows(2, 3000, torch.float32, "randn", 5).cuda(), 500))


@pytest.mark.cuda
def test_cuda_torch_compile_fullgraph(ext):
    x = make_rows(4, 50257, torch.float16, "randn", seed=6)

    def f(t):
        values, indices = ext.topk(t, 50)
        return values.float() * 2, indices

    compiled = torch.compile(f, fullgraph=True)
    values, indices = compiled(x.cuda())
    torch.cuda.synchronize()
    assert_topk_equal(x, 50, (values / 2).half(), indices)


@pytest.mark.cuda
def test_cuda_op_checks(ext):
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.fastgpt.topk(torch.randn(2, 10, device="cuda"), 11)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.fastgpt.topk(torch.randn(2, 10, device="cuda").double(), 1)
    with pytest.raises(ValueError, match="k must be in"):
        ext.topk(torch.randn(2, 10, device="cuda"), 0)
    torch.cuda.synchronize()  # no asynchronous error was left behind


# --------------------------------------------------------------------------------------------
# Build folder, --rebuild, installed sources (contract C3)
# --------------------------------------------------------------------------------------------
def test_build_folder_is_under_fastgpt_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path))
    version = torch.__version__.replace("+", "_")
    assert topk_mod.build_dir(False) == tmp_path / "torch_extensions" / f"fastgpt_ops-{version}-cpu"
    assert topk_mod.build_dir(True) == tmp_path / "torch_extensions" / f"fastgpt_ops-{version}-cuda"
    monkeypatch.delenv("FASTGPT_CACHE_DIR")
    assert topk_mod.build_dir(False).parent == Path.home() / ".cache" / "fastgpt" / "torch_extensions"


def test_rebuild_deletes_the_build_folder_then_builds(ext, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path))
    stale = topk_mod.build_dir(False) / "stale.o"
    stale.parent.mkdir(parents=True)
    stale.write_text("left over")
    builds = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: builds.append(kw["build_directory"]))
    try:
        assert topk_mod.main(["--rebuild"]) == 0  # the op stays registered from the real build
        assert not stale.exists()
        assert builds and builds[-1] == str(topk_mod.build_dir(topk_mod._cuda_toolkit_found()))
    finally:
        topk_mod.load_extension.cache_clear()


def test_missing_sources_fall_back_with_one_clear_warning(ext, monkeypatch, tmp_path):
    monkeypatch.setattr(topk_mod, "CSRC", tmp_path)  # an install without the csrc package data
    monkeypatch.setattr(topk_mod, "_warned", False)
    monkeypatch.setattr(topk_mod, "_kernel_devices", frozenset())
    topk_mod.load_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="sources .* are not in .*package data"):
            assert not topk_mod.load_extension()
        x = make_rows(2, 100, torch.float32, "special", seed=2)
        assert_topk_equal(x, 7, *topk_mod.topk(x, 7))
        assert launch_record()["topk"]["impl"] == "torch"
    finally:
        topk_mod.load_extension.cache_clear()
    monkeypatch.undo()
    assert topk_mod.topk_backend("cpu") == "cpu-ext"


def test_installed_wheel_ships_the_sources(tmp_path):
    """A non-editable install finds csrc/ as package data at the path topk.py looks in."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("fastgpt", "kernels", "csrc"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
                    str(src)], check=True, capture_output=True, timeout=300)
    site = tmp_path / "site"
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as whl:
        whl.extractall(site)
    code = ("import fastgpt.kernels.topk as t; "
            "print(t.CSRC); assert all((t.CSRC / n).is_file() for n in t._SOURCES), t.CSRC")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(site / "fastgpt" / "csrc")
