"""The CUDA extension (csrc/, tubevit_fast._C): every link of the verification chain that can run
without a GPU, and the GPU tests for where one is present.

    tile math   csrc/attention_tile.h compiled with g++ and run on the CPU (ctypes) against float64
    emulator    the real kernel bodies (csrc/attention_kernels.cuh) compiled as host C++ and run by
                csrc/testing/emu_harness.cpp (a block = 128 fibers; mma/ldmatrix/cp.async emulated
                from the PTX ISA's fragment layouts), forward and backward, against float64
    build       the nvcc build's ptxas report: 0 spills for every kernel on sm_80 and sm_90a
    SASS        cuobjdump of the built .so: HMMA in every matmul kernel on both archs
    ops         schemas, fake kernels under opcheck on meta tensors, both import orders,
                clean errors for CPU tensors, fp32, bad head dims, mismatched shapes
    gpu         the kernels against PyTorch (SDPA / float64) on a real GPU (skipped without one)

Where CI=true, a missing extension build, nvcc, g++ or cuobjdump fails these tests instead of
skipping them: CI builds the extension (see setup.py) and must verify it.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import assert_close_to_golden, dtype_atol
from tubevit_fast import extension
from tubevit_fast.reference.attention import attention_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
KERNELS = ("attention_fwd_kernel", "attention_fwd_sm90_kernel", "attention_bwd_preprocess_kernel",
           "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dkdv_dqatomic_kernel",
           "attention_bwd_dq_convert_kernel")
MATMUL_KERNELS = ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel",
                  "attention_bwd_dkdv_dqatomic_kernel")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def require(ok: bool, reason: str) -> None:
    """Skip on a developer machine, fail in CI (where the CUDA build is part of the job)."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def require_extension() -> None:
    require(extension.is_available(), extension.unavailable_reason() or "")


def ops():
    require_extension()
    return torch.ops.tubevit_fast_C


# ---- host tools and cached host builds ---------------------------------------------------------

def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _cuda_include_dir() -> str | None:
    """A directory with cuda_fp16.h / cuda_bf16.h (host-usable headers) for the emulator."""
    candidates = [os.path.join(h, "include") for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.exists(os.path.join(c, "cuda_bf16.h"))), None)


