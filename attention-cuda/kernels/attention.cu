// Flash decoding over a static KV cache and flash decode-and-prefill over a paged KV cache.
//
// Two kernels serve both caches (PAGED selects the addressing). A block owns one request
// ("row"), one tile of its new query tokens, one chunk of the query heads of one key/value
// group (so each key/value head is read once per group, not once per query head), and one
// split of the key range (flash-decoding's split-KV). The static cache's tensor-core decode
// build also comes in blocks of 2 or 4 neighbouring key/value groups (`_mma16g2`, `_mma16g4`:
// the same bytes in fewer, longer blocks). Keys and values stream through shared
// memory a tile at a time (cp.async, double-buffered), with an online softmax per (token, head)
// pair (fp32 accumulation, exp2 with a log2(e)-premultiplied scale).
//
// * `attend` (CUDA cores, every dtype and head dimension): each of the 4 warps takes a quarter
//   of every key tile and keeps fp32 dot products for all of the block's pairs (at most PAIRS,
//   a compile-time bound the host picks per launch); the warps are merged at the end.
// * `attend_mma` (tensor cores, bf16/f16, head dimension <= 128): the block's pairs are the M
//   rows of m16n8k16 MMAs; see the comment above it.
//
// Keys at positions >= the cached length are the step's new tokens: blocks read them from the
// new-key input rather than the cache, and the blocks of the first head chunk and first split
// write the new keys and values of their token tile into the cache. No block reads what
// another block of the same launch writes.
//
// Static cache (Megatron's layout [max_seq, max_batch, groups, head_dim]): one new token per
// batch row at position offsets[b]; rotary (rotate-half or interleaved, partial) is applied in
// fp32 to the query and the new key from cos/sin tables [max_seq, rot/2] and rounded once
// (the CUDA-core kernel keeps the rotated query in fp32).
// Paged cache ([num_blocks, block_size, groups, head_dim]): requests with any number of new
// tokens (decode and chunked prefill in one launch), already rotated, laid out by cu_q; causal
// masking is bottom-right aligned (new token j of a request sees keys 0..=cached+j).
//
// With nsplit > 1 each block writes a partial output and log-sum-exp (fp32) and
// `attn_combine` merges them.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define INFINITY __int_as_float(0x7f800000)

#define WARPS 4
#define THREADS (WARPS * 32)

struct Params {
  unsigned long long q, k_new, v_new, k_cache, v_cache, out, part_o, part_lse;
  unsigned long long cu_q, kv_len, block_table, cos, sin;
  long long seq_stride, batch_stride;  // static cache strides, elements
  int batch_offset;
  int block_size, bt_stride;           // paged
  int rot_half, interleaved;           // static rotary (rot_half = 0: none)
  int n_rows, hq, hkv, group, heads_per_chunk, nchunks, nsplit, tokens_per_tile;
  int split_len;                       // least keys per split (a multiple of the key tile)
  int total_tokens;                    // query tokens of the launch (rows of out / part_o)
  float scale_log2;                    // softmax_scale * log2(e)
  int z_fastest;                       // static: grid (z, rows, tiles) instead of (tiles, rows, z)
  int token0;                          // append: the launch's first token (cu_q holds absolute offsets)
};

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy that bypasses registers and L1 (sm_80+), to a shared-memory
// address.
__device__ __forceinline__ void cp_async16_to(unsigned dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  cp_async16_to(smem_addr(smem_dst), gmem_src);
}
// The same, copying `src_bytes` (16 or 0: zeros) of the 16.
__device__ __forceinline__ void cp_async16_zfill(unsigned dst, const void* gmem_src, unsigned src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
// x, computed here once: the compiler keeps it in a register rather than recomputing it
// from the thread index in a loop.
__device__ __forceinline__ unsigned opaque(unsigned x) {
  unsigned r;
  asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Programmatic dependent launch (sm_90+; no-ops where the launch did not ask for it). Every
// kernel here waits for the previous kernel on the stream to complete, its writes visible,
// before it touches global memory (`wait_for_previous_grid`), and lets the next kernel launch
// once it is done streaming (`launch_next_grid`: the attention kernels after their key loop,
// the combine at its start). The host launches the split combine that way, so its blocks are
// resident as the attention kernel's last ones finish, but not the attention kernel itself:
// blocks of a grid launched into a busy GPU are placed in whatever slots are free, unevenly,
// and a one-wave decode launch then lost up to a quarter of its bandwidth (`queue` in
// src/launch.rs).
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The (row, token tile, z = (group, chunk, split)) of this block. Static cache: (blockIdx.y,
// blockIdx.x, blockIdx.z), or with p.z_fastest (blockIdx.y, blockIdx.z, blockIdx.x): then the
// blocks of a row's groups, whose keys sit side by side in the cache's [s, b, h, d] memory,
// start together and stream neighbouring bytes (the host chooses it for blocks of few keys:
// `launch`). Paged cache: the blocks are renumbered so that z varies fastest and the tiles run
// from the last to the first (a request's last tiles see the most keys, so the longest blocks
// start first and the short ones fill the tail); the tile index g enumerates the tiles of all
// requests, row r's starting at
// first(r) = (cu_q[r] + r * (T - 1)) / T (T = tokens per tile). Consecutive starts are at least
// ceil(lq / T) apart, so every row's tiles fit, with at most one spare per row and none when
// T = 1 (decode); a launch holds first(n_rows) blocks per (group, chunk, split), not n_rows x
// the longest request's tiles. A spare block gets a tile past its row's tokens and returns.
__device__ __forceinline__ int first_tile(const int* cu, int r, int tokens_per_tile) {
  return (cu[r] + r * (tokens_per_tile - 1)) / tokens_per_tile;
}
template <bool PAGED>
__device__ __forceinline__ void block_tile(const Params& p, int& row, int& tile, int& z) {
  if (!PAGED) {
    row = blockIdx.y;
    tile = p.z_fastest ? blockIdx.z : blockIdx.x;
    z = p.z_fastest ? blockIdx.x : blockIdx.z;
    return;
  }
  const int linear = blockIdx.x + gridDim.x * blockIdx.z;
  z = linear % gridDim.z;
  const int* cu = reinterpret_cast<const int*>(p.cu_q);
  const int g = gridDim.x - 1 - linear / gridDim.z, T = p.tokens_per_tile;
  // The last row whose first tile is at or before g (first(r) <= g without the division).
  int lo = 0, hi = p.n_rows - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] + mid * (T - 1) < (g + 1) * T) lo = mid; else hi = mid - 1;
  }
  row = lo;
  tile = g - first_tile(cu, lo, p.tokens_per_tile);
}

// z = (group, chunk, split), split fastest; the divisions only where the launch has several.
__device__ __forceinline__ void split_z(const Params& p, int z, int& g, int& chunk, int& split) {
  int q = z;
  split = 0;
  if (p.nsplit > 1) {
    split = q % p.nsplit;
    q /= p.nsplit;
  }
  chunk = 0;
  if (p.nchunks > 1) {
    chunk = q % p.nchunks;
    q /= p.nchunks;
  }
  g = q;
}

// The end of both kernels: merges NW slices of the keys per pair (slice s of pair k has maximum
// mm[s * stride + k], sum ll[s * stride + k] and output row aa + (s * stride + k) * arow, in
// shared memory) and writes the normalised output (one split) or the split's partial output and
// log-sum-exp (base 2). Pair k is new token q0 + t0 + k / nh, query head h0 + k % nh. Each
// thread takes 4 consecutive channels (16-byte shared-memory reads; arow is a multiple of 4).
// ONE: the block has one token (static cache), so pair k is head h0 + k.
template <typename T, int HD, int NW, bool ONE>
__device__ __forceinline__ void merge_and_store(const Params& p, int split, int pairs, int q0, int t0, int h0, int nh,
                                                const float* mm, const float* ll, const float* aa, int stride,
                                                int arow) {
  constexpr int V = 4, HV = HD / V;
  static_assert(HD % V == 0, "merge vector");
  for (int i = threadIdx.x; i < pairs * HV; i += THREADS) {
    const int k = i / HV, d = (i % HV) * V;
    float mx = -INFINITY;
#pragma unroll
    for (int s = 0; s < NW; ++s) mx = fmaxf(mx, mm[s * stride + k]);
    float lsum = 0.f, o[V] = {0.f, 0.f, 0.f, 0.f};
    if (mx != -INFINITY) {
#pragma unroll
      for (int s = 0; s < NW; ++s) {
        const float f = exp2f(mm[s * stride + k] - mx);
        lsum += ll[s * stride + k] * f;
        const float4 a = *reinterpret_cast<const float4*>(aa + (s * stride + k) * arow + d);
        o[0] += a.x * f;
        o[1] += a.y * f;
        o[2] += a.z * f;
        o[3] += a.w * f;
      }
    }
    const long long tok = q0 + t0 + (ONE ? 0 : k / nh);
    const int head = h0 + (ONE ? k : k % nh);
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    if (p.nsplit == 1) {
      T* out = reinterpret_cast<T*>(p.out) + (tok * p.hq + head) * HD + d;
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = from_f<T>(o[e] * inv);
    } else {
      const long long slot = ((long long)split * p.total_tokens + tok) * p.hq + head;
      *reinterpret_cast<float4*>(reinterpret_cast<float*>(p.part_o) + slot * HD + d) =
          make_float4(o[0] * inv, o[1] * inv, o[2] * inv, o[3] * inv);
      if (d == 0) reinterpret_cast<float*>(p.part_lse)[slot] = lsum > 0.f ? mx + log2f(lsum) : -INFINITY;
    }
  }
}

// Keys per split of a row (or token tile) whose keys end at `limit`: the row's keys evenly
// over the launch's splits, in whole key tiles of KT, and at least p.split_len (what the host
// sized the launch by). A row longer than the host expected (an understated max_seqlen_k or
// max_sequence_offset, a CUDA graph replayed at a longer context) spreads over every split
// rather than losing keys or piling them onto one.
template <int KT>
__device__ __forceinline__ int split_length(const Params& p, int limit) {
  const int per = p.nsplit == 1 ? limit : (limit + p.nsplit - 1) / p.nsplit;
  return max(p.split_len, (per + KT - 1) / KT * KT);
}

