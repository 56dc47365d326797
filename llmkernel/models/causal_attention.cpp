// Causal self-attention in fp32 on CPU, forward and backward, for training on fixed windows.
//
// PyTorch's CPU flash-attention kernel streams keys through an online softmax in small tiles. For the
// windows we train on (up to a few thousand tokens) a whole (batch, head) fits in a core's L2 cache, so
// this kernel takes one (batch, head) per task and, per block of 64 query rows, computes the scores
// against exactly the keys the block can see with one BLAS call, the softmax in place, and the output
// with one more. Backward reuses the probabilities when the forward kept them (short windows: a block
// triangle per head, about T^2 / 2 floats) or recomputes them from the saved log-sum-exp, and accumulates
// dK and dV per key/value head, so grouped-query attention needs no copies.
// Inputs are read in the strides they come in: (batch, heads, seq, head_dim) views of the projections'
// (batch, seq, heads, head_dim) outputs need no transpose copy, and outputs are written in that layout.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// The Fortran BLAS that libtorch_cpu carries (MKL on x86 wheels). Called inside at::parallel_for, it
// runs single-threaded on each core.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 64;  // query rows per block; the causal skip works at this granularity

// Row-major C[m x n] = alpha * op(A)[m x k] * op(B)[k x n] + beta * C, through the column-major BLAS
// (C^T = op(B)^T op(A)^T).
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = transpose_b ? 't' : 'n', tb = transpose_a ? 't' : 'n';
  const int rows = n, cols = m, inner = k, ld_a = ldb, ld_b = lda, ld_c = ldc;
  sgemm_(&ta, &tb, &rows, &cols, &inner, &alpha, b, &ld_a, a, &ld_b, &beta, c, &ld_c);
}

float lanes_sum(const Vec& x) {
  float lanes[Vec::size()];
  x.store(lanes);
  float total = 0.f;
  for (int i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

float lanes_max(const Vec& x) {
  float lanes[Vec::size()];
  x.store(lanes);
  float best = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) best = std::max(best, lanes[i]);
  return best;
}

// In place: row[0:visible] = softmax(row[0:visible]), row[visible:width] = 0. Returns the log-sum-exp.
float softmax_row(float* row, int64_t visible, int64_t width) {
  const int64_t vectorized = visible - visible % Vec::size();
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < vectorized; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
  float max = lanes_max(vmax);
  for (int64_t j = vectorized; j < visible; ++j) max = std::max(max, row[j]);
  Vec vsum(0.f);
  for (int64_t j = 0; j < vectorized; j += Vec::size()) {
    Vec e = (Vec::loadu(row + j) - Vec(max)).exp_u20();
    e.store(row + j);
    vsum = vsum + e;
  }
  float sum = lanes_sum(vsum);
  for (int64_t j = vectorized; j < visible; ++j) sum += (row[j] = std::exp(row[j] - max));
  const float inverse = 1.f / sum;
  for (int64_t j = 0; j < vectorized; j += Vec::size()) (Vec::loadu(row + j) * Vec(inverse)).store(row + j);
  for (int64_t j = vectorized; j < visible; ++j) row[j] *= inverse;
  std::fill(row + visible, row + width, 0.f);
  return max + std::log(sum);
}

// In place: row[0:visible] = exp(row - lse) (the forward's probabilities again), row[visible:width] = 0.
void probabilities_row(float* row, int64_t visible, int64_t width, float lse) {
  const int64_t vectorized = visible - visible % Vec::size();
  for (int64_t j = 0; j < vectorized; j += Vec::size()) (Vec::loadu(row + j) - Vec(lse)).exp_u20().store(row + j);
  for (int64_t j = vectorized; j < visible; ++j) row[j] = std::exp(row[j] - lse);
  std::fill(row + visible, row + width, 0.f);
}

// In place: dS = P * (dP - delta) over the visible keys, 0 beyond (softmax backward for one row).
void softmax_backward_row(float* grad, const float* probs, int64_t visible, int64_t width, float delta) {
  const int64_t vectorized = visible - visible % Vec::size();
  for (int64_t j = 0; j < vectorized; j += Vec::size())
    (Vec::loadu(probs + j) * (Vec::loadu(grad + j) - Vec(delta))).store(grad + j);
  for (int64_t j = vectorized; j < visible; ++j) grad[j] = probs[j] * (grad[j] - delta);
  std::fill(grad + visible, grad + width, 0.f);
}

float dot(const float* x, const float* y, int64_t size) {
  const int64_t vectorized = size - size % Vec::size();
  Vec acc(0.f);
  for (int64_t d = 0; d < vectorized; d += Vec::size()) acc = acc + Vec::loadu(x + d) * Vec::loadu(y + d);
  float total = lanes_sum(acc);
  for (int64_t d = vectorized; d < size; ++d) total += x[d] * y[d];
  return total;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4,
                "causal_attention: expects fp32 CPU tensors of shape (batch, heads, seq, head_dim)");
    TORCH_CHECK(t->stride(3) == 1, "causal_attention: head_dim must be contiguous");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
              "causal_attention: q (B, H, T, D) and k, v (B, KVH, T, D) with H divisible by KVH");
}

