"""Attention benchmarks: tubevit_fast.attention against PyTorch SDPA called directly.

Shapes (Shape below):
  CPU   dense B=1 N=539 H=12 Dh=64 (the paper configuration: PAPER_TUBES on 32x224x224), and
        varlen segments [539, 196, 539, 196] (videos and images packed), H=12 Dh=64
  CUDA  dense B=32 N=539 H=12 Dh=64 (TubeViT-B), B=8 N=539 H=16 Dh=80 (TubeViT-H's head dim),
        B=8 N=1176 H=16 Dh=128, and varlen [539, 196] x 8, H=12 Dh=64
Varlen: ours runs packed with cu_seqlens; the SDPA baseline is what one does without varlen
support: pad every sample to the longest and pass a boolean key-padding mask (padded query
rows are computed and thrown away).

Impls: "sdpa" (the baseline, F.scaled_dot_product_attention on (B, H, N, D), autograd backward),
ours with every backend that runs on the device ("torch" on CPU; "torch", "triton" and "cuda"
when tubevit_fast.extension is built, on CUDA) and "auto" as its own row (what a user gets),
plus flash-attn / xformers when importable (CUDA only). Each for the forward pass (no_grad) and
forward+backward (gradients of q, k, v). On CUDA the end-of-run summary also prints the
backends' order for tubevit_fast.backends.MEASURED_ORDER on this GPU (BenchTools.dispatch_rows).

Before timing, each impl is checked once against the SDPA baseline (output, and gradients for
forward+backward) within a dtype tolerance. Nothing asserts on time.

extra_info: flops (4*B*H*Nq*Nk*D forward, x3.5 forward+backward; for varlen the sum over
segments of the real work), min_bytes (q, k, v read and out written once, plus dout read and
dq, dk, dv written for forward+backward), tflops / gbps from the median, speedup_vs_sdpa (the SDPA
benchmark's median from this same session / ours), speedup_vs_sdpa_interleaved (the two run
in a shuffled order each round right after: the ratio to trust on a shared machine), and
peak_memory_bytes: the peak of one untimed call after the timed rounds, above the memory
allocated before it (BenchTools.peak_memory: torch.cuda.max_memory_allocated on CUDA, the CPU
profiler's allocation and free events on CPU), with peak_memory_method saying which.

    pytest benchmarks/test_attention.py --benchmark-only
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tubevit_fast import extension
from tubevit_fast.ops.attention import attention
from tubevit_fast.packing import cu_seqlens_from_lengths


@dataclass(frozen=True)
class Shape:
    layout: str          # "dense" or "varlen"
    lengths: tuple       # one sequence length per sample
    heads: int
    head_dim: int

    @property
    def id(self) -> str:
        if self.layout == "dense":
            return f"dense-B{len(self.lengths)}-N{self.lengths[0]}-H{self.heads}-D{self.head_dim}"
        return f"varlen-{len(self.lengths)}seq-H{self.heads}-D{self.head_dim}"


SHAPES = {
    "cpu": [Shape("dense", (539,), 12, 64), Shape("varlen", (539, 196) * 2, 12, 64)],
    "cuda": [Shape("dense", (539,) * 32, 12, 64), Shape("dense", (539,) * 8, 16, 80),
             Shape("dense", (1176,) * 8, 16, 128), Shape("varlen", (539, 196) * 8, 12, 64)],
}
ROUNDS = {"cpu": (10, 2), "cuda": (50, 10)}                 # (rounds, warmup rounds)
INTERLEAVED_ROUNDS = {"cpu": 10, "cuda": 30}
PASSES = ["forward", "forward+backward"]

_DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
CONFIGS = [(d, torch.float32, shape) for d in _DEVICES if d.type == "cpu" for shape in SHAPES["cpu"]] + \
          [(d, torch.bfloat16, shape) for d in _DEVICES if d.type == "cuda" for shape in SHAPES["cuda"]]
HAVE_FLASH = importlib.util.find_spec("flash_attn") is not None
HAVE_XFORMERS = importlib.util.find_spec("xformers") is not None
BACKENDS = ("torch", "triton", "cuda", "auto")


def impls_for(device: torch.device) -> list[str]:
    """Baseline first: the other impls read its median."""
    if device.type == "cpu":
        return ["sdpa", "torch", "auto"]
    out = ["sdpa", "torch", "triton"]
    if extension.is_available():
        out.append("cuda")
    out.append("auto")
    if HAVE_FLASH:
        out.append("flash_attn")
    if HAVE_XFORMERS:
        out.append("xformers")
    return out


ALL_IMPLS = ["sdpa", "torch", "triton", "cuda", "auto", "flash_attn", "xformers"]


class Problem:
    """Inputs for one (layout, device, dtype): packed tensors for ours, padded ones for SDPA."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(0)
        self.shape, self.layout, self.device, self.dtype = shape, shape.layout, device, dtype
        self.lengths = list(shape.lengths)
        self.heads, self.head_dim = shape.heads, shape.head_dim
        self.batch, self.max_len = len(self.lengths), max(self.lengths)
        layout = self.layout
        total = sum(self.lengths)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device, dtype)

        if layout == "dense":
            # (B, N, H, D): the layout tubevit_fast.attention takes; SDPA gets transposed views.
            self.q, self.k, self.v = (rand(self.batch, self.max_len, self.heads, self.head_dim).requires_grad_()
                                      for _ in range(3))
            self.dout = rand(self.batch, self.max_len, self.heads, self.head_dim)
            self.cu = None
            self.mask = None
        else:
            self.q, self.k, self.v = (rand(total, self.heads, self.head_dim).requires_grad_() for _ in range(3))
            self.dout = rand(total, self.heads, self.head_dim)
            self.cu = cu_seqlens_from_lengths(self.lengths, device)  # as TubeViT.pack builds it
            # Padded copies for SDPA (leaf tensors of their own, so autograd stops at them).
            self.pad_q, self.pad_k, self.pad_v = (self.pad(t.detach()).requires_grad_()
                                                  for t in (self.q, self.k, self.v))
            self.pad_dout = self.pad(self.dout)
            valid = torch.arange(self.max_len, device=device)[None, :] < torch.tensor(self.lengths, device=device)[:, None]
            self.valid = valid                                       # (B, max_len)
            self.mask = valid[:, None, None, :]                      # (B, 1, 1, Nk): keys to keep

    # -- layout helpers --
    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        out = packed.new_zeros(self.batch, self.max_len, *packed.shape[1:])
        start = 0
        for i, n in enumerate(self.lengths):
            out[i, :n] = packed[start:start + n]
            start += n
        return out

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        return padded[self.valid]

    # -- work counts --
    def flops(self, backward: bool) -> int:
        fwd = sum(4 * self.heads * n * n * self.head_dim for n in self.lengths)
        return int(fwd * 3.5) if backward else fwd

    def min_bytes(self, backward: bool) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        tensor = sum(self.lengths) * self.heads * self.head_dim * itemsize
        return tensor * (8 if backward else 4)  # fwd: q k v out; bwd adds dout dq dk dv

    # -- the callables: each returns (out, grads or None) in the packed/dense layout of ours --
    def _sdpa_raw(self, q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=self.mask)
        return out.transpose(1, 2)

    def run(self, impl: str, backward: bool):
        if impl == "sdpa":
            inputs = (self.q, self.k, self.v) if self.layout == "dense" else (self.pad_q, self.pad_k, self.pad_v)
            dout = self.dout if self.layout == "dense" else self.pad_dout
            fn = self._sdpa_raw
        else:
            inputs, dout = (self.q, self.k, self.v), self.dout
            fn = functools.partial(self._ours, impl)
        if not backward:
            with torch.no_grad():
                return fn(*inputs), None
        out = fn(*inputs)
        return out, torch.autograd.grad(out, inputs, dout)

    def _ours(self, impl, q, k, v):
        if impl in BACKENDS:
            return attention(q, k, v, self.cu, self.cu, backend=impl)
        if impl == "flash_attn":
            import flash_attn
            if self.cu is None:
                return flash_attn.flash_attn_func(q, k, v)
            return flash_attn.flash_attn_varlen_func(q, k, v, self.cu, self.cu, self.max_len, self.max_len)
        if impl == "xformers":
            from xformers import ops as xops
            if self.cu is None:
                return xops.memory_efficient_attention(q, k, v)
            bias = xops.fmha.BlockDiagonalMask.from_seqlens(self.lengths)
            return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
        raise ValueError(impl)

    # -- the once-only check against the SDPA baseline --
    def check(self, impl: str, backward: bool) -> None:
        if impl == "sdpa":
            return
        want_out, want_grads = self.run("sdpa", backward)
        got_out, got_grads = self.run(impl, backward)
        if self.layout == "varlen":
            want_out = self.unpad(want_out)
            want_grads = None if want_grads is None else [self.unpad(g) for g in want_grads]
        tol = 2e-4 if self.dtype == torch.float32 else 3e-2
        pairs = [("out", got_out, want_out)]
        if backward:
            pairs += list(zip(("dq", "dk", "dv"), got_grads, want_grads))
        for name, got, want in pairs:
            scale = want.detach().abs().max().item() + 1.0
            err = (got.detach().float() - want.detach().float()).abs().max().item()
            assert err <= tol * scale, f"{impl} {self.layout} {name}: max error {err:.3e} > {tol:.0e} x {scale:.3e}"