// Element offset of key position t of (row, group) in the cache.
template <bool PAGED>
__device__ __forceinline__ long long cache_offset(const Params& p, int row, int g, int t, int hd) {
  if (PAGED) {
    const int* bt = reinterpret_cast<const int*>(p.block_table) + (long long)row * p.bt_stride;
    // Power-of-two block sizes (the usual ones) by shift and mask, others by division.
    const int bs = p.block_size;
    int i, j;
    if ((bs & (bs - 1)) == 0) {
      const int shift = __ffs(bs) - 1;
      i = t >> shift;
      j = t & (bs - 1);
    } else {
      i = t / bs;
      j = t - i * bs;
    }
    const long long blk = bt[i];
    return ((blk * bs + j) * p.hkv + g) * (long long)hd;
  } else {
    return (long long)t * p.seq_stride + (long long)(p.batch_offset + row) * p.batch_stride + (long long)g * hd;
  }
}

// Rotary of one head vector (fp32, in place) at position pos: Megatron's formula
// out = x * cos + rotate_half(x) * sin over the first 2 * rot_half channels.
__device__ __forceinline__ void rotate(float* x, int hd, const Params& p, int pos, int lane_base, int stride) {
  const float* cs = reinterpret_cast<const float*>(p.cos) + (long long)pos * p.rot_half;
  const float* sn = reinterpret_cast<const float*>(p.sin) + (long long)pos * p.rot_half;
  // Each thread rotates pairs i = lane_base, lane_base + stride, ... < rot_half.
  for (int i = lane_base; i < p.rot_half; i += stride) {
    int a, b;
    if (p.interleaved) { a = 2 * i; b = 2 * i + 1; } else { a = i; b = i + p.rot_half; }
    float xa = x[a], xb = x[b], c = cs[i], s = sn[i];
    x[a] = xa * c - xb * s;
    x[b] = xb * c + xa * s;
  }
}

// Shared-memory rows of key, value and query tiles. With SWZ and at least 8 16-byte chunks
// per row, rows are unpadded and chunk c of row r sits at chunk c ^ (r % 8) (an XOR swizzle):
// the 16-byte copies of 8 lanes then fill one aligned 128-byte line of shared memory, and the
// same chunk of 8 consecutive rows still lands in 8 distinct bank groups. Padded rows (one
// extra chunk) avoid the bank conflicts too, but a row then straddles 128-byte lines, which
// splits each warp's cp.async into more requests and re-requests global sectors (Nsight
// Compute counted 1.5x the sectors of the data read from L2).
template <typename T, int HD, bool SWZ>
struct Rows {
  static constexpr int VEC = 16 / (int)sizeof(T);
  static constexpr bool SWIZZLED = SWZ && HD / VEC >= 8;
  static constexpr int ROW = SWIZZLED ? HD : HD + VEC;  // elements per row
  // Element offset of 16-byte chunk c of row r.
  static __device__ __forceinline__ int at(int r, int c) {
    return SWIZZLED ? r * HD + ((c ^ (r & 7)) * VEC) : r * ROW + c * VEC;
  }
};

// The fast paths a build of `load_kv_tile` compiles (a bit set; builds at their register limit
// take fewer): cached tiles of evenly strided rows, cached tiles across pages, tiles of new
// tokens.
constexpr int COPY_STRIDED = 1, COPY_PAGES = 2, COPY_NEW = 4;

// Copies key tile [base, base + KT) of (row, group g) into one shared-memory stage (rows laid
// out by L, a Rows) and commits it as one cp.async group. Cached positions and the step's new
// tokens (positions >= cached, read from the new-key/value inputs) go through cp.async (16
// bytes each, no register round trip), except the static cache's new key, which
// `put_new_key` writes once the stage has arrived; positions >= end get zeros (plain stores),
// so that masked keys never carry NaN into the value product. The trip count is a
// compile-time constant, so the address arithmetic (block-table reads of the paged cache) of
// all of a thread's copies is issued up front.
template <typename T, int HD, int KT, typename L, int NTHREADS, bool PAGED, int FAST>
__device__ __forceinline__ void load_kv_tile(const Params& p, T* sk, T* sv, int base, int end, int cached, int row,
                                             int g, int q0, const T* knew, const T* vnew, const T* kc,
                                             const T* vc) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CHUNKS = KT * (HD / VEC);
  static_assert(CHUNKS % NTHREADS == 0, "tile copy shape");
  // Rows each pass of the block's threads covers; this thread's first row and chunk.
  constexpr int RPI = NTHREADS / (HD / VEC);
  static_assert(RPI >= 1 && NTHREADS % (HD / VEC) == 0, "tile copy shape");
  const int j0 = threadIdx.x / (HD / VEC), c0 = (threadIdx.x % (HD / VEC)) * VEC;
  // The tile's rows from evenly strided sources: this thread's row it at off + it x stride.
  // Its destinations are two shared addresses plus immediates where its rows share row j0's
  // swizzle (RPI a multiple of 8, or unswizzled rows), per-row offsets otherwise.
  auto strided = [&](const T* ks, const T* vs, long long off, long long stride) {
    const unsigned dk = smem_addr(sk + L::at(j0, c0 / VEC)), dv = smem_addr(sv + L::at(j0, c0 / VEC));
    const T* kr = ks + off;
    const T* vr = vs + off;
#pragma unroll
    for (int it = 0; it < CHUNKS / NTHREADS; ++it) {
      const unsigned o = !L::SWIZZLED || RPI % 8 == 0
                             ? (unsigned)(it * RPI * L::ROW * sizeof(T))
                             : (unsigned)((L::at(it * RPI + j0, c0 / VEC) - L::at(j0, c0 / VEC)) * sizeof(T));
      cp_async16_to(dk + o, kr + it * stride);
      cp_async16_to(dv + o, vr + it * stride);
    }
    cp_async_commit();
  };
  // Fast paths (FAST, a set of COPY_*): every key of the tile is cached, so no copy needs a
  // bounds check, and where the source rows are evenly strided (the static cache, a tile on
  // one page) each copy costs one address add instead of the per-row offset and block-table
  // arithmetic (COPY_PAGES: a tile across pages, that arithmetic without the checks); or
  // (COPY_NEW) every key is one of the step's new tokens, strided rows of the inputs.
  if ((FAST & (COPY_STRIDED | COPY_PAGES)) && base + KT <= end && base + KT <= cached) {
    const int bs = p.block_size;
    if ((FAST & COPY_STRIDED) && (!PAGED || ((bs & (bs - 1)) == 0 ? base & (bs - 1) : base % bs) + KT <= bs)) {
      const long long off = cache_offset<PAGED>(p, row, g, base + j0, HD) + c0;
      strided(kc, vc, off, PAGED ? (long long)RPI * p.hkv * HD : (long long)RPI * p.seq_stride);
      return;
    }
    if (FAST & COPY_PAGES) {
#pragma unroll
      for (int it = 0; it < CHUNKS / NTHREADS; ++it) {
        const int at = L::at(it * RPI + j0, c0 / VEC);
        const long long off = cache_offset<PAGED>(p, row, g, base + it * RPI + j0, HD) + c0;
        cp_async16(sk + at, kc + off);
        cp_async16(sv + at, vc + off);
      }
      cp_async_commit();
      return;
    }
  }
  // Every key of the tile one of the step's new tokens (a prompt, a prefill chunk past its
  // cached prefix), which the paged kernels read from the inputs: evenly strided rows.
  if (PAGED && (FAST & COPY_NEW) && base >= cached && base + KT <= end) {
    strided(knew, vnew, ((long long)(q0 + base + j0 - cached) * p.hkv + g) * HD + c0, (long long)RPI * p.hkv * HD);
    return;
  }
#pragma unroll
  for (int it = 0; it < CHUNKS / NTHREADS; ++it) {
    const int i = it * NTHREADS + threadIdx.x;
    const int j = i / (HD / VEC), c = (i % (HD / VEC)) * VEC;
    const int t = base + j;
    T* dk = sk + L::at(j, c / VEC);
    T* dv = sv + L::at(j, c / VEC);
    if (t < end && t < cached) {
      const long long off = cache_offset<PAGED>(p, row, g, t, HD) + c;
      cp_async16(dk, kc + off);
      cp_async16(dv, vc + off);
    } else if (t < end) {
      const long long src = ((long long)(q0 + t - cached) * p.hkv + g) * HD + c;
      cp_async16(dv, vnew + src);
      if (PAGED) cp_async16(dk, knew + src);
    } else {
      *reinterpret_cast<uint4*>(dk) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(dv) = make_uint4(0, 0, 0, 0);
    }
  }
  cp_async_commit();
}

// Static cache: the step's new keys (the rotated fp32 `snew`, [GPB][HD], rounded) into their
// rows of key stage sk, if position `cached` is in tile [base, base + KP) and before end. A
// stage holds KP positions of each of GPB key/value heads, head h's in rows [h * KP, h * KP + KP).
// Called between the stage's cp.async wait and the barrier that publishes it (its previous
// readers passed the barrier before the wait).
template <typename T, int HD, int KP, typename L, int GPB = 1>
__device__ __forceinline__ void put_new_key(T* sk, int base, int end, int cached, const float* snew) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CPR = HD / VEC;
  const int j = cached - base;
  if (j < 0 || j >= KP || cached >= end) return;
  for (int i = threadIdx.x; i < GPB * CPR; i += THREADS) {
    const int h = i / CPR, c = i % CPR;
    T tmp[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) tmp[e] = from_f<T>(snew[i * VEC + e]);
    *reinterpret_cast<uint4*>(sk + L::at(h * KP + j, c)) = *reinterpret_cast<uint4*>(tmp);
  }
}

