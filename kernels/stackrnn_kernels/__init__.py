"""Fused CPU loops for stackrnn's recurrent layers, registered as XLA FFI targets.

Importing this package loads the shared library and registers two targets for the
CPU: `FORWARD` (a layer's loop from its projected inputs to its states) and
`BACKWARD` (that loop's reverse, from the states' cotangents to the gates'). stackrnn
finds the package when it is installed and calls them through `jax.ffi.ffi_call`;
see `stackrnn._fused` for their arguments.
"""

import ctypes
import pathlib

import jax


FORWARD = "stackrnn_kernels_forward"
BACKWARD = "stackrnn_kernels_backward"
# The `cell` attribute of both targets.
CELLS = {"tanh": 0, "relu": 1, "gru": 2, "lstm": 3}

_library = ctypes.cdll.LoadLibrary(
    str(pathlib.Path(__file__).parent / "libstackrnn_kernels.so")
)
for _name, _symbol in ((FORWARD, "StackrnnForward"), (BACKWARD, "StackrnnBackward")):
    jax.ffi.register_ffi_target(
        _name, jax.ffi.pycapsule(getattr(_library, _symbol)), platform="cpu"
    )
