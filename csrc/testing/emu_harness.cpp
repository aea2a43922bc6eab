// CPU emulator for the attention kernels of csrc/attention_kernels.cuh.
//
// The kernel bodies are compiled unchanged as host C++ (TVF_EMULATE): every warp- or
// block-collective instruction goes through sm80_primitives.cuh, whose emulated versions are
// implemented here. A thread block runs as one fiber per thread (ucontext) on one OS thread; warp
// collectives (mma.sync, ldmatrix, shfl) and __syncthreads are barriers between fibers,
// resolved with the operand layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16",
// "ldmatrix"), written here independently of the kernels' use of them.
//
// Checks beyond the results (tests/test_attention_cuda.py compares those with float64):
//   - all 32 lanes of a warp reach the same collective, all threads of the block reach each
//     barrier (a divergent or missing barrier is reported as a deadlock, not a hang);
//   - no thread exits with cp.async copies in flight (uncommitted or never waited for);
//   - ldmatrix / cp.async addresses are aligned and inside the block's dynamic shared memory,
//     cp.async sources inside the input tensors;
//   - three schedules (config key "mode"), each seeded:
//       "deferred"   cp.async copies land only when cp.async.wait_group retires their group, so
//                    reading a stage before waiting for it reads stale (NaN) data;
//       "immediate"  copies land at issue;
//       "greedy"     copies land at issue, and after every block barrier one randomly chosen
//                    warp runs alone until it blocks at the next one (the others then run).
//                    A warp that is a whole barrier interval ahead of the rest is what exposes
//                    a write-after-read race on a cp.async ring: with a missing loop-end
//                    barrier it refills the stage the other warps have not read yet. The other
//                    two schedules keep warps within a collective or so of each other.
//     In every mode the fibers are otherwise run in a random order each round.
//   - shared memory starts as NaN (0xFF bytes), outputs start as NaN, and outputs sit between
//     guard regions that must be untouched afterwards.
//
// Protocol: emu_harness <dir>. <dir>/config.txt holds "key value" lines; tensors are raw
// little-endian files in <dir> (see tests/test_attention_cuda.py). Exit code 0 on success;
// otherwise a message on stderr.
#define TVF_EMULATE 1
#include "../attention_fwd_sm90.cuh"  // and with it attention_kernels.cuh

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "emu_harness: %s\n", msg.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

struct Range {
  const char* begin;
  const char* end;
  std::string name;
};
std::vector<Range> g_inputs;          // readable global memory (for cp.async source checks)
std::vector<Range> g_atomic_targets;  // fp32 buffers that atomic adds may target

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};

void perform(const Copy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, c.bytes);
  } else {
    std::memset(c.dst, 0, c.bytes);
  }
}

// One wgmma of a warpgroup: its shape and operands (A-fragments of all 128 threads, or a
// descriptor), shared by the 128 threads, each of which applies it to its own accumulators.
struct WgmmaOp {
  int n = 0;
  bool a_in_registers = false, trans_b = false, bf16 = false;
  uint32_t a[128][4] = {};
  uint64_t desc_a = 0, desc_b = 0;
};
struct PendingWgmma {
  std::shared_ptr<const WgmmaOp> op;
  float* d;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  int tid = 0;
  bool done = false;
  bool waiting = false;
  std::vector<Copy> uncommitted;
  std::deque<std::vector<Copy>> groups;
  std::vector<PendingWgmma> wgmma_uncommitted;
  std::deque<std::vector<PendingWgmma>> wgmma_groups;
};

struct Barrier {
  int count = 0;
  long generation = 0;
  int kind = -1;  // which collective the current generation is for
};

enum Kind { kBlockSync = 1, kMma, kLdm, kLdmTrans, kShfl, kWgmma };

struct WarpXchg {
  uint32_t a[32][4];
  uint32_t b[32][2];
  const char* addr[32];
  float f[32];
};

struct Block {
  std::vector<Fiber> fibers;
  int nthreads = 0;
  ucontext_t sched;
  int current = 0;
  int idx[3] = {0, 0, 0};
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<WarpXchg> xchg;
  std::vector<Barrier> warpgroup_bar;
  std::vector<WgmmaOp> warpgroup_xchg;                     // operands being gathered
  std::vector<std::shared_ptr<const WgmmaOp>> warpgroup_op;  // the last op gathered
  std::function<void()> body;
  bool deferred = true;  // cp.async lands at wait_group (else at issue); wgmma runs at wait_group (else at issue)
  bool bf16 = false;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  long progress = 0;
};