// Key tiles of the static cache's one-row-tile (decode) build, for a block of GPB neighbouring
// key/value heads of one batch row: a tile holds KP = KT / GPB positions of each head (head h's
// in stage rows [h * KP, h * KP + KP)), and each position's GPB heads are GPB * HD contiguous
// elements of the cache, which the block's copy instructions read whole. A block loads its tiles
// in order, [start, start + KP), [start + KP, ...), and every thread copies the same chunk of
// the same rows of each: its source addresses are fixed for the block up to a per-tile step, and
// its shared-memory destinations are one address plus offsets that repeat every 8 rows (the
// swizzle). A tile whose keys are all cached costs a 16-byte copy and a 64-bit address add per
// chunk; the tile holding the split's end or the new position zero-fills (cp.async with 0 source
// bytes) what it does not copy, reads the new values from the input, and leaves the new keys'
// rows to `put_new_key`.
template <typename T, int HD, int KT, typename L, int GPB>
struct StaticTiles {
  static constexpr int VEC = 16 / (int)sizeof(T);
  static constexpr int CPR = HD / VEC;              // 16-byte chunks per row
  static constexpr int CPP = GPB * CPR;             // 16-byte chunks per position (GPB heads)
  static constexpr int KP = KT / GPB;               // positions per tile
  static constexpr int PPP = THREADS / CPP;         // positions per pass of the block
  static constexpr int CPT = KP / PPP;              // copies per thread per tile, keys and values each
  static constexpr unsigned ROWB = L::ROW * sizeof(T);
  static constexpr unsigned STAGEB = KT * ROWB;     // one stage of keys; values start 2 stages on
  static_assert(THREADS % CPP == 0 && KP % PPP == 0 && KP % 8 == 0, "tile copy shape");
  // A thread's rows are j0 + it * PPP (+ h * KP): their swizzle (row % 8) is j0 ^ flip(it).
  static_assert(!L::SWIZZLED || PPP % 8 == 0 || 8 % PPP == 0, "a thread's swizzles");
  static __device__ __forceinline__ unsigned flip(int it) { return L::SWIZZLED && PPP < 8 ? (it * PPP) & 7 : 0u; }
  const char* k;         // this thread's first chunk of the next tile, key cache
  const char* v;         // the same, value cache
  const char* fresh_v;   // its chunk of the new values (input)
  long long step;        // bytes per tile
  unsigned rs;           // bytes between this thread's rows (PPP positions; the host checks the range)
  unsigned dst;          // shared address of its first row in key stage 0
  unsigned cx;           // its chunk's byte offset in the row, before the per-row flip
  int j0;                // its first position of a tile

  __device__ __forceinline__ void init(const Params& p, int row, int g0, int start, const void* stage0) {
    j0 = threadIdx.x / CPP;
    const int cc = threadIdx.x % CPP, h = cc / CPR, c0 = cc % CPR;
    const long long e = cache_offset<false>(p, row, g0, start + j0, HD) + cc * VEC;
    k = reinterpret_cast<const char*>(p.k_cache) + e * (long long)sizeof(T);
    v = reinterpret_cast<const char*>(p.v_cache) + e * (long long)sizeof(T);
    fresh_v = reinterpret_cast<const char*>(p.v_new) + (((long long)row * p.hkv + g0) * HD + cc * VEC) * (long long)sizeof(T);
    step = (long long)KP * p.seq_stride * (long long)sizeof(T);
    rs = (unsigned)(PPP * p.seq_stride * (long long)sizeof(T));
    const int r0 = h * KP + j0;
    dst = smem_addr(stage0) + (unsigned)r0 * ROWB;
    cx = opaque((unsigned)(L::at(r0, c0) - r0 * L::ROW) * (unsigned)sizeof(T));
  }

  // Shared address of copy `it` in key stage st.
  __device__ __forceinline__ unsigned to(int st, int it) const {
    return dst + st * STAGEB + it * PPP * ROWB + (cx ^ (flip(it) * 16u));
  }

  // Tile [base, base + KP) into stage st; keys at or past `end` are zeros. The static cache's
  // one new token sits at position `cached`.
  __device__ __forceinline__ void load(const Params& p, int base, int end, int cached, int st) {
    const int kend = min(end, cached);  // cached keys of the tile: [base, kend)
    if (base + KP <= kend) {
#pragma unroll
      for (int it = 0; it < CPT; ++it) {
        const unsigned d = to(st, it);
        cp_async16_to(d, k + (unsigned long long)rs * it);
        cp_async16_to(d + 2 * STAGEB, v + (unsigned long long)rs * it);
      }
    } else {
#pragma unroll
      for (int it = 0; it < CPT; ++it) {
        const unsigned d = to(st, it);
        const int t = base + it * PPP + j0;
        const bool in = t < kend, fresh = t == cached && cached < end;
        if (!fresh) {
          cp_async16_zfill(d, in ? k + (unsigned long long)rs * it : reinterpret_cast<const char*>(p.k_cache),
                           in ? 16 : 0);
        }
        cp_async16_zfill(d + 2 * STAGEB, in ? v + (unsigned long long)rs * it : fresh ? fresh_v : reinterpret_cast<const char*>(p.v_cache),
                         in || fresh ? 16 : 0);
      }
    }
    cp_async_commit();
    k += step;
    v += step;
  }
};

// Appends new tokens [t0, t0 + ntok) of (row, group g) to the cache, 16 bytes at a time: the
// keys from the new-key input (paged) or the rotated fp32 `snew` (static, one token), the
// values from the new-value input. Each (row, group, token tile) is appended by one block, and
// no block reads a new token from the cache (they come from the inputs), so there is no race.
template <typename T, int HD, bool PAGED>
__device__ __forceinline__ void append_tokens(const Params& p, int row, int g, int q0, int cached, int t0, int ntok,
                                              const float* snew, const T* knew, const T* vnew, T* kc, T* vc) {
  constexpr int VEC = 16 / sizeof(T);
  for (int i = threadIdx.x; i < ntok * (HD / VEC); i += THREADS) {
    const int j = t0 + i / (HD / VEC), c = (i % (HD / VEC)) * VEC;
    const long long dst = cache_offset<PAGED>(p, row, g, cached + j, HD) + c;
    const long long src = ((long long)(q0 + j) * p.hkv + g) * HD + c;
    *reinterpret_cast<uint4*>(vc + dst) = *reinterpret_cast<const uint4*>(vnew + src);
    if (PAGED) {
      *reinterpret_cast<uint4*>(kc + dst) = *reinterpret_cast<const uint4*>(knew + src);
    } else {
      T tmp[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) tmp[e] = from_f<T>(snew[c + e]);
      *reinterpret_cast<uint4*>(kc + dst) = *reinterpret_cast<uint4*>(tmp);
    }
  }
}

// Keys per shared-memory stage: 64 for rows of up to 128 bytes, fewer for wider rows, so two
// stages of keys and values stay near 35 KB (six resident blocks per multiprocessor).
template <typename T, int HD>
struct Tile {
  static constexpr int KT = (HD * (int)sizeof(T) <= 128) ? 64 : (HD * (int)sizeof(T) <= 256 ? 32 : 16);
};

// PAIRS: the most (token, head) pairs a block keeps, a compile-time bound (1, 2, 4 or 8) so the
// per-pair loops and registers fit the launch (the host picks the smallest that holds it).
template <typename T, int HD, int PAIRS, bool PAGED>
__device__ void attend(const Params& p) {
  wait_for_previous_grid();
  constexpr int VEC = 16 / sizeof(T);       // elements per 16-byte vector
  constexpr int KT = Tile<T, HD>::KT;       // keys per stage
  constexpr int KPW = KT / WARPS;           // keys per warp per stage
  // Swizzled rows where a warp's keys span 8 rows (the 8 lanes of a phase then read 8 distinct
  // rows' chunks), padded rows otherwise.
  using L = Rows<T, HD, KPW >= 8>;
  constexpr int ROW = L::ROW;
  constexpr int LPK = 32 / KPW;             // lanes per key in the score
  constexpr int DPL = HD / LPK;             // dims per lane in the score
  constexpr int PER_LANE = HD / 32;         // output dims per lane
  static_assert(DPL % VEC == 0 && PER_LANE >= 1 && KPW * WARPS == KT, "tile shape");
  extern __shared__ __align__(16) unsigned char smem[];
  // Two stages of key and value tiles (cp.async double buffering), then the queries.
  T* sk_buf = reinterpret_cast<T*>(smem);                        // [2][KT][ROW]
  T* sv_buf = sk_buf + 2 * KT * ROW;                             // [2][KT][ROW]
  // The warp merge at the end reuses the stages: they are sized for whichever is larger.
  constexpr int STAGES_BYTES = 4 * KT * ROW * (int)sizeof(T);
  constexpr int MERGE_BYTES = WARPS * PAIRS * (HD + 2) * 4;
  constexpr int FRONT = STAGES_BYTES > MERGE_BYTES ? STAGES_BYTES : MERGE_BYTES;
  float* sq = reinterpret_cast<float*>(smem + FRONT);            // [PAIRS][HD]
  float* snew = sq + PAIRS * HD;                                 // static: the rotated new key

  int row, tile, z;
  block_tile<PAGED>(p, row, tile, z);
  int g, chunk, split;
  split_z(p, z, g, chunk, split);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  int q0, lq, kv_total;
  if (PAGED) {
    const int* cu = reinterpret_cast<const int*>(p.cu_q);
    q0 = cu[row];
    lq = cu[row + 1] - q0;
    kv_total = reinterpret_cast<const int*>(p.kv_len)[row];
  } else {
    q0 = row;
    lq = 1;
    kv_total = reinterpret_cast<const int*>(p.kv_len)[row] + 1;  // offsets[b] cached + the new token
  }
  const int cached = kv_total - lq;
  const int t0 = tile * p.tokens_per_tile;
  if (t0 >= lq) return;
  const int ntok = min(p.tokens_per_tile, lq - t0);
  const int h0 = g * p.group + chunk * p.heads_per_chunk;
  const int nh = min(p.heads_per_chunk, p.group - chunk * p.heads_per_chunk);
  const int pairs = ntok * nh;  // pair i: token t0 + i / nh, head h0 + i % nh

  const T* knew = reinterpret_cast<const T*>(p.k_new);
  const T* vnew = reinterpret_cast<const T*>(p.v_new);
  T* kc = reinterpret_cast<T*>(p.k_cache);
  T* vc = reinterpret_cast<T*>(p.v_cache);

  // 1. Queries of this block's pairs into shared memory (fp32), rotated in the static cache.
  const T* qg = reinterpret_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < pairs * HD; i += THREADS) {
    int pi = i / HD, d = i % HD;
    int tok = q0 + t0 + pi / nh, head = h0 + pi % nh;
    sq[pi * HD + d] = to_f(qg[((long long)tok * p.hq + head) * HD + d]);
  }
  if (!PAGED) {
    for (int d = threadIdx.x; d < HD; d += THREADS) snew[d] = to_f(knew[((long long)row * p.hkv + g) * HD + d]);
  }
  __syncthreads();
  if (!PAGED && p.rot_half > 0) {
    for (int pi = warp; pi < pairs; pi += WARPS) rotate(sq + pi * HD, HD, p, cached, lane, 32);
    if (warp == WARPS - 1) rotate(snew, HD, p, cached, lane, 32);
    __syncthreads();
  }

  // 2. The first head chunk's first split appends this tile's new keys and values.
  if (chunk == 0 && split == 0) append_tokens<T, HD, PAGED>(p, row, g, q0, cached, t0, ntok, snew, knew, vnew, kc, vc);

  // 3. Key range of this split, up to the last key any token of the tile may see.
  const int limit = cached + t0 + ntok;  // exclusive
  const int split_len = split_length<KT>(p, limit);
  const int start = split * split_len;
  const int end = min(limit, start + split_len);

  // Per warp: an online softmax for every pair over the warp's keys of each stage.
  float m[PAIRS], l[PAIRS], acc[PAIRS][PER_LANE];
