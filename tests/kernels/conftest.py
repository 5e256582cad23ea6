"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter: tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports Triton (see there why it cannot be set here)."""
