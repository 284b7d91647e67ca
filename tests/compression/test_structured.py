"""Channel (structured) pruning plans: fewer channels, the same function as the masked model; refused layers."""

import pytest
import torch
from torch import nn

from project.compression import measure
from project.compression.structured import apply_plan, check_structured_targets, compute_plan, zero_plan
from project.errors import UserError
from project.models import build_network

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


@pytest.mark.parametrize(
    "arch, kwargs, shape",
    [("lenet5", {}, (1, 28, 28)), ("cnn", {}, (1, 28, 28)), ("resnet9", {"width": 8}, (3, 32, 32))],
)
def test_channel_pruning_gives_fewer_channels_and_matches_masked_model(arch, kwargs, shape):
    torch.manual_seed(0)
    net = build_network(arch, 10, shape[0], shape[1], **kwargs).eval()
    with torch.no_grad():
        _randomise_bn(net)
    ex = torch.randn(1, *shape)
    targets = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "head"]
    plan = compute_plan(net, ex, targets, amount=0.5, norm=1)
    pruned = build_network(arch, 10, shape[0], shape[1], **kwargs)
    pruned.load_state_dict(net.state_dict())
    pruned.eval()
    apply_plan(pruned, plan, ex)
    masked = build_network(arch, 10, shape[0], shape[1], **kwargs)
    masked.load_state_dict(net.state_dict())
    masked.eval()
    zero_plan(masked, plan, ex)

    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert all(a < b for a, b in zip(convs(pruned), convs(net)))
    assert pruned.head.out_features == 10
    assert measure.count_parameters(pruned) < 0.5 * measure.count_parameters(net)
    assert measure.count_macs(pruned, ex) < 0.5 * measure.count_macs(net, ex)
    x = torch.randn(6, *shape)
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(x), atol=1e-4)
        assert not torch.allclose(net(x), masked(x), atol=1e-3)  # the channels removed did matter


def test_grouped_conv_is_refused_for_channel_pruning():
    with pytest.raises(UserError, match="grouped"):
        check_structured_targets({"conv": nn.Conv2d(4, 8, 3, groups=2)})
