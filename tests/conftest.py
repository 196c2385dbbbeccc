import pytest
import torch

# One intra-op thread: the tests run tiny models, where a second thread only adds a synchronisation per op and stalls
# whenever another process holds a core (measured on the 2-core machine with other work running: test_contract.py
# 80 s with 1 thread vs 427 s with 2, test_fmvit.py 23 s vs 80 s).
torch.set_num_threads(1)


def randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine params, so BN folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(1 + torch.randn(n, generator=g) * 0.2)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


@pytest.fixture
def tiny_nextvit_args():
    """A Next-ViT with every block type (NCB, NTB with spatial reduction) small enough for fast tests."""
    return dict(depths=(1, 1, 2, 1), ntb_period=2, stem_chs=(16, 16, 32), ncb_widths=(32, 64, 96, 128),
                ntb_widths=(None, 96, 128, 192))
