"""Fixtures shared by several test modules, and the suite's compiler cache."""

import os
import tempfile

import pytest
import torch

# torch's inductor cache does not tell apart kernels built under different ATEN_CPU_CAPABILITY values:
# after a run with the machine's own kernels, a run with `default` or `avx2` (as .ci/run and the
# README's portability check do, on one machine) reuses or rebuilds the first run's vectorised C++
# with the wrong flags — a C++ compile error, or a segfault when the kernel runs. One cache per
# capability for the suite (unless the caller chose a cache directory).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"nanoseek-tests-inductor-{os.getuid() if hasattr(os, 'getuid') else 0}-"
                               f"{torch.backends.cpu.get_cpu_capability().lower()}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core box are far faster single-threaded: one torch thread for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