// An empty (batch, heads, seq, head_dim) tensor laid out as (batch, seq, heads, head_dim).
at::Tensor empty_bthd(const at::Tensor& like, int64_t heads, bool zeros) {
  auto options = like.options();
  auto sizes = std::vector<int64_t>{like.size(0), like.size(2), heads, like.size(3)};
  return (zeros ? at::zeros(sizes, options) : at::empty(sizes, options)).transpose(1, 2);
}

}  // namespace

// Floats in one head's probability blocks: block i holds its rows x (the keys they see). Mirrored by
// probabilities_per_head in attention.py, which torch.compile traces.
int64_t probabilities_per_head(int64_t seq) {
  int64_t total = 0;
  for (int64_t first = 0; first < seq; first += kBlock) {
    const int64_t rows = std::min(kBlock, seq - first);
    total += rows * (first + rows);
  }
  return total;
}

// q: (B, H, T, D); k, v: (B, KVH, T, D). Returns out (B, H, T, D), laid out (B, T, H, D), the log-sum-exp
// of every score row, (B, H, T), and, if keep_probabilities, every head's probability blocks
// (B * H, probabilities_per_head(T)) for the backward (else an empty tensor).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                bool keep_probabilities) {
  check_inputs(q, k, v);
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t group = heads / k.size(1), per_head = probabilities_per_head(seq);
  at::Tensor out = empty_bthd(q, heads, false);
  at::Tensor lse = at::empty({batch, heads, seq}, q.options());
  at::Tensor kept = at::empty({keep_probabilities ? batch * heads : 0, per_head}, q.options());
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(keep_probabilities ? 0 : kBlock * seq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const float* Q = q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1);
      const float* K = k.data_ptr<float>() + b * k.stride(0) + (h / group) * k.stride(1);
      const float* V = v.data_ptr<float>() + b * v.stride(0) + (h / group) * v.stride(1);
      float* O = out.data_ptr<float>() + b * out.stride(0) + h * out.stride(1);
      float* L = lse.data_ptr<float>() + task * seq;
      float* S = keep_probabilities ? kept.data_ptr<float>() + task * per_head : scratch.data();
      for (int64_t first = 0; first < seq; first += kBlock) {
        const int64_t rows = std::min(kBlock, seq - first), keys = first + rows;  // keys this block sees
        gemm(false, true, rows, keys, dim, float(scale), Q + first * q.stride(2), q.stride(2), K, k.stride(2),
             0.f, S, keys);
        for (int64_t r = 0; r < rows; ++r) L[first + r] = softmax_row(S + r * keys, first + r + 1, keys);
        gemm(false, false, rows, dim, keys, 1.f, S, keys, V, v.stride(2), 0.f, O + first * out.stride(2),
             out.stride(2));
        if (keep_probabilities) S += rows * keys;
      }
    }
  });
  return {out, lse, kept};
}