def _host_build(source: str, flags: list[str], shared: bool, csrc: str = CSRC) -> str:
    """Compile <csrc>/testing/<source> with the host compiler, cached by content of csrc/."""
    cxx = _cxx()
    require(cxx is not None, "no host C++ compiler (g++) found")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(csrc)) + [os.path.join("testing", source)]:
        path = os.path.join(csrc, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(name.encode() + f.read())
    digest.update(" ".join(flags).encode())
    cache = os.path.join(tempfile.gettempdir(), "tubevit_fast_host_builds")
    os.makedirs(cache, exist_ok=True)
    stem = f"{os.path.splitext(source)[0]}-{digest.hexdigest()[:16]}"
    out = os.path.join(cache, stem + (".so" if shared else ""))
    if not os.path.exists(out):
        tmp = out + f".tmp{os.getpid()}"
        cmd = [cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", *flags,
               os.path.join(csrc, "testing", source), "-o", tmp]
        if shared:
            cmd[1:1] = ["-shared", "-fPIC"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"host build of {source} failed:\n{proc.stderr}"
        os.replace(tmp, out)
    return out


# ---- (f) tile math on the CPU --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tile_lib():
    lib = ctypes.CDLL(_host_build("tile_harness.cpp", [], shared=True))
    f32p, i32p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int)
    lib.tvf_tile_fragment_map.argtypes = [ctypes.c_int, i32p, i32p]
    lib.tvf_tile_forward.argtypes = [f32p, f32p, ctypes.c_int, ctypes.c_float, f32p, f32p]
    for name in ("tvf_tile_backward_rows", "tvf_tile_backward_cols"):
        getattr(lib, name).argtypes = [f32p, f32p, f32p, f32p, ctypes.c_float, ctypes.c_int, f32p, f32p]
    return lib


def _ptr(a: np.ndarray, ctype=ctypes.c_float):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


def test_tile_fragment_map_covers_each_element_once(tile_lib):
    for ntile in (0, 3):
        rows, cols = np.zeros(128, np.int32), np.zeros(128, np.int32)
        tile_lib.tvf_tile_fragment_map(ntile, _ptr(rows, ctypes.c_int), _ptr(cols, ctypes.c_int))
        cells = set(zip(rows.tolist(), cols.tolist()))
        assert len(cells) == 128
        assert cells == {(r, c) for r in range(16) for c in range(8 * ntile, 8 * ntile + 8)}
        # the PTX ISA's m16n8 accumulator layout: lane l holds rows l/4 and l/4 + 8, columns 2(l%4), +1
        lane = np.arange(32)
        assert (rows[0::4] == lane // 4).all() and (rows[2::4] == lane // 4 + 8).all()
        assert (cols[0::4] == 8 * ntile + 2 * (lane % 4)).all() and (cols[1::4] == cols[0::4] + 1).all()


@pytest.mark.parametrize("n_keys", [0, 1, 5, 63, 64, 100, 130, 200])
@pytest.mark.parametrize("magnitude", [1.0, 300.0])
def test_tile_forward_online_softmax(tile_lib, n_keys, magnitude):
    """Tiles of 64 keys through scale_and_mask_cols / row_max_partial / online_softmax_step /
    exp2_rows_and_sum / rescale_rows / finalize_rows vs softmax and logsumexp in float64."""
    rng = np.random.default_rng(n_keys + int(magnitude))
    s = (rng.standard_normal((16, n_keys)) * magnitude).astype(np.float32)
    v = rng.standard_normal((n_keys, 64)).astype(np.float32)
    scale = 0.125
    out, lse = np.full((16, 64), np.nan, np.float32), np.full(16, np.nan, np.float32)
    tile_lib.tvf_tile_forward(_ptr(s), _ptr(v), n_keys, scale, _ptr(out), _ptr(lse))
    if n_keys == 0:  # a row with no keys: output 0, lse -inf (FlashAttention's convention)
        assert (out == 0).all() and np.isneginf(lse).all()
        return
    z = s.astype(np.float64) * scale
    ref_lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    ref_out = np.exp(z - ref_lse[:, None]) @ v.astype(np.float64)
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-6, atol=2e-5 * max(1.0, np.abs(z).max() / 100))
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=2e-5 * max(1.0, math.sqrt(n_keys)))


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "cols"])
@pytest.mark.parametrize("valid_cols", [64, 37, 1])
def test_tile_backward_p_and_ds(tile_lib, transposed, valid_cols):
    """recompute_p_rows/ds_rows (dQ kernel) and recompute_p_cols/ds_cols (dK/dV kernel, lse and
    delta per column) vs exp(scale s - lse) and P (dP - delta); masked columns give exactly 0."""
    rng = np.random.default_rng(valid_cols + 7 * transposed)
    s = rng.standard_normal((16, 64)).astype(np.float32) * 3
    dp = rng.standard_normal((16, 64)).astype(np.float32)
    scale = 0.1
    n_vec = 64 if transposed else 16
    lse = (rng.standard_normal(n_vec) + 2).astype(np.float32)
    delta = rng.standard_normal(n_vec).astype(np.float32)
    p_out, ds_out = np.full((16, 64), np.nan, np.float32), np.full((16, 64), np.nan, np.float32)
    fn = tile_lib.tvf_tile_backward_cols if transposed else tile_lib.tvf_tile_backward_rows
    fn(_ptr(s), _ptr(dp), _ptr(lse), _ptr(delta), scale, valid_cols, _ptr(p_out), _ptr(ds_out))
    lse_b = lse[None, :] if transposed else lse[:, None]
    delta_b = delta[None, :] if transposed else delta[:, None]
    p_ref = np.exp(s.astype(np.float64) * scale - lse_b)
    ds_ref = p_ref * (dp - delta_b)
    mask = np.arange(64)[None, :] < valid_cols
    np.testing.assert_allclose(p_out[:, :valid_cols], p_ref[:, :valid_cols], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(ds_out[:, :valid_cols], ds_ref[:, :valid_cols], rtol=1e-5, atol=1e-6)
    assert (p_out[~np.broadcast_to(mask, p_out.shape)] == 0).all()
    assert (ds_out[~np.broadcast_to(mask, ds_out.shape)] == 0).all()


# ---- the kernels, emulated on the CPU ----------------------------------------------------------------

def _build_emulator(csrc: str = CSRC) -> str:
    include = _cuda_include_dir()
    require(include is not None, "no CUDA headers (cuda_fp16.h) for the kernel emulator")
    return _host_build("emu_harness.cpp", [f"-I{include}"], shared=False, csrc=csrc)


@pytest.fixture(scope="module")
def emulator():
    return _build_emulator()


def _storage_bytes(t: torch.Tensor) -> bytes:
    """The elements a (possibly strided) view spans, from its first element on."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    return flat.contiguous().view(torch.int16).numpy().tobytes()


def run_emulated(emu: str, pass_: str, q, k, v, cu=(None, None), scale=None, dout=None, out=None, lse=None,
                 mode="deferred", seed=0, backward="deterministic", forward="mma"):
    """Run the emulated kernels: fwd -> (out, lse); bwd -> (dq, dk, dv, delta). forward: "mma"
    (the sm_80 kernel) or "wgmma" (the Hopper one). backward: "deterministic" (dQ kernel + dK/dV
    kernel) or "atomic" (dK/dV kernel with fp32 atomic dQ)."""
    cu_q, cu_k = cu
    varlen = cu_q is not None
    heads, head_dim = q.shape[-2], q.shape[-1]
    if varlen:
        batch, rows_q, rows_k = cu_q.numel() - 1, q.shape[0], k.shape[0]
        max_q = int((cu_q[1:] - cu_q[:-1]).max()) if batch else 0
        max_k = int((cu_k[1:] - cu_k[:-1]).max()) if batch else 0
    else:
        batch, rows_q, rows_k, max_q, max_k = q.shape[0], q.shape[0] * q.shape[1], k.shape[0] * k.shape[1], \
            q.shape[1], k.shape[1]
    config = {"pass": pass_, "varlen": int(varlen), "batch": batch, "heads": heads, "rows_q": rows_q,
              "rows_k": rows_k, "mode": mode, "seed": seed, "max_q": max_q, "max_k": max_k,
              "scale": repr(float(1 / math.sqrt(head_dim) if scale is None else scale)), "head_dim": head_dim,
              "dtype": DTYPE_NAMES[q.dtype], "backward": backward, "forward": forward}
    with tempfile.TemporaryDirectory(prefix="tvf_emu_") as d:
        def put(name, t):
            with open(os.path.join(d, name + ".bin"), "wb") as f:
                f.write(_storage_bytes(t))
            st = t.stride()
            config[name + ".offset"] = 0
            config[name + ".strides"] = f"0 {st[0]} {st[1]}" if varlen else f"{st[0]} {st[1]} {st[2]}"

        def put_raw(name, t):
            with open(os.path.join(d, name + ".bin"), "wb") as f:
                f.write(t.contiguous().numpy().tobytes())

        put("q", q), put("k", k), put("v", v)
        if varlen:
            put_raw("cu_q", cu_q.to(torch.int32)), put_raw("cu_k", cu_k.to(torch.int32))
        if pass_ == "bwd":
            put("dout", dout), put("o", out), put_raw("lse", lse.float())
        with open(os.path.join(d, "config.txt"), "w") as f:
            f.writelines(f"{key} {value}\n" for key, value in config.items())
        proc = subprocess.run([emu, d], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"emulated kernels failed: {proc.stderr.strip()}"

        def get(name, shape, dtype):
            with open(os.path.join(d, f"out_{name}.bin"), "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=dtype).reshape(shape).clone()

        lse_shape = (heads, rows_q) if varlen else (q.shape[0], heads, q.shape[1])
        if pass_ == "fwd":
            return get("o", q.shape, q.dtype), get("lse", lse_shape, torch.float32)
        return (get("dq", q.shape, q.dtype), get("dk", k.shape, k.dtype), get("dv", v.shape, v.dtype),
                get("delta", lse_shape, torch.float32))


@dataclass(frozen=True)
class Case:
    """Dense (batch, nq, nk) or packed varlen (per-segment lengths); `packed` takes q, k, v as
    strided views of one qkv tensor (..., 3, H, D), as a fused projection produces them."""
    heads: int
    head_dim: int
    batch: int = 0
    nq: int = 0
    nk: int = 0
    seg_q: tuple = ()
    seg_k: tuple = ()
    packed: bool = False

    @property
    def varlen(self) -> bool:
        return bool(self.seg_q)

    @property
    def id(self) -> str:
        shape = (f"varlen-q{','.join(map(str, self.seg_q))}-k{','.join(map(str, self.seg_k))}" if self.varlen
                 else f"B{self.batch}-Nq{self.nq}-Nk{self.nk}")
        return f"{shape}-H{self.heads}-D{self.head_dim}" + ("-qkv" if self.packed else "")


def cu_seqlens(lengths):
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)


def make_inputs(case: Case, generator: torch.Generator):
    """float64 q, k, v, dout and (cu_q, cu_k)."""
    h, d = case.heads, case.head_dim
    if case.varlen:
        lead_q, lead_k = (sum(case.seg_q),), (sum(case.seg_k),)
        cu = (cu_seqlens(case.seg_q), cu_seqlens(case.seg_k))
    else:
        lead_q, lead_k, cu = (case.batch, case.nq), (case.batch, case.nk), (None, None)
    rand = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator)  # noqa: E731
    q, k, v, dout = rand(*lead_q, h, d), rand(*lead_k, h, d), rand(*lead_k, h, d), rand(*lead_q, h, d)
    return q, k, v, dout, cu


def as_dtype(case: Case, q, k, v, dtype):
    """q, k, v in `dtype`; views of one packed qkv tensor for packed cases (needs nq == nk)."""
    if not case.packed:
        return q.to(dtype), k.to(dtype), v.to(dtype)
    qkv = torch.stack([q, k, v], dim=-3).to(dtype)  # (..., 3, H, D)
    return qkv.select(-3, 0), qkv.select(-3, 1), qkv.select(-3, 2)


def reference(q, k, v, dout, cu, dtype, scale=None):
    """out, dq, dk, dv and lse of the reference computed in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, *cu, softmax_scale=scale, return_lse=True)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [out.detach(), *grads], lse.detach()


