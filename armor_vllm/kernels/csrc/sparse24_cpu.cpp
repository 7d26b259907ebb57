// 2:4 sparse linear on the CPU: y(T, N) = x(T, K) @ S^T (+ bias), reading S in a compressed form.
//
// Layout (chosen for SIMD, built by pack()):
//   rows are grouped in tiles of 16 consecutive output rows (N padded to a multiple of 16 with
//   zero rows); a SIMD register holds one value of each of the 16 rows of a tile.
//   For every tile and every group g of 4 consecutive inputs, each row keeps 2 values v0, v1 at
//   input positions i0, i1 in 0..3 (a row with fewer non-zeros keeps zeros).
//   values, fp32 storage: (tiles, G, 2, 16) float   -> [v0 of the 16 rows][v1 of the 16 rows]
//   values, bf16 storage: (tiles, G, 16, 2) bf16    -> per row a 32-bit word (v0 low, v1 high)
//   meta:                 (tiles, ceil(G/8), 16) int32: the 32-bit word of row r holds, for 8
//                         consecutive groups j = 0..7, the 4-bit code i0 | i1 << 2 at bits 4j..4j+3.
//   So a kept value costs its storage plus 2 bits: fp32 53% of dense bytes, bf16 56%.
//
// Kernel idea: for 16 rows and one group, broadcast x[4g..4g+3] to every 128-bit lane of a register
// and pick each row's inputs with a lane permutation indexed by the row's code (the permute uses
// only the low 2 bits of an index modulo the 4-element replication, so `meta >> 4j` and
// `meta >> (4j + 2)` are the indices as they are); two FMAs per group. Tokens are register-blocked
// (one read of the weights serves up to 8 tokens; more tokens loop over K-chunks kept in cache).
// With AVX512_BF16 and bf16 x and storage, vdpbf16ps does v0*x[i0] + v1*x[i1] in one instruction.
//
// ISA is dispatched at run time (__builtin_cpu_supports), overridable with ARMOR_VLLM_CPU_ISA =
// avx512bf16 | avx512 | avx2 | scalar (a request above what the CPU has falls back to the best
// available path). Threads: at::parallel_for over tiles (torch.set_num_threads / OMP binding).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int TILE = 16;       // output rows per tile
constexpr int GPW = 8;         // groups per 32-bit metadata word
constexpr int64_t KCHUNK = 256;  // groups per K-chunk when several token blocks share a tile

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512BF16 = 3 };

int cpu_best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
#if defined(__GNUC__) && (__GNUC__ >= 10)
    if (__builtin_cpu_supports("avx512bf16")) return ISA_AVX512BF16;
#endif
    return ISA_AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
  return ISA_SCALAR;
}

int resolve_isa() {
  static const int best = cpu_best_isa();
  const char* env = std::getenv("ARMOR_VLLM_CPU_ISA");
  if (!env || !*env) return best;
  std::string s(env);
  int want = best;
  if (s == "scalar") want = ISA_SCALAR;
  else if (s == "avx2") want = ISA_AVX2;
  else if (s == "avx512") want = ISA_AVX512;
  else if (s == "avx512bf16") want = ISA_AVX512BF16;
  return std::min(want, best);
}

