"""Test-session settings shared by every test file."""

import torch

# One intra-op thread: the suite's tensors are small, and on a busy 2-core machine OpenMP's spin-waiting
# made small kernels up to 100x slower with two threads.
torch.set_num_threads(1)
