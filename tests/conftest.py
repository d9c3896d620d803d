"""Test set-up: without a GPU, Triton kernels run in Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before Triton compiles anything, so before scan.py is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
