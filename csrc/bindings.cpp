// tubevit_fast._C: registers the CUDA attention kernels as PyTorch operators.
//
//   tubevit_fast_C::attention_fwd(q, k, v, cu_seqlens_q?, cu_seqlens_k?, max_seqlen_q,
//                                 max_seqlen_k, softmax_scale, wgmma=False) -> (out, lse)
//       wgmma=True: the Hopper (sm_90a, wgmma) forward; opt-in, compute capability 9.0 only
//   tubevit_fast_C::attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q?, cu_seqlens_k?,
//                                 max_seqlen_q, max_seqlen_k, softmax_scale,
//                                 deterministic=True) -> (dq, dk, dv)
//       deterministic=False: the 5-product backward (dQ accumulated in fp32 with atomics)
//   tubevit_fast_C::compiled_head_dims() -> int[]
//   tubevit_fast_C::kernel_configs() -> str        (JSON: tile sizes, threads, shared memory)
//   tubevit_fast_C::build_info() -> str            (JSON: arch list, head dims, CUDA version)
//
// Namespace: the Python package defines its own custom ops in namespace "tubevit_fast" with
// torch.library.custom_op. These low-level kernels live in their own namespace,
// "tubevit_fast_C", with one TORCH_LIBRARY block: no second owner of "tubevit_fast" whatever
// the import order (tests/test_attention_cuda.py checks both orders). Fake (meta) kernels are
// registered from Python (tubevit_fast/extension.py).
//
// The module has no Python functions: importing it runs the static registrations below. No
// pybind11 and no torch/extension.h, to keep the build short.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention_params.h"

namespace {

using at::Tensor;
using tvf::AttentionParams;

// Calls f(std::integral_constant<int, D>{}) for the head dim d if this build compiled it (setup.py
// defines TVF_HDIM_<D> for each built one), and returns its result; nullopt for any other d.
template <typename F>
auto with_head_dim(int d, F&& f) -> std::optional<decltype(f(std::integral_constant<int, 64>{}))> {
  switch (d) {
#ifdef TVF_HDIM_64
    case 64: return f(std::integral_constant<int, 64>{});
#endif
#ifdef TVF_HDIM_80
    case 80: return f(std::integral_constant<int, 80>{});
#endif
#ifdef TVF_HDIM_96
    case 96: return f(std::integral_constant<int, 96>{});
#endif
#ifdef TVF_HDIM_128
    case 128: return f(std::integral_constant<int, 128>{});
#endif
    default: return std::nullopt;
  }
}

std::vector<int64_t> compiled_head_dims() {
  std::vector<int64_t> dims;
  for (int d : {64, 80, 96, 128}) {
    if (with_head_dim(d, [](auto) { return 0; })) dims.push_back(d);
  }
  return dims;
}

constexpr const char* kKernelHeadDims = "64, 80, 96, 128";

std::string join(const std::vector<int64_t>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  return os.str();
}

// The Hopper kernel exists as machine code for sm_90a only (elsewhere it is a trap).
void check_wgmma_device(const char* name, const Tensor& q) {
  int major = 0, minor = 0;
  const int dev = q.device().index();
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess,
              name, ": cannot read the compute capability of device ", dev);
  TORCH_CHECK(major == 9 && minor == 0, name, ": the wgmma forward (TUBEVIT_FAST_CUDA_WGMMA=1) runs on compute "
              "capability 9.0 (H100/H200) only, got ", major, ".", minor);
}

// The kernels read rows with 16-byte vector copies: unit stride along the head dim, other
// strides multiples of 8 elements, 16-byte aligned base. Anything else is copied first.
Tensor vector_ready(const Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; ok && i + 1 < t.dim(); ++i) ok = t.size(i) <= 1 || t.stride(i) % 8 == 0;
  return ok ? t : t.contiguous();
}

