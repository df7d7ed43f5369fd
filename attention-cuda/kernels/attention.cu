// Flash decoding over a static KV cache and flash decode-and-prefill over a paged KV cache.
//
// One kernel serves both caches (PAGED selects the addressing). A block owns one request
// ("row"), one tile of its new query tokens, one chunk of the query heads of one key/value
// group (so each key/value head is read once per group, not once per query head), and one
// split of the key range (flash-decoding's split-KV). Keys and values stream through shared
// memory KT at a time (cp.async, double-buffered); each of the 4 warps takes a quarter of every
// tile and keeps an online softmax for all of the block's (token, head) pairs (fp32
// accumulation, exp2 with a log2(e)-premultiplied scale); the warps are merged at the end. The
// number of pairs is a compile-time bound (PAIRS), picked by the host per launch.
//
// Keys at positions >= the cached length are the step's new tokens: blocks read them from the
// new-key input rather than the cache, and the block owning (row, group, first tile, first head
// chunk, first split) writes them into the cache. No block reads what another block of the
// same launch writes.
//
// Static cache (Megatron's layout [max_seq, max_batch, groups, head_dim]): one new token per
// batch row at position offsets[b]; rotary (rotate-half or interleaved, partial) is applied in
// fp32 to the query and the new key from cos/sin tables [max_seq, rot/2] and rounded once.
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
  int split_len;                       // keys per split (a multiple of the key tile)
  int total_tokens;                    // query tokens of the launch (rows of out / part_o)
  float scale_log2;                    // softmax_scale * log2(e)
};

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// 16-byte global -> shared copy that bypasses registers and L1 (sm_80+).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Element offset of key position t of (row, group) in the cache.
template <bool PAGED>
__device__ __forceinline__ long long cache_offset(const Params& p, int row, int g, int t, int hd) {
  if (PAGED) {
    const int* bt = reinterpret_cast<const int*>(p.block_table) + (long long)row * p.bt_stride;
    long long blk = bt[t / p.block_size];
    return ((blk * p.block_size + t % p.block_size) * p.hkv + g) * (long long)hd;
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
  constexpr int VEC = 16 / sizeof(T);       // elements per 16-byte vector
  constexpr int ROW = HD + VEC;             // padded shared-memory row (breaks bank conflicts)
  constexpr int KT = Tile<T, HD>::KT;       // keys per stage
  constexpr int KPW = KT / WARPS;           // keys per warp per stage
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

  const int row = blockIdx.y;
  const int tile = blockIdx.x;
  const int z = blockIdx.z;
  const int split = z % p.nsplit;
  const int chunk = (z / p.nsplit) % p.nchunks;
  const int g = z / (p.nsplit * p.nchunks);
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

  // 2. The owner block appends the new keys and values of this group to the cache.
  if (tile == 0 && chunk == 0 && split == 0) {
    for (int i = threadIdx.x; i < lq * HD; i += THREADS) {
      int j = i / HD, d = i % HD;
      long long dst = cache_offset<PAGED>(p, row, g, cached + j, HD) + d;
      long long src = ((long long)(q0 + j) * p.hkv + g) * HD + d;
      kc[dst] = PAGED ? knew[src] : from_f<T>(snew[d]);
      vc[dst] = vnew[src];
    }
  }

  // 3. Key range of this split, up to the last key any token of the tile may see.
  const int limit = cached + t0 + ntok;  // exclusive
  const int start = split * p.split_len;
  const int end = min(limit, start + p.split_len);

  // Per warp: an online softmax for every pair over the warp's keys of each stage.
  float m[PAIRS], l[PAIRS], acc[PAIRS][PER_LANE];
#pragma unroll
  for (int k = 0; k < PAIRS; ++k) {
    m[k] = -INFINITY;
    l[k] = 0.f;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[k][e] = 0.f;
  }

  // 3a. Issues the copies of key tile `base` into stage `st`: cached positions with cp.async
  //     (16 bytes each, no register round trip), the step's new tokens and padding with stores.
  auto load_tile = [&](int base, int st) {
    T* sk = sk_buf + st * KT * ROW;
    T* sv = sv_buf + st * KT * ROW;
    for (int i = threadIdx.x; i < KT * (HD / VEC); i += THREADS) {
      int j = i / (HD / VEC), c = (i % (HD / VEC)) * VEC;
      int t = base + j;
      T* dk = sk + j * ROW + c;
      T* dv = sv + j * ROW + c;
      if (t < end && t < cached) {
        long long off = cache_offset<PAGED>(p, row, g, t, HD) + c;
        cp_async16(dk, kc + off);
        cp_async16(dv, vc + off);
      } else {
        uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
        if (t < end) {
          long long src = ((long long)(q0 + t - cached) * p.hkv + g) * HD + c;
          vv = *reinterpret_cast<const uint4*>(vnew + src);
          if (PAGED) {
            kv = *reinterpret_cast<const uint4*>(knew + src);
          } else {
            T tmp[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) tmp[e] = from_f<T>(snew[c + e]);
            kv = *reinterpret_cast<uint4*>(tmp);
          }
        }
        *reinterpret_cast<uint4*>(dk) = kv;
        *reinterpret_cast<uint4*>(dv) = vv;
      }
    }
    cp_async_commit();
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
    __syncthreads();
    const T* sk = sk_buf + stage * KT * ROW + warp * KPW * ROW;
    const T* sv = sv_buf + stage * KT * ROW + warp * KPW * ROW;
    const int t = base + warp * KPW + kk;  // this lane's key position
    // 3b. Scores of every pair for this lane's key: DPL dims here (every LPK-th 16-byte
    //     chunk), summed over the LPK lanes of the key.
    float s[PAIRS];
#pragma unroll
    for (int k = 0; k < PAIRS; ++k) s[k] = 0.f;
    const T* kr = sk + kk * ROW;
#pragma unroll
    for (int c = 0; c < DPL / VEC; ++c) {
      const int dim = (c * LPK + part) * VEC;
      uint4 raw = *reinterpret_cast<const uint4*>(kr + dim);
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
      const T* vr = sv + j * ROW + lane * PER_LANE;
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
  for (int i = threadIdx.x; i < pairs * HD; i += THREADS) {
    int k = i / HD, d = i % HD;
    float mx = -INFINITY;
#pragma unroll
    for (int w2 = 0; w2 < WARPS; ++w2) mx = fmaxf(mx, mm[w2 * PAIRS + k]);
    float lsum = 0.f, o = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w2 = 0; w2 < WARPS; ++w2) {
        float f = exp2f(mm[w2 * PAIRS + k] - mx);
        lsum += ll[w2 * PAIRS + k] * f;
        o += aa[(w2 * PAIRS + k) * HD + d] * f;
      }
    }
    long long tok = q0 + t0 + k / nh;
    int head = h0 + k % nh;
    float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    if (p.nsplit == 1) {
      reinterpret_cast<T*>(p.out)[(tok * p.hq + head) * HD + d] = from_f<T>(o * inv);
    } else {
      long long slot = ((long long)split * p.total_tokens + tok) * p.hq + head;
      reinterpret_cast<float*>(p.part_o)[slot * HD + d] = o * inv;
      if (d == 0) reinterpret_cast<float*>(p.part_lse)[slot] = lsum > 0.f ? mx + log2f(lsum) : -INFINITY;
    }
  }
}

// Merges the splits: o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M). Grid (tokens, heads).
template <typename T, int HD>
__device__ void combine(const Params& p) {
  const long long tok = blockIdx.x;
  const int head = blockIdx.y;
  const float* lse = reinterpret_cast<const float*>(p.part_lse);
  const float* po = reinterpret_cast<const float*>(p.part_o);
  float mx = -INFINITY;
  for (int s = 0; s < p.nsplit; ++s) mx = fmaxf(mx, lse[((long long)s * p.total_tokens + tok) * p.hq + head]);
  T* out = reinterpret_cast<T*>(p.out) + (tok * p.hq + head) * HD;
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    for (int s = 0; s < p.nsplit; ++s) {
      long long slot = ((long long)s * p.total_tokens + tok) * p.hq + head;
      float w = (mx == -INFINITY) ? 0.f : exp2f(lse[slot] - mx);
      num += w * po[slot * HD + d];
      den += w;
    }
    out[d] = from_f<T>(den > 0.f ? num / den : 0.f);
  }
}

