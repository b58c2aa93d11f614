// W4A16 GEMV for CUDA: y = x @ W^T (+ bias) for 1 to 4 rows of bf16/fp16 x (decode), W int4 in
// the layout of plugins/quant/schemes/wna16.py: int32 [N, K/8], the code of input k in bits
// (k % 8) * 4 of word k / 8, scales and zeros [N, G] in x's dtype (w = (q - zero) * scale), an
// optional perm [K] (act order sorted at load time: stored input i is input perm[i]).
//
// The Triton GEMV (plugins/quant/triton/wna16_gemv.py) is its twin and the fallback where this
// does not build. What differs is the memory side: each lane streams whole 16-byte loads (32
// codes) that skip L1, a warp covers R rows at once, and the next batch of loads is issued before
// the current one is multiplied, so every SM keeps enough bytes in flight.
//
// A block first converts x to fp16 in shared memory, scaled by one power of two per 32 inputs so
// that the largest |x| lies in [128, 256): a load's 16 fp16 products per lane half (|q - zero| <=
// 15) sum to less than 65504, and small inputs keep their precision. The pairs are stored as
// (x[k + i], x[k + 4 + i]), the order in which a LOP3 takes a word apart: OR-ing the nibbles at
// bits 0 and 16 into the fp16 pair 0x6400 (1024) gives (1024 + q_i, 1024 + q_(i+4)); the nibbles
// at bits 4 and 20 give 1024 + 16 q, which one FMA by 1/16 brings to 64 + q; a shift by 8 gives
// the other four codes. Subtracting 1024 + zero (resp. 64 + zero) leaves q - zero exactly. A
// load's products add up in one fp16x2 register, which goes to fp32 with the group's scale.
//
// The op before the linear may come fused (the prologue): a block then stages weight * x, or
// weight * (x + residual), and multiplies each row's dot products by the norm's 1 / rms, whose
// sum of squares it gathers while staging (one pass over x); the grid writes x + residual to
// residual_out after its work. Or it stages silu(x[:, :K]) * x[:, K:]. Each op is rounded to x's
// dtype as the unfused kernels round it. Staging stores nothing to global memory, so all of a
// thread's loads of x can be in flight together.
//
// The op after the linear may come fused too (the epilogue): silu_and_mul writes
// silu(z[:, :N/2]) * z[:, N/2:] of z = x @ W^T (+ bias), [M, N/2]. A warp then takes a gate row
// p and its up row p + N/2 (R = 2) and rounds as the unfused ops do: z to x's dtype, silu,
// the product. Computed once per output, where the next linear's prologue would compute it in
// every block (for the down projection of Llama-3-8B, 14336 exponentials in each of 256 blocks).
//
// With pdl the kernel is launched as a programmatic dependent (sm_90+): it may start while the
// kernel before it in the stream finishes, issues its first weight loads (weights never depend
// on an earlier kernel), and waits (griddepcontrol.wait) before it reads x or writes anything.
// It lets the kernel after it start early the same way.
//
// The grid holds at most blocks_per_sm blocks per SM, each looping over row tiles, so x is
// converted once per block; the launch depends only on shapes (safe in a CUDA graph).
// prefetch_steps > 0 also asks L2 for later batches (bulk prefetches); on the H200 that slowed
// every Llama-3-8B linear (run 32), so the default is 0. Operands are checked in Python
// (native/wna16_gemv.py) before the call: a failing check in here ended the process on the H200's
// image rather than raising (run 29).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 32;  // inputs per 16-byte load: 4 words of 8 codes

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ half2 bits_to_half2(uint32_t v) {
  half2 h;
  *reinterpret_cast<uint32_t*>(&h) = v;
  return h;
}

// (w & mask) | 0x64006400 in one instruction.
template <uint32_t kMask>
__device__ __forceinline__ half2 nibbles_plus_1024(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(w), "n"(kMask), "n"(0x64006400));
  return bits_to_half2(r);
}

// The word's 8 codes minus the zero, as (q_i - z, q_(i+4) - z) for i = 0..3.
__device__ __forceinline__ void codes_minus_zero(uint32_t w, half2 minus_1024_zero,
                                                 half2 minus_64_zero, half2 q[4]) {
  const half2 sixteenth = __float2half2_rn(0.0625f);
  q[0] = __hadd2(nibbles_plus_1024<0x000f000fu>(w), minus_1024_zero);
  q[1] = __hfma2(nibbles_plus_1024<0x00f000f0u>(w), sixteenth, minus_64_zero);
  q[2] = __hadd2(nibbles_plus_1024<0x000f000fu>(w >> 8), minus_1024_zero);
  q[3] = __hfma2(nibbles_plus_1024<0x00f000f0u>(w >> 8), sixteenth, minus_64_zero);
}

struct Shape {
  int N, K, G;
  int chunks;         // K / 32: 16-byte loads per row of W
  int group_chunks;   // loads per group (the group size / 32; K / 32 for one group)
  int group_shift;    // log2(group_chunks) when a power of two, else -1
  int lane_batches;   // batches of U loads a lane makes per row
  int tiles;          // row tiles of kWarps * R rows (gated: of kWarps row pairs)
  int gated;          // the silu_and_mul epilogue (R = 2: rows p and p + N / 2 per warp)
  int row_step;       // between a warp's rows: 1, or N / 2 when gated
  int prefetch;       // steps whose weights are asked into L2 ahead of their loads
  int steps;          // tensor-core path: 128-input steps per row (K / 128) ...
  int tile_batches;   // ... and batches of kMmaSteps steps a warp makes per tile
  int flags;          // kSumByLastBlocks
  int64_t stride_xm;
};

// Shape::flags, the variants a measurement can switch on (LOOM_NATIVE_GEMV_FLAGS).
enum Flags : int {
  // write_sum in the grid's last blocks (the fewest tiles), not its first: no change in the
  // decode graph (runs 68 and 73), so off by default.
  kSumByLastBlocks = 1,
};

enum PrologueKind : int { kPlain = 0, kRmsNorm = 1, kSiluAndMul = 2 };

template <typename T>
struct Prologue {
  int kind = kPlain;
  const T* residual = nullptr;  // rms_norm: contiguous [M, K], added to x first ...
  T* residual_out = nullptr;    // ... and the sum written here, contiguous [M, K]
  const T* weight = nullptr;    // rms_norm: the norm's weight [K]
  float eps = 0.f;
};