tvf::RowLayout row_layout(const Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

struct Problem {
  bool varlen;
  int batch, heads, head_dim, seqlen_q, seqlen_k;  // seqlen: dense lengths or varlen maxima
};

// Validates q/k/v (+ cu_seqlens) for op `name` and returns the problem's sizes.
Problem check_qkv(const char* name, const Tensor& q, const Tensor& k, const Tensor& v,
                  const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k, int64_t max_q,
                  int64_t max_k) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt != at::kFloat && dt != at::kDouble, name, ": ", (dt == at::kFloat ? "float32" : "float64"),
              " inputs are not supported by the CUDA kernels (fp16/bf16 tensor-core kernels only); "
              "cast q, k, v to float16 or bfloat16, or use backend='triton' or 'torch' for fp32");
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, name, ": q must be float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, name, ": q, k, v must share a dtype, got ", dt,
              ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), name,
              ": pass both cu_seqlens_q and cu_seqlens_k (packed varlen) or neither (dense)");
  Problem pr{};
  pr.varlen = cu_q.has_value();
  if (!pr.varlen) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, name,
                ": dense layout needs q (B, Nq, H, D) and k, v (B, Nk, H, D), got q ", q.sizes(), ", k ",
                k.sizes(), ", v ", v.sizes());
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), name,
                ": k ", k.sizes(), " does not match q ", q.sizes(), " in batch, heads or head dim");
    TORCH_CHECK(v.sizes() == k.sizes(), name, ": v ", v.sizes(), " must have k's shape ", k.sizes());
    pr.batch = static_cast<int>(q.size(0));
    pr.seqlen_q = static_cast<int>(q.size(1));
    pr.seqlen_k = static_cast<int>(k.size(1));
    pr.heads = static_cast<int>(q.size(2));
    pr.head_dim = static_cast<int>(q.size(3));
    TORCH_CHECK(q.size(1) <= std::numeric_limits<int>::max() && k.size(1) <= std::numeric_limits<int>::max(),
                name, ": sequence too long");
  } else {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, name,
                ": packed varlen layout needs q (total_q, H, D) and k, v (total_k, H, D), got q ", q.sizes(),
                ", k ", k.sizes(), ", v ", v.sizes());
    TORCH_CHECK(k.size(1) == q.size(1) && k.size(2) == q.size(2), name, ": k ", k.sizes(),
                " does not match q ", q.sizes(), " in heads or head dim");
    TORCH_CHECK(v.sizes() == k.sizes(), name, ": v ", v.sizes(), " must have k's shape ", k.sizes());
    for (const Tensor* c : {&*cu_q, &*cu_k}) {
      TORCH_CHECK(c->scalar_type() == at::kInt, name, ": cu_seqlens must be int32, got ", c->scalar_type());
      TORCH_CHECK(c->dim() == 1 && c->numel() >= 1, name, ": cu_seqlens must be 1-D with batch + 1 entries, got ",
                  c->sizes());
    }
    TORCH_CHECK(cu_q->numel() == cu_k->numel(), name, ": cu_seqlens_q and cu_seqlens_k lengths differ (",
                cu_q->numel(), " vs ", cu_k->numel(), ")");
    TORCH_CHECK(max_q >= 0 && max_k >= 0 && max_q <= std::numeric_limits<int>::max() &&
                    max_k <= std::numeric_limits<int>::max(),
                name, ": max_seqlen_q/k must be in [0, 2^31), got ", max_q, ", ", max_k);
    TORCH_CHECK(q.size(0) < std::numeric_limits<int>::max() && k.size(0) < std::numeric_limits<int>::max(), name,
                ": too many packed rows");
    pr.batch = static_cast<int>(cu_q->numel() - 1);
    pr.seqlen_q = static_cast<int>(max_q);
    pr.seqlen_k = static_cast<int>(max_k);
    pr.heads = static_cast<int>(q.size(1));
    pr.head_dim = static_cast<int>(q.size(2));
  }
  const auto dims = compiled_head_dims();
  bool have = false;
  for (auto d : dims) have = have || d == pr.head_dim;
  TORCH_CHECK(have, name, ": head dim ", pr.head_dim, " is not supported by this build of the CUDA kernels (built: ",
              join(dims), "; the kernels support ", kKernelHeadDims,
              ", set TUBEVIT_FAST_CUDA_HEADDIMS when building to choose)");
  TORCH_CHECK(pr.heads <= 65535 && pr.batch <= 65535, name, ": at most 65535 heads and 65535 sequences, got ",
              pr.heads, " and ", pr.batch);
  return pr;
}

// Devices are checked after dtypes and shapes, so those errors read the same for CPU tensors.
void check_devices(const char* name, std::initializer_list<const Tensor*> tensors,
                   const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k) {
  const Tensor& first = **tensors.begin();
  for (const Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda(), name, ": expected CUDA tensors, got a ", t->device().type(),
                " tensor; the CUDA extension has no CPU kernels (use backend='torch', or "
                "backend='triton' with TRITON_INTERPRET=1, for CPU tensors)");
    TORCH_CHECK(t->device() == first.device(), name, ": all tensors must be on one device, got ", first.device(),
                " and ", t->device());
  }
  for (const auto* c : {&cu_q, &cu_k}) {
    TORCH_CHECK(!c->has_value() || (*c)->device() == first.device(), name, ": cu_seqlens must be on ",
                first.device(), ", got ", (*c)->device());
  }
}

