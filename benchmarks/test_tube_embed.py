"""Tube embedding benchmarks on the paper configuration: PAPER_TUBES, 3x32x224x224, dim 768.

Configurations (device, dtype, batch): CPU fp32 B=2; on CUDA bf16 B=32 (the issue-13 headline:
forward <= 1.5x the cuBLAS floor), bf16 B=2 and fp32 B=2.

Cases, each for the forward pass (no_grad) and for forward+backward (weight and bias
gradients; the video needs no gradient):
  reference  Conv3d per tube on the offset slice + flatten + transpose + cat + pos add
             (tubevit_fast.reference.tube_embed), backward through autograd
  floor      the GEMMs alone on patches gathered beforehand (A_i @ W_i^T, and dY_i^T A_i for
             the weight gradient): what is left if gathering, bias, position and layout were free.
             Same GEMM library as the torch backend (torch_backend.gemm.linear: oneDNN for fp32
             on CPU, which runs these shapes about 2x faster than torch.mm's MKL sgemm here;
             cuBLAS on CUDA), so ours/floor measures our overhead, not a library difference
  compiled_reference  torch.compile of the reference (Inductor), compiled before timing
  torch      the "torch" backend through the public op (tubevit_fast.ops.tube_embed, autograd)
  triton     the fused Triton kernels through the public op (CUDA only)
  auto       what a user gets (backend "auto"); on CUDA the torch and triton medians also give
             this GPU's row of tubevit_fast.backends.MEASURED_ORDER (printed at the end of the run)

Before timing, every case is checked once against the reference output (and gradients), so a
broken implementation cannot look fast. Nothing asserts on time.

Peak memory, every case: peak_memory_bytes of one untimed call after the timed rounds, above
what was allocated before it (inputs and weights not counted; temporaries freed inside the call
are), and peak_memory_method saying how it was measured (BenchTools.peak_memory: CUDA allocator
counters, or the CPU profiler's allocation events). The summary row shows ours / reference MiB.

Ratios (extra_info of the torch and triton cases, and the summary table), all from this session:
  speedup_vs_reference  the reference benchmark's median / ours (each run back to back)
  ratio_to_floor        ours / the floor benchmark's median
  *_interleaved         the same from a short extra loop after the torch benchmark that runs the
                        three in a random order each round: on a shared machine whose load
                        changes between benchmarks, these are the ratios to trust
  ratio_to_floor_cold_cache  ours / floor, both timed right after evicting the caches (a 256 MB
                        read, untimed): the floor's warm rounds keep patches and weights in cache,
                        which a call inside a model does not find

uint8 pixels (test_tube_embed_pixels, issue 21): TubeEmbed's forward from a uint8 clip (the
normalisation folded into the projection) against today's float input plus its normalisation
pass, interleaved; CPU fp32 B=2, and on CUDA bf16 B=32 and fp32 B=2 (see the section below).

    pytest benchmarks/test_tube_embed.py --benchmark-only
    pytest benchmarks/test_tube_embed.py --benchmark-only -k pixels    # the uint8 rows alone
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from tubevit_fast.geometry import PAPER_TUBES, token_offsets
from tubevit_fast.ops.tube_embed import tube_embed
from tubevit_fast.posembed import tube_position_embedding
from tubevit_fast.reference.tube_embed import tube_embed_reference
from tubevit_fast.torch_backend.gemm import linear
from tubevit_fast.torch_backend.tube_embed import patches

TUBES = PAPER_TUBES
CHANNELS, SIZE, DIM = 3, (32, 224, 224), 768
ROUNDS = {"cpu": (30, 3), "cuda": (50, 10)}  # (rounds, warmup rounds)
INTERLEAVED_ROUNDS = {"cpu": 15, "cuda": 30}

CONFIGS = [(torch.device("cpu"), torch.float32, 2)]
if torch.cuda.is_available():
    CONFIGS += [(torch.device("cuda"), torch.bfloat16, 32), (torch.device("cuda"), torch.bfloat16, 2),
                (torch.device("cuda"), torch.float32, 2)]
PASSES = ["forward", "forward+backward"]
BASELINES = ["reference", "compiled_reference", "floor"]
FAST = ["torch", "triton", "auto"]
IMPLS = BASELINES + FAST  # baselines first: the fast cases reuse their medians


class Problem:
    """Inputs, pre-gathered floor operands and the reference results for one (device, dtype)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, batch: int):
        gen = torch.Generator().manual_seed(0)
        self.device, self.dtype, self.batch = device, dtype, batch
        self.starts = token_offsets(TUBES, SIZE)
        self.video = torch.randn(batch, CHANNELS, *SIZE, generator=gen).to(device, dtype)
        scales = [math.sqrt(t.patch_size(CHANNELS)) for t in TUBES]
        self.weights = [(torch.randn(DIM, CHANNELS, *t.kernel, generator=gen) / scale).to(device, dtype)
                        .requires_grad_() for t, scale in zip(TUBES, scales)]
        self.biases = [(0.02 * torch.randn(DIM, generator=gen)).to(device, dtype).requires_grad_()
                       for _ in TUBES]
        self.pos = tube_position_embedding(TUBES, SIZE, DIM, device=device)
        self.grad = torch.randn(batch, self.starts[-1], DIM, generator=gen).to(device, dtype)
        # Floor operands: patches and flattened output gradients, prepared outside the timing.
        self.a = [patches(self.video, t).reshape(-1, t.patch_size(CHANNELS)) for t in TUBES]
        self.w = [w.detach().reshape(DIM, -1) for w in self.weights]
        self.dy = [self.grad[:, s:e].reshape(-1, DIM).contiguous()
                   for s, e in zip(self.starts, self.starts[1:])]
        self.params = self.weights + self.biases
        out = tube_embed_reference(self.video, self.weights, self.biases, TUBES, self.pos)
        self.ref_out = out.detach()
        self.ref_grads = torch.autograd.grad(out, self.params, self.grad)

    # -- the timed callables --
    def reference_forward(self):
        with torch.no_grad():
            return tube_embed_reference(self.video, self.weights, self.biases, TUBES, self.pos)

    def reference_forward_backward(self):
        out = tube_embed_reference(self.video, self.weights, self.biases, TUBES, self.pos)
        return out, torch.autograd.grad(out, self.params, self.grad)

    @functools.cached_property
    def _compiled(self):
        return torch.compile(tube_embed_reference, dynamic=False)

    def compiled_reference_forward(self):
        with torch.no_grad():
            return self._compiled(self.video, self.weights, self.biases, TUBES, self.pos)

    def compiled_reference_forward_backward(self):
        out = self._compiled(self.video, self.weights, self.biases, TUBES, self.pos)
        return out, torch.autograd.grad(out, self.params, self.grad)

    def _fast_forward(self, backend):
        with torch.no_grad():
            return tube_embed(self.video, self.weights, self.biases, TUBES, self.pos, backend=backend)

    def _fast_forward_backward(self, backend):
        out = tube_embed(self.video, self.weights, self.biases, TUBES, self.pos, backend=backend)
        return out, torch.autograd.grad(out, self.params, self.grad)

    def torch_forward(self):
        return self._fast_forward("torch")

    def torch_forward_backward(self):
        return self._fast_forward_backward("torch")

    def triton_forward(self):
        return self._fast_forward("triton")

    def triton_forward_backward(self):
        return self._fast_forward_backward("triton")

    def auto_forward(self):
        return self._fast_forward("auto")

    def auto_forward_backward(self):
        return self._fast_forward_backward("auto")

    def floor_forward(self):
        return [linear(a, w) for a, w in zip(self.a, self.w)]

    def floor_forward_backward(self):
        return self.floor_forward(), [linear(dy.t(), a.t()) for dy, a in zip(self.dy, self.a)]

    # -- the once-only correctness checks --
    def _close(self, name, got, want):
        tol = 1e-4 if self.dtype == torch.float32 else 3e-2
        scale = want.detach().abs().max().item() + 1.0
        err = (got.detach().float() - want.detach().float()).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3e} exceeds {tol:.0e} x scale {scale:.3e}"

    def check(self, impl: str, pass_: str) -> None:
        if impl == "reference":
            return
        if impl == "floor":
            fwd = self.floor_forward() if pass_ == "forward" else self.floor_forward_backward()[0]
            tokens = [y.view(self.batch, -1, DIM) + b.detach() for y, b in zip(fwd, self.biases)]
            self._close("floor output", torch.cat(tokens, 1) + self.pos.to(self.dtype), self.ref_out)
            if pass_ != "forward":
                dws = self.floor_forward_backward()[1]
                for i, dw in enumerate(dws):
                    self._close(f"floor dW[{i}]", dw.view(self.weights[i].shape), self.ref_grads[i])
            return
        if pass_ == "forward":
            self._close("output", getattr(self, f"{impl}_forward")(), self.ref_out)
        else:
            out, grads = getattr(self, f"{impl}_forward_backward")()
            self._close("output", out, self.ref_out)
            for i, (g, r) in enumerate(zip(grads, self.ref_grads)):
                self._close(f"grad {i}", g, r)