Block* g_block = nullptr;

Fiber& me() { return g_block->fibers[g_block->current]; }

void yield_to_scheduler() { swapcontext(&me().ctx, &g_block->sched); }

void arrive(Barrier& bar, int expected, int kind) {
  if (bar.count == 0) {
    bar.kind = kind;
  } else if (bar.kind != kind) {
    fail("divergence: thread " + std::to_string(me().tid) + " reached collective kind " + std::to_string(kind) +
         " while others wait at kind " + std::to_string(bar.kind));
  }
  const long gen = bar.generation;
  if (++bar.count == expected) {
    bar.count = 0;
    bar.generation++;
    g_block->progress++;
    return;
  }
  me().waiting = true;
  while (bar.generation == gen) yield_to_scheduler();
  me().waiting = false;
}

int lane() { return me().tid & 31; }
int warp() { return me().tid >> 5; }
void warp_arrive(int kind) { arrive(g_block->warp_bar[warp()], 32, kind); }

void fiber_entry() {
  g_block->body();
  if (!me().wgmma_uncommitted.empty() || !me().wgmma_groups.empty()) {
    fail("thread " + std::to_string(me().tid) + " exits with wgmma products in flight");
  }
  if (!me().uncommitted.empty() || !me().groups.empty()) {
    // They would land after the thread's last instruction, e.g. over an epilogue's staging tile.
    fail("thread " + std::to_string(me().tid) + " exits with cp.async copies in flight (" +
         (me().uncommitted.empty() ? "committed, never waited for" : "never committed") + ")");
  }
  me().done = true;
  g_block->progress++;
  // returning resumes uc_link (the scheduler)
}

bool in_smem(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  return c >= g_block->smem && c + bytes <= g_block->smem + g_block->smem_bytes;
}

enum class Schedule { kDeferred, kImmediate, kGreedy };

Schedule parse_schedule(const std::string& mode) {
  if (mode == "deferred") return Schedule::kDeferred;
  if (mode == "immediate") return Schedule::kImmediate;
  if (mode == "greedy") return Schedule::kGreedy;
  fail("unknown mode " + mode + " (deferred, immediate, greedy)");
}

void run_block(int nthreads, const int idx[3], size_t smem_bytes, Schedule schedule, std::mt19937& rng,
               const std::function<void()>& body) {
  Block blk;
  blk.nthreads = nthreads;
  blk.fibers.resize(nthreads);
  const int nwarps = (nthreads + 31) / 32;
  blk.warp_bar.resize(nwarps);
  blk.xchg.resize(nwarps);
  const int nwarpgroups = (nthreads + 127) / 128;
  blk.warpgroup_bar.resize(nwarpgroups);
  blk.warpgroup_xchg.resize(nwarpgroups);
  blk.warpgroup_op.resize(nwarpgroups);
  for (int a = 0; a < 3; ++a) blk.idx[a] = idx[a];
  blk.body = body;
  blk.deferred = schedule == Schedule::kDeferred;
  std::vector<char> smem(smem_bytes + 16, static_cast<char>(0xFF));  // NaN for fp16/bf16/fp32
  blk.smem = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
  blk.smem_bytes = smem_bytes;
  g_block = &blk;
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = blk.fibers[t];
    f.tid = t;
    f.stack.resize(128 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &blk.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  auto run_fibers = [&](std::vector<int>& order) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      if (blk.fibers[t].done) continue;
      blk.current = t;
      swapcontext(&blk.sched, &blk.fibers[t].ctx);
    }
  };
  std::vector<int> all(nthreads);
  for (int t = 0; t < nthreads; ++t) all[t] = t;
  long greedy_generation = -1;  // the block-barrier generation the current greedy warp was chosen in
  int alive = nthreads;
  while (alive > 0) {
    const long before = blk.progress;
    if (schedule == Schedule::kGreedy && blk.block_bar.generation != greedy_generation) {
      // A new barrier interval: one warp runs alone until it blocks at the next block barrier
      // (its warp collectives always complete: all its lanes are scheduled) or finishes.
      greedy_generation = blk.block_bar.generation;
      const int w = std::uniform_int_distribution<int>(0, nwarps - 1)(rng);
      std::vector<int> lanes;
      for (int t = 32 * w; t < std::min(nthreads, 32 * w + 32); ++t) lanes.push_back(t);
      for (long p = -1; p != blk.progress && blk.block_bar.generation == greedy_generation;) {
        p = blk.progress;
        run_fibers(lanes);
      }
    }
    run_fibers(all);
    alive = 0;
    for (const Fiber& f : blk.fibers) alive += f.done ? 0 : 1;
    if (alive > 0 && blk.progress == before) {
      fail("deadlock: " + std::to_string(alive) + " of " + std::to_string(nthreads) +
           " threads wait at a barrier the others never reach (block " + std::to_string(idx[0]) + "," +
           std::to_string(idx[1]) + "," + std::to_string(idx[2]) + ")");
    }
  }
  g_block = nullptr;
}