const char* isa_name(int isa) {
  switch (isa) {
    case ISA_AVX512BF16: return "avx512bf16";
    case ISA_AVX512: return "avx512";
    case ISA_AVX2: return "avx2";
    default: return "scalar";
  }
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Arguments shared by every kernel; x is fp32 (T, ldx) except on the dpbf16 path (bf16).
struct Args {
  const void* x;
  int64_t ldx;
  const void* values;  // fp32 (tiles, G, 2, 16) or bf16 pairs (tiles, G, 16) as uint32
  const int32_t* meta;  // (tiles, GW, 16)
  int64_t T, N, K, G, GW;
  bool bf16_storage;
};

// Per-tile epilogue: acc (T x 16 fp32, row-major per token) -> y with bias, in y's dtype.
template <typename out_t>
inline void store_tile(const float* acc, int64_t T, int64_t tile, int64_t N, const float* bias,
                       out_t* y, int64_t ldy) {
  const int64_t r0 = tile * TILE;
  const int64_t rows = std::min<int64_t>(TILE, N - r0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      float v = acc[t * TILE + r] + (bias ? bias[r0 + r] : 0.f);
      y[t * ldy + r0 + r] = static_cast<out_t>(v);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// scalar

void tile_scalar(const Args& a, int64_t tile, int64_t t0, int64_t tb, int64_t g0, int64_t g1,
                 float* acc /* tb x 16, accumulated into */) {
  const float* x = static_cast<const float*>(a.x);
  for (int64_t g = g0; g < g1; ++g) {
    for (int r = 0; r < TILE; ++r) {
      const uint32_t code = (uint32_t)a.meta[(tile * a.GW + g / GPW) * TILE + r] >> (4 * (g % GPW));
      const int i0 = code & 3, i1 = (code >> 2) & 3;
      float v0, v1;
      if (a.bf16_storage) {
        const uint16_t* p = static_cast<const uint16_t*>(a.values) + ((tile * a.G + g) * TILE + r) * 2;
        v0 = bf16_bits_to_float(p[0]);
        v1 = bf16_bits_to_float(p[1]);
      } else {
        const float* p = static_cast<const float*>(a.values) + (tile * a.G + g) * 2 * TILE;
        v0 = p[r];
        v1 = p[TILE + r];
      }
      for (int64_t t = 0; t < tb; ++t) {
        const float* xr = x + (t0 + t) * a.ldx + 4 * g;
        acc[t * TILE + r] += v0 * xr[i0] + v1 * xr[i1];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX-512 (fp32 x; fp32 or bf16 storage)

template <int TB, bool BF16W>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile_avx512_t(
    const Args& a, int64_t tile, int64_t t0, int64_t g0, int64_t g1, float* acc) {
  const float* x = static_cast<const float*>(a.x) + t0 * a.ldx;
  __m512 acc0[TB], acc1[TB];
  for (int t = 0; t < TB; ++t) {
    acc0[t] = _mm512_loadu_ps(acc + t * TILE);
    acc1[t] = _mm512_setzero_ps();
  }
  const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
  int64_t g = g0;
  while (g < g1) {
    const int64_t w = g / GPW;
    const int j0 = (int)(g % GPW);
    const int64_t gend = std::min<int64_t>(g1, (w + 1) * GPW);
    __m512i m = _mm512_loadu_si512((const void*)(a.meta + (tile * a.GW + w) * TILE));
    if (j0) m = _mm512_srl_epi32(m, _mm_cvtsi32_si128(4 * j0));
    for (; g < gend; ++g) {
      const __m512i idx1 = _mm512_srli_epi32(m, 2);
      __m512 v0, v1;
      if (BF16W) {
        const __m512i wv = _mm512_loadu_si512(
            (const void*)(static_cast<const uint32_t*>(a.values) + (tile * a.G + g) * TILE));
        v0 = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
        v1 = _mm512_castsi512_ps(_mm512_and_si512(wv, hi_mask));
      } else {
        const float* p = static_cast<const float*>(a.values) + (tile * a.G + g) * 2 * TILE;
        v0 = _mm512_loadu_ps(p);
        v1 = _mm512_loadu_ps(p + TILE);
      }
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + t * a.ldx + 4 * g));
        acc0[t] = _mm512_fmadd_ps(v0, _mm512_permutexvar_ps(m, xb), acc0[t]);
        acc1[t] = _mm512_fmadd_ps(v1, _mm512_permutexvar_ps(idx1, xb), acc1[t]);
      }
      m = _mm512_srli_epi32(m, 4);
    }
  }
  for (int t = 0; t < TB; ++t) _mm512_storeu_ps(acc + t * TILE, _mm512_add_ps(acc0[t], acc1[t]));
}

// AVX-512 BF16: x and storage both bf16; one vdpbf16ps per group and token.
#if defined(__GNUC__) && (__GNUC__ >= 10)
#define ARMOR_HAVE_BF16_PATH 1
template <int TB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void tile_avx512bf16_t(
    const Args& a, int64_t tile, int64_t t0, int64_t g0, int64_t g1, float* acc) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x) + t0 * a.ldx;
  __m512 acc0[TB], acc1[TB];
  for (int t = 0; t < TB; ++t) {
    acc0[t] = _mm512_loadu_ps(acc + t * TILE);
    acc1[t] = _mm512_setzero_ps();
  }
  int64_t g = g0;
  while (g < g1) {
    const int64_t w = g / GPW;
    const int j0 = (int)(g % GPW);
    const int64_t gend = std::min<int64_t>(g1, (w + 1) * GPW);
    __m512i m = _mm512_loadu_si512((const void*)(a.meta + (tile * a.GW + w) * TILE));
    if (j0) m = _mm512_srl_epi32(m, _mm_cvtsi32_si128(4 * j0));
    for (; g < gend; ++g) {
      // word 0 of each 32-bit lane from m (index i0 in bits 0-1), word 1 from m << 14 (i1 in its bits 0-1)
      const __m512i idx = _mm512_mask_blend_epi16((__mmask32)0xAAAAAAAAu, m, _mm512_slli_epi32(m, 14));
      const __m512i wv = _mm512_loadu_si512(
          (const void*)(static_cast<const uint32_t*>(a.values) + (tile * a.G + g) * TILE));
      const bool odd = (g & 1);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        int64_t x4;
        std::memcpy(&x4, x + t * a.ldx + 4 * g, 8);
        const __m512i xp = _mm512_permutexvar_epi16(idx, _mm512_set1_epi64(x4));
        if (odd)
          acc1[t] = _mm512_dpbf16_ps(acc1[t], (__m512bh)wv, (__m512bh)xp);
        else
          acc0[t] = _mm512_dpbf16_ps(acc0[t], (__m512bh)wv, (__m512bh)xp);
      }
      m = _mm512_srli_epi32(m, 4);
    }
  }
  for (int t = 0; t < TB; ++t) _mm512_storeu_ps(acc + t * TILE, _mm512_add_ps(acc0[t], acc1[t]));
}
#endif

// ------------------------------------------------------------------------------------------------
// AVX2 + FMA (fp32 x; fp32 or bf16 storage); a tile is two 8-row halves.

template <int TB, bool BF16W>
__attribute__((target("avx2,fma"))) void tile_avx2_t(const Args& a, int64_t tile, int64_t t0,
                                                      int64_t g0, int64_t g1, float* acc) {
  const float* x = static_cast<const float*>(a.x) + t0 * a.ldx;
  __m256 accl[TB], acch[TB];
  for (int t = 0; t < TB; ++t) {
    accl[t] = _mm256_loadu_ps(acc + t * TILE);
    acch[t] = _mm256_loadu_ps(acc + t * TILE + 8);
  }
  const __m256i hi_mask = _mm256_set1_epi32((int)0xFFFF0000u);
  int64_t g = g0;
  while (g < g1) {
    const int64_t w = g / GPW;
    const int j0 = (int)(g % GPW);
    const int64_t gend = std::min<int64_t>(g1, (w + 1) * GPW);
    const int32_t* mp = a.meta + (tile * a.GW + w) * TILE;
    __m256i ml = _mm256_loadu_si256((const __m256i*)mp);
    __m256i mh = _mm256_loadu_si256((const __m256i*)(mp + 8));
    if (j0) {
      ml = _mm256_srl_epi32(ml, _mm_cvtsi32_si128(4 * j0));
      mh = _mm256_srl_epi32(mh, _mm_cvtsi32_si128(4 * j0));
    }
    for (; g < gend; ++g) {
      const __m256i il1 = _mm256_srli_epi32(ml, 2), ih1 = _mm256_srli_epi32(mh, 2);
      __m256 v0l, v0h, v1l, v1h;
      if (BF16W) {
        const uint32_t* p = static_cast<const uint32_t*>(a.values) + (tile * a.G + g) * TILE;
        const __m256i wl = _mm256_loadu_si256((const __m256i*)p);
        const __m256i wh = _mm256_loadu_si256((const __m256i*)(p + 8));
        v0l = _mm256_castsi256_ps(_mm256_slli_epi32(wl, 16));
        v0h = _mm256_castsi256_ps(_mm256_slli_epi32(wh, 16));
        v1l = _mm256_castsi256_ps(_mm256_and_si256(wl, hi_mask));
        v1h = _mm256_castsi256_ps(_mm256_and_si256(wh, hi_mask));
      } else {
        const float* p = static_cast<const float*>(a.values) + (tile * a.G + g) * 2 * TILE;
        v0l = _mm256_loadu_ps(p);
        v0h = _mm256_loadu_ps(p + 8);
        v1l = _mm256_loadu_ps(p + TILE);
        v1h = _mm256_loadu_ps(p + TILE + 8);
      }
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) {
        const __m256 xb = _mm256_broadcast_ps((const __m128*)(x + t * a.ldx + 4 * g));
        accl[t] = _mm256_fmadd_ps(v0l, _mm256_permutevar8x32_ps(xb, ml), accl[t]);
        acch[t] = _mm256_fmadd_ps(v0h, _mm256_permutevar8x32_ps(xb, mh), acch[t]);
        accl[t] = _mm256_fmadd_ps(v1l, _mm256_permutevar8x32_ps(xb, il1), accl[t]);
        acch[t] = _mm256_fmadd_ps(v1h, _mm256_permutevar8x32_ps(xb, ih1), acch[t]);
      }
      ml = _mm256_srli_epi32(ml, 4);
      mh = _mm256_srli_epi32(mh, 4);
    }
  }
  for (int t = 0; t < TB; ++t) {
    _mm256_storeu_ps(acc + t * TILE, accl[t]);
    _mm256_storeu_ps(acc + t * TILE + 8, acch[t]);
  }
}

