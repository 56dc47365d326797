// Weight-only int4 / int8 matrix products for decoding on CPU, in llama.cpp's style.
//
// y[n, out] = x[n, in] W^T with x quantized on the fly to int8 in blocks of 32 (one fp32 scale per block,
// max|x| / 127) and W read as stored:
//  * int4: [out, in / 2] uint8, per 32 weights 16 bytes, byte j holding weight j in its low nibble and
//    weight j + 16 in its high nibble, q in 0..15 (Q4_1's layout); [out, in / group, 2] fp16 (scale d,
//    minimum m) with w = q * d + m. The block dot is sum(q * xq) (unsigned x signed: dpbusd's operand
//    order), and the minimum adds m * dx * sum(xq) of the block, so the asymmetric grid costs no extra pass.
//  * int8: [out, in] int8 and one fp32 scale per output row (bf16 when stored); dpbusd(|w|, sign(xq, w)).
// Each block's int32 dot becomes fp32 and is accumulated with d_w * d_x, as llama.cpp does. Four weight
// rows are processed at once (independent FMA chains) against up to four activation rows, so each
// weight byte is read once per four activation rows; output rows are split over threads.
// Two instruction sets, chosen when it is built (models/weight_only.py passes -DLLMK_VNNI and AVX-512 flags
// where the CPU has AVX-512 VNNI): 256-bit dpbusd, or AVX2's maddubs + madd.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // activations per int8 scale, weights per int4 byte group
constexpr int kRows = 4;        // weight rows per tile (8 measured no faster: 4.4 against 4.7 ms, noise)
constexpr int kCols = 4;        // activation rows per tile
constexpr int64_t kAhead = 16;  // rows ahead that the weight stream is prefetched (DRAM latency)

// x [n, in] fp32 -> xq [n, in] int8, per block scale dx [n, in / 32] and dx * sum(xq) of the block, sx.
void quantize_rows(const float* x, int64_t n, int64_t in, int8_t* xq, float* dx, float* sx) {
  const int64_t blocks = in / kBlock;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* v = x + i * in + b * kBlock;
      float amax = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f, inverse = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = xq + i * in + b * kBlock;
      int sum = 0;
      for (int64_t j = 0; j < kBlock; ++j) sum += (q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inverse)));
      dx[i * blocks + b] = d;
      // The sum of the quantized block, not of x: then the int4 minimum's term and the q * d term see the
      // same x, and the error is that of x's rounding times w (not times q * d, whose mean is -m).
      sx[i * blocks + b] = d * static_cast<float>(sum);
    }
  }
}

struct Activations {
  const int8_t* q;
  const float* d;
  const float* s;
  int64_t in, blocks;
};

// The horizontal sum of 8 floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// u8 weights x s8 activations -> 8 int32 partial sums of 4 products each.
inline __m256i block_dot(__m256i u, __m256i s) {
#ifdef LLMK_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // maddubs pairs stay below 2^15: int4 q <= 15, int8 |w| <= 128 against |xq| <= 127.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// The int4 kernel's activations: blocks in tuples of kTuple = 2 (a 512-bit variant with 4 took twice as
// long on this Zen 4: 10.4 against 4.9 ms for a step's products),
// 32 * kTuple bytes per tuple laid out as [first halves x_b[0:16] of its blocks, then second halves
// x_b[16:32]] (missing last blocks are zeros), so that the low nibbles of 16 * kTuple packed weight bytes
// (each block's first half) and their high nibbles each meet one load. Per tuple, 4 lanes per block of
// dx and of sx / 4 (the 4 int32 lanes dpbusd leaves per 16 products).
constexpr int64_t kTuple = 2;

void tuple_rows(const int8_t* xq, const float* dx, const float* sx, int64_t n, int64_t blocks, int8_t* q,
                float* dv, float* sv) {
  const int64_t tuples = (blocks + kTuple - 1) / kTuple;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = 0; p < tuples; ++p) {
      int8_t* dst = q + (i * tuples + p) * 32 * kTuple;
      for (int64_t k = 0; k < kTuple; ++k) {
        const int64_t b = kTuple * p + k;
        for (int part = 0; part < 2; ++part) {
          int8_t* to = dst + part * 16 * kTuple + k * 16;
          if (b < blocks) std::copy_n(xq + (i * blocks + b) * kBlock + part * 16, 16, to);
          else std::fill_n(to, 16, int8_t{0});
        }
        for (int lane = 0; lane < 4; ++lane) {
          dv[(i * tuples + p) * 4 * kTuple + k * 4 + lane] = b < blocks ? dx[i * blocks + b] : 0.f;
          sv[(i * tuples + p) * 4 * kTuple + k * 4 + lane] = b < blocks ? sx[i * blocks + b] / 4.f : 0.f;
        }
      }
    }
  }
}