AttentionParams base_params(const Problem& pr, const Tensor& q, const Tensor& k, const Tensor& v,
                            const std::optional<Tensor>& cu_q, const std::optional<Tensor>& cu_k,
                            double softmax_scale) {
  TORCH_CHECK(std::isfinite(softmax_scale), "softmax_scale must be finite, got ", softmax_scale);
  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cu_seqlens_q = pr.varlen ? cu_q->data_ptr<int>() : nullptr;
  p.cu_seqlens_k = pr.varlen ? cu_k->data_ptr<int>() : nullptr;
  p.q_layout = row_layout(q, pr.varlen);
  p.k_layout = row_layout(k, pr.varlen);
  p.v_layout = row_layout(v, pr.varlen);
  p.batch = pr.batch;
  p.heads = pr.heads;
  p.head_dim = pr.head_dim;
  p.max_seqlen_q = pr.seqlen_q;
  p.max_seqlen_k = pr.seqlen_k;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  return p;
}

std::vector<int64_t> lse_shape(const Problem& pr, const Tensor& q) {
  if (pr.varlen) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(2), q.size(1)};
}

void set_lse_strides(AttentionParams& p, const Problem& pr, const Tensor& lse) {
  p.lse_batch_stride = pr.varlen ? 0 : lse.stride(0);
  p.lse_head_stride = pr.varlen ? lse.stride(0) : lse.stride(1);
}

#ifndef TVF_ARCH_LIST
#define TVF_ARCH_LIST "unknown"
#endif