// ------------------------------------------------------------------------------------------------
// dispatch of one (tile, token block, K-range) step

using TileFn = void (*)(const Args&, int64_t, int64_t, int64_t, int64_t, float*);

template <int TB>
TileFn pick_fn(int isa, bool bf16w, bool bf16x) {
#ifdef ARMOR_HAVE_BF16_PATH
  if (isa == ISA_AVX512BF16 && bf16w && bf16x) return &tile_avx512bf16_t<TB>;
#endif
  if (isa >= ISA_AVX512) return bf16w ? &tile_avx512_t<TB, true> : &tile_avx512_t<TB, false>;
  if (isa == ISA_AVX2) return bf16w ? &tile_avx2_t<TB, true> : &tile_avx2_t<TB, false>;
  return nullptr;
}

TileFn pick(int tb, int isa, bool bf16w, bool bf16x) {
  switch (tb) {
    case 1: return pick_fn<1>(isa, bf16w, bf16x);
    case 2: return pick_fn<2>(isa, bf16w, bf16x);
    case 3: return pick_fn<3>(isa, bf16w, bf16x);
    case 4: return pick_fn<4>(isa, bf16w, bf16x);
    case 5: return pick_fn<5>(isa, bf16w, bf16x);
    case 6: return pick_fn<6>(isa, bf16w, bf16x);
    case 7: return pick_fn<7>(isa, bf16w, bf16x);
    default: return pick_fn<8>(isa, bf16w, bf16x);
  }
}