// int4 tile: rows [r0, r0 + R) of W against activation rows [c0, c0 + C), two blocks per step.
// `Shared`: both blocks of a pair use one scale (group size 64 or more), else one each (group 32).
template <int R, int C, bool Shared>
inline void int4_tile(const uint8_t* w, const uint16_t* scales, int64_t groups, int64_t per_group,
                      const Activations& a, int64_t r0, int64_t c0, float* y, int64_t out) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i spread_d = Shared ? _mm256_setzero_si256() : _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i spread_m = Shared ? _mm256_set1_epi32(1) : _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
  const int64_t row_bytes = a.in / 2, pairs = (a.blocks + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t b = 2 * p;
    const bool whole = b + 1 < a.blocks;  // else the last, odd block: its pair's second half is zeros
    __m256i xl[C], xh[C];
    __m256 dx[C], sx[C];
    for (int c = 0; c < C; ++c) {
      const int8_t* x = a.q + ((c0 + c) * pairs + p) * 64;
      xl[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
      xh[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
      dx[c] = _mm256_loadu_ps(a.d + ((c0 + c) * pairs + p) * 8);
      sx[c] = _mm256_loadu_ps(a.s + ((c0 + c) * pairs + p) * 8);
    }
    const int64_t g = b / per_group;
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + (r0 + r) * row_bytes + b * 16;
      if ((p & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead * row_bytes), _MM_HINT_T0);
      const __m256i packed = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row))
                                   : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      const __m256i ql = _mm256_and_si256(packed, low), qh = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
      // Scales [d, m] of the pair's block(s) as fp16 -> fp32 (F16C), spread over the lanes of each block.
      const uint16_t* s = scales + ((r0 + r) * groups + g) * 2;
      int32_t two;
      std::memcpy(&two, s, 4);
      __m128i bits = _mm_cvtsi32_si128(two);
      if (!Shared && whole) {
        int64_t four;
        std::memcpy(&four, s, 8);
        bits = _mm_cvtsi64_si128(four);
      }
      const __m256 dm = _mm256_castps128_ps256(_mm_cvtph_ps(bits));
      const __m256 d = _mm256_permutevar8x32_ps(dm, spread_d), m = _mm256_permutevar8x32_ps(dm, spread_m);
      for (int c = 0; c < C; ++c) {
#ifdef LLMK_VNNI
        const __m256i sum = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ql, xl[c]), qh, xh[c]);
#else
        const __m256i sum = _mm256_add_epi32(block_dot(ql, xl[c]), block_dot(qh, xh[c]));
