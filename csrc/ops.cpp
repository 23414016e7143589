// Every schema of the unet_fast library, in one place. Kernels register themselves per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; autograd and fake (meta) kernels live in unet_fast/ops/*.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import unet_fast._C` loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(unet_fast, m) {
  // [skip, up] on channels, each centre-cropped or zero-padded to `size` (H, W).
  m.def("crop_concat(Tensor skip, Tensor up, SymInt[2] size) -> Tensor");
  // The inverse crop/pad of each channel slice of grad back to its input's spatial size.
  m.def(
      "crop_concat_backward(Tensor grad, SymInt skip_channels, SymInt[2] skip_size, "
      "SymInt[2] up_size) -> (Tensor, Tensor)");
}
