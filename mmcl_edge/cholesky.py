"""A Cholesky solve that factors its matrix in place: the ridge head's [d, d] system with no copy.

``torch.linalg.cholesky_ex`` copies its input (to column-major) and returns the factor as another
matrix; at the ridge head's 3,233 features each is 84 MB of float64, and that solve was the
learner's peak. Here LAPACK's ``potrf``/``potrs`` run on the matrix's own memory: the ones PyTorch
links (MKL in the x86 wheels, OpenBLAS on ARM builds), so the numbers are bit-identical to
``cholesky_ex`` + ``cholesky_solve`` on the same lower triangle; SciPy's where PyTorch exports none.
"""
from __future__ import annotations

import ctypes
import os

import torch

_BLOCK = 256  # rows per block when mirroring a triangle: temporaries of [256, d], not [d, d]
_FUNCS: list = []


def mirror_lower(a: torch.Tensor) -> None:
    """Copy ``a``'s strict lower triangle onto its upper one, in place (row blocks)."""
    d = a.shape[0]
    for i in range(0, d, _BLOCK):
        j = min(i + _BLOCK, d)
        block = a[i:j, i:j]
        block.copy_(torch.tril(block) + torch.tril(block, -1).T)
        a[i:j, j:].copy_(a[j:, i:j].T)


def cholesky_solve_in_place(a: torch.Tensor, lam: float, rhs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """``(a + lam I)^-1 b`` for each ``b`` in ``rhs``, reading only ``a``'s lower triangle (as
    ``torch.linalg.cholesky`` does); None when ``a + lam I`` is not positive definite.

    ``a`` (contiguous float64) is the workspace: on return it holds its lower triangle mirrored
    onto the upper one and its diagonal as before, i.e. ``a`` itself when it was symmetric.
    """
    if a.dtype != torch.float64 or not a.is_contiguous() or a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError("cholesky_solve_in_place needs a square, contiguous float64 matrix")
    potrf, potrs = _lapack()
    d = a.shape[0]
    diagonal = a.diagonal().clone()
    # row-major ``a`` is LAPACK's column-major ``a^T``: its "lower" triangle is ``a``'s upper one,
    # so that one gets ``a``'s lower values, and the factor lands there, leaving the lower intact
    mirror_lower(a)
    a.diagonal().add_(lam)
    n, info, uplo = ctypes.c_int(d), ctypes.c_int(0), b"L"
    out = []
    try:
        potrf(uplo, ctypes.byref(n), a.data_ptr(), ctypes.byref(n), ctypes.byref(info), 1)
        if info.value != 0:
            return None
        for b in rhs:
            x = torch.empty(b.shape[1], d, dtype=torch.float64)  # column-major [d, k]; potrs overwrites it
            x.copy_(b.detach().T)
            k = ctypes.c_int(x.shape[0])
            potrs(uplo, ctypes.byref(n), ctypes.byref(k), a.data_ptr(), ctypes.byref(n), x.data_ptr(),
                  ctypes.byref(n), ctypes.byref(info), 1)
            if info.value != 0:
                raise RuntimeError(f"LAPACK dpotrs failed (info {info.value})")
            out.append(x.T)
        return out
    finally:
        mirror_lower(a)
        a.diagonal().copy_(diagonal)


_INT = ctypes.POINTER(ctypes.c_int)
_SIGNATURES = {"dpotrf": (ctypes.c_char_p, _INT, ctypes.c_void_p, _INT, _INT, ctypes.c_size_t),
               "dpotrs": (ctypes.c_char_p, _INT, _INT, ctypes.c_void_p, _INT, ctypes.c_void_p, _INT, _INT,
                          ctypes.c_size_t)}


def _lapack():
    """(dpotrf, dpotrs) with LAPACK's Fortran calling convention (the trailing argument is the
    hidden length of ``uplo``, which LAPACK itself does not read)."""
    if not _FUNCS:
        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            funcs = tuple(getattr(lib, f + "_") for f in _SIGNATURES)
            for f, args in zip(funcs, _SIGNATURES.values()):
                f.argtypes, f.restype = args, None
        except (OSError, AttributeError):  # a PyTorch build that exports no LAPACK: SciPy's
            from scipy.linalg import cython_lapack

            api = ctypes.pythonapi
            api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
            api.PyCapsule_GetPointer.restype = ctypes.c_void_p
            api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
            capsules = cython_lapack.__pyx_capi__
            funcs = tuple(ctypes.CFUNCTYPE(None, *args)(api.PyCapsule_GetPointer(capsules[f], api.PyCapsule_GetName(capsules[f])))
                          for f, args in _SIGNATURES.items())
        _FUNCS.append(funcs)
    return _FUNCS[0]