#endif
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, dx[c]), acc[r][c]);
        acc[r][c] = _mm256_fmadd_ps(m, sx[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[(c0 + c) * out + r0 + r] = hsum(acc[r][c]);
}

template <int R, int C>
inline void int8_tile(const int8_t* w, const float* scales, const Activations& a, int64_t r0, int64_t c0,
                      float* y, int64_t out) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) {
    __m256i xs[C];
    __m256 dx[C];
    for (int c = 0; c < C; ++c) {
      xs[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + (c0 + c) * a.in + b * kBlock));
      dx[c] = _mm256_set1_ps(a.d[(c0 + c) * a.blocks + b]);
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* row = w + (r0 + r) * a.in + b * kBlock;
      if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + kAhead * a.in), _MM_HINT_T0);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      const __m256i magnitude = _mm256_sign_epi8(q, q);
      for (int c = 0; c < C; ++c) {
        const __m256 dot = _mm256_cvtepi32_ps(block_dot(magnitude, _mm256_sign_epi8(xs[c], q)));
        acc[r][c] = _mm256_fmadd_ps(dot, dx[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[(c0 + c) * out + r0 + r] = hsum(acc[r][c]) * scales[r0 + r];
}

// Dispatch a tile of R weight rows (1..4) over all activation rows, C at a time.
template <int R, typename Tile>
inline void columns(int64_t n, Tile&& tile) {
  int64_t c = 0;
  for (; c + kCols <= n; c += kCols) tile(std::integral_constant<int, R>{}, std::integral_constant<int, kCols>{}, c);
  switch (n - c) {
    case 3: tile(std::integral_constant<int, R>{}, std::integral_constant<int, 3>{}, c); break;
    case 2: tile(std::integral_constant<int, R>{}, std::integral_constant<int, 2>{}, c); break;
    case 1: tile(std::integral_constant<int, R>{}, std::integral_constant<int, 1>{}, c); break;
    default: break;
  }
}

template <typename Tile>
inline void rows(int64_t begin, int64_t end, int64_t n, Tile&& tile) {
  int64_t r = begin;
  for (; r + kRows <= end; r += kRows)
    columns<kRows>(n, [&](auto R, auto C, int64_t c) { tile(R, C, r, c); });
  for (; r < end; ++r) columns<1>(n, [&](auto R, auto C, int64_t c) { tile(R, C, r, c); });
}

void int4_range(const uint8_t* w, const uint16_t* scales, int64_t groups, int64_t per_group, const Activations& a,
                int64_t begin, int64_t end, int64_t n, float* y, int64_t out) {
  rows(begin, end, n, [&](auto R, auto C, int64_t r, int64_t c) {
    if (per_group < kTuple)
      int4_tile<decltype(R)::value, decltype(C)::value, false>(w, scales, groups, per_group, a, r, c, y, out);
    else int4_tile<decltype(R)::value, decltype(C)::value, true>(w, scales, groups, per_group, a, r, c, y, out);
  });
}

void int8_range(const int8_t* w, const float* scales, const Activations& a, int64_t begin, int64_t end, int64_t n,
                float* y, int64_t out) {
  rows(begin, end, n, [&](auto R, auto C, int64_t r, int64_t c) {
    int8_tile<decltype(R)::value, decltype(C)::value>(w, scales, a, r, c, y, out);
  });
}

// Output rows per task: whole tiles, and enough of them that a task is worth starting.
constexpr int64_t kGrain = 64;

struct Quantized {
  at::Tensor q, d, s;
  Activations view() const {
    return {q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>(), q.size(1), d.size(1)};
  }
};

Quantized quantize_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be [n, in] fp32");
  TORCH_CHECK(x.size(1) % kBlock == 0, "in_features must be a multiple of 32, got ", x.size(1));
  const at::Tensor input = x.contiguous();
  const int64_t n = input.size(0), in = input.size(1);
  Quantized out{at::empty({n, in}, x.options().dtype(at::kChar)), at::empty({n, in / kBlock}, x.options()),
                at::empty({n, in / kBlock}, x.options())};
  const float* src = input.data_ptr<float>();
  int8_t* q = out.q.data_ptr<int8_t>();
  float *d = out.d.data_ptr<float>(), *s = out.s.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    quantize_rows(src + begin * in, end - begin, in, q + begin * in, d + begin * (in / kBlock),
                  s + begin * (in / kBlock));
  });
  return out;
}

at::Tensor finish(at::Tensor y, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

}  // namespace

#ifdef LLMK_VNNI
std::string isa() { return "avx512vnni"; }
#else
std::string isa() { return "avx2"; }
#endif