@functools.cache
def problem(shape: Shape, device: torch.device, dtype: torch.dtype) -> Problem:
    return Problem(shape, device, dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{d.type}-{_dtype_name(t)}-{s.id}" for d, t, s in CONFIGS])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_attention(benchmark, bench, config, pass_, impl):
    device, dtype, shape = config
    if impl not in impls_for(device):
        pytest.skip(f"{impl} does not run on {device.type} here")
    backward = pass_ != "forward"
    layout = shape.layout
    p = problem(shape, device, dtype)
    p.check(impl, backward)  # once, untimed

    timed = bench.synchronized(lambda: p.run(impl, backward), device)

    rounds, warmup = ROUNDS[device.type]
    described = (f"B={p.batch} N={p.max_len}" if layout == "dense" else f"segments={p.lengths}") + \
        f" H={p.heads} Dh={p.head_dim}"
    benchmark.group = f"attention {shape.id} {pass_} {device.type} {_dtype_name(dtype)}"
    benchmark.extra_info.update(op="attention", impl=impl, layout=layout, pass_=pass_, device=device.type,
                                dtype=_dtype_name(dtype), shape=described, threads=torch.get_num_threads(),
                                baseline_note="sdpa on padded + key-padding mask" if layout == "varlen" else "sdpa")
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = bench.annotate(benchmark, flops=p.flops(backward), min_bytes=p.min_bytes(backward))
    key = ("attention", shape, pass_, device.type, dtype)
    peak, method = bench.peak_memory(lambda: p.run(impl, backward), device, key=key + (impl,))
    benchmark.extra_info.update(peak_memory_bytes=peak, peak_memory_method=method)

    if impl == "sdpa":
        bench.record_baseline(key + ("sdpa",), benchmark)
        return
    if median is None:
        return
    if impl in BACKENDS[:-1]:
        bench.record_dispatch("attention", device, dtype, p.head_dim, layout, pass_, impl, median)
    base = bench.baseline(key + ("sdpa",), lambda: p.run("sdpa", backward), device)
    benchmark.extra_info["speedup_vs_sdpa"] = base / median
    benchmark.extra_info["sdpa_median_s"] = base
    base_peak, _ = bench.peak_memory(lambda: p.run("sdpa", backward), device, key=key + ("sdpa",))
    benchmark.extra_info["sdpa_peak_memory_bytes"] = base_peak
    # Cross-check against load drift on a shared machine: both run in a shuffled order per round.
    mixed = bench.interleaved({"sdpa": lambda: p.run("sdpa", backward), impl: lambda: p.run(impl, backward)},
                              device, rounds=INTERLEAVED_ROUNDS[device.type])
    benchmark.extra_info["interleaved_medians_s"] = mixed
    benchmark.extra_info["speedup_vs_sdpa_interleaved"] = mixed["sdpa"] / mixed[impl]
    tflops = p.flops(backward) / median / 1e12
    gbps = p.min_bytes(backward) / median / 1e9
    note = f"{tflops:.3f} TFLOP/s, {gbps:.1f} GB/s"
    if layout == "varlen":
        note += ", sdpa padded+mask"
    bench.add_row(f"attn {shape.id} {'fwd+bwd' if backward else 'fwd'} [{impl}]", device.type, dtype, median, base, "sdpa", notes=note,
                  peak=peak, baseline_peak=base_peak, interleaved=mixed["sdpa"] / mixed[impl],
                  spread=bench.run_spread(benchmark, key + ("sdpa",)))
