"""Fixtures shared by the unit tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (tiny models are faster so, and do not stall on a busy
    machine), then restore the thread count. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_unet():
    """A small course U-Net with seeded random weights (cross-attention width 24), in eval mode."""
    from course_lib.unet import UNet, UNetConfig

    torch.manual_seed(0)
    return UNet(UNetConfig(block_channels=(16, 32), layers_per_block=1, heads=2, context_dim=24,
                           time_embed_dim=32, norm_groups=8)).eval()


@pytest.fixture(autouse=True, scope="session")
def float32_means_float32():
    """No TF32 in the tests. On Ampere and newer GPUs cuDNN convolutions (and, where enabled, matmuls) round
    float32 inputs to TF32's 10-bit mantissa, about 1e-3 relative error: far above the 1e-5 at which the
    equivalence tests compare the course's code with diffusers. (Notebooks run by ``course.py gpu`` get
    the same through NVIDIA_TF32_OVERRIDE=0.) Restored after the session."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
