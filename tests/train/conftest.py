"""In-process training tests run on one thread: the suite shares two cores with the subprocess runs
and other jobs, and oversubscribed intra-op threads make torch several times slower, not faster."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
