"""TF32 tensor-core arithmetic for Triton's interpreter, which otherwise computes every float32 ``tl.dot``
in IEEE float32 whatever its ``input_precision``.

With ``emulate()`` installed, a float32 dot asking for ``tf32`` or ``tf32x3`` rounds as an NVIDIA
tensor core would, so that the accuracy tests and the conformance suite judge the ``tf32x3`` path
on this CPU by the arithmetic a GPU does:

* a tensor core reads only a float32 operand's TF32 part (sign, exponent, 10 mantissa bits): the low 13
  bits are dropped (truncated: the pessimistic model);
* ``tf32x3`` (Triton's F32DotTC pass, the 3xTF32 trick): a_big = a rounded to the nearest TF32 value
  (cvt.rna), a_small = a - a_big, the same for b; a_small b_big + a_big b_small, then + a_big b_big;
* products of TF32 values are exact in float32, and the sums are float32 (NumPy's float32 matmul).
"""

from __future__ import annotations

import numpy as np

_LOW_BITS = np.uint32(0x1FFF)  # the 13 mantissa bits TF32 lacks


def tf32_truncated(x: np.ndarray) -> np.ndarray:
    """The TF32 part a tensor core reads from float32 ``x``."""
    return (np.asarray(x, np.float32).view(np.uint32) & ~_LOW_BITS).view(np.float32)


def tf32_rounded(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to the nearest TF32 value, ties away from zero (PTX cvt.rna.tf32.f32)."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & ~_LOW_BITS).view(np.float32)


def tf32_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(tf32_truncated(a), tf32_truncated(b))


def tf32x3_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    a_big, b_big = tf32_rounded(a), tf32_rounded(b)
    small = tf32_dot(a - a_big, b_big) + tf32_dot(a_big, b - b_big)
    return tf32_dot(a_big, b_big) + np.nan_to_num(small, nan=0.0)


def emulate() -> None:
    """Install the emulation in Triton's interpreter (idempotent; float32 dots asking for IEEE, and
    16-bit dots, are untouched)."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "emulates_tensor_cores", False):
        return
    plain = builder.create_dot
    emulated = {ir.INPUT_PRECISION.TF32: tf32_dot, ir.INPUT_PRECISION.TF32x3: tf32x3_dot}

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        dot = emulated.get(input_precision)
        if dot is None or a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return plain(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle((dot(a.data, b.data) + d.data).astype(np.float32), d.dtype.scalar)

    create_dot.emulates_tensor_cores = True
    builder.create_dot = create_dot