#pragma unroll
  for (int k = 0; k < PAIRS; ++k) {
    m[k] = -INFINITY;
    l[k] = 0.f;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[k][e] = 0.f;
  }

  // 3a. Issues the copies of key tile `base` into stage `st`.
  auto load_tile = [&](int base, int st) {
    load_kv_tile<T, HD, KT, L, THREADS, PAGED, COPY_STRIDED | COPY_PAGES>(
        p, sk_buf + st * KT * ROW, sv_buf + st * KT * ROW, base, end, cached, row, g, q0, knew, vnew, kc, vc);
  };

  // Lane = part * KPW + kk: the 8 lanes of a 16-byte shared-memory access phase read the same
  // chunk of 8 different keys, whose rows are 16 bytes apart in the banks (the row padding),
  // and the same query chunk (a broadcast): no bank conflicts.
  const int kk = lane % KPW;    // this lane's key within the warp's slice
  const int part = lane / KPW;  // which DPL dims of it
  if (start < end) load_tile(start, 0);
  for (int base = start, stage = 0; base < end; base += KT, stage ^= 1) {
    // Prefetch the next tile into the other stage, then wait for this one.
    if (base + KT < end) {
      load_tile(base + KT, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if (!PAGED) put_new_key<T, HD, KT, L>(sk_buf + stage * KT * ROW, base, end, cached, snew);
    __syncthreads();
    // The warp's rows start at a multiple of 8 when swizzled: row % 8 is kk % 8 (keys) and
    // j % 8 (values) below.
    const T* sk = sk_buf + stage * KT * ROW + warp * KPW * ROW;
    const T* sv = sv_buf + stage * KT * ROW + warp * KPW * ROW;
    const int t = base + warp * KPW + kk;  // this lane's key position
    // 3b. Scores of every pair for this lane's key: DPL dims here (every LPK-th 16-byte
    //     chunk), summed over the LPK lanes of the key.
    float s[PAIRS];
#pragma unroll
    for (int k = 0; k < PAIRS; ++k) s[k] = 0.f;
#pragma unroll
    for (int c = 0; c < DPL / VEC; ++c) {
      const int dim = (c * LPK + part) * VEC;
      uint4 raw = *reinterpret_cast<const uint4*>(sk + L::at(kk, c * LPK + part));
      const T* kv = reinterpret_cast<const T*>(&raw);
      float kf[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) kf[e] = to_f(kv[e]);
#pragma unroll
      for (int k = 0; k < PAIRS; ++k) {
        if (k < pairs) {
          const float* qv = sq + k * HD + dim;
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[k] += qv[e] * kf[e];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < PAIRS; ++k) {
#pragma unroll
      for (int o = 16; o >= KPW; o >>= 1) s[k] += __shfl_xor_sync(0xffffffff, s[k], o);
    }
    // 3c. Online softmax per pair over the warp's keys, then the weighted values.
    float w[PAIRS];
#pragma unroll
    for (int k = 0; k < PAIRS; ++k) {
      w[k] = 0.f;
      if (k >= pairs) continue;
      int qpos = cached + t0 + k / nh;
      float sk_ = (t < end && t <= qpos) ? s[k] * p.scale_log2 : -INFINITY;
      float tmax = sk_;
#pragma unroll
      for (int o = KPW / 2; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, o));
      float m_new = fmaxf(m[k], tmax);
      if (m_new == -INFINITY) continue;  // nothing visible yet (uniform across the warp)
      float corr = exp2f(m[k] - m_new);
      float pj = (sk_ == -INFINITY) ? 0.f : exp2f(sk_ - m_new);
      // Each key's weight is counted by its part-0 lane; the lanes' sums are added at the end
      // (corr is uniform across the warp, so the per-lane sums stay consistent).
      l[k] = l[k] * corr + (part == 0 ? pj : 0.f);
      m[k] = m_new;
#pragma unroll
      for (int e = 0; e < PER_LANE; ++e) acc[k][e] *= corr;
      w[k] = pj;
    }
#pragma unroll
    for (int j = 0; j < KPW; ++j) {
      float vf[PER_LANE];
      static_assert(!L::SWIZZLED || VEC % PER_LANE == 0, "a lane's values stay in one chunk");
      const T* vr = sv + L::at(j, lane * PER_LANE / VEC) + lane * PER_LANE % VEC;
#pragma unroll
      for (int e = 0; e < PER_LANE; ++e) vf[e] = to_f(vr[e]);
#pragma unroll
      for (int k = 0; k < PAIRS; ++k) {
        float wj = __shfl_sync(0xffffffff, w[k], j);
        if (k < pairs) {
#pragma unroll
          for (int e = 0; e < PER_LANE; ++e) acc[k][e] += wj * vf[e];
        }
      }
    }
    __syncthreads();  // the next iteration refills the other stage, then this one
  }
  launch_next_grid();

  // 4. Merge the warps (their maxima, sums and partial outputs via shared memory, reusing the
  //    key/value stages), then write the output (one split) or partial output and lse.
  float* mm = reinterpret_cast<float*>(smem);       // [WARPS][PAIRS]
  float* ll = mm + WARPS * PAIRS;               // [WARPS][PAIRS]
  float* aa = ll + WARPS * PAIRS;               // [WARPS][PAIRS][HD]
#pragma unroll
  for (int k = 0; k < PAIRS; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l[k] += __shfl_xor_sync(0xffffffff, l[k], o);
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < PAIRS; ++k) {
    if (k >= pairs) continue;
    if (lane == 0) {
      mm[warp * PAIRS + k] = m[k];
      ll[warp * PAIRS + k] = l[k];
    }
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) aa[(warp * PAIRS + k) * HD + lane * PER_LANE + e] = acc[k][e];
  }
  __syncthreads();
  // (ONE stays off here: its one-token form made the two-pair build spill.)
  merge_and_store<T, HD, WARPS, false>(p, split, pairs, q0, t0, h0, nh, mm, ll, aa, PAIRS, HD);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core variant (bf16 / f16, head dim <= 128): the block's (token, head) pairs are the M
// rows of m16n8k16 MMAs (16 * MW of them; pairs beyond the block's count are zero rows), so a
// key/value row costs a few MMA and ldmatrix instructions shared by all of a group's heads
// instead of a fp32 dot product per head. MW warps split the rows (16 each) and WARPS / MW
// split every key tile (KW slices of 16-key chunks), with an online softmax per row in fp32;
// the key slices are merged at the end. Decode uses MW = 1 (all four warps on one 16-row
// tile, a quarter of each key tile each); chunked prefill uses MW = 4 (FlashAttention-2's
// split: every warp sees every key). Queries are rounded to the element type once, after
// rotary; probabilities are rounded to it for the value product, with fp32 accumulation.

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], unsigned a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
// The same from generic pointers into shared memory.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* ptr) { ldsm_x4(r, smem_addr(ptr)); }
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const void* ptr) { ldsm_x4_trans(r, smem_addr(ptr)); }

// 2^x by the hardware's approximation, results below 2^-126 flushed to zero: exp2f adds a
// range check and two multiplies per call to keep those (12.8% of the instructions the
// several-row-tile build executed on a causal 4096-token paged prefill, for probabilities that
// vanish next to the row's largest, at least 1).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// d += a (16x16, row-major fragment) * b (16x8, column-major fragment), fp32 accumulate.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  }
  static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
  }
  static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// How far (log2) a tile's maximum score may pass a row's reference before the tensor-core
// kernel moves the reference and rescales the row's outputs.
constexpr float LAZY_RESCALE = 8.f;

// Keys per shared-memory stage of the tensor-core kernel, and the most rows of a block.
constexpr int MMA_KT = 64;
constexpr int MMA_ROWS = 64;