// ------------------------------------------------------------------------------------------------
// public functions

void check_packed(const torch::Tensor& values, const torch::Tensor& meta, int64_t n, int64_t k) {
  TORCH_CHECK(k > 0 && k % 4 == 0, "sparse24: K must be a positive multiple of 4, got ", k);
  const int64_t tiles = (n + TILE - 1) / TILE, G = k / 4, GW = (G + GPW - 1) / GPW;
  TORCH_CHECK(values.is_contiguous() && meta.is_contiguous(), "sparse24: packed tensors must be contiguous");
  TORCH_CHECK(meta.scalar_type() == torch::kInt32 && meta.numel() == tiles * GW * TILE,
              "sparse24: bad metadata tensor for N=", n, " K=", k);
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 || values.scalar_type() == torch::kBFloat16,
              "sparse24: values must be float32 or bfloat16");
  TORCH_CHECK(values.numel() == tiles * G * 2 * TILE, "sparse24: bad values tensor for N=", n, " K=", k);
}

// dense 2:4 core (N, K) -> (values, meta). dtype: storage dtype of values.
std::vector<torch::Tensor> pack(const torch::Tensor& core_in, c10::ScalarType dtype) {
  TORCH_CHECK(core_in.dim() == 2, "sparse24.pack: core must be 2-D (N, K)");
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "sparse24.pack: dtype must be float32 or bfloat16");
  const auto core = core_in.to(torch::kFloat32).contiguous();
  const int64_t N = core.size(0), K = core.size(1);
  TORCH_CHECK(K > 0 && K % 4 == 0, "sparse24.pack: K must be a positive multiple of 4, got ", K);
  const int64_t tiles = (N + TILE - 1) / TILE, G = K / 4, GW = (G + GPW - 1) / GPW;
  auto vals = torch::zeros({tiles, G, 2, TILE}, torch::kFloat32);
  auto meta = torch::zeros({tiles, GW, TILE}, torch::kInt32);
  const float* c = core.data_ptr<float>();
  float* v = vals.data_ptr<float>();
  int32_t* m = meta.data_ptr<int32_t>();
  std::atomic<int64_t> bad_row{-1}, bad_col{-1};
  at::parallel_for(0, tiles, 1, [&](int64_t tb, int64_t te) {
    for (int64_t tile = tb; tile < te; ++tile) {
      for (int r = 0; r < TILE; ++r) {
        const int64_t row = tile * TILE + r;
        for (int64_t g = 0; g < G; ++g) {
          int pos[2] = {0, 1}, npos = 0;
          if (row < N) {
            const float* p = c + row * K + 4 * g;
            int nz = 0;
            for (int i = 0; i < 4; ++i) if (p[i] != 0.f) { if (nz < 2) pos[nz] = i; ++nz; }
            if (nz > 2) { bad_row = row; bad_col = 4 * g; continue; }
            npos = nz;
            // fill the remaining slots with the lowest unused positions (values 0)
            for (int i = 0; i < 4 && npos < 2; ++i) {
              bool used = false;
              for (int q = 0; q < npos; ++q) used |= pos[q] == i;
              if (!used) pos[npos++] = i;
            }
            if (pos[0] > pos[1]) std::swap(pos[0], pos[1]);
            v[((tile * G + g) * 2 + 0) * TILE + r] = p[pos[0]];
            v[((tile * G + g) * 2 + 1) * TILE + r] = p[pos[1]];
          }
          const uint32_t code = (uint32_t)pos[0] | ((uint32_t)pos[1] << 2);
          m[(tile * GW + g / GPW) * TILE + r] |= (int32_t)(code << (4 * (g % GPW)));
        }
      }
    }
  });
  TORCH_CHECK(bad_row.load() < 0, "sparse24.pack: core is not 2:4 sparse (row ", bad_row.load(),
              ", columns ", bad_col.load(), "..", bad_col.load() + 3, ")");
  if (dtype == torch::kBFloat16) {
    // (tiles, G, 2, 16) -> (tiles, G, 16, 2): one 32-bit word (v0, v1) per row
    return {vals.to(torch::kBFloat16).transpose(2, 3).contiguous(), meta};
  }
  return {vals, meta};
}

