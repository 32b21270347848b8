"""Folded BatchNorm for inference (models.fold): the copy computes what the network computes, the
network itself is untouched, and what cannot be folded safely is left as it is."""

import torch
from torch import nn

from warmstart.compute.runtime import Runtime
from warmstart.models.fold import fold_batchnorm
from warmstart.models.outputs import PreLogits


def _batchnorms(model) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_the_folded_copy_computes_the_same_features_without_batchnorm(lite0):
    model = lite0.train()  # a training model: its copy is for inference, the model keeps its mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert folded is not model and _batchnorms(model) == 49 and _batchnorms(folded) == 0
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.rand(4, 3, 160, 160, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        expected = model.eval().forward_features(x)
        got = folded.forward_features(x)
    assert float((expected - got).abs().max()) <= 1e-4 * float(expected.abs().max())
    runtime = Runtime(torch.device("cpu"), "fp32", True)
    features = runtime.frozen(PreLogits(model), "lite0", "w", (3, 160, 160))(x)  # PyTorch runs the folded copy
    with torch.inference_mode():
        unfolded = model.forward_head(expected, pre_logits=True)
    assert torch.allclose(features, unfolded, atol=1e-4)


class _SharedConvOutput(nn.Module):
    """A convolution whose output feeds its BatchNorm and a skip connection: folding would change
    the skip's input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _PreActivation(nn.Module):
    """A BatchNorm before its convolution (pre-activation networks, DenseNet): nothing feeds it."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_what_cannot_be_folded_is_left_as_it_is():
    for network in (_SharedConvOutput(), _PreActivation()):
        with torch.no_grad():
            network.bn.running_mean.uniform_(-1, 1), network.bn.running_var.uniform_(0.5, 2)
            network.bn.weight.uniform_(0.5, 2), network.bn.bias.uniform_(-1, 1)
        assert fold_batchnorm(network.eval()) is network, type(network).__name__
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        plain[1].running_mean.uniform_(-1, 1), plain[1].running_var.uniform_(0.5, 2)
    folded = fold_batchnorm(plain.eval())
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(folded(x), plain(x), atol=1e-5)