@functools.cache
def problem(device: torch.device, dtype: torch.dtype, batch: int) -> Problem:
    return Problem(device, dtype, batch)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("config", CONFIGS, ids=[f"{d.type}-{_dtype_name(t)}-B{b}" for d, t, b in CONFIGS])
@pytest.mark.parametrize("pass_,impl", [(p, i) for p in PASSES for i in IMPLS],
                         ids=[f"{p}-{i}" for p in PASSES for i in IMPLS])
def test_tube_embed(benchmark, bench, config, pass_, impl):
    device, dtype, batch = config
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton kernels are benchmarked on a GPU (on CPU they only run interpreted)")
    p = problem(device, dtype, batch)
    p.check(impl, pass_)  # once, outside the timed part (compiles the compiled_reference too)

    fn = getattr(p, f"{impl}_{pass_.replace('+', '_')}")

    timed = bench.synchronized(fn, device)

    rounds, warmup = ROUNDS[device.type]
    benchmark.group = f"tube_embed {pass_} {device.type} {_dtype_name(dtype)} B={batch}"
    benchmark.extra_info.update(op="tube_embed", impl=impl, pass_=pass_, device=device.type,
                                dtype=_dtype_name(dtype), batch=batch, shape=f"B={batch} C={CHANNELS} {SIZE} dim={DIM}",
                                threads=torch.get_num_threads())
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)

    backward = pass_ != "forward"
    itemsize = torch.empty((), dtype=dtype).element_size()
    flops = bench.flops(TUBES, SIZE, batch, CHANNELS, DIM, weight_grad=backward)
    median = bench.annotate(
        benchmark, flops=flops,
        min_bytes=bench.min_bytes(TUBES, SIZE, batch, CHANNELS, DIM, itemsize, pos=True, weight_grad=backward))

    name = pass_.replace("+", "_")
    key = ("tube_embed", pass_, device.type, dtype, batch)
    peak, method = bench.peak_memory(fn, device, key=key + (impl,))
    benchmark.extra_info.update(peak_memory_bytes=peak, peak_memory_method=method)
    if impl not in FAST:
        bench.record_baseline(key + (impl,), benchmark)
        return
    if median is None:  # --benchmark-disable: correctness only
        return
    if impl != "auto":
        bench.record_dispatch("tube_embed", device, dtype, None, None, pass_, impl, median)
    # Headline ratios: our median against the reference's and the floor's own benchmarks, all
    # run back to back in this session (timed here if those were deselected).
    ref = bench.baseline(key + ("reference",), getattr(p, f"reference_{name}"), device)
    floor = bench.baseline(key + ("floor",), getattr(p, f"floor_{name}"), device)
    compiled = bench.baseline(key + ("compiled_reference",), getattr(p, f"compiled_reference_{name}"), device)
    ref_peak, _ = bench.peak_memory(getattr(p, f"reference_{name}"), device, key=key + ("reference",))
    benchmark.extra_info["reference_peak_memory_bytes"] = ref_peak
    benchmark.extra_info["speedup_vs_reference"] = ref / median
    benchmark.extra_info["speedup_vs_compiled_reference"] = compiled / median
    benchmark.extra_info["reference_median_s"] = ref
    benchmark.extra_info["ratio_to_floor"] = median / floor
    benchmark.extra_info["floor_median_s"] = floor
    benchmark.extra_info["floor_tflops"] = flops / floor / 1e12
    # Cross-check that load changes between the benchmarks cannot fake: the three interleaved,
    # in a random order each round (so each one as often follows each of the others).
    mixed = bench.interleaved({impl_: getattr(p, f"{impl_}_{name}") for impl_ in ("reference", "floor", impl)},
                              device, rounds=INTERLEAVED_ROUNDS[device.type])
    benchmark.extra_info["interleaved_medians_s"] = mixed
    benchmark.extra_info["speedup_vs_reference_interleaved"] = mixed["reference"] / mixed[impl]
    benchmark.extra_info["ratio_to_floor_interleaved"] = mixed[impl] / mixed["floor"]
    # The floor's GEMMs run back to back on warm patches and weights (14.7 MB of weights stay in
    # cache between its rounds); a real call finds them cold after the video streamed through.
    # Both again with the caches evicted before every call (outside the timing).
    cold = {impl_: bench.median_seconds(getattr(p, f"{impl_}_{name}"), device, rounds=INTERLEAVED_ROUNDS[device.type],
                                        before=lambda: bench.evict_caches(device))
            for impl_ in ("floor", impl)}
    benchmark.extra_info["cold_cache_medians_s"] = cold
    benchmark.extra_info["ratio_to_floor_cold_cache"] = cold[impl] / cold["floor"]
    bench.add_row(f"tube_embed {'fwd+bwd' if backward else 'fwd'} B={batch} [{impl}]", device.type, dtype, median,
                  ref, "reference", floor=floor, peak=peak, baseline_peak=ref_peak,
                  interleaved=mixed["reference"] / mixed[impl], spread=bench.run_spread(benchmark, key + ("reference",)),
                  notes=f"{flops / median / 1e12:.3g} TFLOP/s (floor {flops / floor / 1e12:.3g}); "
                        f"x floor interleaved {mixed[impl] / mixed['floor']:.2f}, cold caches {cold[impl] / cold['floor']:.2f}; "
                        f"{compiled / median:.2f}x vs compiled ref")