// x [n, in] fp32, packed [out, in / 2] uint8, scales [out, in / group, 2] fp16 -> [n, out] fp32.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t group,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && scales.is_contiguous() &&
                  scales.scalar_type() == at::kHalf,
              "int4: packed uint8 and fp16 scales, contiguous");
  TORCH_CHECK(group % kBlock == 0 && x.size(1) % group == 0 && packed.size(1) * 2 == x.size(1), "int4 shapes");
  const Quantized natural = quantize_input(x);
  const int64_t n = x.size(0), out = packed.size(0), groups = x.size(1) / group, blocks = x.size(1) / kBlock;
  const int64_t tuples = (blocks + kTuple - 1) / kTuple;
  Quantized paired{at::empty({n, tuples * 32 * kTuple}, natural.q.options()),
                   at::empty({n, tuples * 4 * kTuple}, x.options()), at::empty({n, tuples * 4 * kTuple}, x.options())};
  tuple_rows(natural.q.data_ptr<int8_t>(), natural.d.data_ptr<float>(), natural.s.data_ptr<float>(), n, blocks,
            paired.q.data_ptr<int8_t>(), paired.d.data_ptr<float>(), paired.s.data_ptr<float>());
  const Activations a{paired.q.data_ptr<int8_t>(), paired.d.data_ptr<float>(), paired.s.data_ptr<float>(),
                      x.size(1), blocks};
  at::Tensor y = at::empty({n, out}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, (out + kRows - 1) / kRows, kGrain / kRows, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kRows, last = std::min(out, end * kRows);
    int4_range(w, s, groups, group / kBlock, a, first, last, n, dst, out);
  });
  return finish(y, bias);
}

// x [n, in] fp32, weight [out, in] int8, scales [out] fp32 -> [n, out] fp32.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.size(1) == x.size(1),
              "int8: weight [out, in] int8, contiguous");
  const Quantized q = quantize_input(x);
  const Activations a = q.view();
  const at::Tensor row_scales = scales.to(at::kFloat).contiguous();
  const int64_t n = x.size(0), out = weight.size(0);
  at::Tensor y = at::empty({n, out}, x.options());
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = row_scales.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, (out + kRows - 1) / kRows, kGrain / kRows, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * kRows, last = std::min(out, end * kRows);
    int8_range(w, s, a, first, last, n, dst, out);
  });
  return finish(y, bias);
}

// ---- One decode step's layers in one call (llama.cpp's way: no per-op dispatch) ----------------------

namespace {

// One weight-only product as the Python side hands it over: packed, scales, bias (empty if none).
struct Product {
  at::Tensor packed, scales, bias;
  int64_t bits, group;
  at::Tensor operator()(const at::Tensor& x) const {
    const c10::optional<at::Tensor> b = bias.numel() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
    return bits == 4 ? int4_mm(x, packed, scales, group, b) : int8_mm(x, packed, scales, b);
  }
};

// RMSNorm of each row of x [n, hidden] with weight [hidden], fp32 (as F.rms_norm computes it).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t n = x.size(0), hidden = x.size(1);
  at::Tensor y = at::empty_like(x);
  const float *src = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float* v = src + i * hidden;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < hidden; ++j) sum += v[j] * v[j];
    const float inverse = 1.f / std::sqrt(sum / hidden + static_cast<float>(eps));
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) dst[i * hidden + j] = v[j] * inverse * w[j];
  }
  return y;
}

// HF's half-split rotary embedding of one head in place.
void rotate(float* v, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = v[d], b = v[d + half];
    v[d] = a * cos[d] - b * sin[d];
    v[d + half] = b * cos[d + half] + a * sin[d + half];
  }
}

}  // namespace