# Tiles (csrc/attention_params.h): forward and dQ blocks of 128 queries, key tiles of 64 (32 at
# D = 128; dQ: 32 beyond D = 64); dK/dV blocks of 128 keys, query tiles of 64 (32 at D = 128).
EMULATED_CASES = [
    Case(heads=1, head_dim=64, batch=2, nq=150, nk=200),                    # ragged tails, 2 blocks each way
    Case(heads=3, head_dim=128, batch=2, nq=1, nk=77),                      # attention pooling (Nq = 1)
    Case(heads=1, head_dim=80, batch=1, nq=140, nk=150),                    # D 80 (dK/dV: 8 x 1 warps)
    Case(heads=2, head_dim=96, batch=1, nq=40, nk=100),                     # D 96
    Case(heads=1, head_dim=128, seg_q=(130, 3), seg_k=(20, 140)),           # varlen D 128, long segments
    Case(heads=2, head_dim=64, seg_q=(5, 0, 70), seg_k=(33, 7, 90)),        # varlen, an empty query segment
    Case(heads=2, head_dim=128, seg_q=(1, 1, 1), seg_k=(50, 3, 64)),        # varlen pooling
    Case(heads=1, head_dim=80, seg_q=(17, 66), seg_k=(9, 130)),             # varlen D 80
    Case(heads=1, head_dim=96, seg_q=(33,), seg_k=(31,)),                   # varlen D 96
    Case(heads=2, head_dim=64, batch=2, nq=37, nk=37, packed=True),         # strided views of qkv
    Case(heads=2, head_dim=128, seg_q=(20, 45), seg_k=(20, 45), packed=True),
]


EMULATOR_MODES = ("deferred", "immediate", "greedy")


@pytest.mark.parametrize("case", [Case(heads=2, head_dim=64, batch=1, nq=70, nk=90),
                                  Case(heads=1, head_dim=80, seg_q=(5, 40), seg_k=(33, 20))], ids=lambda c: c.id)
def test_emulated_kernels_take_a_custom_softmax_scale(emulator, case):
    """softmax_scale far from 1/sqrt(Dh), dense and packed, forward and backward (a kernel that
    drops the scale in any product, or applies it twice, fails)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.id}-scale".encode()))
    q64, k64, v64, dout64, cu = make_inputs(case, gen)
    golden, golden_lse = reference(q64, k64, v64, dout64, cu, torch.float64, scale=0.37)
    same_dtype, same_lse = reference(q64, k64, v64, dout64, cu, torch.float16, scale=0.37)
    q, k, v = as_dtype(case, q64, k64, v64, torch.float16)
    out, lse = run_emulated(emulator, "fwd", q, k, v, cu, scale=0.37)
    dq, dk, dv, _ = run_emulated(emulator, "bwd", q, k, v, cu, scale=0.37, dout=dout64.half(), out=out, lse=lse)
    for name, fast, gold, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), golden, same_dtype):
        assert_close_to_golden(fast, gold, ref, atol=dtype_atol(torch.float16), name=name)
    assert_close_to_golden(lse, golden_lse, same_lse.float(), atol=1e-5, name="lse", dtype=torch.float16)


@pytest.mark.parametrize("mode", EMULATOR_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: c.id)
def test_emulated_kernels_match_float64(emulator, case, dtype, mode):
    """The kernel sources themselves (forward, delta preprocess, dQ, dK/dV), run by the CPU
    emulator under each of its schedules (see csrc/testing/emu_harness.cpp), against the float64
    reference with FlashAttention's 2x-PyTorch-error rule."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.id}-{dtype}-{mode}".encode()))
    q64, k64, v64, dout64, cu = make_inputs(case, gen)
    golden, golden_lse = reference(q64, k64, v64, dout64, cu, torch.float64)
    same_dtype, same_lse = reference(q64, k64, v64, dout64, cu, dtype)
    q, k, v = as_dtype(case, q64, k64, v64, dtype)
    seed = zlib.crc32(mode.encode()) % 1000
    out, lse = run_emulated(emulator, "fwd", q, k, v, cu, mode=mode, seed=seed)
    dq, dk, dv, delta = run_emulated(emulator, "bwd", q, k, v, cu, dout=dout64.to(dtype), out=out, lse=lse,
                                     mode=mode, seed=seed)
    atol = dtype_atol(dtype)
    for name, fast, gold, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), golden, same_dtype):
        assert_close_to_golden(fast, gold, ref, atol=atol, name=name)
    assert_close_to_golden(lse, golden_lse, same_lse.float(), atol=1e-5, name="lse", dtype=dtype)
    golden_delta = (dout64.to(dtype).double() * out.double()).sum(-1)
    golden_delta = golden_delta.permute(1, 0) if case.varlen else golden_delta.permute(0, 2, 1)
    torch.testing.assert_close(delta.double(), golden_delta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: c.id)