// (values, meta) -> dense (N, K) in the storage dtype (tests, and the large-batch path): one pass,
// each output row written once, sequentially.
template <bool BF16>
void unpack_rows(const void* values, const int32_t* m, int64_t n, int64_t k, void* out) {
  const int64_t G = k / 4, GW = (G + GPW - 1) / GPW, tiles = (n + TILE - 1) / TILE;
  using raw_t = typename std::conditional<BF16, uint16_t, float>::type;
  const raw_t* v = static_cast<const raw_t*>(values);
  raw_t* o = static_cast<raw_t*>(out);
  at::parallel_for(0, tiles, 1, [&](int64_t tb, int64_t te) {
    for (int64_t tile = tb; tile < te; ++tile)
      for (int r = 0; r < TILE; ++r) {
        const int64_t row = tile * TILE + r;
        if (row >= n) break;
        raw_t* orow = o + row * k;
        const int32_t* mrow = m + tile * GW * TILE + r;
        for (int64_t w = 0; w < GW; ++w) {
          uint32_t code = (uint32_t)mrow[w * TILE];
          const int64_t gend = std::min<int64_t>(G, (w + 1) * GPW);
          for (int64_t g = w * GPW; g < gend; ++g, code >>= 4) {
            raw_t a0, a1;
            if (BF16) {
              a0 = v[((tile * G + g) * TILE + r) * 2];
              a1 = v[((tile * G + g) * TILE + r) * 2 + 1];
            } else {
              a0 = v[((tile * G + g) * 2) * TILE + r];
              a1 = v[((tile * G + g) * 2 + 1) * TILE + r];
            }
            raw_t* q = orow + 4 * g;
            q[0] = q[1] = q[2] = q[3] = raw_t(0);
            q[code & 3] = a0;
            q[(code >> 2) & 3] = a1;
          }
        }
      }
  });
}

torch::Tensor unpack(const torch::Tensor& values, const torch::Tensor& meta, int64_t n, int64_t k) {
  check_packed(values, meta, n, k);
  auto out = torch::empty({n, k}, values.options());
  if (values.scalar_type() == torch::kBFloat16)
    unpack_rows<true>(values.data_ptr(), meta.data_ptr<int32_t>(), n, k, out.data_ptr());
  else
    unpack_rows<false>(values.data_ptr(), meta.data_ptr<int32_t>(), n, k, out.data_ptr());
  return out;
}