// Entry points: attn_{static|paged}_{bf16|f16|f32}_{head dim}_p{pairs},
// attn_combine_{dtype}_{head dim}.
#define ATTN_ATTEND(TNAME, T, HD, P)                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS) attn_static_##TNAME##_##HD##_p##P(Params p) { \
    attend<T, HD, P, false>(p);                                                                         \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(THREADS) attn_paged_##TNAME##_##HD##_p##P(Params p) {  \
    attend<T, HD, P, true>(p);                                                                          \
  }
#define ATTN_COMBINE(TNAME, T, HD) \
  extern "C" __global__ void attn_combine_##TNAME##_##HD(Params p) { combine<T, HD>(p); }
#define ATTN_EVERY_PAIRS(TNAME, T, HD) \
  ATTN_COMBINE(TNAME, T, HD)           \
  ATTN_ATTEND(TNAME, T, HD, 1)         \
  ATTN_ATTEND(TNAME, T, HD, 2)         \
  ATTN_ATTEND(TNAME, T, HD, 4)         \
  ATTN_ATTEND(TNAME, T, HD, 8)

// One variant per compilation (-DATTN_TNAME=bf16 -DATTN_T=__nv_bfloat16 -DATTN_HD=128
// -DATTN_PAIRS=4), or every variant with -DATTN_ALL.
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
#elif defined(ATTN_TNAME)
#define ATTN_EXPAND(TN, T, HD, P) ATTN_COMBINE(TN, T, HD) ATTN_ATTEND(TN, T, HD, P)
ATTN_EXPAND(ATTN_TNAME, ATTN_T, ATTN_HD, ATTN_PAIRS)
#endif
