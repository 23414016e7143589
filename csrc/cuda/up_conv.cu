// up_conv_backward on CUDA: the matrix products run on cuBLAS (csrc/up_conv.h).
#include <torch/library.h>

#include "up_conv.h"

TORCH_LIBRARY_IMPL(unet_fast, CUDA, m) { m.impl("up_conv_backward", &unet_fast::up_conv_backward); }