// ---- Tracing (benchmarks/gemv_trace.py), built only with -DLOOM_GEMV_TRACE ----
// Thread 0 of every block of the lanes' path writes one record: the %globaltimer (ns) at the
// block's start, after griddepcontrol.wait, after x is staged, after its tiles and at its end.
// The block's state lives in shared memory, so the kernel holds no registers for it.
#ifdef LOOM_GEMV_TRACE
struct TraceRecord {
  unsigned long long start, waited, staged, looped, done;
  int n, k, block, sm;
  unsigned long long unused;  // 64 bytes a record
};
__device__ TraceRecord* g_trace = nullptr;
__device__ unsigned int g_trace_capacity = 0;  // 0: not recording
__device__ unsigned int g_trace_count = 0;

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

struct BlockTrace {
  unsigned long long ns[4];
  bool on;
  __device__ void begin() {
    if (threadIdx.x != 0) return;
    on = g_trace_capacity != 0;
    if (on) ns[0] = global_ns();
  }
  __device__ void mark(int i) {  // thread 0's own `on`, or after a barrier
    if (threadIdx.x == 0 && on) ns[i] = global_ns();
  }
  __device__ void tiles_done() {  // after the staging barrier: `on` is the block's
    if (!on) return;
    __syncthreads();
    mark(3);
  }
  __device__ void finish(int n, int k) {
    if (threadIdx.x != 0 || !on) return;
    TraceRecord rec;
    rec.start = ns[0];
    rec.waited = ns[1];
    rec.staged = ns[2];
    rec.looped = ns[3];
    rec.done = global_ns();
    rec.n = n;
    rec.k = k;
    rec.block = blockIdx.x;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(rec.sm));
    rec.unused = 0;
    const unsigned int i = atomicAdd(&g_trace_count, 1u);
    if (i < g_trace_capacity) g_trace[i] = rec;
  }
};
#else
struct BlockTrace {
  __device__ void begin() {}
  __device__ void mark(int) {}
  __device__ void tiles_done() {}
  __device__ void finish(int, int) {}
};
#endif

template <typename T, int R, int U>
struct Batch {
  uint4 w[R][U];
  T scale[R][U];
  T zero[R][U];
};

template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// silu(gate) * up of two values of T, each op rounded to T as the unfused kernels round.
template <typename T>
__device__ __forceinline__ float silu_mul(float gate, float up) {
  const float silu = round_to<T>(gate * __frcp_rn(1.f + __expf(-gate)));
  return round_to<T>(silu * up);
}

// The row of W that slot r (< R) of this warp takes in `tile`: R consecutive rows, or with the
// epilogue the warp's pair p: gate row p (r = 0), up row p + N / 2 (r = 1). May pass N.
template <int R>
__device__ __forceinline__ int w_row(const Shape& s, int tile, int r) {
  const int warp = threadIdx.x / 32;
  const int first = s.gated ? tile * kWarps + warp : (tile * kWarps + warp) * R;
  return first + r * s.row_step;
}

// x is staged in pieces of 8 inputs: one 16-byte load of each source, one word of a chunk in
// shared memory. Threads take pieces kThreads apart, and each issues the loads of its next piece
// before it converts the current one (staging stores nothing to global memory), so one load
// latency is exposed however many pieces a thread takes. The code that runs once per launch is
// kept short: a kernel starts with a cold instruction cache, and on the H200 a longer staging
// path (eight pieces unrolled, run 68) took 2-3 times as long.
constexpr int kPiece = 8;

// The 8 values row[e], e = perm[8q + i] or 8q + i, one at a time (act order, or rows not 16-byte
// aligned); out of line, so the aligned path's code stays short.
template <typename T>
__device__ __noinline__ uint4 gather_piece(const T* __restrict__ row, const int* __restrict__ perm,
                                           int q) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kPiece; ++i)
    e[i] = row[perm != nullptr ? perm[q * kPiece + i] : q * kPiece + i];
  return raw;
}

// The 8 values of piece q of a row as they are stored.
template <typename T>
__device__ __forceinline__ uint4 load_piece(const T* __restrict__ row, const int* __restrict__ perm,
                                            int q, bool aligned) {
  if (perm == nullptr && aligned) return *reinterpret_cast<const uint4*>(row + q * kPiece);
  return gather_piece(row, perm, q);
}

template <typename T>
__device__ __forceinline__ float element(const uint4& raw, int i) {
  return to_float(reinterpret_cast<const T*>(&raw)[i]);
}

// What a piece of the linear's input is made from: x, and residual (rms_norm, optional) or up
// (silu_and_mul, x being the gate), and the norm's weight.
struct PieceSources {
  uint4 x, other, weight;
};

template <typename T, int kKind>
__device__ __forceinline__ void load_sources(const T* __restrict__ x, const int* __restrict__ perm,
                                             const Shape& s, const Prologue<T>& p, bool aligned,
                                             int m, int q, PieceSources& out) {
  const T* row = x + m * s.stride_xm;
  out.x = load_piece(row, perm, q, aligned);
  if (kKind == kSiluAndMul) out.other = load_piece(row + s.K, perm, q, aligned);
  if (kKind == kRmsNorm) {
    if (p.residual != nullptr)
      out.other = load_piece(p.residual + static_cast<int64_t>(m) * s.K, perm, q, aligned);
    out.weight = load_piece(p.weight, perm, q, aligned);
  }
}

// The piece's 8 inputs of the linear, before the norm's 1 / rms: x, w * (x + residual) with
// sq += (x + residual)^2, or silu(gate) * up; each op rounded to T as the unfused kernels round.
template <typename T, int kKind>
__device__ __forceinline__ void piece_inputs(const PieceSources& in, const Prologue<T>& p,
                                             float v[kPiece], float& sq) {
#pragma unroll
  for (int i = 0; i < kPiece; ++i) {
    const float a = element<T>(in.x, i);
    if (kKind == kPlain) {
      v[i] = a;
    } else if (kKind == kSiluAndMul) {
      v[i] = silu_mul<T>(a, element<T>(in.other, i));
    } else {
      const float h = p.residual != nullptr ? round_to<T>(a + element<T>(in.other, i)) : a;
      sq = fmaf(h, h, sq);
      v[i] = round_to<T>(element<T>(in.weight, i) * h);
    }
  }
}

template <int M>
struct NormPartials {
  float sq[kWarps][M];  // each warp's sum of squares per row (rms_norm)
};

// 2^e and 2^-e of the power of two e that brings the largest |x| of an exponent's pieces into
// [128, 256) (clamped to [-100, 100]; 0 for 0, inf or nan), from the float's bits.
__device__ __forceinline__ void staging_scale(float top, float& up, float& down) {
  const int biased = (__float_as_int(top) >> 23) & 0xff;  // top >= 0
  int e = 0;
  if (top > 0.f && biased != 0xff) e = biased == 0 ? 100 : min(max(134 - biased, -100), 100);
  up = __int_as_float((127 + e) << 23);
  down = __int_as_float((127 - e) << 23);
}