void check_launch(const char* name, int err) {
  const auto e = static_cast<cudaError_t>(err);
  TORCH_CHECK(e != cudaErrorNoKernelImageForDevice && e != cudaErrorUnsupportedPtxVersion, name,
              ": this GPU cannot run the kernels of this build (", cudaGetErrorString(e),
              "); it holds TORCH_CUDA_ARCH_LIST=" TVF_ARCH_LIST
              " and the kernels need compute capability 8.0 or newer; `python -m tubevit_fast.info` "
              "shows what the binary holds");
  TORCH_CHECK(err == 0, name, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         const std::optional<Tensor>& cu_q_in, const std::optional<Tensor>& cu_k_in,
                                         int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                         bool wgmma) {
  const char* name = "tubevit_fast_C::attention_fwd";
  const Problem pr = check_qkv(name, q_in, k_in, v_in, cu_q_in, cu_k_in, max_seqlen_q, max_seqlen_k);
  check_devices(name, {&q_in, &k_in, &v_in}, cu_q_in, cu_k_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  if (wgmma) check_wgmma_device(name, q_in);
  const Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  std::optional<Tensor> cu_q, cu_k;
  if (pr.varlen) {
    cu_q = cu_q_in->contiguous();
    cu_k = cu_k_in->contiguous();
  }
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty(lse_shape(pr, q), q.options().dtype(at::kFloat));
  if (q.numel() == 0 || pr.batch == 0 || pr.seqlen_q == 0) return {out, lse};

  AttentionParams p = base_params(pr, q, k, v, cu_q, cu_k, softmax_scale);
  p.o = out.data_ptr();
  p.o_layout = row_layout(out, pr.varlen);
  p.lse = lse.data_ptr<float>();
  set_lse_strides(p, pr, lse);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(name, *with_head_dim(pr.head_dim, [&](auto d) {
    constexpr int D = decltype(d)::value;
    return wgmma ? tvf::launch_attention_fwd_sm90<D>(p, stream) : tvf::launch_attention_fwd<D>(p, stream);
  }));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                 const std::optional<Tensor>& cu_q_in,
                                                 const std::optional<Tensor>& cu_k_in, int64_t max_seqlen_q,
                                                 int64_t max_seqlen_k, double softmax_scale, bool deterministic) {
  const char* name = "tubevit_fast_C::attention_bwd";
  const Problem pr = check_qkv(name, q_in, k_in, v_in, cu_q_in, cu_k_in, max_seqlen_q, max_seqlen_k);
  for (const Tensor* t : {&dout_in, &out_in}) {
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type(), name, ": dout and out must have q's dtype ",
                q_in.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->sizes() == q_in.sizes(), name, ": dout and out must have q's shape ", q_in.sizes(), ", got ",
                t->sizes());
  }
  const auto want_lse = lse_shape(pr, q_in);
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, name, ": lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(want_lse), name, ": lse must have shape ", at::IntArrayRef(want_lse),
              ", got ", lse_in.sizes());
  check_devices(name, {&q_in, &k_in, &v_in, &dout_in, &out_in, &lse_in}, cu_q_in, cu_k_in);

  c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = vector_ready(q_in), k = vector_ready(k_in), v = vector_ready(v_in);
  const Tensor dout = vector_ready(dout_in), out = vector_ready(out_in), lse = lse_in.contiguous();
  std::optional<Tensor> cu_q, cu_k;
  if (pr.varlen) {
    cu_q = cu_q_in->contiguous();
    cu_k = cu_k_in->contiguous();
  }
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  if (pr.batch == 0 || (q.numel() == 0 && k.numel() == 0)) return {dq, dk, dv};
  Tensor delta = at::empty(lse.sizes(), lse.options());

  AttentionParams p = base_params(pr, q, k, v, cu_q, cu_k, softmax_scale);
  p.o = const_cast<void*>(out.data_ptr());
  p.o_layout = row_layout(out, pr.varlen);
  p.dout = dout.data_ptr();
  p.do_layout = row_layout(dout, pr.varlen);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  set_lse_strides(p, pr, lse);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_layout = row_layout(dq, pr.varlen);
  p.dk_layout = row_layout(dk, pr.varlen);
  p.dv_layout = row_layout(dv, pr.varlen);
  Tensor dq_accum;  // kept alive until the launches are queued; the caching allocator orders its reuse
  if (!deterministic) {
    dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    p.dq_accum = dq_accum.data_ptr<float>();
    p.dq_accum_layout = row_layout(dq_accum, pr.varlen);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(name, *with_head_dim(pr.head_dim, [&](auto d) {
    return tvf::launch_attention_bwd<decltype(d)::value>(p, stream);
  }));
  return {dq, dk, dv};
}

template <template <int> class Cfg, int D>
void config_json(std::ostringstream& os, const char* kernel, bool& first) {
  os << (first ? "" : ",") << "{\"kernel\":\"" << kernel << "\",\"head_dim\":" << D
     << ",\"threads\":" << Cfg<D>::THREADS << ",\"block_m\":" << Cfg<D>::BM << ",\"block_n\":" << Cfg<D>::BN
     << ",\"stages\":" << Cfg<D>::STAGES << ",\"shared_bytes\":" << Cfg<D>::smem_bytes << "}";
  first = false;
}

template <int D>
void configs_for(std::ostringstream& os, bool& first) {
  config_json<tvf::FwdConfig, D>(os, "attention_fwd_kernel", first);
  config_json<tvf::FwdSm90Config, D>(os, "attention_fwd_sm90_kernel", first);
  config_json<tvf::DqConfig, D>(os, "attention_bwd_dq_kernel", first);
  config_json<tvf::DkdvConfig, D>(os, "attention_bwd_dkdv_kernel", first);
  config_json<tvf::DkdvConfig, D>(os, "attention_bwd_dkdv_dqatomic_kernel", first);
  for (const char* kernel : {"attention_bwd_preprocess_kernel", "attention_bwd_dq_convert_kernel"}) {
    os << ",{\"kernel\":\"" << kernel << "\",\"head_dim\":" << D << ",\"threads\":" << tvf::kPreprocessRows
       << ",\"block_m\":" << tvf::kPreprocessRows << ",\"block_n\":0,\"stages\":0,\"shared_bytes\":0}";
  }
}

// JSON list describing every compiled kernel instance (dtype aside): for the audit.
std::string kernel_configs() {
  std::ostringstream os;
  bool first = true;
  os << "[";
  for (int d : compiled_head_dims()) {
    with_head_dim(static_cast<int>(d), [&](auto dim) {
      configs_for<decltype(dim)::value>(os, first);
      return 0;
    });
  }
  os << "]";
  return os.str();
}

// JSON: what this binary was built for (python -m tubevit_fast.info prints it).
std::string build_info() {
  std::ostringstream os;
  os << "{\"arch_list\":\"" TVF_ARCH_LIST "\",\"head_dims\":[" << join(compiled_head_dims())
     << "],\"cuda_runtime_version\":" << CUDART_VERSION << "}";
  return os.str();
}

}  // namespace

TORCH_LIBRARY(tubevit_fast_C, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool wgmma=False) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float softmax_scale, bool deterministic=True) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("compiled_head_dims() -> int[]", &compiled_head_dims);
  m.def("kernel_configs() -> str", &kernel_configs);
  m.def("build_info() -> str", &build_info);
}

// CUDA: the kernels. CPU: the same entry points, whose checks reject CPU tensors with a clear
// message (instead of the dispatcher's "could not run ... with arguments from the CPU backend").
TORCH_LIBRARY_IMPL(tubevit_fast_C, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

TORCH_LIBRARY_IMPL(tubevit_fast_C, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

// A Python module with no functions: importing tubevit_fast._C loads the operators.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "tubevit_fast CUDA attention operators", -1, nullptr};
  return PyModule_Create(&module);
}