// y (T, N) = x (T, K) @ S^T + bias; x 2-D, any float dtype (output in x's dtype).
torch::Tensor mm(const torch::Tensor& x_in, const torch::Tensor& values, const torch::Tensor& meta,
                 int64_t n, int64_t k, const c10::optional<torch::Tensor>& bias_in) {
  check_packed(values, meta, n, k);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "sparse24.mm: x must be (T, ", k, ")");
  TORCH_CHECK(x_in.device().is_cpu(), "sparse24.mm: CPU tensors only");
  const int isa = resolve_isa();
  const bool bf16w = values.scalar_type() == torch::kBFloat16;
  const auto out_dtype = x_in.scalar_type();
  const int64_t T = x_in.size(0);
  auto y = torch::empty({T, n}, x_in.options());
  if (T == 0) return y;
  bool bf16x = false;
#ifdef ARMOR_HAVE_BF16_PATH
  bf16x = isa == ISA_AVX512BF16 && bf16w && out_dtype == torch::kBFloat16;
#endif
  torch::Tensor x = bf16x ? x_in.contiguous() : x_in.to(torch::kFloat32).contiguous();
  torch::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->numel() == n, "sparse24.mm: bias must have N=", n, " elements");
    bias = bias_in->to(torch::kFloat32).contiguous();
  }
  Args a;
  a.x = x.data_ptr();
  a.ldx = k;
  a.values = values.data_ptr();
  a.meta = meta.data_ptr<int32_t>();
  a.T = T; a.N = n; a.K = k; a.G = k / 4; a.GW = (a.G + GPW - 1) / GPW;
  a.bf16_storage = bf16w;
  const int64_t tiles = (n + TILE - 1) / TILE;
  const int64_t TBMAX = 8;
  const int64_t nblocks = (T + TBMAX - 1) / TBMAX;
  // several token blocks: walk K in chunks so a tile's chunk is read from cache by each block
  const int64_t kchunk = nblocks > 1 ? KCHUNK : a.G;
  const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;
  // grain: enough tiles per task that a thread streams >= ~64 KiB of weights
  const int64_t tile_bytes = a.G * TILE * (bf16w ? 4 : 8) + a.GW * TILE * 4;
  const int64_t grain = std::max<int64_t>(1, (int64_t)(65536 / std::max<int64_t>(1, tile_bytes * std::min<int64_t>(T, 8))));
  at::parallel_for(0, tiles, grain, [&](int64_t tb, int64_t te) {
    std::vector<float> acc(T * TILE);
    for (int64_t tile = tb; tile < te; ++tile) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g0 = 0; g0 < a.G; g0 += kchunk) {
        const int64_t g1 = std::min(a.G, g0 + kchunk);
        for (int64_t t0 = 0; t0 < T; t0 += TBMAX) {
          const int64_t tbn = std::min(TBMAX, T - t0);
          TileFn fn = pick((int)tbn, isa, bf16w, bf16x);
          if (fn) fn(a, tile, t0, g0, g1, acc.data() + t0 * TILE);
          else tile_scalar(a, tile, t0, tbn, g0, g1, acc.data() + t0 * TILE);
        }
      }
      switch (out_dtype) {
        case torch::kFloat32: store_tile(acc.data(), T, tile, n, bias_p, y.data_ptr<float>(), n); break;
        case torch::kBFloat16: store_tile(acc.data(), T, tile, n, bias_p, y.data_ptr<c10::BFloat16>(), n); break;
        case torch::kHalf: store_tile(acc.data(), T, tile, n, bias_p, y.data_ptr<c10::Half>(), n); break;
        default: TORCH_CHECK(false, "sparse24.mm: unsupported x dtype");
      }
    }
  });
  return y;
}

// The op armor_vllm::cpu_sparse24_mm: x (..., K) -> (..., N). Up to max_tokens tokens run the
// compressed kernel; above, the core is decompressed into a temporary dense weight for at::linear
// (measured faster there); nothing dense outlives the call.
int64_t large_batch_tokens() {
  static const int64_t v = [] {
    const char* e = std::getenv("ARMOR_VLLM_CPU_SPARSE_MAX_TOKENS");
    return e && *e ? std::atoll(e) : (int64_t)128;
  }();
  return v;
}

torch::Tensor sparse24_mm_op(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& meta,
                             int64_t n, int64_t k, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "cpu_sparse24_mm: x must end in K=", k);
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  const auto x2 = x.reshape({-1, k});
  torch::Tensor y;
  if (x2.size(0) > large_batch_tokens()) {
    const auto w = unpack(values, meta, n, k);
    const bool has_bias = bias.has_value() && bias->defined();
    if (w.scalar_type() == x.scalar_type()) {
      y = has_bias ? at::linear(x2, w, bias->to(x.scalar_type())) : at::linear(x2, w);
    } else {  // never round weights or x below their own precision
      const auto xf = x2.to(torch::kFloat32);
      const auto wf = w.to(torch::kFloat32);
      y = (has_bias ? at::linear(xf, wf, bias->to(torch::kFloat32)) : at::linear(xf, wf)).to(x.scalar_type());
    }
  } else {
    y = mm(x2, values, meta, n, k, bias);
  }
  return y.reshape(out_shape);
}