// stage_x for one prologue kind: piece idx of the M rows (row idx / per_row) for
// idx = threadIdx.x, + kThreads, ...; every thread runs the same number of iterations (the
// exponent's largest |x| goes round by shuffles).
template <typename T, int M, int kExpChunks, int kKind>
__device__ __forceinline__ void stage_pieces(const T* __restrict__ x, const int* __restrict__ perm,
                                             const Shape& s, const Prologue<T>& p, bool aligned,
                                             uint4* pairs, float* inv, float sq[M]) {
  const int per_row = s.chunks * 4;
  const int total = M * per_row;
  auto row_of = [&](int idx) { return M == 1 ? 0 : idx / per_row; };
  PieceSources now, next;
  int idx = threadIdx.x;
  if (idx < total)
    load_sources<T, kKind>(x, perm, s, p, aligned, row_of(idx), idx - row_of(idx) * per_row, now);
#pragma unroll 1
  for (int base = 0; base < total; base += kThreads, idx += kThreads) {
    const int ahead = idx + kThreads;
    if (ahead < total)
      load_sources<T, kKind>(x, perm, s, p, aligned, row_of(ahead),
                             ahead - row_of(ahead) * per_row, next);
    const bool in = idx < total;
    const int m = in ? row_of(idx) : 0, q = in ? idx - m * per_row : 0;
    float v[kPiece], t = 0.f, top = 0.f;
    if (in) {
      piece_inputs<T, kKind>(now, p, v, t);
#pragma unroll
      for (int mm = 0; mm < M; ++mm)
        if (mm == m) sq[mm] += t;
#pragma unroll
      for (int i = 0; i < kPiece; ++i) top = fmaxf(top, fabsf(v[i]));
    }
    // The lanes of one exponent's pieces are consecutive (4 pieces a chunk).
#pragma unroll
    for (int o = 1; o < 4 * kExpChunks; o *= 2)
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, o));
    if (in) {
      float up, down;
      staging_scale(top, up, down);
      const int u = q / 4, word = q % 4;
      if (word == 0) inv[m * s.chunks + u] = down;
      uint4 slot;
      uint32_t* h = reinterpret_cast<uint32_t*>(&slot);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        half2 pr = __floats2half2_rn(v[i] * up, v[4 + i] * up);
        h[i] = *reinterpret_cast<uint32_t*>(&pr);
      }
      pairs[(m * 4 + word) * s.chunks + u] = slot;
    }
    now = next;
  }
}

// Converts the M rows of the linear's input into shared memory: pairs[m][word j][chunk u] holds
// the 4 fp16x2 pairs (x[k + i], x[k + 4 + i]) * 2^s of inputs k = 32u + 8j .. +8, inv[m][u] the
// 2^-s, one s for every kExpChunks chunks (the largest |x| of them goes round by shuffles, so all
// threads run the same number of iterations). With rms_norm, the inputs staged are
// w * (x + residual) and each warp's sums of squares go to `partials`: the norm's 1 / rms
// multiplies the dot products instead (row_scales).
template <typename T, int M, int kExpChunks = 1>
__device__ void stage_x(const T* __restrict__ x, const int* __restrict__ perm, const Shape& s,
                        const Prologue<T>& p, bool aligned, uint4* pairs, float* inv,
                        NormPartials<M>& partials) {
  float sq[M];
#pragma unroll
  for (int m = 0; m < M; ++m) sq[m] = 0.f;
  if (p.kind == kRmsNorm) {
    stage_pieces<T, M, kExpChunks, kRmsNorm>(x, perm, s, p, aligned, pairs, inv, sq);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float t = sq[m];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (threadIdx.x % 32 == 0) partials.sq[threadIdx.x / 32][m] = t;
    }
  } else if (p.kind == kSiluAndMul) {
    stage_pieces<T, M, kExpChunks, kSiluAndMul>(x, perm, s, p, aligned, pairs, inv, sq);
  } else {
    stage_pieces<T, M, kExpChunks, kPlain>(x, perm, s, p, aligned, pairs, inv, sq);
  }
}

// What each row's dot products are multiplied by: rms_norm's 1 / sqrt(mean(h^2) + eps), else 1
// (after the __syncthreads that follows stage_x).
template <typename T, int M>
__device__ __forceinline__ void row_scales(const Prologue<T>& p, const Shape& s,
                                           const NormPartials<M>& partials, float scale[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    scale[m] = 1.f;
    if (p.kind == kRmsNorm) {
      float t = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) t += partials.sq[w][m];
      scale[m] = rsqrtf(t / s.K + p.eps);
    }
  }
}

// rms_norm with a residual: x + residual to residual_out, 8 inputs per thread over the whole grid,
// after the block's own work (only the kernels after this one read it).
template <typename T, int M>
__device__ void write_sum(const T* __restrict__ x, const Shape& s, const Prologue<T>& p,
                          bool aligned) {
  if (p.kind != kRmsNorm || p.residual == nullptr) return;
  const int pieces = s.K / 8;
  // The grid's first blocks hold the most tiles; its last ones are idle sooner.
  const int block = s.flags & kSumByLastBlocks ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  for (int idx = block * kThreads + threadIdx.x; idx < M * pieces;
       idx += gridDim.x * kThreads) {
    const int m = idx / pieces, k = (idx - m * pieces) * 8;
    const T* xr = x + m * s.stride_xm + k;
    const T* rr = p.residual + static_cast<int64_t>(m) * s.K + k;
    T* out = p.residual_out + static_cast<int64_t>(m) * s.K + k;
    if (aligned) {
      const uint4 a = *reinterpret_cast<const uint4*>(xr), b = *reinterpret_cast<const uint4*>(rr);
      uint4 o;
      const T* ae = reinterpret_cast<const T*>(&a);
      const T* be = reinterpret_cast<const T*>(&b);
      T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int i = 0; i < 8; ++i) oe[i] = from_float<T>(to_float(ae[i]) + to_float(be[i]));
      *reinterpret_cast<uint4*>(out) = o;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
    }
  }
}

// Issues the loads of batch b (U loads per lane and row) of a warp's R rows in a tile; lanes past
// the end of a row load its last chunk again, which multiply_batch weighs by zero. Offsets are
// 32-bit (the wrapper checks that W has fewer than 2^31 chunks), so each address is one multiply-add
// on the base pointer.
template <typename T, int R, int U>
__device__ __forceinline__ void load_batch(const uint4* __restrict__ w, const T* __restrict__ scales,
                                           const T* __restrict__ zeros, const Shape& s, int tile,
                                           int b, Batch<T, R, U>& out) {
  const int lane = threadIdx.x % 32;
  int u[U], g[U];
#pragma unroll
  for (int j = 0; j < U; ++j) {
    u[j] = min((b * U + j) * 32 + lane, s.chunks - 1);
    g[j] = s.group_shift >= 0 ? (u[j] >> s.group_shift) : u[j] / s.group_chunks;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(w_row<R>(s, tile, r), s.N - 1);
    const int w_first = row * s.chunks, g_first = row * s.G;
#pragma unroll
    for (int j = 0; j < U; ++j) {
      out.w[r][j] = load_streaming(w + (w_first + u[j]));
      out.scale[r][j] = scales[g_first + g[j]];
      out.zero[r][j] = zeros[g_first + g[j]];
    }
  }
}

