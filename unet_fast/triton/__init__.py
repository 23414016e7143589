"""Triton kernels and their launchers (backend="triton").

Importing this package compiles nothing; the kernels are decorated at import, so set
TRITON_INTERPRET=1 *before* importing it to run them on the CPU through Triton's interpreter
(how the tests prove them without a GPU).
"""