# ---- uint8 pixels: the normalisation folded into the projection (issue 21) ------------------
#
# TubeEmbed (the fast layer, backend "auto") on the paper setting, forward only (no_grad):
#   uint8            the decoder's pixels straight in: the normalisation is folded into the tube
#                    kernels and biases (tubevit_fast.pixels), the op reads uint8
#   float+normalize  today's path: the uint8 clip converted and normalised in one pass over the
#                    whole video ((x / 255 - mean) / std, float), then the float forward
# Interleaved (a random order each round, with the float forward alone as a third reference), the
# summary row gives float+normalize / uint8 (> 1: the uint8 path is faster). Bytes handed to the
# layer per clip: uint8 is a quarter of float32's.
PIXEL_CONFIGS = [(torch.device("cpu"), torch.float32, 2)]
if torch.cuda.is_available():
    PIXEL_CONFIGS += [(torch.device("cuda"), torch.bfloat16, 32), (torch.device("cuda"), torch.float32, 2)]
PIXEL_IMPLS = ["uint8", "float+normalize"]


class PixelProblem:
    def __init__(self, device: torch.device, dtype: torch.dtype, batch: int):
        from tubevit_fast import TubeEmbed

        gen = torch.Generator().manual_seed(1)
        torch.manual_seed(1)
        self.layer = TubeEmbed(TUBES, CHANNELS, DIM).to(device, dtype)
        self.pixels = torch.randint(0, 256, (batch, CHANNELS, *SIZE), generator=gen, dtype=torch.uint8).to(device)
        self.normalised = self.normalize()

    def normalize(self) -> torch.Tensor:
        shape = (1, CHANNELS, 1, 1, 1)
        mean, std = self.layer.pixel_mean.view(shape), self.layer.pixel_std.view(shape)
        return ((self.pixels.to(self.layer.pixel_mean.dtype) / 255 - mean) / std).to(self.normalised_dtype)

    @property
    def normalised_dtype(self) -> torch.dtype:
        return self.layer.biases[0].dtype

    def uint8(self):
        with torch.no_grad():
            return self.layer(self.pixels)

    def float_normalize(self):
        with torch.no_grad():
            return self.layer(self.normalize())

    def float_only(self):
        with torch.no_grad():
            return self.layer(self.normalised)

    def check(self) -> None:
        """Both paths give the same tokens (to the dtype's precision) before anything is timed."""
        got, want = self.uint8().float(), self.float_only().float()
        tol = 1e-4 if self.normalised_dtype == torch.float32 else 5e-2
        err = (got - want).abs().max().item()
        assert err <= tol * (want.abs().max().item() + 1.0), f"uint8 path off by {err:.3e}"