// GPB > 1 (the static decode build, MW = 1): the block serves GPB neighbouring key/value heads
// g, g + 1, ... of its row, whose query heads are its pairs (h0 = g x group, nh = GPB x group);
// each key tile holds KT / GPB positions of every head, warp w attends to head w / (KW / GPB),
// and a row's partial results from the other heads' warps are dropped in the merge.
template <typename T, int HD, int MW, bool PAGED, int GPB = 1>
__device__ __forceinline__ void attend_mma_rows(const Params& p, int row, int q0, int lq, int cached, int t0, int ntok,
                                                int g, int split, int h0, int nh, bool owner) {
  constexpr int VEC = 8;          // 16-bit elements per 16-byte vector
  using L = Rows<T, HD, true>;    // swizzled rows (padded for head dim 32)
  constexpr int ROW = L::ROW;
  constexpr int KT = MMA_KT;
  constexpr int KW = WARPS / MW;  // warps splitting each key tile
  constexpr int KPW = KT / KW;    // keys per warp per stage (16, 32 or 64)
  constexpr int ROWS = 16 * MW;   // (token, head) pairs per block
  constexpr int KS = HD / 16;     // k-steps of the scores
  constexpr int NT = HD / 8;      // n-tiles of the output
  constexpr int AROW = HD + 4;    // fp32 merge row (padded)
  constexpr int KP = KT / GPB;    // positions per stage (of each of the block's heads)
  constexpr int WPG = KW / GPB;   // warps per head
  static_assert(sizeof(T) == 2 && HD % 16 == 0 && KPW % 16 == 0, "tile shape");
  static_assert(GPB == 1 || (MW == 1 && !PAGED && KW % GPB == 0), "several heads per block: static decode only");
  static_assert(KT == MMA_KT && ROWS <= MMA_ROWS, "tile shape");
  extern __shared__ __align__(16) unsigned char smem[];
  T* sk_buf = reinterpret_cast<T*>(smem);  // [2][KT][ROW]
  T* sv_buf = sk_buf + 2 * KT * ROW;       // [2][KT][ROW]
  // With several row tiles the queries go through stage 1's key tile (they are in registers
  // before it is loaded); a single row tile (decode) keeps them in a region of their own and
  // reads its fragments per chunk, which saves the registers of one more resident block.
  // The fp32 new key of the static cache lives past both.
  constexpr bool QREG = MW > 1;
  constexpr int STAGES_BYTES = 4 * KT * ROW * 2;
  constexpr int MERGE_BYTES = (KW * ROWS * AROW + 2 * KW * ROWS) * 4;
  constexpr int FRONT = STAGES_BYTES > MERGE_BYTES ? STAGES_BYTES : MERGE_BYTES;
  // Queries in a region of their own are only written by plain stores: padded rows keep their
  // fragment addresses immediate offsets (fewer registers in the key loop).
  using LQ = Rows<T, HD, QREG>;
  T* sq = QREG ? sk_buf + KT * ROW : reinterpret_cast<T*>(smem + FRONT);  // [ROWS][LQ::ROW]
  float* snew = reinterpret_cast<float*>(smem + FRONT + 16 * (HD + VEC) * 2);
  float* angles = snew + GPB * HD;  // the static cache's rotary cos [HD / 2], then sin [HD / 2]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int mw = warp % MW, kw = warp / MW;
  const int pairs = ntok * nh;

  const T* knew = reinterpret_cast<const T*>(p.k_new);
  const T* vnew = reinterpret_cast<const T*>(p.v_new);
  T* kc = reinterpret_cast<T*>(p.k_cache);
  T* vc = reinterpret_cast<T*>(p.v_cache);

  // 0. Global loads that need no key count first, so that their latencies overlap (a block's
  //    prologue is otherwise a chain of round trips during which its key tiles sit idle): the
  //    queries (rows past the block's pairs are zeros) and, static cache, the new key and the
  //    value chunk the append writes. Then the static cache's cached length, the first two key
  //    tiles (two in flight, as in the key loop) and the rotary angles at that position.
  //    (The paged cache's lengths are known by now, and builds of several row tiles are at
  //    their register limit: those store each query chunk as it arrives.)
  const T* qg = reinterpret_cast<const T*>(p.q);
  // Pair pi is token tok_of(pi) of the tile, head head_of(pi) of the chunk (static: one token).
  auto tok_of = [&](int pi) { return PAGED ? pi / nh : 0; };
  auto head_of = [&](int pi) { return PAGED ? pi % nh : pi; };
  constexpr int CPR = HD / VEC;  // 16-byte chunks per row
  constexpr int QIT = (ROWS * CPR + THREADS - 1) / THREADS;
  auto q_load = [&](int it) {
    const int i = it * THREADS + threadIdx.x, pi = i / CPR, c = (i % CPR) * VEC;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (i < ROWS * CPR && pi < pairs) {
      v = *reinterpret_cast<const uint4*>(qg + ((long long)(q0 + t0 + tok_of(pi)) * p.hq + h0 + head_of(pi)) * HD + c);
    }
    return v;
  };
  auto q_store = [&](int it, uint4 v) {
    const int i = it * THREADS + threadIdx.x;
    if (i < ROWS * CPR) *reinterpret_cast<uint4*>(sq + LQ::at(i / CPR, i % CPR)) = v;
  };
  constexpr bool QBATCH = MW == 1 && !PAGED;
  uint4 qv[QBATCH ? QIT : 1];
  if (QBATCH) {
#pragma unroll
    for (int it = 0; it < QIT; ++it) qv[QBATCH ? it : 0] = q_load(it);
  }
  // The new keys of the block's heads (GPB x HD contiguous elements), KN per thread.
  constexpr int KN = (GPB * HD + THREADS - 1) / THREADS;
  float kn[KN];
  uint4 vn = make_uint4(0, 0, 0, 0);
  if (!PAGED) {
    static_assert(PAGED || GPB * CPR <= THREADS, "one new-value chunk per thread");
    const long long at = ((long long)row * p.hkv + g) * HD;
#pragma unroll
    for (int i = 0; i < KN; ++i) {
      const int e = i * THREADS + threadIdx.x;
      kn[i] = e < GPB * HD ? to_f(knew[at + e]) : 0.f;
    }
    if (owner && threadIdx.x < GPB * CPR) vn = *reinterpret_cast<const uint4*>(vnew + at + threadIdx.x * VEC);
    cached = reinterpret_cast<const int*>(p.kv_len)[row];
  }
  const int limit = cached + t0 + ntok;
  const int split_len = split_length<KP>(p, limit);
  const int start = split * split_len;
  const int end = min(limit, start + split_len);
  // (The static decode build copies with `StaticTiles`, the others with `load_kv_tile`.)
  constexpr bool STILES = MW == 1 && !PAGED;
  // The copy paths of `load_kv_tile`: every cached one (decode); the paged builds of several
  // row tiles also tiles of new tokens (a causal 4096-token paged prefill x1.08-1.11 on an
  // H100), and tiles across pages except at head dimension 64, whose build spilled 16 bytes
  // with them; the static ones, at their register limit, none.
  constexpr int COPY = MW == 1  ? COPY_STRIDED | COPY_PAGES
                       : PAGED ? COPY_STRIDED | COPY_NEW | (HD == 64 ? 0 : COPY_PAGES)
                               : 0;
  StaticTiles<T, HD, KT, L, GPB> tiles;
  if (STILES) tiles.init(p, row, g, start, sk_buf);
  auto load_tile = [&](int base, int st) {
    if (STILES) {
      tiles.load(p, base, end, cached, st);
    } else {
      load_kv_tile<T, HD, KT, L, THREADS, PAGED, COPY>(
          p, sk_buf + st * KT * ROW, sv_buf + st * KT * ROW, base, end, cached, row, g, q0, knew, vnew, kc, vc);
    }
  };
  // (Several row tiles keep their queries in stage 1 until they are in registers: one tile.)
  bool second = false;  // the second key tile is in flight already
  if (start < end) {
    load_tile(start, 0);
    if (!QREG && start + KP < end) {
      load_tile(start + KP, 1);
      second = true;
    }
  }
  // Rotary angles of the static cache's new position (rot_half <= HD / 2 <= THREADS).
  const int r = PAGED ? 0 : p.rot_half;
  float cs = 0.f, sn = 0.f;
  if (!PAGED && threadIdx.x < r) {
    cs = reinterpret_cast<const float*>(p.cos)[(long long)cached * r + threadIdx.x];
    sn = reinterpret_cast<const float*>(p.sin)[(long long)cached * r + threadIdx.x];
  }

  // 1. Into shared memory; then rotary in place: fp32, each query rounded once.
  if (QBATCH) {
#pragma unroll
    for (int it = 0; it < QIT; ++it) q_store(it, qv[QBATCH ? it : 0]);
  } else {
    // The same as q_store(q_load(it)), in the loop form that keeps the paged head-dim-64
    // build of several row tiles without a spill (the lambdas' form spilled 4 bytes there).
    for (int i = threadIdx.x; i < ROWS * CPR; i += THREADS) {
      const int pi = i / CPR, c = (i % CPR) * VEC;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (pi < pairs) {
        v = *reinterpret_cast<const uint4*>(qg + ((long long)(q0 + t0 + tok_of(pi)) * p.hq + h0 + head_of(pi)) * HD + c);
      }
      *reinterpret_cast<uint4*>(sq + LQ::at(pi, c / VEC)) = v;
    }
  }
  if (!PAGED) {
#pragma unroll
    for (int i = 0; i < KN; ++i) {
      const int e = i * THREADS + threadIdx.x;
      if (e < GPB * HD) snew[e] = kn[i];
    }
    if (threadIdx.x < r) {
      angles[threadIdx.x] = cs;
      angles[HD / 2 + threadIdx.x] = sn;
    }
  }
  __syncthreads();
  if (!PAGED && r > 0) {
    // Channel pairs (a, b) sharing angle k: (k, k + r) or (2k, 2k + 1); rows `pairs` on are the
    // new keys. HD / 2 lanes per row, one per angle (r <= HD / 2), so no lane divides by r.
    constexpr int RH = HD / 2;
    static_assert(THREADS % RH == 0, "rows of the rotary pass");
    const int k = threadIdx.x % RH;
    const int a = p.interleaved ? 2 * k : k, b = p.interleaved ? 2 * k + 1 : k + r;
    const float c = k < r ? angles[k] : 0.f, sv_ = k < r ? angles[HD / 2 + k] : 0.f;
    for (int pi = threadIdx.x / RH; k < r && pi < pairs + GPB; pi += THREADS / RH) {
      if (pi < pairs) {
        T& ea = sq[LQ::at(pi, a / VEC) + a % VEC];
        T& eb = sq[LQ::at(pi, b / VEC) + b % VEC];
        const float xa = to_f(ea), xb = to_f(eb);
        ea = from_f<T>(xa * c - xb * sv_);
        eb = from_f<T>(xb * c + xa * sv_);
      } else {
        float* kr = snew + (pi - pairs) * HD;
        const float xa = kr[a], xb = kr[b];
        kr[a] = xa * c - xb * sv_;
        kr[b] = xb * c + xa * sv_;
      }
    }
    __syncthreads();
  }

  // 2. The first head chunk's first split appends this tile's new keys and values (static: the
  //    rotated key, rounded, and the value chunk loaded above).
  if (owner) {
    if (PAGED) {
      append_tokens<T, HD, PAGED>(p, row, g, q0, cached, t0, ntok, snew, knew, vnew, kc, vc);
    } else if (threadIdx.x < GPB * CPR) {
      const long long dst = cache_offset<PAGED>(p, row, g, cached, HD) + threadIdx.x * VEC;
      T tmp[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) tmp[e] = from_f<T>(snew[threadIdx.x * VEC + e]);
      *reinterpret_cast<uint4*>(kc + dst) = *reinterpret_cast<uint4*>(tmp);
      *reinterpret_cast<uint4*>(vc + dst) = vn;
    }
  }

  // The warp's query fragments: in registers for the whole key loop (QREG), or re-read from
  // shared memory per chunk.
  const int gq = lane / 4, tq = lane % 4;
  const int q_row = mw * 16 + ((lane / 8) & 1) * 8 + lane % 8, q_chunk = lane / 16;
  unsigned qa[QREG ? KS : 1][4];
  if (QREG) {
#pragma unroll
    for (int ks = 0; ks < (QREG ? KS : 1); ++ks) ldsm_x4(qa[ks], sq + LQ::at(q_row, q_chunk + 2 * ks));
  }
  if (QREG) __syncthreads();  // every warp has its queries before stage 1 is overwritten
  // Last key each of this thread's two rows (gq, gq + 8) may see; -1 for padding rows.
  int qlim[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int pi = mw * 16 + gq + 8 * h;
    qlim[h] = pi < pairs ? cached + t0 + tok_of(pi) : -1;
  }
  int wlim = max(qlim[0], qlim[1]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wlim = max(wlim, __shfl_xor_sync(0xffffffff, wlim, o));

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  // ldmatrix row addresses: keys as the n dimension of the scores (non-transposed), keys as
  // the k dimension of the value product (transposed).
  const int k_row = (lane / 16) * 8 + lane % 8, k_chunk = (lane / 8) & 1;
  const int v_row = ((lane / 8) & 1) * 8 + lane % 8, v_chunk = lane / 16;
  // The byte offsets of the lane's fragments for k-steps 0..3 of a 16-key chunk, kept for the
  // whole loop: steps 4..7 sit 128 bytes on (chunk c + 8 lands on (c ^ s) + 8 for swizzles
  // s < 8) and the next 16-key chunk 16 rows on (the same swizzles), immediate offsets. (The
  // several-row-tile build used to compute each fragment's swizzled address in the loop: 1.7
  // times the integer instructions of its key loop, 250 registers rather than 229 under the
  // same bounds, and 4-5% slower on a 4096-token paged prefill.)
  constexpr unsigned CHUNKB = 16 * ROW * sizeof(T);  // bytes from one 16-key chunk to the next
  constexpr int FS = KS < 4 ? KS : 4;
  unsigned kfo[FS], vfo[FS];
#pragma unroll
  for (int i = 0; i < FS; ++i) {
    kfo[i] = opaque(L::at(k_row, k_chunk + 2 * i) * (unsigned)sizeof(T));
    vfo[i] = opaque(L::at(v_row, v_chunk + 2 * i) * (unsigned)sizeof(T));
  }
  constexpr unsigned STEP4 = 8 * VEC * sizeof(T);  // bytes from k-step ks to ks + 4

  for (int base = start, stage = 0; base < end; base += KP, stage ^= 1) {
    if (base + KP < end) {
      if (second) {
        second = false;
      } else {
        load_tile(base + KP, stage ^ 1);
      }
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if (!PAGED) put_new_key<T, HD, KP, L, GPB>(sk_buf + stage * KT * ROW, base, end, cached, snew);
    __syncthreads();
    // The warp's KPW keys of this stage, one online-softmax step (one rescale) for all of them.
    constexpr int NC = KPW / 16;  // 16-key chunks
    const int off = kw * KPW;     // the warp's first key (row) within the stage
    const int kb0 = base + (GPB == 1 ? off : kw % WPG * KPW);  // its position
    if (kb0 < end && kb0 <= wlim) {  // warp-uniform: otherwise every key is masked
      const unsigned ska = smem_addr(sk_buf + (stage * KT + off) * ROW);
      const unsigned sva = smem_addr(sv_buf + (stage * KT + off) * ROW);
      // 3b. Scores of the warp's 16 rows against its keys (two n-tiles of 8 per chunk). The
      //     k-steps are the outer loop so that the chunks' 2 x NC accumulator chains
      //     interleave (MMA latency is hidden); chunks past the last visible key cost a few
      //     MMAs and are masked below.
      float s[2 * NC][4];
#pragma unroll
      for (int j = 0; j < 2 * NC; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        unsigned a[4];
        if (QREG) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = qa[QREG ? ks : 0][e];
        } else {
          ldsm_x4(a, sq + LQ::at(q_row, q_chunk + 2 * ks));
        }
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          unsigned b[4];
          ldsm_x4(b, ska + kfo[ks % FS] + (ks / FS) * STEP4 + c * CHUNKB);
          Mma<T>::run(s[2 * c], a, b[0], b[1]);
          Mma<T>::run(s[2 * c + 1], a, b[2], b[3]);
        }
      }
      // 3c. Mask (only where the warp's keys pass the split's end or a row's last visible key;
      //     padding rows are never stored), then the online softmax per row (4 lanes share a
      //     row) in the log2 domain: the raw maximum times the scale (positive, checked by the
      //     host), probabilities exp2(s x scale - m) in one FMA each.
      const int klast = kb0 + KPW - 1;
      const bool inside = klast < end && (qlim[0] < 0 || klast <= qlim[0]) && (qlim[1] < 0 || klast <= qlim[1]);
      if (!__all_sync(0xffffffff, inside)) {
#pragma unroll
        for (int j = 0; j < 2 * NC; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = kb0 + j * 8 + 2 * tq + (e & 1);
            if (!(key < end && key <= qlim[e / 2])) s[j][e] = -INFINITY;
          }
        }
      }
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 2 * NC; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], s[j][e]);
      }
      float corr[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
        // The row's reference (the maximum its probabilities are taken against) moves only
        // when a score passes it by more than LAZY_RESCALE: probabilities stay below
        // 2^LAZY_RESCALE (exact in fp32, rounded to the element type as before), and most
        // tiles skip the rescale of the outputs.
        const float cand = mx[h] * p.scale_log2;
        const float m_new = cand > m[h] + LAZY_RESCALE ? cand : m[h];
        const float ref = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
        corr[h] = exp2f(m[h] - ref);
        m[h] = m_new;
        mx[h] = ref;
      }
      float rs[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 2 * NC; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // (The one-row-tile builds, bound by memory, keep exp2f and their registers; so
          // does head dim 64, whose build of several row tiles spilled with exp2_ftz.)
          const float x = fmaf(s[j][e], p.scale_log2, -mx[e / 2]);
          s[j][e] = MW == 1 || HD == 64 ? exp2f(x) : exp2_ftz(x);
          rs[e / 2] += s[j][e];
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) l[h] = l[h] * corr[h] + rs[h];
      // Once the maxima settle, corr is exactly 1 for every row: skip the rescale.
      if (__any_sync(0xffffffff, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          acc[n][0] *= corr[0];
          acc[n][1] *= corr[0];
          acc[n][2] *= corr[1];
          acc[n][3] *= corr[1];
        }
      }
      // 3d. Probabilities as A fragments (the score layout of two n-tiles is the A layout of
      //     one k-step), times the values.
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int kb = kb0 + c * 16;
        if (kb < end && kb <= wlim) {  // warp-uniform: a fully masked chunk adds nothing
          const unsigned pa[4] = {Mma<T>::pack(s[2 * c][0], s[2 * c][1]), Mma<T>::pack(s[2 * c][2], s[2 * c][3]),
                                  Mma<T>::pack(s[2 * c + 1][0], s[2 * c + 1][1]),
                                  Mma<T>::pack(s[2 * c + 1][2], s[2 * c + 1][3])};
#pragma unroll
          for (int dn = 0; dn < HD / 16; ++dn) {
            unsigned b[4];
            ldsm_x4_trans(b, sva + vfo[dn % FS] + (dn / FS) * STEP4 + c * CHUNKB);
            Mma<T>::run(acc[2 * dn], pa, b[0], b[1]);
            Mma<T>::run(acc[2 * dn + 1], pa, b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();
  }
  launch_next_grid();

  // 4. Merge the key slices (rows' maxima, sums and outputs through shared memory, reusing
  //    the stages), then write the output (one split) or the partial output and lse.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
  }
  // (The key loop's last barrier, or the queries' where it ran no tile, ordered every read of
  // the stages before these writes.) Padding rows are not merged.
  float* aa = reinterpret_cast<float*>(smem);  // [KW][ROWS][AROW]
  float* mm = aa + KW * ROWS * AROW;           // [KW][ROWS]
  float* ll = mm + KW * ROWS;                  // [KW][ROWS]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = kw * ROWS + mw * 16 + gq + 8 * h;
    if (mw * 16 + gq + 8 * h >= pairs) continue;
    // Several heads per block: rows of another head's queries saw this warp's keys too; they
    // leave the merge with nothing (maximum -inf, sum 0, zero output: whatever those scores
    // were, even infinite, nothing of them reaches the row's own result).
    const bool mine = GPB == 1 || (gq + 8 * h) / (pairs / GPB) == kw / WPG;
    if (tq == 0) {
      mm[r] = mine ? m[h] : -INFINITY;
      ll[r] = mine ? l[h] : 0.f;
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float2 o = mine ? make_float2(acc[n][2 * h], acc[n][2 * h + 1]) : make_float2(0.f, 0.f);
      *reinterpret_cast<float2*>(aa + r * AROW + n * 8 + 2 * tq) = o;
    }
  }
  __syncthreads();
  merge_and_store<T, HD, KW, !PAGED>(p, split, pairs, q0, t0, h0, nh, mm, ll, aa, ROWS, AROW);
}