// Every layer of a Llama decode step whose products are all weight-only, for rows that each decode one
// token: x [n, hidden] fp32 (embedded tokens) -> x after the last layer (before the final norm).
// `tensors` holds per layer: input norm, post norm, then (packed, scales, bias) of qkv, o, gate_up, down;
// `settings` per layer (bits, group) of those four. cache [layers, 2, slots, kv_heads, cap, dim] fp32 gets
// each row's key and value at (slot, position); attention covers positions 0..position of its slot.
at::Tensor decode_layers(at::Tensor x, const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& settings,
                         at::Tensor cache, const std::vector<int64_t>& slots, const std::vector<int64_t>& positions,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t kv_heads, double eps) {
  TORCH_CHECK(cache.is_contiguous() && cache.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              "decode_layers: contiguous fp32 cache and rope tables");
  const int64_t n = x.size(0), layers = cache.size(0), num_slots = cache.size(2), capacity = cache.size(4);
  const int64_t dim = cache.size(5), group = heads / kv_heads, width = (heads + 2 * kv_heads) * dim;
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == layers * 14 && static_cast<int64_t>(settings.size()) == layers * 8,
              "decode_layers: 14 tensors and 8 settings per layer");
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  const int64_t max_length = *std::max_element(positions.begin(), positions.end()) + 1;
  x = x.contiguous();
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* t = tensors.data() + layer * 14;
    const int64_t* set = settings.data() + layer * 8;
    const Product qkv{t[2], t[3], t[4], set[0], set[1]}, o{t[5], t[6], t[7], set[2], set[3]};
    const Product gate_up{t[8], t[9], t[10], set[4], set[5]}, down{t[11], t[12], t[13], set[6], set[7]};
    at::Tensor projected = qkv(rms_norm(x, t[0], eps));  // [n, width]
    float* rows = projected.data_ptr<float>();
    float* keys = cache.data_ptr<float>() + layer * 2 * num_slots * kv_heads * capacity * dim;
    float* values = keys + num_slots * kv_heads * capacity * dim;
    for (int64_t i = 0; i < n; ++i) {
      float* row = rows + i * width;
      const float *c = cos.data_ptr<float>() + positions[i] * dim, *s = sin.data_ptr<float>() + positions[i] * dim;
      for (int64_t h = 0; h < heads + kv_heads; ++h) rotate(row + h * dim, c, s, dim);
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t at_ = ((slots[i] * kv_heads + h) * capacity + positions[i]) * dim;
        std::copy_n(row + (heads + h) * dim, dim, keys + at_);
        std::copy_n(row + (heads + kv_heads + h) * dim, dim, values + at_);
      }
    }
    at::Tensor attended = at::empty({n, heads * dim}, x.options());
    float* out = attended.data_ptr<float>();
    at::parallel_for(0, n * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(max_length);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / heads, h = task % heads, length = positions[i] + 1;
        const float* q = rows + i * width + h * dim;
        const int64_t base = (slots[i] * kv_heads + h / group) * capacity * dim;
        float best = -INFINITY;
        for (int64_t j = 0; j < length; ++j) {
          const float* k = keys + base + j * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += q[d] * k[d];
          scores[j] = dot * scale;
          best = std::max(best, scores[j]);
        }
        float total = 0.f;
        for (int64_t j = 0; j < length; ++j) total += (scores[j] = std::exp(scores[j] - best));
        float* o_row = out + i * heads * dim + h * dim;
        std::fill_n(o_row, dim, 0.f);
        for (int64_t j = 0; j < length; ++j) {
          const float* v = values + base + j * dim;
          const float p = scores[j] / total;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) o_row[d] += p * v[d];
        }
      }
    });
    x.add_(o(attended));
    at::Tensor gu = gate_up(rms_norm(x, t[1], eps));  // [n, 2 * intermediate]: gate, then up
    const int64_t inner = gu.size(1) / 2;
    at::Tensor act = at::empty({n, inner}, x.options());
    const float* g = gu.data_ptr<float>();
    float* a = act.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < inner; ++j) {
        const float v = g[i * 2 * inner + j];
        a[i * inner + j] = v / (1.f + std::exp(-v)) * g[i * 2 * inner + inner + j];
      }
    x.add_(down(act));
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the instruction set built: avx512vnni or avx2");
  m.def("int4_mm", &int4_mm, "x [n, in] fp32 times int4 weights (Q4_1 layout) -> [n, out] fp32");
  m.def("rms_norm", &rms_norm, "RMSNorm of the rows of x [n, hidden] fp32");
  m.def("decode_layers", &decode_layers, "every layer of a weight-only Llama decode step");
  m.def("int8_mm", &int8_mm, "x [n, in] fp32 times int8 weights (per-row scales) -> [n, out] fp32");
}
