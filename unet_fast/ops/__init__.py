"""The fused ops: validate inputs, then dispatch to the chosen backend's kernel."""
from .crop_concat import crop_concat

__all__ = ["crop_concat"]