template <typename T>
float half_to_float(uint16_t bits) {
  T h;
  std::memcpy(static_cast<void*>(&h), &bits, 2);
  return tvf::to_float<T>(h);
}

float elem(uint32_t reg, int which, bool bf16) {
  const uint16_t bits = static_cast<uint16_t>(which ? reg >> 16 : reg & 0xFFFF);
  return bf16 ? half_to_float<__nv_bfloat16>(bits) : half_to_float<__half>(bits);
}

}  // namespace

// ---- the emulated primitives ------------------------------------------------------------------
namespace tvf {
namespace emu {

int thread_index() { return me().tid; }
int block_index(int axis) { return g_block->idx[axis]; }
void block_sync() { arrive(g_block->block_bar, g_block->nthreads, kBlockSync); }

float shfl_xor(float v, int mask) {
  WarpXchg& x = g_block->xchg[warp()];
  x.f[lane()] = v;
  warp_arrive(kShfl);
  const float r = x.f[lane() ^ mask];
  warp_arrive(kShfl);
  return r;
}

void ldmatrix(uint32_t* r, int matrices, const void* row, bool trans) {
  const int l = lane();
  const bool addressing = l < 8 * matrices;  // .x2: lanes 16-31 supply no address
  if (addressing && !in_smem(row, 16)) fail("ldmatrix: row address outside the block's shared memory");
  if (addressing && reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
  WarpXchg& x = g_block->xchg[warp()];
  x.addr[l] = static_cast<const char*>(row);
  const int kind = (trans ? kLdmTrans : kLdm) + 10 * matrices;  // every lane must issue the same shape
  warp_arrive(kind);
  const int g = l >> 2, t = l & 3;
  for (int i = 0; i < matrices; ++i) {
    // Matrix i's rows come from lanes 8i..8i+7; element (row, col) of it is at row address + 2 col.
    auto at = [&](int mrow, int mcol) {
      uint16_t v;
      std::memcpy(&v, x.addr[8 * i + mrow] + 2 * mcol, 2);
      return static_cast<uint32_t>(v);
    };
    r[i] = trans ? (at(2 * t, g) | (at(2 * t + 1, g) << 16)) : (at(g, 2 * t) | (at(g, 2 * t + 1) << 16));
  }
  warp_arrive(kind);
}

void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  WarpXchg& x = g_block->xchg[warp()];
  const int l = lane();
  for (int i = 0; i < 4; ++i) x.a[l][i] = a[i];
  x.b[l][0] = b0;
  x.b[l][1] = b1;
  warp_arrive(kMma);
  // A (16x16, row): element (row, k) is in lane 4 (row % 8) + (k % 8) / 2, register
  // (row >= 8) + 2 (k >= 8), half k % 2. B (16x8, col): element (k, n) is in lane 4 n + (k % 8) / 2,
  // register (k >= 8), half k % 2. C/D: element e of lane l is (l / 4 + 8 (e / 2), 2 (l % 4) + e % 2).
  auto A = [&](int row, int k) {
    return elem(x.a[4 * (row % 8) + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2, bf16);
  };
  auto B = [&](int k, int n) { return elem(x.b[4 * n + (k % 8) / 2][k >= 8 ? 1 : 0], k % 2, bf16); };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = l / 4 + 8 * (e / 2), col = 2 * (l % 4) + e % 2;
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[e] = acc;
  }
  warp_arrive(kMma);
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ---- wgmma (sm_90a), per the PTX ISA's "Asynchronous Warpgroup Level Matrix" sections ----------

uint32_t smem_offset(const void* p) {
  if (!in_smem(p, 16)) fail("shared-memory descriptor: address outside the block's shared memory");
  return static_cast<uint32_t>(static_cast<const char*>(p) - g_block->smem);
}

// A no-swizzle descriptor's start address, LBO (between core matrices along K) and SBO (along M/N).
struct Descriptor {
  uint32_t start, lbo, sbo;
};

Descriptor decode(uint64_t desc) {
  if ((desc >> 62) != 0) fail("wgmma descriptor: only the no-swizzle layout is emulated");
  if (((desc >> 49) & 7) != 0) fail("wgmma descriptor: base offset must be 0");
  return {static_cast<uint32_t>(desc & 0x3FFF) << 4, static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4};
}

float smem_elem(uint32_t byte_offset, bool bf16) {
  if (byte_offset + 2 > g_block->smem_bytes) fail("wgmma operand outside the block's shared memory");
  uint16_t bits;
  std::memcpy(&bits, g_block->smem + byte_offset, 2);
  return elem(bits, 0, bf16);
}

// K-major operand element (mn, k) of a 16-wide k-slice: core matrix (mn / 8, k / 8), row mn % 8 of
// 16 bytes, element k % 8. N-major (transposed): core matrix (mn / 8, k / 8), row k % 8, element mn % 8.
uint32_t k_major(const Descriptor& d, int mn, int k) {
  return d.start + (mn / 8) * d.sbo + (k / 8) * d.lbo + (mn % 8) * 16 + (k % 8) * 2;
}
uint32_t mn_major(const Descriptor& d, int mn, int k) {
  return d.start + (mn / 8) * d.sbo + (k / 8) * d.lbo + (k % 8) * 16 + (mn % 8) * 2;
}

// This thread's part of d += A (64 x 16) B (16 x n): accumulator register 4 i + e holds row
// 16 (warp % 4) + lane / 4 + 8 (e / 2), column 8 i + 2 (lane % 4) + e % 2.
void apply(const WgmmaOp& op, float* d, int thread_in_group) {
  const int w = thread_in_group / 32, l = thread_in_group % 32;
  const Descriptor da = op.a_in_registers ? Descriptor{} : decode(op.desc_a), db = decode(op.desc_b);
  auto A = [&](int row, int k) {
    if (!op.a_in_registers) return smem_elem(k_major(da, row, k), op.bf16);
    const int r = row % 16, lane_of = 4 * (r % 8) + (k % 8) / 2;  // mma.m16n8k16 A-fragment of warp row / 16
    return elem(op.a[32 * (row / 16) + lane_of][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2, op.bf16);
  };
  auto B = [&](int k, int col) {
    return smem_elem(op.trans_b ? mn_major(db, col, k) : k_major(db, col, k), op.bf16);
  };
  for (int i = 0; i < op.n / 8; ++i) {
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w + l / 4 + 8 * (e / 2), col = 8 * i + 2 * (l % 4) + e % 2;
      float acc = d[4 * i + e];
      for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
      d[4 * i + e] = acc;
    }
  }
}

void wgmma(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, bool trans_b, bool bf16) {
  const int group = me().tid / 128, t = me().tid % 128;
  if (g_block->nthreads < 128 * (group + 1)) fail("wgmma: the block is not made of whole warpgroups");
  WgmmaOp& x = g_block->warpgroup_xchg[group];
  if (a_regs != nullptr) std::memcpy(x.a[t], a_regs, sizeof(x.a[t]));
  if (t == 0) {
    x.n = n;
    x.a_in_registers = a_regs != nullptr;
    x.desc_a = desc_a;
    x.desc_b = desc_b;
    x.trans_b = trans_b;
    x.bf16 = bf16;
  }
  arrive(g_block->warpgroup_bar[group], 128, kWgmma);
  if (x.n != n || x.a_in_registers != (a_regs != nullptr) || x.desc_a != desc_a || x.desc_b != desc_b ||
      x.trans_b != trans_b) {
    fail("wgmma: the threads of a warpgroup issued different products");
  }
  if (t == 0) g_block->warpgroup_op[group] = std::make_shared<const WgmmaOp>(x);
  arrive(g_block->warpgroup_bar[group], 128, kWgmma);
  const PendingWgmma pending{g_block->warpgroup_op[group], d};
  if (g_block->deferred) {
    me().wgmma_uncommitted.push_back(pending);  // runs at wgmma.wait_group
  } else {
    apply(*pending.op, d, t);
  }
}

void wgmma_commit() {
  me().wgmma_groups.push_back(std::move(me().wgmma_uncommitted));
  me().wgmma_uncommitted.clear();
}

void wgmma_wait(int pending) {
  while (static_cast<int>(me().wgmma_groups.size()) > pending) {
    for (const PendingWgmma& w : me().wgmma_groups.front()) apply(*w.op, w.d, me().tid % 128);
    me().wgmma_groups.pop_front();
  }
}

// Fibers switch only at collectives, so a plain add is atomic here; the target must lie inside
// an atomic-accumulation buffer (bounds-checked like every other global access the emulator sees).
void atomic_add(float* gmem, float v) {
  const char* c = reinterpret_cast<const char*>(gmem);
  bool inside = false;
  for (const Range& r : g_atomic_targets) inside = inside || (c >= r.begin && c + sizeof(float) <= r.end);
  if (!inside) fail("atomic add outside every accumulation buffer");
  if (reinterpret_cast<uintptr_t>(gmem) % sizeof(float) != 0) fail("atomic add: misaligned address");
  *gmem += v;
}

void cp_async(void* dst, const void* src, int bytes, bool valid) {
  if (!in_smem(dst, bytes)) fail("cp.async: destination outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0) fail("cp.async: misaligned destination");
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % bytes != 0) fail("cp.async: misaligned source");
    const char* s = static_cast<const char*>(src);
    bool inside = false;
    for (const Range& r : g_inputs) inside = inside || (s >= r.begin && s + bytes <= r.end);
    if (!inside) fail("cp.async: source outside every input tensor");
  }
  const Copy c{dst, src, bytes, valid};
  if (g_block->deferred) {
    me().uncommitted.push_back(c);
  } else {
    perform(c);
  }
}

void cp_async_commit() {
  me().groups.push_back(std::move(me().uncommitted));
  me().uncommitted.clear();
}

void cp_async_wait(int pending) {
  while (static_cast<int>(me().groups.size()) > pending) {
    for (const Copy& c : me().groups.front()) perform(c);
    me().groups.pop_front();
  }
}

}  // namespace emu
}  // namespace tvf

