// Entry points of the fused CPU kernels: the attention of one pair of scores tensors (l2_attention.cpp), all caption
// groups of a paired_attention call (paired_groups.cpp), and the MSB loss (msb_loss.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

// exp of floats and doubles, vectorised in simd loops by glibc's vector math library (the extension links -lmvec)
#pragma omp declare simd notinbranch
extern "C" double exp(double);
#pragma omp declare simd notinbranch
extern "C" float expf(float);

inline float vector_exp(float x) { return expf(x); }
inline double vector_exp(double x) { return exp(x); }

std::vector<at::Tensor> forward(const at::Tensor& raw, const at::Tensor& gram, const at::Tensor& query_sq,
                                const at::Tensor& query_mask, const at::Tensor& ctx_mask, bool clipped,
                                double lambda, bool save);
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& raw, const at::Tensor& query_sq,
                                 const at::Tensor& query_mask, const at::Tensor& w, const at::Tensor& gram_w,
                                 const at::Tensor& scale, const at::Tensor& dot, const at::Tensor& att, bool clipped,
                                 double lambda);
std::vector<at::Tensor> paired_forward(const at::Tensor& raw, const at::Tensor& row_gram, const at::Tensor& col_gram,
                                       const at::Tensor& row_sq, const at::Tensor& col_sq, const at::Tensor& row_mask,
                                       const at::Tensor& col_mask, bool clipped, double lambda, bool save);
std::vector<at::Tensor> paired_backward(const at::Tensor& grad_out, const at::Tensor& raw, const at::Tensor& row_sq,
                                        const at::Tensor& col_sq, const at::Tensor& row_mask,
                                        const at::Tensor& col_mask, const std::vector<at::Tensor>& first,
                                        const std::vector<at::Tensor>& second, bool clipped, double lambda);

std::vector<at::Tensor> column_packing(const at::Tensor& col_lengths, const std::optional<at::Tensor>& order,
                                       const std::vector<int64_t>& bounds, int64_t padded_len);
std::vector<at::Tensor> grouped_forward(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_mask,
                                        const at::Tensor& col_lengths, const std::optional<at::Tensor>& order,
                                        const std::vector<int64_t>& bounds, bool clipped, double lambda, bool save);
std::vector<at::Tensor> grouped_backward(const at::Tensor& grad_out, const at::Tensor& rows,
                                         const std::vector<at::Tensor>& saved, const std::vector<int64_t>& col_shape,
                                         const std::optional<at::Tensor>& order, const std::vector<int64_t>& bounds,
                                         bool clipped, double lambda);

std::vector<at::Tensor> msb_loss(const at::Tensor& sims, const at::Tensor& pos, double gamma_1, double gamma_2,
                                 double delta, bool with_grad);