// ---------------------------------------------------------------------------------------------
// Block-diagonal wrappers (ARMOR's A and B) for few tokens: y_s[t, j*bs:(j+1)*bs] = x[t, j*bs:(j+1)*bs]
// @ wt[j][:, s*bs:(s+1)*bs] for every shard s, with wt (n, bs, shards*bs) as kernels.blockdiag stacks
// it. At decode the wrappers are tiny (2*d*bs numbers) and a batched matmul costs its dispatch and
// layout copies, not its flops: one pass per block here, fp32 accumulation, any float x / wt dtype.

template <typename wt_t>
static inline __attribute__((always_inline)) void bd_row(float* __restrict__ a, const wt_t* __restrict__ wr, float xv,
                                                         int64_t width) {
  if constexpr (std::is_same<wt_t, float>::value) {
#pragma GCC ivdep
    for (int64_t c = 0; c < width; ++c) a[c] += xv * wr[c];
  } else {  // bf16 -> fp32 is a 16-bit shift: vectorises
    const uint16_t* __restrict__ wb = reinterpret_cast<const uint16_t*>(wr);
#pragma GCC ivdep
    for (int64_t c = 0; c < width; ++c) {
      const uint32_t u = static_cast<uint32_t>(wb[c]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      a[c] += xv * f;
    }
  }
}

// Blocks jb..je: each weight row of a block is read once for all T tokens (acc: T x width in L1).
template <typename xt, typename wt_t, typename ot>
static inline __attribute__((always_inline)) void bd_blocks(const xt* x, const wt_t* w, const float* bias,
                                                            ot* out, int64_t T, int64_t n, int64_t bs,
                                                            int64_t shards, int64_t jb, int64_t je) {
  const int64_t width = shards * bs, d = n * bs;
  std::vector<float> acc(T * width), xf(T * bs);
  for (int64_t j = jb; j < je; ++j) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < bs; ++i) xf[t * bs + i] = static_cast<float>(x[t * d + j * bs + i]);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t i = 0; i < bs; ++i) {
      const wt_t* wr = w + (j * bs + i) * width;
      for (int64_t t = 0; t < T; ++t) bd_row<wt_t>(acc.data() + t * width, wr, xf[t * bs + i], width);
    }
    for (int64_t s = 0; s < shards; ++s)
      for (int64_t t = 0; t < T; ++t) {
        ot* o = out + (s * T + t) * d + j * bs;
        const float* a = acc.data() + t * width + s * bs;
        for (int64_t c = 0; c < bs; ++c) o[c] = static_cast<ot>(a[c] + (bias ? bias[j * bs + c] : 0.f));
      }
  }
}

template <typename xt, typename wt_t, typename ot>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void bd_avx512(const xt* x, const wt_t* w, const float* b, ot* o,
                                                                   int64_t T, int64_t n, int64_t bs, int64_t s,
                                                                   int64_t jb, int64_t je) {
  bd_blocks(x, w, b, o, T, n, bs, s, jb, je);
}
template <typename xt, typename wt_t, typename ot>
__attribute__((target("avx2,fma"))) void bd_avx2(const xt* x, const wt_t* w, const float* b, ot* o, int64_t T,
                                                 int64_t n, int64_t bs, int64_t s, int64_t jb, int64_t je) {
  bd_blocks(x, w, b, o, T, n, bs, s, jb, je);
}
template <typename xt, typename wt_t, typename ot>
void bd_scalar(const xt* x, const wt_t* w, const float* b, ot* o, int64_t T, int64_t n, int64_t bs, int64_t s,
               int64_t jb, int64_t je) {
  bd_blocks(x, w, b, o, T, n, bs, s, jb, je);
}

