"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter.

triton.jit decides interpreted-or-compiled when a kernel is decorated, i.e. when kernels.masked_gather
/ kernels.contrastive are first imported; kernels.dispatch imports them lazily, so setting the
variable here, while pytest collects this directory, is early enough for the whole session (and
spawned workers inherit it). The interpreter only changes how Triton kernels launch; nothing else in
the suite reads it.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
