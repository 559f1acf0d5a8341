"""One intra-op thread: these tiny models gain nothing from more, and the test machine is shared."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the root conftest restores the previous count afterwards
    yield
