// Schemas of the kernel-level ops, declared once. Each device's kernels register
// implementations in their own files (TORCH_LIBRARY_IMPL(srntt, CPU|CUDA, m)).
// Semantics: docs/DESIGN.md; the public ops built on them live in srntt_core/ops/library.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing srntt_core._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_FRAGMENT(srntt, m) {
  m.def(
      "_patch_match_fused(Tensor query, Tensor[] keys, int patch_size, int stride, int padding, "
      "str precision) -> (Tensor, Tensor)");
  // The k best keys per query patch: index and score (B, Gq_h, Gq_w, k), best first.
  m.def(
      "_patch_match_topk_fused(Tensor query, Tensor[] keys, int patch_size, int stride, "
      "int padding, str precision, int k) -> (Tensor, Tensor)");
  m.def(
      "_feature_swap_fused(Tensor[] values, Tensor index, int patch_size, int stride, int padding, "
      "int scale, int out_h, int out_w, str reduce) -> Tensor");
  m.def(
      "_feature_swap_fused_backward(Tensor grad_out, Tensor index, int[] value_sizes, int patch_size, "
      "int stride, int padding, int scale, str reduce) -> Tensor[]");
  // Winograd F(4x4, 3x3) convolution (stride 1, zero padding 1), channels_last float32: the filters
  // transformed once, then relu?(conv(x) + bias + other).
  m.def("_winograd_pack(Tensor weight) -> Tensor");
  m.def(
      "_winograd_conv3x3(Tensor x, Tensor packed, Tensor? bias, Tensor? other, bool relu) -> Tensor");
}