def test_emulated_atomic_backward_matches_float64(emulator, case, dtype):
    """The optional 5-product backward (dK/dV kernel adding dS K to an fp32 dQ with atomics, then
    a convert kernel), under the greedy schedule: dq against float64, and dk, dv bit-identical
    to the deterministic backward's (the same code computes them)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.id}-{dtype}-atomic".encode()))
    q64, k64, v64, dout64, cu = make_inputs(case, gen)
    golden, _ = reference(q64, k64, v64, dout64, cu, torch.float64)
    same_dtype, _ = reference(q64, k64, v64, dout64, cu, dtype)
    q, k, v = as_dtype(case, q64, k64, v64, dtype)
    out, lse = run_emulated(emulator, "fwd", q, k, v, cu)
    args = dict(dout=dout64.to(dtype), out=out, lse=lse, mode="greedy", seed=7)
    dq, dk, dv, _ = run_emulated(emulator, "bwd", q, k, v, cu, backward="atomic", **args)
    _, dk_det, dv_det, _ = run_emulated(emulator, "bwd", q, k, v, cu, backward="deterministic", **args)
    assert_close_to_golden(dq, golden[1], same_dtype[1], atol=dtype_atol(dtype), name="dq")
    assert torch.equal(dk, dk_det) and torch.equal(dv, dv_det)


@pytest.mark.parametrize("mode", EMULATOR_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: c.id)
def test_emulated_hopper_forward_matches_float64(emulator, case, dtype, mode):
    """The opt-in sm_90a forward (wgmma with shared-memory descriptors, P from registers, V as a
    transposed operand), run by the emulator's reading of the PTX ISA's wgmma layouts: out and
    lse against float64. Schedules as above; "deferred" also runs each product only at its
    wgmma.wait_group, so a result read before the wait would be stale."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.id}-{dtype}-{mode}-wgmma".encode()))
    q64, k64, v64, dout64, cu = make_inputs(case, gen)
    golden, golden_lse = reference(q64, k64, v64, dout64, cu, torch.float64)
    same_dtype, same_lse = reference(q64, k64, v64, dout64, cu, dtype)
    q, k, v = as_dtype(case, q64, k64, v64, dtype)
    out, lse = run_emulated(emulator, "fwd", q, k, v, cu, mode=mode, seed=11, forward="wgmma")
    assert_close_to_golden(out, golden[0], same_dtype[0], atol=dtype_atol(dtype), name="out")
    assert_close_to_golden(lse, golden_lse, same_lse.float(), atol=1e-5, name="lse", dtype=dtype)


def test_emulated_empty_key_segment(emulator):
    """A query segment whose key segment is empty: output 0, lse -inf, dq 0 (and dk/dv of the
    other segments unaffected)."""
    case = Case(heads=1, head_dim=64, seg_q=(3, 4), seg_k=(0, 5))
    gen = torch.Generator().manual_seed(5)
    q64, k64, v64, dout64, cu = make_inputs(case, gen)
    q, k, v = (t.half() for t in (q64, k64, v64))
    out, lse = run_emulated(emulator, "fwd", q, k, v, cu)
    assert (out[:3] == 0).all() and torch.isneginf(lse[:, :3]).all()
    dq, dk, dv, _ = run_emulated(emulator, "bwd", q, k, v, cu, dout=dout64.half(), out=out, lse=lse)
    assert (dq[:3] == 0).all()
    golden, _ = reference(q64[3:], k64, v64, dout64[3:], (cu_seqlens([4]), cu_seqlens([5])), torch.float64)
    for fast, gold in zip((out[3:], dq[3:], dk, dv), golden):
        torch.testing.assert_close(fast.double(), gold, rtol=0, atol=2e-2)


# ---- (a) the install: setup.py never fails for want of a toolkit; what the binary holds ---------------

def _run_setup(args, cwd, env_overrides, path=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TUBEVIT_FAST_BUILD_CUDA", "CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "CXX")}
    env.update(env_overrides)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, os.path.join(cwd, "setup.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _notices(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("tubevit_fast: ")]


@pytest.fixture
def fake_toolkit(tmp_path):
    """A CUDA_HOME whose nvcc reports torch's CUDA version and fails every compile, and a host
    compiler that fails every compile (version queries go to the real g++)."""
    require(torch.version.cuda is not None, "torch is a CPU-only build")
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc, cxx = home / "bin" / "nvcc", home / "bin" / "fake-c++"
    version = f"release {torch.version.cuda}, V{torch.version.cuda}.0"
    nvcc.write_text("#!/bin/sh\n"
                    f'[ "$1" = "--version" ] && {{ echo "Cuda compilation tools, {version}"; exit 0; }}\n'
                    'echo "nvcc fatal : fake toolkit" >&2; exit 1\n')
    cxx.write_text("#!/bin/sh\n"
                   'for a in "$@"; do [ "$a" = "-c" ] && { echo "fake c++ fails" >&2; exit 1; }; done\n'
                   f'exec {_cxx() or "g++"} "$@"\n')
    nvcc.chmod(0o755), cxx.chmod(0o755)
    return home, cxx


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_setup_without_a_toolkit(tmp_path, mode):
    """No nvcc under CUDA_HOME: auto mode installs pure Python with one notice, =1 fails saying why."""
    flag = {"TUBEVIT_FAST_BUILD_CUDA": "1"} if mode == "required" else {}
    proc = _run_setup(["--name"], ROOT, {"CUDA_HOME": str(tmp_path), **flag})
    notices = _notices(proc)
    assert len(notices) == 1 and f"CUDA_HOME={tmp_path} holds no bin/nvcc" in notices[0], proc.stderr
    if mode == "auto":
        assert proc.returncode == 0 and "installing without the CUDA extension" in notices[0], proc.stderr
    else:
        assert proc.returncode != 0 and "TUBEVIT_FAST_BUILD_CUDA=1 but" in notices[0]


def test_setup_without_ninja(fake_toolkit, tmp_path):
    home, _ = fake_toolkit
    proc = _run_setup(["--name"], ROOT, {"CUDA_HOME": str(home)}, path=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [notice] = _notices(proc)
    assert notice == ("tubevit_fast: installing without the CUDA extension: ninja not found "
                      "(pip install ninja)")


def test_setup_drops_archs_below_sm80(fake_toolkit):
    require(shutil.which("ninja") is not None, "ninja not installed")
    home, _ = fake_toolkit
    proc = _run_setup(["--name"], ROOT, {"CUDA_HOME": str(home), "TORCH_CUDA_ARCH_LIST": "7.0;7.5"})
    assert proc.returncode == 0
    assert _notices(proc) == [
        "tubevit_fast: not building the CUDA extension for 7.0;7.5 (it needs sm_80 or newer)",
        "tubevit_fast: installing without the CUDA extension: TORCH_CUDA_ARCH_LIST names no arch the kernels "
        "support (8.0 or newer)"], proc.stderr


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_setup_falls_back_when_the_compile_fails(fake_toolkit, tmp_path, mode):
    """A toolkit that is present but cannot compile: auto mode still installs (pure Python, one
    notice, no module left behind); =1 fails the build."""
    require(shutil.which("ninja") is not None, "ninja not installed")
    home, cxx = fake_toolkit
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), repo)
    shutil.copytree(CSRC, repo / "csrc")
    (repo / "tubevit_fast").mkdir()
    flag = {"TUBEVIT_FAST_BUILD_CUDA": "1"} if mode == "required" else {}
    proc = _run_setup(["build_ext", "--inplace"], str(repo),
                      {"CUDA_HOME": str(home), "CXX": str(cxx), "TUBEVIT_FAST_CUDA_HEADDIMS": "64",
                       "MAX_JOBS": "1", **flag})
    assert not list((repo / "tubevit_fast").glob("_C*.so"))
    if mode == "auto":
        assert proc.returncode == 0, proc.stderr[-2000:]
        [notice] = _notices(proc)
        assert notice.startswith("tubevit_fast: installing without the CUDA extension: its build failed")
    else:
        assert proc.returncode != 0 and not _notices(proc), proc.stderr[-2000:]