// ---- driver -------------------------------------------------------------------------------------
namespace {

std::map<std::string, std::string> g_config;

std::string cfg(const std::string& key) {
  auto it = g_config.find(key);
  if (it == g_config.end()) fail("config: missing key " + key);
  return it->second;
}
long long cfg_i(const std::string& key) { return std::stoll(cfg(key)); }

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot read " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const char* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(data, static_cast<std::streamsize>(bytes));
  if (!f) fail("cannot write " + path);
}

constexpr size_t kGuard = 256;

// An output buffer with NaN poison inside and guard bytes around it.
struct Output {
  std::vector<char> mem;
  size_t bytes = 0;
  char* data() { return mem.data() + kGuard; }
  void init(size_t n) {
    bytes = n;
    mem.assign(n + 2 * kGuard + 16, static_cast<char>(0xFF));
    for (size_t i = 0; i < kGuard; ++i) mem[i] = mem[kGuard + n + i] = static_cast<char>(0xA5);
  }
  void check(const std::string& name) {
    for (size_t i = 0; i < kGuard; ++i) {
      if (mem[i] != static_cast<char>(0xA5) || mem[kGuard + bytes + i] != static_cast<char>(0xA5)) {
        fail("write outside output tensor " + name);
      }
    }
  }
};

struct Input {
  std::vector<char> storage;
  int64_t offset = 0;  // elements
  tvf::RowLayout layout{};
};