// Asks L2 for batch b of the warp's rows in a tile (no registers held: the loads that follow hit
// L2). Sm_90 takes each row's U * 512 contiguous bytes in one bulk prefetch; older GPUs a line at
// a time.
template <int R, int U>
__device__ __forceinline__ void prefetch_batch(const uint4* __restrict__ w, const Shape& s, int tile,
                                               int b) {
  if (tile >= s.tiles) return;
  const int lane = threadIdx.x % 32;
  const int first = b * U * 32;
  const int count = min(U * 32, s.chunks - first);
#if __CUDA_ARCH__ >= 900
  if (lane < R && w_row<R>(s, tile, lane) < s.N) {
    const uint4* p = w + static_cast<int64_t>(w_row<R>(s, tile, lane)) * s.chunks + first;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(count * 16) : "memory");
  }
#else
  constexpr int kLines = U * 4;  // 128-byte lines per row
  for (int line = lane; line < R * kLines; line += 32) {
    const int row = min(w_row<R>(s, tile, line / kLines), s.N - 1);
    const int u = first + min((line % kLines) * 8, count - 1);
    asm volatile("prefetch.global.L2 [%0];" ::"l"(w + static_cast<int64_t>(row) * s.chunks + u));
  }
#endif
}

// The (tile, batch) of the step `ahead` steps after (tile, b).
__device__ __forceinline__ void advance(const Shape& s, int tile, int b, int ahead, int& out_tile,
                                        int& out_b) {
  const int t = b + ahead;
  out_tile = tile + (t / s.lane_batches) * gridDim.x;
  out_b = t % s.lane_batches;
}

template <typename T, int M, int R, int U>
__device__ __forceinline__ void multiply_batch(const Batch<T, R, U>& in, const uint4* pairs,
                                               const float* inv, const Shape& s, int b,
                                               float acc[R][M]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < U; ++j) {
    const int u_raw = (b * U + j) * 32 + lane;
    const bool valid = u_raw < s.chunks;
    const int u = valid ? u_raw : s.chunks - 1;
    half2 part[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) part[r][m] = __float2half2_rn(0.f);
    half2 minus_1024_zero[R], minus_64_zero[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float z = to_float(in.zero[r][j]);
      minus_1024_zero[r] = __float2half2_rn(-1024.f - z);
      minus_64_zero[r] = __float2half2_rn(-64.f - z);
    }
#pragma unroll
    for (int word = 0; word < 4; ++word) {
      uint4 xq[M];
#pragma unroll
      for (int m = 0; m < M; ++m) xq[m] = pairs[(m * 4 + word) * s.chunks + u];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        half2 q[4];
        const uint32_t wv = reinterpret_cast<const uint32_t*>(&in.w[r][j])[word];
        codes_minus_zero(wv, minus_1024_zero[r], minus_64_zero[r], q);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xq[m]);
#pragma unroll
          for (int i = 0; i < 4; ++i) part[r][m] = __hfma2(q[i], bits_to_half2(xw[i]), part[r][m]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float down = valid ? inv[m * s.chunks + u] : 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float2 f = __half22float2(part[r][m]);
        acc[r][m] = fmaf(f.x + f.y, to_float(in.scale[r][j]) * down, acc[r][m]);
      }
    }
  }
}

// The warp's rows of a finished tile: each lane's sums added up, times the row scale, plus the
// bias, to y (or through the epilogue); the sums are reset for the next tile.
template <typename T, int M, int R>
__device__ __forceinline__ void write_rows(const T* __restrict__ bias, T* __restrict__ y,
                                           const Shape& s, int tile, float acc[R][M],
                                           const float scale[M]) {
  const bool lead = threadIdx.x % 32 == 0;
  float gate[M];  // gated: row p's z, rounded to T
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = w_row<R>(s, tile, r);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      acc[r][m] = 0.f;
      v *= scale[m];
      if (!lead || row >= s.N) continue;
      if (bias != nullptr) v += to_float(bias[row]);
      if (!s.gated) {
        y[static_cast<int64_t>(m) * s.N + row] = from_float<T>(v);
      } else if (r == 0) {
        gate[m] = round_to<T>(v);
      } else if (row - s.row_step < s.row_step) {  // the up row of pair row - N / 2 < N / 2
        y[static_cast<int64_t>(m) * s.row_step + row - s.row_step] =
            from_float<T>(silu_mul<T>(gate[m], round_to<T>(v)));
      }
    }
  }
}

// Multiplies batch `now` of (tile, b) after issuing the loads of the next step into `ahead`;
// writes the warp's rows when b ends a tile. Returns false after the block's last step.
template <typename T, int M, int R, int U>
__device__ __forceinline__ bool step(const uint4* __restrict__ w, const T* __restrict__ scales,
                                     const T* __restrict__ zeros, const T* __restrict__ bias,
                                     T* __restrict__ y, const uint4* pairs, const float* inv,
                                     const Shape& s, int& tile, int& b,
                                     const Batch<T, R, U>& now, Batch<T, R, U>& ahead,
                                     float acc[R][M], const float scale[M]) {
  int next_tile = tile, next_b = b + 1;
  if (next_b == s.lane_batches) {
    next_b = 0;
    next_tile += gridDim.x;
  }
  const bool more = next_tile < s.tiles;
  if (more) load_batch<T, R, U>(w, scales, zeros, s, next_tile, next_b, ahead);
  if (s.prefetch > 0) {
    int far_tile, far_b;
    advance(s, tile, b, s.prefetch + 1, far_tile, far_b);
    prefetch_batch<R, U>(w, s, far_tile, far_b);
  }
  multiply_batch<T, M, R, U>(now, pairs, inv, s, b, acc);
  if (next_b == 0) write_rows<T, M, R>(bias, y, s, tile, acc, scale);
  tile = next_tile;
  b = next_b;
  return more;
}