// The tensor-core kernel: the block's pairs decide how its warps split rows and keys. With
// MAXROWS = 16 (launches whose blocks all hold at most 16 pairs: decode) only the one-row-tile
// body is compiled, which needs fewer registers, so more blocks stay resident.
// GPB > 1 (static decode, MAXROWS = 16): each block serves GPB neighbouring key/value heads
// (z's group index counts blocks of GPB heads; the host launches one head chunk and checks that
// GPB x group <= 16).
template <typename T, int HD, bool PAGED, int MAXROWS, int GPB = 1>
__device__ void attend_mma(const Params& p) {
  static_assert(GPB == 1 || (MAXROWS == 16 && !PAGED), "several heads per block: static decode only");
  wait_for_previous_grid();
  int row, tile, z;
  block_tile<PAGED>(p, row, tile, z);
  int g, chunk, split;
  split_z(p, z, g, chunk, split);
  g *= GPB;
  int q0, lq, kv_total;
  if (PAGED) {
    const int* cu = reinterpret_cast<const int*>(p.cu_q);
    q0 = cu[row];
    lq = cu[row + 1] - q0;
    kv_total = reinterpret_cast<const int*>(p.kv_len)[row];
  } else {
    q0 = row;
    lq = 1;
    kv_total = 1;  // the new token; attend_mma_rows reads offsets[b] (cached) after its query loads
  }
  const int cached = kv_total - lq;
  const int t0 = tile * p.tokens_per_tile;
  if (t0 >= lq) return;
  const int ntok = min(p.tokens_per_tile, lq - t0);
  const int h0 = g * p.group + chunk * p.heads_per_chunk;
  const int nh = GPB * min(p.heads_per_chunk, p.group - chunk * p.heads_per_chunk);
  const int pairs = ntok * nh;
  const bool owner = chunk == 0 && split == 0;
  if (MAXROWS == 16 || pairs <= 16) {
    attend_mma_rows<T, HD, 1, PAGED, GPB>(p, row, q0, lq, cached, t0, ntok, g, split, h0, nh, owner);
  } else if (pairs <= 32) {
    attend_mma_rows<T, HD, 2, PAGED>(p, row, q0, lq, cached, t0, ntok, g, split, h0, nh, owner);
  } else {
    attend_mma_rows<T, HD, 4, PAGED>(p, row, q0, lq, cached, t0, ntok, g, split, h0, nh, owner);
  }
}

