import os
import shutil
import tempfile

import pytest

import zmtest


@pytest.fixture
def server():
    s = zmtest.Server()
    s.start()
    yield s
    s.kill()
    shutil.rmtree(s.tmp, ignore_errors=True)


@pytest.fixture
def sim():
    from simctl import Sim

    d = tempfile.mkdtemp(prefix="zm-sim-")
    s = Sim.start(d, log_file=os.path.join(d, "sim.log"))
    yield s
    s.stop()
    shutil.rmtree(d, ignore_errors=True)


def pytest_report_header(config):
    return "ziti-management store backend: %s (ZM_TEST_BACKEND)" % zmtest.BACKEND
