// up_conv_backward on the CPU: the matrix products run on oneDNN/MKL (csrc/up_conv.h).
#include "up_conv.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(unet_fast, CPU, m) { m.impl("up_conv_backward", &unet_fast::up_conv_backward); }