// Gradients of `forward` for grad_out (B, H, T, D), given its out, lse and kept probabilities (empty:
// recompute them). Returns dq (B, H, T, D) and dk, dv (B, KVH, T, D), laid out (batch, seq, heads,
// head_dim) like the projections they flow back into.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& kept, double scale) {
  check_inputs(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.stride(3) == 1 && out.stride(3) == 1,
              "causal_attention: grad_out and out must be (B, H, T, D) with head_dim contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads, per_head = probabilities_per_head(seq);
  const bool reuse = kept.numel() > 0;
  TORCH_CHECK(!reuse || (kept.size(0) == batch * heads && kept.size(1) == per_head && kept.is_contiguous()),
              "causal_attention: kept probabilities of the wrong shape");
  at::Tensor dq = empty_bthd(q, heads, false);
  at::Tensor dk = empty_bthd(k, kv_heads, true), dv = empty_bthd(v, kv_heads, true);  // accumulated
  // One task per (batch, key/value head): the query heads of its group add into the same dK, dV rows.
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(reuse ? 0 : kBlock * seq), grads(kBlock * seq), delta(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kh = task % kv_heads;
      const float* K = k.data_ptr<float>() + b * k.stride(0) + kh * k.stride(1);
      const float* V = v.data_ptr<float>() + b * v.stride(0) + kh * v.stride(1);
      float* dK = dk.data_ptr<float>() + b * dk.stride(0) + kh * dk.stride(1);
      float* dV = dv.data_ptr<float>() + b * dv.stride(0) + kh * dv.stride(1);
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
        const float* Q = q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1);
        const float* G = grad_out.data_ptr<float>() + b * grad_out.stride(0) + h * grad_out.stride(1);
        const float* O = out.data_ptr<float>() + b * out.stride(0) + h * out.stride(1);
        const float* L = lse.data_ptr<float>() + (b * heads + h) * seq;
        float* dQ = dq.data_ptr<float>() + b * dq.stride(0) + h * dq.stride(1);
        const float* kept_block = reuse ? kept.data_ptr<float>() + (b * heads + h) * per_head : nullptr;
        for (int64_t first = 0; first < seq; first += kBlock) {
          const int64_t rows = std::min(kBlock, seq - first), keys = first + rows;
          const float *Qb = Q + first * q.stride(2), *Gb = G + first * grad_out.stride(2);
          const float* P = kept_block;
          if (reuse) {
            kept_block += rows * keys;
          } else {
            float* recomputed = scratch.data();
            gemm(false, true, rows, keys, dim, float(scale), Qb, q.stride(2), K, k.stride(2), 0.f, recomputed,
                 keys);
            for (int64_t r = 0; r < rows; ++r) probabilities_row(recomputed + r * keys, first + r + 1, keys, L[first + r]);
            P = recomputed;
          }
          float* dS = grads.data();
          for (int64_t r = 0; r < rows; ++r) delta[r] = dot(Gb + r * grad_out.stride(2), O + (first + r) * out.stride(2), dim);
          gemm(true, false, keys, dim, rows, 1.f, P, keys, Gb, grad_out.stride(2), 1.f, dV, dv.stride(2));
          gemm(false, true, rows, keys, dim, 1.f, Gb, grad_out.stride(2), V, v.stride(2), 0.f, dS, keys);
          for (int64_t r = 0; r < rows; ++r)
            softmax_backward_row(dS + r * keys, P + r * keys, first + r + 1, keys, delta[r]);
          gemm(false, false, rows, dim, keys, float(scale), dS, keys, K, k.stride(2), 0.f,
               dQ + first * dq.stride(2), dq.stride(2));
          gemm(true, false, keys, dim, rows, float(scale), dS, keys, Qb, q.stride(2), 1.f, dK, dk.stride(2));
        }
      }
    }
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal attention forward: (out, lse, kept probabilities)");
  m.def("backward", &backward, "causal attention backward: (dq, dk, dv)");
}