void aligned_copy(std::vector<char>& raw, std::vector<char>& dst) {
  // 16-byte aligned storage (std::vector<char> only guarantees malloc alignment, which is 16 on
  // x86-64 glibc; keep it explicit).
  dst.assign(raw.size() + 16, 0);
  std::memcpy(dst.data(), raw.data(), raw.size());
}

Input load_input(const std::string& dir, const std::string& name, int elem_bytes) {
  Input in;
  std::vector<char> raw = read_file(dir + "/" + name + ".bin");
  aligned_copy(raw, in.storage);
  if (reinterpret_cast<uintptr_t>(in.storage.data()) % 16 != 0) fail("storage not 16-byte aligned");
  in.offset = cfg_i(name + ".offset");
  std::istringstream s(cfg(name + ".strides"));
  s >> in.layout.batch_stride >> in.layout.row_stride >> in.layout.head_stride;
  g_inputs.push_back({in.storage.data(), in.storage.data() + raw.size(), name});
  (void)elem_bytes;
  return in;
}

template <typename T, int D>
void run(const std::string& dir) {
  const bool bwd = cfg("pass") == "bwd";
  const bool varlen = cfg_i("varlen") != 0;
  const int batch = static_cast<int>(cfg_i("batch")), heads = static_cast<int>(cfg_i("heads"));
  const int64_t rows_q = cfg_i("rows_q"), rows_k = cfg_i("rows_k");  // total rows (dense: B * N)
  const Schedule schedule = parse_schedule(cfg("mode"));
  std::mt19937 rng(static_cast<unsigned>(cfg_i("seed")));

  tvf::AttentionParams p{};
  Input q = load_input(dir, "q", 2), k = load_input(dir, "k", 2), v = load_input(dir, "v", 2);
  p.q = reinterpret_cast<const T*>(q.storage.data()) + q.offset;
  p.k = reinterpret_cast<const T*>(k.storage.data()) + k.offset;
  p.v = reinterpret_cast<const T*>(v.storage.data()) + v.offset;
  p.q_layout = q.layout;
  p.k_layout = k.layout;
  p.v_layout = v.layout;
  std::vector<char> cu_q_raw, cu_k_raw;
  if (varlen) {
    cu_q_raw = read_file(dir + "/cu_q.bin");
    cu_k_raw = read_file(dir + "/cu_k.bin");
    p.cu_seqlens_q = reinterpret_cast<const int*>(cu_q_raw.data());
    p.cu_seqlens_k = reinterpret_cast<const int*>(cu_k_raw.data());
  }
  p.batch = batch;
  p.heads = heads;
  p.head_dim = D;
  p.max_seqlen_q = static_cast<int>(cfg_i("max_q"));
  p.max_seqlen_k = static_cast<int>(cfg_i("max_k"));
  p.softmax_scale = std::stof(cfg("scale"));
  p.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  p.is_bf16 = tvf::IsBf16<T>::value;
  // Outputs: contiguous, like bindings.cpp allocates them.
  auto contiguous = [&](int64_t rows_per_batch) {
    return varlen ? tvf::RowLayout{0, int64_t(heads) * D, D}
                  : tvf::RowLayout{rows_per_batch * heads * D, int64_t(heads) * D, D};
  };
  const int64_t nq = varlen ? 0 : rows_q / batch, nk = varlen ? 0 : rows_k / batch;
  p.lse_batch_stride = varlen ? 0 : int64_t(heads) * nq;
  p.lse_head_stride = varlen ? rows_q : nq;
  const size_t q_bytes = size_t(rows_q) * heads * D * sizeof(T), k_bytes = size_t(rows_k) * heads * D * sizeof(T);
  const size_t lse_bytes = size_t(rows_q) * heads * sizeof(float);

  auto grid_run = [&](tvf::Grid3 g, int threads, size_t smem, auto body) {
    for (int z = 0; z < g.z; ++z)
      for (int y = 0; y < g.y; ++y)
        for (int x = 0; x < g.x; ++x) {
          const int idx[3] = {x, y, z};
          run_block(threads, idx, smem, schedule, rng, [&] { body(); });
        }
  };

  if (!bwd) {
    Output o, lse;
    o.init(q_bytes);
    lse.init(lse_bytes);
    p.o = o.data();
    p.o_layout = contiguous(nq);
    p.lse = reinterpret_cast<float*>(lse.data());
    if (cfg("forward") == "wgmma") {
      using Cfg = tvf::FwdSm90Config<D>;
      grid_run(tvf::grid_over_q(p, Cfg::BM), Cfg::THREADS, Cfg::smem_bytes,
               [&] { tvf::attention_fwd_sm90_body<T, D>(p, g_block->smem); });
    } else if (cfg("forward") == "mma") {
      using Cfg = tvf::FwdConfig<D>;
      grid_run(tvf::grid_over_q(p, Cfg::BM), Cfg::THREADS, Cfg::smem_bytes,
               [&] { tvf::attention_fwd_body<T, D>(p, g_block->smem); });
    } else {
      fail("forward must be mma or wgmma, got " + cfg("forward"));
    }
    o.check("out");
    lse.check("lse");
    write_file(dir + "/out_o.bin", o.data(), o.bytes);
    write_file(dir + "/out_lse.bin", lse.data(), lse.bytes);
    return;
  }
  Input dout = load_input(dir, "dout", 2), out = load_input(dir, "o", 2);
  std::vector<char> lse_raw = read_file(dir + "/lse.bin"), lse_store;
  aligned_copy(lse_raw, lse_store);
  g_inputs.push_back({lse_store.data(), lse_store.data() + lse_raw.size(), "lse"});
  p.dout = reinterpret_cast<const T*>(dout.storage.data()) + dout.offset;
  p.do_layout = dout.layout;
  p.o = const_cast<T*>(reinterpret_cast<const T*>(out.storage.data()) + out.offset);
  p.o_layout = out.layout;
  p.lse = reinterpret_cast<float*>(lse_store.data());
  Output delta, dq, dk, dv;
  delta.init(lse_bytes);
  dq.init(q_bytes);
  dk.init(k_bytes);
  dv.init(k_bytes);
  p.delta = reinterpret_cast<float*>(delta.data());
  g_inputs.push_back({delta.data(), delta.data() + lse_bytes, "delta"});
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.dq_layout = contiguous(nq);
  p.dk_layout = contiguous(nk);
  p.dv_layout = contiguous(nk);
  grid_run(tvf::grid_over_q(p, tvf::kPreprocessRows), tvf::kPreprocessRows, 0,
           [&] { tvf::attention_bwd_preprocess_body<T, D>(p); });
  using Dkdv = tvf::DkdvConfig<D>;
  Output dq_accum;  // the 5-product backward's fp32 dQ, zeroed as bindings.cpp does
  if (cfg("backward") == "atomic") {
    dq_accum.init(size_t(rows_q) * heads * D * sizeof(float));
    std::memset(dq_accum.data(), 0, dq_accum.bytes);
    p.dq_accum = reinterpret_cast<float*>(dq_accum.data());
    p.dq_accum_layout = contiguous(nq);
    g_atomic_targets.push_back({dq_accum.data(), dq_accum.data() + dq_accum.bytes, "dq_accum"});
    grid_run(tvf::grid_over_k(p, Dkdv::BN), Dkdv::THREADS, Dkdv::smem_bytes,
             [&] { tvf::attention_bwd_dkdv_body<T, D, true>(p, g_block->smem); });
    grid_run(tvf::grid_over_q(p, tvf::kPreprocessRows), tvf::kPreprocessRows, 0,
             [&] { tvf::attention_bwd_dq_convert_body<T, D>(p); });
    dq_accum.check("dq_accum");
  } else if (cfg("backward") == "deterministic") {
    grid_run(tvf::grid_over_q(p, tvf::DqConfig<D>::BM), tvf::DqConfig<D>::THREADS, tvf::DqConfig<D>::smem_bytes,
             [&] { tvf::attention_bwd_dq_body<T, D>(p, g_block->smem); });
    grid_run(tvf::grid_over_k(p, Dkdv::BN), Dkdv::THREADS, Dkdv::smem_bytes,
             [&] { tvf::attention_bwd_dkdv_body<T, D, false>(p, g_block->smem); });
  } else {
    fail("backward must be deterministic or atomic, got " + cfg("backward"));
  }
  delta.check("delta");
  dq.check("dq");
  dk.check("dk");
  dv.check("dv");
  write_file(dir + "/out_delta.bin", delta.data(), delta.bytes);
  write_file(dir + "/out_dq.bin", dq.data(), dq.bytes);
  write_file(dir + "/out_dk.bin", dk.data(), dk.bytes);
  write_file(dir + "/out_dv.bin", dv.data(), dv.bytes);
}

template <typename T>
void run_dtype(int d, const std::string& dir) {
  switch (d) {
    case 64: return run<T, 64>(dir);
    case 80: return run<T, 80>(dir);
    case 96: return run<T, 96>(dir);
    case 128: return run<T, 128>(dir);
    default: fail("unsupported head dim " + std::to_string(d));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) fail("usage: emu_harness <dir>");
  const std::string dir = argv[1];
  std::ifstream f(dir + "/config.txt");
  if (!f) fail("cannot read config.txt");
  std::string key, value;
  while (f >> key && std::getline(f >> std::ws, value)) g_config[key] = value;
  const int d = static_cast<int>(cfg_i("head_dim"));
  if (cfg("dtype") == "bf16") {
    run_dtype<__nv_bfloat16>(d, dir);
  } else {
    run_dtype<__half>(d, dir);
  }
  return 0;
}