// The tiles the defaults pick for one or two rows of x keep two blocks per SM (at most 128
// registers a thread).
template <typename T, int M, int R, int U>
__global__ void __launch_bounds__(kThreads, (M == 1 && R * U <= 8) || (M == 2 && R * U <= 4) ? 2 : 1)
    int4_gemv_kernel(const T* __restrict__ x, const int* __restrict__ perm,
                     const uint4* __restrict__ w, const T* __restrict__ scales,
                     const T* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
                     Shape s, Prologue<T> p, bool x_aligned) {
  extern __shared__ uint4 smem[];
  uint4* pairs = smem;                                           // [M][4][chunks]
  float* inv = reinterpret_cast<float*>(smem + M * 4 * s.chunks);  // [M][chunks]

  // The block's row tiles are one sequence of (tile, batch) steps. The first loads go out before
  // x is staged, each later one before the step ahead of it is multiplied (two buffers in turn).
  __shared__ BlockTrace trace;
  trace.begin();
  int tile = blockIdx.x, b = 0;
  Batch<T, R, U> even, odd;
  load_batch<T, R, U>(w, scales, zeros, s, tile, b, even);
  for (int d = 1; d <= s.prefetch; ++d) {
    int far_tile, far_b;
    advance(s, tile, b, d, far_tile, far_b);
    prefetch_batch<R, U>(w, s, far_tile, far_b);
  }
#if __CUDA_ARCH__ >= 900
  // No-ops unless launched as a programmatic dependent: let the next kernel launch, then wait
  // for the one before (its writes visible) before x is read or anything written.
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  trace.mark(1);
  __shared__ NormPartials<M> partials;
  stage_x<T, M>(x, perm, s, p, x_aligned, pairs, inv, partials);
  __syncthreads();
  trace.mark(2);
  float scale[M];
  row_scales<T, M>(p, s, partials, scale);

  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  while (step<T, M, R, U>(w, scales, zeros, bias, y, pairs, inv, s, tile, b, even, odd, acc,
                          scale) &&
         step<T, M, R, U>(w, scales, zeros, bias, y, pairs, inv, s, tile, b, odd, even, acc,
                          scale)) {
  }
  trace.tiles_done();
  write_sum<T, M>(x, s, p, x_aligned);
  trace.finish(s.N, s.K);
}

// ---- The tensor-core path (one row of x) ----
// A tile is 16 rows of W (with the epilogue: 8 gate rows and their 8 up rows) and the block's 8
// warps split its inputs in steps of 128: warp w takes steps w, w + 8, ... Lane (g, t) = (lane / 4,
// lane % 4) loads chunk 4 * step + t of rows g and g + 8 of the tile, so the four t-lanes of a row
// cover one step and x is staged with one power of two per step. Each word's 2 x 8 codes minus
// their zeros (codes_minus_zero) are the A operand of two m16n8k16 MMAs, as (row g, row g + 8) x
// (inputs 2t, 2t + 1 and 2t + 8, 2t + 9 of the MMA's k, each pair an input pair of the word);
// B holds the matching x pairs in every column, so every column of C is the dot product, summed
// in fp32 over the step's four lanes: c[0] for row g, c[2] for row g + 8. A step lies in one
// group (the group size is a multiple of 128, or one group), so its C times the group's scale and
// the step's 2^-s adds to the row's sum. At the end of a tile the warps add up their sums in
// shared memory and the first 16 threads write the rows (or, gated, the 8 silu(gate) * up).
// About 40% fewer instructions per byte of W than the lanes' path, but slower on the H200 (run
// 66: batch-1 GPTQ decode step 2.59 ms against 2.20), so it runs only when asked for (mma).
constexpr int kMmaSteps = 4;  // steps of loads in flight per lane (two 16-byte loads each)

template <typename T>
struct MmaBatch {
  uint4 w[kMmaSteps][2];
  T scale[kMmaSteps][2];
  T zero[kMmaSteps][2];
};

__device__ __forceinline__ uint32_t half2_bits(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// c += A B for one m16n8k16 tile: A 16 x 16 fp16 (row major), B 16 x 8 fp16 (column major), fp32 C.
__device__ __forceinline__ void mma_16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Row of slot r (0: row g, 1: row g + 8) of `tile`; may pass N.
__device__ __forceinline__ int mma_row(const Shape& s, int tile, int r) {
  const int g = threadIdx.x % 32 / 4;
  return s.gated ? tile * 8 + g + r * s.row_step : tile * 16 + g + r * 8;
}

// The step of slot j of batch b of this warp (may pass the last step).
__device__ __forceinline__ int mma_step_of(int b, int j) {
  return (b * kMmaSteps + j) * kWarps + threadIdx.x / 32;
}

template <typename T>
__device__ __forceinline__ void mma_load(const uint4* __restrict__ w, const T* __restrict__ scales,
                                         const T* __restrict__ zeros, const Shape& s, int tile,
                                         int b, MmaBatch<T>& out) {
  const int t = threadIdx.x % 4;
  int u[kMmaSteps], grp[kMmaSteps];
#pragma unroll
  for (int j = 0; j < kMmaSteps; ++j) {
    u[j] = min(mma_step_of(b, j), s.steps - 1) * 4 + t;
    grp[j] = s.group_shift >= 0 ? (u[j] >> s.group_shift) : u[j] / s.group_chunks;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = min(mma_row(s, tile, r), s.N - 1);
    const int w_first = row * s.chunks, g_first = row * s.G;
#pragma unroll
    for (int j = 0; j < kMmaSteps; ++j) {
      out.w[j][r] = load_streaming(w + (w_first + u[j]));
      out.scale[j][r] = scales[g_first + grp[j]];
      out.zero[j][r] = zeros[g_first + grp[j]];
    }
  }
}

template <typename T>
__device__ __forceinline__ void mma_multiply(const MmaBatch<T>& in, const uint4* pairs,
                                             const float* inv, const Shape& s, int b,
                                             float acc[2]) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < kMmaSteps; ++j) {
    const int step = mma_step_of(b, j);
    if (step >= s.steps) break;  // the same for the whole warp
    const int u = step * 4 + t;
    half2 minus_1024_zero[2], minus_64_zero[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float z = to_float(in.zero[j][r]);
      minus_1024_zero[r] = __float2half2_rn(-1024.f - z);
      minus_64_zero[r] = __float2half2_rn(-64.f - z);
    }
    float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int word = 0; word < 4; ++word) {
      const uint4 xq = pairs[word * s.chunks + u];
      half2 qa[4], qb[4];
      codes_minus_zero(reinterpret_cast<const uint32_t*>(&in.w[j][0])[word], minus_1024_zero[0],
                       minus_64_zero[0], qa);
      codes_minus_zero(reinterpret_cast<const uint32_t*>(&in.w[j][1])[word], minus_1024_zero[1],
                       minus_64_zero[1], qb);
      mma_16816(c, half2_bits(qa[0]), half2_bits(qb[0]), half2_bits(qa[1]), half2_bits(qb[1]),
                xq.x, xq.y);
      mma_16816(c, half2_bits(qa[2]), half2_bits(qb[2]), half2_bits(qa[3]), half2_bits(qb[3]),
                xq.z, xq.w);
    }
    const float down = inv[u];
    acc[0] = fmaf(c[0], to_float(in.scale[j][0]) * down, acc[0]);
    acc[1] = fmaf(c[2], to_float(in.scale[j][1]) * down, acc[1]);
  }
}