@functools.cache
def pixel_problem(device: torch.device, dtype: torch.dtype, batch: int) -> PixelProblem:
    return PixelProblem(device, dtype, batch)


@pytest.mark.parametrize("config", PIXEL_CONFIGS, ids=[f"{d.type}-{_dtype_name(t)}-B{b}" for d, t, b in PIXEL_CONFIGS])
@pytest.mark.parametrize("impl", PIXEL_IMPLS)
def test_tube_embed_pixels(benchmark, bench, config, impl):
    device, dtype, batch = config
    p = pixel_problem(device, dtype, batch)
    p.check()
    fn = {"uint8": p.uint8, "float+normalize": p.float_normalize}[impl]

    timed = bench.synchronized(fn, device)

    rounds, warmup = ROUNDS[device.type]
    benchmark.group = f"tube_embed pixels fwd {device.type} {_dtype_name(dtype)} B={batch}"
    benchmark.extra_info.update(op="tube_embed_pixels", impl=impl, pass_="forward", device=device.type,
                                dtype=_dtype_name(dtype), batch=batch, backend=p.layer.backend,
                                shape=f"B={batch} C={CHANNELS} {SIZE} dim={DIM}", threads=torch.get_num_threads(),
                                input_bytes=(p.pixels if impl == "uint8" else p.normalised).nbytes)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = bench.median_of(benchmark)
    key = ("tube_embed_pixels", device.type, dtype, batch)
    if impl != "uint8":
        bench.record_baseline(key + (impl,), benchmark)
        return
    if median is None:  # --benchmark-disable: correctness only
        return
    baseline = bench.baseline(key + ("float+normalize",), p.float_normalize, device)
    mixed = bench.interleaved({"uint8": p.uint8, "float+normalize": p.float_normalize, "float": p.float_only},
                              device, rounds=INTERLEAVED_ROUNDS[device.type])
    benchmark.extra_info["interleaved_medians_s"] = mixed
    benchmark.extra_info["speedup_vs_float_normalize_interleaved"] = mixed["float+normalize"] / mixed["uint8"]
    benchmark.extra_info["ratio_to_float_only_interleaved"] = mixed["uint8"] / mixed["float"]
    bench.add_row(f"tube_embed fwd B={batch} [uint8 in]", device.type, dtype, median, baseline, "float+normalize",
                  interleaved=mixed["float+normalize"] / mixed["uint8"],
                  spread=bench.run_spread(benchmark, key + ("float+normalize",)),
                  notes=f"interleaved ms: uint8 {mixed['uint8'] * 1e3:.1f}, float+normalize "
                        f"{mixed['float+normalize'] * 1e3:.1f}, float alone {mixed['float'] * 1e3:.1f}; "
                        f"input {p.pixels.nbytes / 2**20:.0f} vs {p.normalised.nbytes / 2**20:.0f} MiB")
