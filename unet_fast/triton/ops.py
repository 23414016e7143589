"""The Triton backend's entry points, as the public ops call them (importing them registers the
triton_ops and decorates the kernels: set TRITON_INTERPRET=1 before, to run on the CPU)."""
from .batch_norm_relu import batch_norm_relu_stats, check_dtype  # noqa: F401
from .conv import conv3x3_stats, conv_relu  # noqa: F401
from .crop_concat import crop_concat  # noqa: F401