def test_runs_on_reads_the_compatibility_rules():
    from tubevit_fast import info
    targets = {"sass": ["sm_80", "sm_90a"], "ptx": ["compute_80"]}
    assert info.runs_on((8, 0), targets) == "sm_80 machine code"
    assert info.runs_on((8, 9), targets) == "sm_80 machine code"  # same major, higher minor
    assert info.runs_on((9, 0), targets) == "sm_90a machine code"
    assert info.runs_on((12, 0), targets).startswith("compute_80 PTX")
    assert info.runs_on((7, 5), targets) is None
    assert info.runs_on((10, 0), {"sass": ["sm_80", "sm_90a"], "ptx": ["compute_90a"]}) is None
    assert info.runs_on((9, 0), {"sass": ["sm_80"], "ptx": []}) is None  # no sm_9x code, no PTX


@pytest.mark.aot
def test_info_reports_the_archs_in_the_binary():
    """python -m tubevit_fast.info: the build's arch list and the binary's SASS / PTX (cuobjdump)."""
    require_extension()
    from tubevit_fast.audit import cuobjdump_path
    require(cuobjdump_path() is not None, "cuobjdump not found (Triton's wheel or CUDA_HOME)")
    proc = subprocess.run([sys.executable, "-m", "tubevit_fast.info", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ext = json.loads(proc.stdout)["extension"]
    build, binary = ext["build"], ext["binary"]
    assert build["head_dims"] == list(extension.supported_head_dims())
    entries = build["arch_list"].split(";")
    sass_from_list = {"sm_" + a.split("+")[0].replace(".", "") for a in entries}
    ptx_from_list = {"compute_" + a.split("+")[0].replace(".", "") for a in entries if a.endswith("+PTX")}
    assert set(binary["sass"]) == sass_from_list and set(binary["ptx"]) == ptx_from_list, (build, binary)
    if IN_CI and not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # setup.py's default list
        assert build["arch_list"] == "8.0+PTX;9.0a"
        assert binary == {"sass": ["sm_80", "sm_90a"], "ptx": ["compute_80"]}
    from tubevit_fast.info import format_text
    text = format_text(json.loads(proc.stdout))
    assert "machine code (SASS): " + ", ".join(binary["sass"]) in text, text


# Every cp.async refill of a ring buffer in the kernels is written on the line after the barrier
# that ends every warp's reads of that buffer, and marked so.
REFILL_AFTER_BARRIER = re.compile(r"(\n[ \t]*block_sync\(\);)(\n[^\n]*// refill: after the barrier[^\n]*)")
# forward: V and K; dQ: the K/V pair; dK/dV: the Q/dO/lse/delta tile; Hopper forward: V and K
REFILLS = {"attention_kernels.cuh": 4, "attention_fwd_sm90.cuh": 2}


@pytest.fixture(scope="module")
def emulator_with_early_refills(tmp_path_factory):
    """The emulator built from a copy of csrc/ in which every refill is issued just before its
    barrier instead of after it: the loop-end barrier of the buffer's last reader is gone, so a
    warp that finishes early overwrites data the other warps have not read yet (a write-after-
    read race on the ring; the reads of data just waited for, read-after-write, stay guarded)."""
    mutant = tmp_path_factory.mktemp("mutant") / "csrc"
    shutil.copytree(CSRC, mutant)
    for name, expected in REFILLS.items():
        path = mutant / name
        source, n = REFILL_AFTER_BARRIER.subn(r"\2\1", path.read_text())
        assert n == expected, f"{name}: found {n} marked refills, expected {expected}: update the test"
        path.write_text(source)
    return _build_emulator(str(mutant))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_greedy_schedule_catches_a_refill_before_its_barrier(emulator_with_early_refills, dtype):
    """Mutation test of the emulator: with the refills moved above their barriers, the greedy
    schedule gives wrong out (both forward kernels), dq, dk and dv (each kernel is fed exact
    inputs, so each failure is its own). The real kernels pass the same schedule on every
    emulated case (tests above)."""
    case = Case(heads=1, head_dim=64, batch=1, nq=200, nk=200)  # >= 3 tiles per ring in every kernel
    gen = torch.Generator().manual_seed(14)
    q64, k64, v64, dout64, cu = make_inputs(case, gen)
    golden, golden_lse = reference(q64, k64, v64, dout64, cu, torch.float64)
    same_dtype, _ = reference(q64, k64, v64, dout64, cu, dtype)
    q, k, v = as_dtype(case, q64, k64, v64, dtype)
    emu = emulator_with_early_refills
    out, _ = run_emulated(emu, "fwd", q, k, v, mode="greedy", seed=3)
    out_wgmma, _ = run_emulated(emu, "fwd", q, k, v, mode="greedy", seed=3, forward="wgmma")
    dq, dk, dv, _ = run_emulated(emu, "bwd", q, k, v, dout=dout64.to(dtype), out=golden[0].to(dtype),
                                 lse=golden_lse.float(), mode="greedy", seed=3)
    atol = dtype_atol(dtype)
    for name, fast, gold, ref in zip(("out", "out (wgmma)", "dq", "dk", "dv"), (out, out_wgmma, dq, dk, dv),
                                     [golden[0], *golden], [same_dtype[0], *same_dtype]):
        with pytest.raises(AssertionError):
            assert_close_to_golden(fast, gold, ref, atol=atol, name=name)


# ---- (b), (c) the nvcc build: ptxas report and SASS ------------------------------------------------

@pytest.mark.aot
def test_build_prerequisites_and_extension_present():
    """nvcc (CUDA_HOME or /usr/local/cuda) and the built module; in CI both are required."""
    homes = [h for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    nvcc = next((p for p in (os.path.join(h, "bin", "nvcc") for h in homes) if os.path.exists(p)), None)
    require(nvcc is not None, f"nvcc not found under {homes}")
    require_extension()
    assert extension.library_path() and os.path.exists(extension.library_path())


def _ptxas_rows() -> list[dict]:
    require_extension()
    from tubevit_fast.audit import extension_targets
    path = extension_targets.ptxas_log_path()
    require(path is not None, "the build kept no ptxas report (_C.ptxas.log) next to tubevit_fast._C")
    with open(path) as f:
        return extension_targets.ptxas_rows(f.read())


@pytest.mark.aot
def test_ptxas_reports_no_spills_for_every_kernel():
    rows = _ptxas_rows()
    archs = {r["arch"] for r in rows}
    if IN_CI:
        assert {"sm_80", "sm_90a"} <= archs, f"CI builds for sm_80 and sm_90a, the report has {sorted(archs)}"
    assert archs, "empty ptxas report"
    dims = extension.supported_head_dims()
    expected = {(kern, dt, d, arch)
                for kern in KERNELS for dt in ("fp16", "bf16") for d in dims for arch in archs}
    found = {(r["kernel"], r["dtype"], r["head_dim"], r["arch"]) for r in rows}
    assert expected <= found, f"kernels missing from the ptxas report: {sorted(expected - found)}"
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not spilling, "spills / stack frames:\n" + "\n".join(map(str, spilling))
    assert all(r["registers"] <= 255 for r in rows)


@pytest.fixture(scope="module")
def audit():
    require_extension()
    from tubevit_fast.audit import cuobjdump_path
    require(cuobjdump_path() is not None, "cuobjdump not found (Triton's wheel or CUDA_HOME)")
    from tubevit_fast.audit import extension_targets
    return extension_targets.audit_rows()


@pytest.mark.aot
def test_sass_has_tensor_core_mma_on_both_archs(audit):
    from tubevit_fast.audit import ROW_KEYS
    assert audit, "cuobjdump found none of the extension's kernels"
    for row in audit:
        assert set(ROW_KEYS) <= set(row), sorted(set(ROW_KEYS) - set(row))
    archs = {r["arch"] for r in audit}
    assert archs == {"sm_80", "sm_90"}, archs
    dims = extension.supported_head_dims()
    for kern in MATMUL_KERNELS:
        for dt in ("fp16", "bf16"):
            for d in dims:
                for arch in ("sm_80", "sm_90"):
                    key = (kern, dt, f"D{d}", arch)
                    [row] = [r for r in audit
                             if (r["kernel"], r["dtype"], r["config"].split("-")[0], r["arch"]) == key]
                    assert row["mma_instructions"] > 0, row
                    assert row["details"]["hmma"] > 0 and row["details"]["ldsm"] > 0, row
                    assert row["load_widths"].get(128, 0) > 0, f"no 128-bit cp.async/LDG: {row}"
                    assert row["spill_bytes"] == 0 and row["ok"], row
    assert all(r["ok"] for r in audit), [r for r in audit if not r["ok"]]


@pytest.mark.aot
def test_hopper_forward_sass_has_hgmma(audit):
    """The opt-in wgmma forward: HGMMA (D/16 for S = Q K^T, 4 key chunks x its n64/n32/n16 pieces
    for O += P V) and no HMMA in its sm_90a machine code, 128-bit cp.async, 0 spills; absent from
    the sm_80 rows (a trap there, never launched)."""
    rows = [r for r in audit if r["kernel"] == "attention_fwd_sm90_kernel"]
    assert {r["arch"] for r in rows} == {"sm_90"}, rows
    dims = extension.supported_head_dims()
    expected = {(dt, d) for dt in ("fp16", "bf16") for d in dims}
    assert {(r["dtype"], r["details"]["head_dim"]) for r in rows} == expected
    for row in rows:
        d = row["details"]["head_dim"]
        pieces = d // 64 + bool(d % 64 & 32) + bool(d % 64 & 16)
        assert row["details"]["hgmma"] == d // 16 + 4 * pieces and row["details"]["hmma"] == 0, row
        assert row["load_widths"].get(128, 0) > 0 and row["spill_bytes"] == 0 and row["ok"], row


@pytest.mark.aot
def test_audit_rows_agree_with_the_ptxas_report_and_the_audit_rules(audit):
    """The extension's rows are judged with tubevit_fast.audit's rules: spill_bytes is LOCAL +
    STACK, occupancy is estimate_occupancy's, ok is row_ok's; registers match ptxas' report."""
    from tubevit_fast import audit as A
    for row in audit:
        det = row["details"]
        assert det["module"] == A.EXTENSION_MODULE
        assert row["spill_bytes"] == det["stack_bytes"] + det["local_bytes"], row
        assert row["shared_bytes"] == det["dynamic_shared_bytes"] + det["static_shared_bytes"], row
        assert row["occupancy"] == round(A.estimate_occupancy(row["arch"], row["registers"], row["shared_bytes"],
                                                              det["num_warps"]), 4), row
        assert row["ok"] == A.row_ok(row["spill_bytes"], det["ptxas"], row["matmul"], row["mma_instructions"],
                                     row["occupancy"]), row
        assert det["ptxas"] is not None and det["ptxas"]["registers"] == row["registers"], row
        assert row["load_widths"] == A.SassStats(ldg=det["ldg_widths"], ldgsts=det["ldgsts_widths"]).load_widths


@pytest.mark.aot
def test_audit_cli_lists_the_extension_rows():
    """`python -m tubevit_fast.audit` audits the extension beside the Triton kernels: its rows have
    exactly the ROW_KEYS, and --module tubevit_fast._C --strict passes on them alone."""
    from tubevit_fast import audit as A
    require_extension()
    require(A.cuobjdump_path() is not None, "cuobjdump not found (Triton's wheel or CUDA_HOME)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-m", "tubevit_fast.audit", "--module", A.EXTENSION_MODULE,
                           "--arch", "sm_90", "--dtype", "bf16", "--json", "--strict"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert rows and all(tuple(r) == A.ROW_KEYS for r in rows), rows[:1]
    assert {(r["arch"], r["dtype"]) for r in rows} == {("sm_90", "bf16")}
    expected = {(k, f"D{d}") for k in KERNELS for d in extension.supported_head_dims()}
    assert {(r["kernel"], r["config"].split("-")[0]) for r in rows} == expected
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert "not auditing" not in proc.stderr


# ---- (d) schemas, fake kernels, opcheck, registration ------------------------------------------------

SCHEMAS = {
    "attention_fwd": "tubevit_fast_C::attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, "
                     "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, "
                     "bool wgmma=False) -> (Tensor out, Tensor lse)",
    "attention_bwd": "tubevit_fast_C::attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
                     "Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
                     "int max_seqlen_k, float softmax_scale, bool deterministic=True) "
                     "-> (Tensor dq, Tensor dk, Tensor dv)",
}


@pytest.mark.aot
def test_op_schemas():
    o = ops()
    for name, schema in SCHEMAS.items():
        assert str(getattr(o, name).default._schema) == schema
    assert set(extension.supported_head_dims()) <= set(extension.KERNEL_HEAD_DIMS)
    assert extension.supported_head_dims(), "no head dim compiled"
    configs = extension.kernel_configs()
    assert {c["kernel"] for c in configs} == set(KERNELS)


def _meta_args(varlen: bool, dtype=torch.float16, head_dim=64):
    meta = dict(device="meta", dtype=dtype)
    if varlen:
        q, k = torch.empty(9, 3, head_dim, **meta), torch.empty(11, 3, head_dim, **meta)
        cu_q = torch.empty(3, device="meta", dtype=torch.int32)
        cu_k = torch.empty(3, device="meta", dtype=torch.int32)
        lse = torch.empty(3, 9, device="meta", dtype=torch.float32)
        return q, k, k.clone(), cu_q, cu_k, 6, 8, lse
    q, k = torch.empty(2, 5, 3, head_dim, **meta), torch.empty(2, 7, 3, head_dim, **meta)
    return q, k, k.clone(), None, None, 5, 7, torch.empty(2, 3, 5, device="meta", dtype=torch.float32)


@pytest.mark.aot
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_opcheck_on_meta_tensors(varlen, dtype):
    o = ops()
    q, k, v, cu_q, cu_k, max_q, max_k, lse = _meta_args(varlen, dtype)
    fwd_args = (q, k, v, cu_q, cu_k, max_q, max_k, 0.125)
    for wgmma in (False, True):
        torch.library.opcheck(o.attention_fwd.default, (*fwd_args, wgmma))
    out, lse_fake = o.attention_fwd(*fwd_args)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse_fake.shape == lse.shape and lse_fake.dtype == torch.float32
    bwd_args = (torch.empty_like(q), q, k, v, torch.empty_like(q), lse, cu_q, cu_k, max_q, max_k, 0.125)
    for deterministic in (True, False):
        torch.library.opcheck(o.attention_bwd.default, (*bwd_args, deterministic))
        dq, dk, dv = o.attention_bwd(*bwd_args, deterministic)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


@pytest.mark.aot
def test_fake_kernels_trace_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    o = ops()
    with FakeTensorMode():
        q = torch.empty(2, 1, 4, 128, dtype=torch.bfloat16)
        k = torch.empty(2, 50, 4, 128, dtype=torch.bfloat16)
        out, lse = o.attention_fwd(q, k, k, None, None, 1, 50, 0.1)
        assert out.shape == (2, 1, 4, 128) and lse.shape == (2, 4, 1)


def test_backward_variant_follows_the_env_and_torch_determinism(monkeypatch):
    monkeypatch.delenv(extension.ENV_BACKWARD, raising=False)
    assert extension.backward_variant() == "deterministic"  # the default
    monkeypatch.setenv(extension.ENV_BACKWARD, "atomic")
    assert extension.backward_variant() == "atomic"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert extension.backward_variant() == "deterministic"
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setenv(extension.ENV_BACKWARD, "fast")
    with pytest.raises(ValueError, match="TUBEVIT_FAST_CUDA_BACKWARD='fast'"):
        extension.backward_variant()


_IMPORT_ORDER_SCRIPT = r"""
import importlib, sys, torch
order = sys.argv[1]
def load_extension():
    import tubevit_fast.extension as ext
    assert ext.unavailable_reason() is None, ext.unavailable_reason()
def load_python_ops():
    # the package's own custom ops live in namespace "tubevit_fast" (torch.library.custom_op)
    @torch.library.custom_op("tubevit_fast::_namespace_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x.clone()
    importlib.import_module("tubevit_fast.ops.attention")  # must import: no note-and-pass
for step in (order.split(",")):
    {"ext": load_extension, "py": load_python_ops}[step]()
ns = torch.ops.tubevit_fast_C
assert hasattr(ns, "attention_fwd") and hasattr(ns, "attention_bwd")
assert hasattr(torch.ops.tubevit_fast, "attention_fwd") and hasattr(torch.ops.tubevit_fast, "attention_bwd")
assert torch.ops.tubevit_fast._namespace_probe(torch.ones(2)).sum().item() == 2
print("ok")
"""


@pytest.mark.aot
@pytest.mark.parametrize("order", ["ext,py", "py,ext"])
def test_registration_in_both_import_orders(order):
    """The C++ library (namespace tubevit_fast_C) and the Python custom ops (namespace
    tubevit_fast) load side by side whichever is imported first."""
    require_extension()
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_SCRIPT, order], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


# ---- (e) clean errors --------------------------------------------------------------------------------

def _dense(dtype=torch.float16, head_dim=64, device="cpu", nq=4, nk=6):
    q = torch.randn(2, nq, 3, head_dim, device=device).to(dtype)
    k = torch.randn(2, nk, 3, head_dim, device=device).to(dtype)
    return q, k, k.clone()


@pytest.mark.aot
@pytest.mark.parametrize("args, match", [
    (lambda: (*_dense(), None, None, 4, 6, 0.1), r"expected CUDA tensors, got a cpu tensor"),
    (lambda: (*_dense(torch.float32), None, None, 4, 6, 0.1),
     r"float32 inputs are not supported by the CUDA kernels"),
    (lambda: (*_dense(head_dim=32), None, None, 4, 6, 0.1), r"head dim 32 is not supported"),
    (lambda: (*_dense(head_dim=72), None, None, 4, 6, 0.1), r"head dim 72 is not supported"),
    (lambda: (_dense()[0], _dense()[1][:1], _dense()[2], None, None, 4, 6, 0.1), r"does not match q"),
    (lambda: (_dense()[0], *_dense(torch.bfloat16)[1:], None, None, 4, 6, 0.1), r"must share a dtype"),
    (lambda: (*(t[0] for t in _dense()), torch.tensor([0, 4], dtype=torch.int32), None, 4, 6, 0.1),
     r"pass both cu_seqlens_q and cu_seqlens_k"),
    (lambda: (*(t[0] for t in _dense()), torch.tensor([0, 4]), torch.tensor([0, 6]), 4, 6, 0.1),
     r"cu_seqlens must be int32"),
], ids=["cpu", "fp32", "head-dim-32", "head-dim-72", "shape", "dtype-mix", "one-cu", "cu-int64"])
def test_forward_rejects_bad_input_cleanly(args, match):
    o = ops()
    with pytest.raises(RuntimeError, match=match):
        o.attention_fwd(*args())


@pytest.mark.aot
def test_backward_rejects_bad_input_cleanly():
    o = ops()
    q, k, v = _dense()
    lse = torch.zeros(2, 3, 4)
    with pytest.raises(RuntimeError, match="expected CUDA tensors"):
        o.attention_bwd(q, q, k, v, q, lse, None, None, 4, 6, 0.1)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        o.attention_bwd(q, q, k, v, q, lse[:, :, :2], None, None, 4, 6, 0.1)
    with pytest.raises(RuntimeError, match="dout and out must have q's shape"):
        o.attention_bwd(q[:, :2], q, k, v, q, lse, None, None, 4, 6, 0.1)
    with pytest.raises(RuntimeError, match="not supported by the CUDA kernels"):
        qf, kf, vf = _dense(torch.float32)
        o.attention_bwd(qf, qf, kf, vf, qf, lse, None, None, 4, 6, 0.1)


@pytest.mark.aot
def test_fake_kernel_rejects_fp32_on_meta():
    o = ops()
    q = torch.empty(1, 4, 2, 64, device="meta")
    with pytest.raises(RuntimeError, match="not supported by the CUDA kernels"):
        o.attention_fwd(q, q, q, None, None, 4, 4, 0.1)


# ---- (g) on a GPU: against PyTorch -------------------------------------------------------------------

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present")

GPU_CASES = [
    Case(heads=4, head_dim=d, batch=2, nq=nq, nk=nk)
    for d in (64, 80, 96, 128) for nq, nk in ((128, 128), (77, 301), (1, 197))
] + [
    Case(heads=3, head_dim=d, seg_q=(5, 0, 130, 64), seg_k=(33, 7, 90, 64)) for d in (64, 80, 96, 128)
] + [
    Case(heads=2, head_dim=64, batch=2, nq=200, nk=200, packed=True),
    Case(heads=2, head_dim=128, seg_q=(1, 1, 1), seg_k=(50, 3, 640)),
]


def _gpu_case(case: Case, dtype, salt: str, scale=None):
    """Inputs on the GPU and the references of a GPU test: (q, k, v in dtype, dout float64, cu,
    max_q, max_k, golden, golden_lse, same_dtype, same_lse). Skips head dims this build lacks."""
    require_extension()
    if case.head_dim not in extension.supported_head_dims():
        pytest.skip(f"head dim {case.head_dim} not in this build")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case.id}-{dtype}{salt}".encode()))
    q64, k64, v64, dout64, cu = make_inputs(case, gen)
    q64, k64, v64, dout64 = (t.to(dev) for t in (q64, k64, v64, dout64))
    cu = tuple(c.to(dev) if c is not None else None for c in cu)
    golden, golden_lse = reference(q64, k64, v64, dout64, cu, torch.float64, scale)
    same_dtype, same_lse = reference(q64, k64, v64, dout64, cu, dtype, scale)
    q, k, v = as_dtype(case, q64, k64, v64, dtype)
    max_q, max_k = (max(case.seg_q), max(case.seg_k)) if case.varlen else (case.nq, case.nk)
    return q, k, v, dout64, cu, max_q, max_k, golden, golden_lse, same_dtype, same_lse


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", [Case(heads=2, head_dim=64, batch=2, nq=150, nk=200),
                                  Case(heads=2, head_dim=64, seg_q=(5, 140), seg_k=(133, 20))], ids=lambda c: c.id)