// Merges the splits: o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M). Grid (tokens, heads),
// COMBINE_THREADS threads, dynamic shared memory (nsplit + RG * HD) floats: the split weights,
// then per-group partial sums. The threads split into RG groups of HD / 4 float4 columns;
// group r sums splits r, r + RG, ... Each thread issues the loads of its first COMBINE_PREFETCH
// partial rows before the log-sum-exps are reduced, so the kernel waits on memory about once.
#define COMBINE_THREADS 128
#define COMBINE_PREFETCH 16
template <typename T, int HD>
__device__ void combine(const Params& p) {
  wait_for_previous_grid();
  launch_next_grid();
  constexpr int C4 = HD / 4;
  constexpr int RG = COMBINE_THREADS / C4;
  static_assert(RG >= 1 && COMBINE_THREADS % C4 == 0, "combine shape");
  extern __shared__ __align__(16) unsigned char smem[];
  float* w = reinterpret_cast<float*>(smem);  // [nsplit]
  float* part = w + ((p.nsplit + 3) / 4) * 4;  // [RG][HD]
  __shared__ float red[COMBINE_THREADS / 32];
  const long long tok = blockIdx.x;
  const int head = blockIdx.y;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const float* lse = reinterpret_cast<const float*>(p.part_lse);
  const float* po = reinterpret_cast<const float*>(p.part_o);
  auto slot = [&](int s) { return ((long long)s * p.total_tokens + tok) * p.hq + head; };
  const int r = tid / C4, c = (tid % C4) * 4;
  // 0. This thread's first partial rows, in flight during step 1.
  float4 pre[COMBINE_PREFETCH];
#pragma unroll
  for (int k = 0; k < COMBINE_PREFETCH; ++k) {
    const int s = r + k * RG;
    pre[k] = s < p.nsplit ? *reinterpret_cast<const float4*>(po + slot(s) * HD + c) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  // 1. The largest lse, then the weights 2^(lse_s - M) and their sum.
  float mx = -INFINITY;
  for (int s = tid; s < p.nsplit; s += COMBINE_THREADS) {
    w[s] = lse[slot(s)];
    mx = fmaxf(mx, w[s]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
#pragma unroll
  for (int i = 1; i < COMBINE_THREADS / 32; ++i) mx = fmaxf(mx, red[i]);
  __syncthreads();
  float den = 0.f;
  for (int s = tid; s < p.nsplit; s += COMBINE_THREADS) {
    w[s] = mx == -INFINITY ? 0.f : exp2f(w[s] - mx);
    den += w[s];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffff, den, o);
  if (lane == 0) red[warp] = den;
  __syncthreads();
  den = 0.f;
#pragma unroll
  for (int i = 0; i < COMBINE_THREADS / 32; ++i) den += red[i];
  // 2. Weighted partial outputs, RG splits at a time.
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int k = 0; k < COMBINE_PREFETCH; ++k) {
    const int s = r + k * RG;
    const float ws = s < p.nsplit ? w[s] : 0.f;
    acc.x += ws * pre[k].x;
    acc.y += ws * pre[k].y;
    acc.z += ws * pre[k].z;
    acc.w += ws * pre[k].w;
  }
#pragma unroll 4
  for (int s = r + COMBINE_PREFETCH * RG; s < p.nsplit; s += RG) {
    const float ws = w[s];
    const float4 v = *reinterpret_cast<const float4*>(po + slot(s) * HD + c);
    acc.x += ws * v.x;
    acc.y += ws * v.y;
    acc.z += ws * v.z;
    acc.w += ws * v.w;
  }
  *reinterpret_cast<float4*>(part + r * HD + c) = acc;
  __syncthreads();
  // 3. Sum the groups and normalise.
  T* out = reinterpret_cast<T*>(p.out) + (tok * p.hq + head) * HD;
  const float inv = den > 0.f ? 1.f / den : 0.f;
  for (int d = tid; d < HD; d += COMBINE_THREADS) {
    float o = 0.f;
#pragma unroll
    for (int g = 0; g < RG; ++g) o += part[g * HD + d];
    out[d] = from_f<T>(o * inv);
  }
}

// The paged cache's append alone, for requests whose attention other kernels compute from the
// inputs (prompts without cached keys, prompt chunks over a gathered copy of theirs): block x copies new token token0 + x's keys and values,
// every key/value head, to the slot the attention kernels' append gives it (its request's block
// table at position seqlens_k - new tokens + its index), 16 bytes a thread at a time. cu_q,
// kv_len and block_table start at the launch's first request; cu_q's offsets, like the rows of
// k_new and v_new, count from the step's first token.
template <typename T, int HD>
__device__ void append_paged(const Params& p) {
  constexpr int VEC = 16 / sizeof(T);
  const int tok = p.token0 + blockIdx.x;
  const int* cu = reinterpret_cast<const int*>(p.cu_q);
  // Its request: the last row whose tokens start at or before it (rows without tokens share
  // their start with the next row, so the last one is the row that has it).
  int lo = 0, hi = p.n_rows - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= tok) lo = mid;
    else hi = mid - 1;
  }
  const int q0 = cu[lo];
  const int t = reinterpret_cast<const int*>(p.kv_len)[lo] - (cu[lo + 1] - q0) + (tok - q0);
  const T* knew = reinterpret_cast<const T*>(p.k_new);
  const T* vnew = reinterpret_cast<const T*>(p.v_new);
  T* kc = reinterpret_cast<T*>(p.k_cache);
  T* vc = reinterpret_cast<T*>(p.v_cache);
  for (int i = threadIdx.x; i < p.hkv * (HD / VEC); i += blockDim.x) {
    const int g = i / (HD / VEC), c = (i % (HD / VEC)) * VEC;
    const long long dst = cache_offset<true>(p, lo, g, t, HD) + c;
    const long long src = ((long long)tok * p.hkv + g) * HD + c;
    *reinterpret_cast<uint4*>(kc + dst) = *reinterpret_cast<const uint4*>(knew + src);
    *reinterpret_cast<uint4*>(vc + dst) = *reinterpret_cast<const uint4*>(vnew + src);
  }
}

// Two attentions of the same queries over disjoint key sets, merged into the attention over
// both (a prompt's chunk over its cached keys and over its own, each from libtorch's kernels):
// out = a e^lse_a / (e^lse_a + e^lse_b) + b e^lse_b / (e^lse_a + e^lse_b), in fp32. a, b and
// out are [tokens, heads, HD] with heads HD apart and tokens `*_stride` elements apart (16-byte
// aligned rows); lse_a and lse_b are natural-log fp32 [heads, tokens], heads `lse_*_head`
// apart. A part without keys (lse -inf) weighs nothing. One thread per 16 bytes of a row,
// grid-stride.
struct MergeParams {
  unsigned long long a, b, lse_a, lse_b, out;
  long long a_stride, b_stride, out_stride, lse_a_head, lse_b_head;
  int tokens, heads;
};