template <typename xt, typename wt_t>
void bd_dispatch(const torch::Tensor& x, const torch::Tensor& w, const float* bias, torch::Tensor& y, int64_t T,
                 int64_t n, int64_t bs, int64_t shards) {
  const int isa = resolve_isa();
  const xt* xp = x.data_ptr<xt>();
  const wt_t* wp = w.data_ptr<wt_t>();
  xt* op = y.data_ptr<xt>();
  // grain: about 64 KiB of wrapper weights per task
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, bs * bs * shards * (int64_t)sizeof(wt_t)));
  at::parallel_for(0, n, grain, [&](int64_t jb, int64_t je) {
    if (isa >= ISA_AVX512) bd_avx512<xt, wt_t, xt>(xp, wp, bias, op, T, n, bs, shards, jb, je);
    else if (isa == ISA_AVX2) bd_avx2<xt, wt_t, xt>(xp, wp, bias, op, T, n, bs, shards, jb, je);
    else bd_scalar<xt, wt_t, xt>(xp, wp, bias, op, T, n, bs, shards, jb, je);
  });
}

// The op armor_vllm::cpu_blockdiag: x (T, n*bs), wt (n, bs, shards*bs) -> (T, n*bs) for one shard,
// (shards, T, n*bs) for several; bias (n*bs) only with one shard. Output in x's dtype.
torch::Tensor blockdiag_op(const torch::Tensor& x_in, const torch::Tensor& wt_in, int64_t shards,
                           const c10::optional<torch::Tensor>& bias_in) {
  TORCH_CHECK(wt_in.dim() == 3 && shards >= 1 && wt_in.size(2) == shards * wt_in.size(1),
              "cpu_blockdiag: wt must be (n, bs, shards*bs) with shards=", shards, ", got ", wt_in.sizes());
  const int64_t n = wt_in.size(0), bs = wt_in.size(1), d = n * bs;
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == d, "cpu_blockdiag: x must be (T, ", d, "), got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && wt_in.device().is_cpu(), "cpu_blockdiag: CPU tensors only");
  const auto xs = x_in.scalar_type(), ws = wt_in.scalar_type();
  TORCH_CHECK(xs == torch::kFloat32 || xs == torch::kBFloat16, "cpu_blockdiag: x must be float32 or bfloat16");
  TORCH_CHECK(ws == torch::kFloat32 || ws == torch::kBFloat16, "cpu_blockdiag: wt must be float32 or bfloat16");
  const int64_t T = x_in.size(0);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  TORCH_CHECK(!has_bias || shards == 1, "cpu_blockdiag: bias is only supported for a single shard");
  auto y = shards == 1 ? torch::empty({T, d}, x_in.options()) : torch::empty({shards, T, d}, x_in.options());
  if (T == 0) return y;
  const auto x = x_in.contiguous();
  const auto w = wt_in.contiguous();
  torch::Tensor bias;
  if (has_bias) {
    TORCH_CHECK(bias_in->numel() == d, "cpu_blockdiag: bias must have ", d, " elements");
    bias = bias_in->to(torch::kFloat32).contiguous();
  }
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  if (xs == torch::kFloat32 && ws == torch::kFloat32) bd_dispatch<float, float>(x, w, bp, y, T, n, bs, shards);
  else if (xs == torch::kFloat32) bd_dispatch<float, c10::BFloat16>(x, w, bp, y, T, n, bs, shards);
  else if (ws == torch::kFloat32) bd_dispatch<c10::BFloat16, float>(x, w, bp, y, T, n, bs, shards);
  else bd_dispatch<c10::BFloat16, c10::BFloat16>(x, w, bp, y, T, n, bs, shards);
  return y;
}

std::string isa_string() { return isa_name(resolve_isa()); }
std::string best_isa_string() { return isa_name(cpu_best_isa()); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(armor_vllm, m) {
  m.def("cpu_sparse24_mm(Tensor x, Tensor values, Tensor meta, int n, int k, Tensor? bias=None) -> Tensor");
  m.def("cpu_blockdiag(Tensor x, Tensor wt, int shards, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(armor_vllm, CPU, m) {
  m.impl("cpu_sparse24_mm", &sparse24_mm_op);
  m.impl("cpu_blockdiag", &blockdiag_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ARMOR 2:4 sparse linear for CPUs (AVX-512 / AVX2 / scalar, runtime dispatch)";
  m.def("pack", &pack, "dense 2:4 core (N, K) -> (values, meta)");
  m.def("unpack", &unpack, "(values, meta, N, K) -> dense core (N, K)");
  m.def("mm", &mm, "y = x @ S^T + bias from the packed core");
  m.def("large_batch_tokens", &large_batch_tokens, "tokens above which mm decompresses per call");
  m.def("isa", &isa_string, "the path mm takes here (ARMOR_VLLM_CPU_ISA applied)");
  m.def("best_isa", &best_isa_string, "the best path this CPU supports");
  m.attr("TILE") = TILE;
}
