import pytest
import torch


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models on a shared 2-core machine gain nothing from a second
    thread but spinning and waiting. Modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
