"""Benchmark-session settings.

Benchmark files are named bench_*.py so that the test run (testpaths = tests)
never picks them up; the hook below makes `pytest benchmarks --benchmark-only`
collect them too. A file named on the command line is collected by pytest
itself, so the hook skips it to avoid collecting it twice.

OMP_WAIT_POLICY: on a machine whose cores are busy with other processes,
OpenMP's default spin-waiting makes every 2-thread parallel region wait for a
scheduler tick (a 65536-element `(t != -100).sum()` took 20-24 ms instead of
0.02 ms here), which buries every measurement in noise. Passive waiting
(threads sleep and are woken) avoids that at a cost of a few microseconds per
parallel region. It must be set before torch (and its OpenMP runtime) is
imported, hence here; export OMP_WAIT_POLICY to override it.
"""

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collect_file(parent, file_path):
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