def test_gpu_custom_softmax_scale(case):
    """A non-default softmax_scale, dense and packed, forward and backward, on hardware."""
    dtype = torch.bfloat16
    q, k, v, dout64, cu, max_q, max_k, golden, golden_lse, same_dtype, same_lse = _gpu_case(case, dtype, "-scale", 0.37)
    out, lse = extension.attention_forward(q, k, v, *cu, max_q, max_k, 0.37)
    dq, dk, dv = extension.attention_backward(dout64.to(dtype), q, k, v, out, lse, *cu, max_q, max_k, 0.37)
    torch.cuda.synchronize()
    for name, fast, gold, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), golden, same_dtype):
        assert_close_to_golden(fast.cpu(), gold.cpu(), ref.cpu(), atol=dtype_atol(dtype), name=name)
    assert_close_to_golden(lse.cpu(), golden_lse.cpu(), same_lse.float().cpu(), atol=1e-5, name="lse", dtype=dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backward", extension.BACKWARDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_against_float64_and_sdpa(case, dtype, backward, monkeypatch):
    monkeypatch.setenv(extension.ENV_BACKWARD, backward)
    q, k, v, dout64, cu, max_q, max_k, golden, golden_lse, same_dtype, same_lse = _gpu_case(case, dtype, "")
    scale = 1 / math.sqrt(case.head_dim)
    out, lse = extension.attention_forward(q, k, v, *cu, max_q, max_k, scale)
    dq, dk, dv = extension.attention_backward(dout64.to(dtype), q, k, v, out, lse, *cu, max_q, max_k, scale)
    torch.cuda.synchronize()
    atol = dtype_atol(dtype)
    for name, fast, gold, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), golden, same_dtype):
        assert fast.dtype == dtype
        assert_close_to_golden(fast, gold, ref, atol=atol, name=name)
    assert_close_to_golden(lse, golden_lse, same_lse.float(), atol=1e-5, name="lse", dtype=dtype)
    if not case.varlen:  # PyTorch's fused kernel as a second opinion
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
        assert_close_to_golden(out, golden[0], sdpa, atol=atol, name="out vs sdpa")