template <typename T, int HD>
__device__ void merge_parts(const MergeParams& p) {
  constexpr int VEC = 16 / sizeof(T), C = HD / VEC;
  const long long n = (long long)p.tokens * p.heads * C;
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    const int c = (int)(i % C) * VEC;
    const long long row = i / C;
    const int h = (int)(row % p.heads);
    const long long tok = row / p.heads;
    const float la = reinterpret_cast<const float*>(p.lse_a)[h * p.lse_a_head + tok];
    const float lb = reinterpret_cast<const float*>(p.lse_b)[h * p.lse_b_head + tok];
    const float m = fmaxf(la, lb);
    const float ea = la == -INFINITY ? 0.f : expf(la - m);
    const float eb = lb == -INFINITY ? 0.f : expf(lb - m);
    const float wa = ea + eb > 0.f ? ea / (ea + eb) : 0.f;
    const T* a = reinterpret_cast<const T*>(p.a) + tok * p.a_stride + h * HD + c;
    const T* b = reinterpret_cast<const T*>(p.b) + tok * p.b_stride + h * HD + c;
    const uint4 va = *reinterpret_cast<const uint4*>(a);
    const uint4 vb = *reinterpret_cast<const uint4*>(b);
    uint4 vo;
    const T* xa = reinterpret_cast<const T*>(&va);
    const T* xb = reinterpret_cast<const T*>(&vb);
    T* xo = reinterpret_cast<T*>(&vo);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float y = to_f<T>(xb[j]);
      xo[j] = from_f<T>(y + (to_f<T>(xa[j]) - y) * wa);
    }
    *reinterpret_cast<uint4*>(reinterpret_cast<T*>(p.out) + tok * p.out_stride + h * HD + c) = vo;
  }
}

// Entry points: attn_{static|paged}_{bf16|f16|f32}_{head dim}_p{pairs} (CUDA cores),
// attn_{static|paged}_{bf16|f16}_{head dim}_mma and _mma16 (tensor cores, head dim <= 128; up
// to 64 or 16 pairs per block),
// attn_combine_{dtype}_{head dim}, attn_append_{dtype}_{head dim}, attn_merge_{dtype}_{head dim}
// (in every build).
// Launch bounds of the CUDA-core builds. The fp32 builds of 4 and 8 pairs and the 16-bit builds
// of 8 pairs state 2 resident blocks: left to its own heuristic, ptxas caps some of them at 72,
// 128 or 168 registers and spills a few bytes (tests/ptx.rs fails on any spill).
#define ATTN_BOUNDS(TNAME, P) ATTN_BOUNDS_##TNAME##_##P
#define ATTN_BOUNDS_bf16_1 __launch_bounds__(THREADS)
#define ATTN_BOUNDS_bf16_2 __launch_bounds__(THREADS)
#define ATTN_BOUNDS_bf16_4 __launch_bounds__(THREADS)
#define ATTN_BOUNDS_bf16_8 __launch_bounds__(THREADS, 2)
#define ATTN_BOUNDS_f16_1 __launch_bounds__(THREADS)
#define ATTN_BOUNDS_f16_2 __launch_bounds__(THREADS)
#define ATTN_BOUNDS_f16_4 __launch_bounds__(THREADS)
#define ATTN_BOUNDS_f16_8 __launch_bounds__(THREADS, 2)
#define ATTN_BOUNDS_f32_1 __launch_bounds__(THREADS)
#define ATTN_BOUNDS_f32_2 __launch_bounds__(THREADS)
#define ATTN_BOUNDS_f32_4 __launch_bounds__(THREADS, 2)
#define ATTN_BOUNDS_f32_8 __launch_bounds__(THREADS, 2)
#define ATTN_ATTEND(TNAME, T, HD, P)                                                                 \
  extern "C" __global__ void ATTN_BOUNDS(TNAME, P) attn_static_##TNAME##_##HD##_p##P(Params p) {   \
    attend<T, HD, P, false>(p);                                                                      \
  }                                                                                                  \
  extern "C" __global__ void ATTN_BOUNDS(TNAME, P) attn_paged_##TNAME##_##HD##_p##P(Params p) {    \
    attend<T, HD, P, true>(p);                                                                       \
  }
// Launch bounds of the tensor-core builds of up to 64 pairs: head dim 32 states one resident
// block (no occupancy target), without which ptxas capped its static build at 96 registers and
// spilled 20 bytes; on head dim 64 the same statement costs a resident block, so it stays there.
// Head dim 128 asks for three resident blocks: 168 registers and a few spilled values (72 bytes
// of stack in the paged build when measured, 80 since its copies of new tokens; 112 in the
// static one) instead of 229 registers and two blocks; with the extra warps to switch between,
// a causal 4096-token paged prefill ran 8% faster and a mixed step's one call 0.87x the time of
// its two parts instead of 0.96x (H200, same-run A/B).
// tests/ptx.rs holds these builds to that spill.
#define ATTN_MMA_BOUNDS(HD) ATTN_MMA_BOUNDS_##HD
#define ATTN_MMA_BOUNDS_32 __launch_bounds__(THREADS, 1)
#define ATTN_MMA_BOUNDS_64 __launch_bounds__(THREADS)
#define ATTN_MMA_BOUNDS_128 __launch_bounds__(THREADS, 3)
#define ATTN_ATTEND_MMA(TNAME, T, HD)                                                                       \
  extern "C" __global__ void ATTN_MMA_BOUNDS(HD) attn_static_##TNAME##_##HD##_mma(Params p) {             \
    attend_mma<T, HD, false, MMA_ROWS>(p);                                                                 \
  }                                                                                                        \
  extern "C" __global__ void ATTN_MMA_BOUNDS(HD) attn_paged_##TNAME##_##HD##_mma(Params p) {              \
    attend_mma<T, HD, true, MMA_ROWS>(p);                                                                  \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(THREADS, 3) attn_static_##TNAME##_##HD##_mma16(Params p) { \
    attend_mma<T, HD, false, 16>(p);                                                                       \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(THREADS, 3) attn_paged_##TNAME##_##HD##_mma16(Params p) {  \
    attend_mma<T, HD, true, 16>(p);                                                                        \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(THREADS, 3) attn_static_##TNAME##_##HD##_mma16g2(Params p) {\
    attend_mma<T, HD, false, 16, 2>(p);                                                                    \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(THREADS, 3) attn_static_##TNAME##_##HD##_mma16g4(Params p) {\
    attend_mma<T, HD, false, 16, 4>(p);                                                                    \
  }
// The split combine, the append and the merge, in every build.
#define ATTN_EVERY_BUILD(TNAME, T, HD)                                                        \
  extern "C" __global__ void attn_combine_##TNAME##_##HD(Params p) { combine<T, HD>(p); }     \
  extern "C" __global__ void attn_append_##TNAME##_##HD(Params p) { append_paged<T, HD>(p); } \
  extern "C" __global__ void attn_merge_##TNAME##_##HD(MergeParams p) { merge_parts<T, HD>(p); }
#define ATTN_EVERY_PAIRS(TNAME, T, HD) \
  ATTN_EVERY_BUILD(TNAME, T, HD)       \
  ATTN_ATTEND(TNAME, T, HD, 1)         \
  ATTN_ATTEND(TNAME, T, HD, 2)         \
  ATTN_ATTEND(TNAME, T, HD, 4)         \
  ATTN_ATTEND(TNAME, T, HD, 8)

// One variant per compilation (-DATTN_TNAME=bf16 -DATTN_T=__nv_bfloat16 -DATTN_HD=128, then
// -DATTN_PAIRS=4 or -DATTN_MMA), or every variant with -DATTN_ALL.
#if defined(ATTN_ALL)
ATTN_EVERY_PAIRS(bf16, __nv_bfloat16, 32)
ATTN_EVERY_PAIRS(bf16, __nv_bfloat16, 64)
ATTN_EVERY_PAIRS(bf16, __nv_bfloat16, 128)
ATTN_EVERY_PAIRS(bf16, __nv_bfloat16, 256)
ATTN_EVERY_PAIRS(f16, __half, 32)
ATTN_EVERY_PAIRS(f16, __half, 64)
ATTN_EVERY_PAIRS(f16, __half, 128)
ATTN_EVERY_PAIRS(f16, __half, 256)
ATTN_EVERY_PAIRS(f32, float, 32)
ATTN_EVERY_PAIRS(f32, float, 64)
ATTN_EVERY_PAIRS(f32, float, 128)
ATTN_EVERY_PAIRS(f32, float, 256)
ATTN_ATTEND_MMA(bf16, __nv_bfloat16, 32)
ATTN_ATTEND_MMA(bf16, __nv_bfloat16, 64)
ATTN_ATTEND_MMA(bf16, __nv_bfloat16, 128)
ATTN_ATTEND_MMA(f16, __half, 32)
ATTN_ATTEND_MMA(f16, __half, 64)
ATTN_ATTEND_MMA(f16, __half, 128)
#elif defined(ATTN_TNAME) && defined(ATTN_MMA)
#define ATTN_EXPAND_MMA(TN, T, HD) ATTN_EVERY_BUILD(TN, T, HD) ATTN_ATTEND_MMA(TN, T, HD)
ATTN_EXPAND_MMA(ATTN_TNAME, ATTN_T, ATTN_HD)
#elif defined(ATTN_TNAME)
#define ATTN_EXPAND(TN, T, HD, P) ATTN_EVERY_BUILD(TN, T, HD) ATTN_ATTEND(TN, T, HD, P)
ATTN_EXPAND(ATTN_TNAME, ATTN_T, ATTN_HD, ATTN_PAIRS)
#endif