// The tile's rows: each warp's sums (lane t = 0 of each g) through shared memory `red`, added up
// by the first 16 threads, times the row scale, plus the bias, to y (or through the epilogue).
// `red` alternates between two halves, so one barrier a tile suffices.
template <typename T>
__device__ __forceinline__ void mma_write(const T* __restrict__ bias, T* __restrict__ y,
                                          const Shape& s, int tile, float acc[2], float scale,
                                          float (*red)[kWarps][16]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  if (lane % 4 == 0) {
    red[0][warp][g] = acc[0];
    red[0][warp][g + 8] = acc[1];
  }
  acc[0] = acc[1] = 0.f;
  __syncthreads();
  const int r = threadIdx.x;
  if (r >= (s.gated ? 8 : 16)) return;
  float v = 0.f;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) v += red[0][k][r];
  if (!s.gated) {
    const int row = tile * 16 + r;
    if (row >= s.N) return;
    v *= scale;
    if (bias != nullptr) v += to_float(bias[row]);
    y[row] = from_float<T>(v);
    return;
  }
  const int p = tile * 8 + r;  // gate row p, up row p + N / 2 (red's row r + 8)
  if (p >= s.row_step) return;
  float up = 0.f;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) up += red[0][k][r + 8];
  float gate = v * scale;
  up *= scale;
  if (bias != nullptr) {
    gate += to_float(bias[p]);
    up += to_float(bias[p + s.row_step]);
  }
  y[p] = from_float<T>(silu_mul<T>(round_to<T>(gate), round_to<T>(up)));
}