def _is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _is_sm90(), reason="the wgmma forward needs an sm_90 GPU (H100/H200)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_wgmma_forward_against_float64(case, dtype, monkeypatch):
    """The opt-in Hopper forward on hardware: out and lse against float64 (the first check of the
    emulator's reading of the wgmma layouts on a real GPU)."""
    monkeypatch.setenv(extension.ENV_WGMMA, "1")
    q, k, v, _, cu, max_q, max_k, golden, golden_lse, same_dtype, same_lse = _gpu_case(case, dtype, "-wgmma")
    out, lse = extension.attention_forward(q, k, v, *cu, max_q, max_k, 1 / math.sqrt(case.head_dim))
    torch.cuda.synchronize()
    assert_close_to_golden(out, golden[0], same_dtype[0], atol=dtype_atol(dtype), name="out")
    assert_close_to_golden(lse, golden_lse, same_lse.float(), atol=1e-5, name="lse", dtype=dtype)


@pytest.mark.gpu
@requires_gpu
def test_gpu_wgmma_forward_is_refused_off_sm90(monkeypatch):
    require_extension()
    if _is_sm90():
        pytest.skip("this GPU runs the wgmma forward")
    monkeypatch.setenv(extension.ENV_WGMMA, "1")
    q, k, v = _dense(torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="runs on compute capability 9.0"):
        extension.attention_forward(q, k, v, None, None, 4, 6, 0.1)


def test_wgmma_request_is_read_from_the_env(monkeypatch):
    monkeypatch.delenv(extension.ENV_WGMMA, raising=False)
    assert not extension.wgmma_requested()  # never on by default
    monkeypatch.setenv(extension.ENV_WGMMA, "1")
    assert extension.wgmma_requested()
    monkeypatch.setenv(extension.ENV_WGMMA, "yes")
    with pytest.raises(ValueError, match="TUBEVIT_FAST_CUDA_WGMMA='yes'"):
        extension.wgmma_requested()


@pytest.mark.gpu
@requires_gpu
def test_gpu_errors_and_empty_inputs():
    require_extension()
    q, k, v = _dense(torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="not supported by the CUDA kernels"):
        extension.attention_forward(q, k, v, None, None, 4, 6, 0.1)
    q, k, v = _dense(torch.float16, device="cuda", nq=0)
    out, lse = extension.attention_forward(q, k, v, None, None, 0, 6, 0.1)
    assert out.shape == q.shape and lse.shape == (2, 3, 0)
