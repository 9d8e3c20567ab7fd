"""Shared test setup: one CPU thread (the tests' models are tiny; OpenMP contention on a busy
2-core machine would otherwise dominate their run time)."""

import torch

torch.set_num_threads(1)