template <typename T>
__device__ __forceinline__ bool mma_step(const uint4* __restrict__ w, const T* __restrict__ scales,
                                         const T* __restrict__ zeros, const T* __restrict__ bias,
                                         T* __restrict__ y, const uint4* pairs, const float* inv,
                                         const Shape& s, int& tile, int& b,
                                         const MmaBatch<T>& now, MmaBatch<T>& ahead, float acc[2],
                                         float scale, float (*red)[kWarps][16], int& parity) {
  int next_tile = tile, next_b = b + 1;
  if (next_b == s.tile_batches) {
    next_b = 0;
    next_tile += gridDim.x;
  }
  const bool more = next_tile < s.tiles;
  if (more) mma_load<T>(w, scales, zeros, s, next_tile, next_b, ahead);
  mma_multiply<T>(now, pairs, inv, s, b, acc);
  if (next_b == 0) {
    mma_write<T>(bias, y, s, tile, acc, scale, red + parity);
    parity ^= 1;
  }
  tile = next_tile;
  b = next_b;
  return more;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    int4_gemv_mma_kernel(const T* __restrict__ x, const int* __restrict__ perm,
                         const uint4* __restrict__ w, const T* __restrict__ scales,
                         const T* __restrict__ zeros, const T* __restrict__ bias,
                         T* __restrict__ y, Shape s, Prologue<T> p, bool x_aligned) {
  extern __shared__ uint4 smem[];
  uint4* pairs = smem;                                       // [4][chunks]
  float* inv = reinterpret_cast<float*>(smem + 4 * s.chunks);  // [chunks]
  __shared__ float red[2][kWarps][16];

  int tile = blockIdx.x, b = 0, parity = 0;
  MmaBatch<T> even, odd;
  mma_load<T>(w, scales, zeros, s, tile, b, even);
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  __shared__ NormPartials<1> partials;
  stage_x<T, 1, 4>(x, perm, s, p, x_aligned, pairs, inv, partials);
  __syncthreads();
  float scale[1];
  row_scales<T, 1>(p, s, partials, scale);
  float acc[2] = {0.f, 0.f};
  while (mma_step<T>(w, scales, zeros, bias, y, pairs, inv, s, tile, b, even, odd, acc, scale[0],
                     red, parity) &&
         mma_step<T>(w, scales, zeros, bias, y, pairs, inv, s, tile, b, odd, even, acc, scale[0],
                     red, parity)) {
  }
  write_sum<T, 1>(x, s, p, x_aligned);
}

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

int log2_exact(int v) {
  if (v <= 0 || (v & (v - 1))) return -1;
  int e = 0;
  while ((1 << e) < v) ++e;
  return e;
}

// What a call passes besides x, the weights and y.
template <typename T>
struct Options {
  const int* perm = nullptr;
  const T* bias = nullptr;
  Prologue<T> prologue;
  int group_size = 0, blocks_per_sm = 2, prefetch = 0, flags = 0;
  bool pdl = false, gated = false;
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The fields every path shares.
template <typename T>
Shape shape_of(const torch::Tensor& x, const torch::Tensor& w_q, const torch::Tensor& scales,
               const Options<T>& o) {
  Shape s;
  s.prefetch = o.prefetch;
  s.flags = o.flags;
  s.N = w_q.size(0);
  s.K = w_q.size(1) * 8;
  s.G = scales.size(1);
  s.chunks = s.K / kChunk;
  s.group_chunks = min(o.group_size, s.K) / kChunk;
  s.group_shift = log2_exact(s.group_chunks);
  s.gated = o.gated ? 1 : 0;
  s.row_step = o.gated ? s.N / 2 : 1;
  s.stride_xm = x.stride(0);
  return s;
}

// Launches `kernel` over min(tiles, blocks_per_sm per SM) blocks with `smem` bytes of dynamic
// shared memory, as a programmatic dependent when o.pdl.
template <typename T, typename Kernel>
void start(Kernel kernel, const Shape& s, size_t smem, const torch::Tensor& x,
           const torch::Tensor& w_q, const torch::Tensor& scales, const torch::Tensor& zeros,
           torch::Tensor& y, const Options<T>& o) {
  const int grid = min(s.tiles, device_attribute(cudaDevAttrMultiProcessorCount) * o.blocks_per_sm);
  if (smem > 48 * 1024) {
    const int limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    TORCH_CHECK(smem <= static_cast<size_t>(limit), "wna16_int4_gemv: ", x.size(0), " rows of ",
                s.K, " inputs need ", smem, " bytes of shared memory, more than the device's ",
                limit);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  // 16-byte loads of x (and of residual and the norm's weight) where every row start allows.
  const Prologue<T>& p = o.prologue;
  const bool aligned = aligned16(x.data_ptr()) && s.stride_xm % 8 == 0 &&
                       (p.residual == nullptr || aligned16(p.residual)) &&
                       (p.residual_out == nullptr || aligned16(p.residual_out)) &&
                       (p.weight == nullptr || aligned16(p.weight));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = o.pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(
      &config, kernel, reinterpret_cast<const T*>(x.data_ptr()), o.perm,
      reinterpret_cast<const uint4*>(w_q.data_ptr()), reinterpret_cast<const T*>(scales.data_ptr()),
      reinterpret_cast<const T*>(zeros.data_ptr()), o.bias, reinterpret_cast<T*>(y.data_ptr()), s,
      p, aligned));
}

template <typename T, int M, int R, int U>
void launch(const torch::Tensor& x, const torch::Tensor& w_q, const torch::Tensor& scales,
            const torch::Tensor& zeros, torch::Tensor& y, const Options<T>& o) {
  Shape s = shape_of(x, w_q, scales, o);
  const int lane_chunks = (s.chunks + 31) / 32;
  s.lane_batches = (lane_chunks + U - 1) / U;
  s.tiles = o.gated ? (s.N / 2 + kWarps - 1) / kWarps : (s.N + kWarps * R - 1) / (kWarps * R);
  const size_t smem = static_cast<size_t>(M) * s.chunks * (4 * sizeof(uint4) + sizeof(float));
  start(int4_gemv_kernel<T, M, R, U>, s, smem, x, w_q, scales, zeros, y, o);
}

// The tensor-core path: one row of x, K a multiple of 128, one group or groups of a multiple of
// 128 inputs (checked by the caller).
template <typename T>
void launch_mma(const torch::Tensor& x, const torch::Tensor& w_q, const torch::Tensor& scales,
                const torch::Tensor& zeros, torch::Tensor& y, const Options<T>& o) {
  Shape s = shape_of(x, w_q, scales, o);
  s.steps = s.K / 128;
  s.tile_batches = ((s.steps + kWarps - 1) / kWarps + kMmaSteps - 1) / kMmaSteps;
  s.tiles = o.gated ? (s.N / 2 + 7) / 8 : (s.N + 15) / 16;
  const size_t smem = static_cast<size_t>(s.chunks) * (4 * sizeof(uint4) + sizeof(float));
  start(int4_gemv_mma_kernel<T>, s, smem, x, w_q, scales, zeros, y, o);
}

// The (rows per warp, loads per lane) pairs built for each number of rows of x.
template <typename T, int M>
void dispatch_tiles(int R, int U, const torch::Tensor& x, const torch::Tensor& w_q,
                    const torch::Tensor& scales, const torch::Tensor& zeros, torch::Tensor& y,
                    const Options<T>& o) {
#define LOOM_TILE(r, u) \
  if (R == r && U == u) return launch<T, M, r, u>(x, w_q, scales, zeros, y, o);
  LOOM_TILE(1, 4)
  LOOM_TILE(2, 4)
  if constexpr (M == 1) {
    LOOM_TILE(1, 2)
    LOOM_TILE(1, 8)
    LOOM_TILE(2, 2)
    LOOM_TILE(2, 8)
    LOOM_TILE(4, 2)
    LOOM_TILE(4, 4)
  }
#undef LOOM_TILE
  TORCH_CHECK(false, "wna16_int4_gemv: no kernel built for ", R, " rows per warp and ", U,
              " loads per lane with ", M, " rows of x (built: 1x4, 2x4; for one row also 1x2, "
              "1x8, 2x2, 2x8, 4x2, 4x4)");
}

template <typename T>
void dispatch_rows(int R, int U, const torch::Tensor& x, const torch::Tensor& w_q,
                   const torch::Tensor& scales, const torch::Tensor& zeros, torch::Tensor& y,
                   const Options<T>& o) {
  switch (x.size(0)) {
    case 1: return dispatch_tiles<T, 1>(R, U, x, w_q, scales, zeros, y, o);
    case 2: return dispatch_tiles<T, 2>(R, U, x, w_q, scales, zeros, y, o);
    case 3: return dispatch_tiles<T, 3>(R, U, x, w_q, scales, zeros, y, o);
    case 4: return dispatch_tiles<T, 4>(R, U, x, w_q, scales, zeros, y, o);
  }
  TORCH_CHECK(false, "wna16_int4_gemv takes 1 to 4 rows of x, got ", x.size(0));
}

template <typename T>
const T* data_or_null(const std::optional<torch::Tensor>& t) {
  return t ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

template <typename T>
void run(int R, int U, const torch::Tensor& x, const torch::Tensor& w_q,
         const torch::Tensor& scales, const torch::Tensor& zeros, torch::Tensor& y,
         const std::optional<torch::Tensor>& perm, const std::optional<torch::Tensor>& bias,
         int64_t prologue, const std::optional<torch::Tensor>& residual,
         const std::optional<torch::Tensor>& residual_out,
         const std::optional<torch::Tensor>& norm_weight, double eps, int64_t group_size,
         int64_t blocks_per_sm, int64_t prefetch_steps, bool pdl, bool gated, bool mma,
         int64_t flags) {
  Options<T> o;
  o.gated = gated;
  o.perm = perm ? perm->data_ptr<int>() : nullptr;
  o.bias = data_or_null<T>(bias);
  o.prologue.kind = static_cast<int>(prologue);
  o.prologue.residual = data_or_null<T>(residual);
  o.prologue.residual_out = residual_out ? reinterpret_cast<T*>(residual_out->data_ptr()) : nullptr;
  o.prologue.weight = data_or_null<T>(norm_weight);
  o.prologue.eps = static_cast<float>(eps);
  o.group_size = group_size;
  o.blocks_per_sm = blocks_per_sm;
  o.prefetch = prefetch_steps;
  o.pdl = pdl;
  o.flags = static_cast<int>(flags);
  if (mma) return launch_mma<T>(x, w_q, scales, zeros, y, o);
  dispatch_rows<T>(R, U, x, w_q, scales, zeros, y, o);
}

}  // namespace

#ifdef LOOM_GEMV_TRACE
// Tracing: from now on every launch of the lanes' path writes one TraceRecord (8 int64) a block
// into `buffer` [capacity, 8] (int64, CUDA), until trace_stop, which returns how many were written
// (more than the capacity: the rest were dropped).
void trace_start(torch::Tensor buffer) {
  TORCH_CHECK(buffer.is_cuda() && buffer.scalar_type() == at::kLong && buffer.dim() == 2 &&
                  buffer.size(1) == 8 && buffer.is_contiguous(),
              "trace_start: buffer must be contiguous int64 [capacity, 8] on the GPU");
  const c10::cuda::CUDAGuard guard(buffer.device());
  TraceRecord* ptr = reinterpret_cast<TraceRecord*>(buffer.data_ptr());
  const unsigned int capacity = static_cast<unsigned int>(buffer.size(0)), zero = 0;
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  C10_CUDA_CHECK(cudaMemcpyToSymbol(g_trace, &ptr, sizeof(ptr)));
  C10_CUDA_CHECK(cudaMemcpyToSymbol(g_trace_count, &zero, sizeof(zero)));
  C10_CUDA_CHECK(cudaMemcpyToSymbol(g_trace_capacity, &capacity, sizeof(capacity)));
}

int64_t trace_stop() {
  unsigned int count = 0, zero = 0;
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  C10_CUDA_CHECK(cudaMemcpyToSymbol(g_trace_capacity, &zero, sizeof(zero)));
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(&count, g_trace_count, sizeof(count)));
  return count;
}
#endif

// The Python wrapper checks every operand first (see the file header); these are a last guard.
torch::Tensor wna16_int4_gemv(torch::Tensor x, torch::Tensor w_q, torch::Tensor scales,
                              torch::Tensor zeros, std::optional<torch::Tensor> perm,
                              std::optional<torch::Tensor> bias, int64_t group_size,
                              int64_t rows_per_warp, int64_t loads_per_lane,
                              int64_t blocks_per_sm, int64_t prefetch_steps, int64_t prologue,
                              std::optional<torch::Tensor> residual,
                              std::optional<torch::Tensor> residual_out,
                              std::optional<torch::Tensor> norm_weight, double eps, bool pdl,
                              int64_t epilogue, bool mma, int64_t flags) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1,
              "wna16_int4_gemv: x must be a 2-D CUDA tensor with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "wna16_int4_gemv: x must be float16 or bfloat16");
  TORCH_CHECK(prologue >= kPlain && prologue <= kSiluAndMul, "wna16_int4_gemv: bad prologue");
  const int64_t N = w_q.size(0), K = w_q.size(1) * 8;
  TORCH_CHECK(w_q.scalar_type() == at::kInt && w_q.is_contiguous(),
              "wna16_int4_gemv: w_q must be contiguous int32 [N, K/8]");
  TORCH_CHECK(x.size(1) == (prologue == kSiluAndMul ? 2 * K : K),
              "wna16_int4_gemv: x has the wrong number of columns");
  TORCH_CHECK(K % kChunk == 0, "wna16_int4_gemv: K is not a multiple of 32");
  TORCH_CHECK(N * (K / kChunk) < (int64_t{1} << 31),
              "wna16_int4_gemv: W has 2^31 or more 16-byte chunks (32-bit offsets)");
  TORCH_CHECK(group_size >= K || (group_size > 0 && group_size % kChunk == 0),
              "wna16_int4_gemv: the group size is not a multiple of 32");
  const int64_t G = group_size >= K ? 1 : K / group_size;
  for (const auto* t : {&scales, &zeros}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->size(0) == N &&
                    t->size(1) == G,
                "wna16_int4_gemv: scales and zeros must be contiguous [N, G] in x's dtype");
  }
  if (perm) {
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->numel() == K && perm->is_contiguous(),
                "wna16_int4_gemv: perm must be contiguous int32 [K]");
  }
  for (const auto* t : {&bias, &norm_weight}) {
    TORCH_CHECK(!*t || ((*t)->scalar_type() == x.scalar_type() && (*t)->is_contiguous()),
                "wna16_int4_gemv: bias and norm_weight must be contiguous in x's dtype");
  }
  TORCH_CHECK(!bias || bias->numel() == N, "wna16_int4_gemv: bias must have N elements");
  TORCH_CHECK(prologue != kRmsNorm || (norm_weight && norm_weight->numel() == K),
              "wna16_int4_gemv: rms_norm needs norm_weight [K]");
  TORCH_CHECK(residual.has_value() == residual_out.has_value(),
              "wna16_int4_gemv: residual and residual_out come together");
  for (const auto* t : {&residual, &residual_out}) {
    TORCH_CHECK(!*t || (prologue == kRmsNorm && (*t)->scalar_type() == x.scalar_type() &&
                        (*t)->is_contiguous() && (*t)->numel() == x.size(0) * K),
                "wna16_int4_gemv: residual and residual_out must be contiguous [M, K] in x's "
                "dtype, with rms_norm");
  }
  const bool gated = epilogue == 1;
  TORCH_CHECK(epilogue == 0 || (gated && N % 2 == 0 && (mma || rows_per_warp == 2)),
              "wna16_int4_gemv: epilogue 1 (silu_and_mul) takes an even N and 2 rows per warp");
  TORCH_CHECK(!mma || (x.size(0) == 1 && K % 128 == 0 && (group_size >= K || group_size % 128 == 0)),
              "wna16_int4_gemv: the tensor-core path takes one row of x, K a multiple of 128 and "
              "groups of a multiple of 128 inputs (or one group)");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({x.size(0), gated ? N / 2 : N}, x.options());
  const int R = rows_per_warp, U = loads_per_lane;
  if (x.scalar_type() == at::kHalf) {
    run<__half>(R, U, x, w_q, scales, zeros, y, perm, bias, prologue, residual, residual_out,
                norm_weight, eps, group_size, blocks_per_sm, prefetch_steps, pdl, gated, mma, flags);
  } else {
    run<__nv_bfloat16>(R, U, x, w_q, scales, zeros, y, perm, bias, prologue, residual,
                       residual_out, norm_weight, eps, group_size, blocks_per_sm, prefetch_steps,
                       pdl, gated, mma, flags);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef LOOM_GEMV_TRACE
  m.def("trace_start", &trace_start, "record every block of the lanes' path into buffer",
        py::arg("buffer"));
  m.def("trace_stop", &trace_stop, "stop recording; the number of records written");
#endif
  m.def("wna16_int4_gemv", &wna16_int4_gemv,
        "y = x @ W^T (+ bias) for 1-4 rows of bf16/fp16 x and int4 W [N, K/8], the op before "
        "and the one after fused (see the file header)",
        py::arg("x"), py::arg("w_q"), py::arg("scales"), py::arg("zeros"), py::arg("perm"),
        py::arg("bias"), py::arg("group_size"), py::arg("rows_per_warp") = 2,
        py::arg("loads_per_lane") = 4, py::arg("blocks_per_sm") = 2,
        py::arg("prefetch_steps") = 0, py::arg("prologue") = 0,
        py::arg("residual") = py::none(), py::arg("residual_out") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-6, py::arg("pdl") = false,
        py::arg("epilogue") = 0, py::arg("mma") = false, py::arg("flags") = 0);
}
