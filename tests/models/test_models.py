import pytest
import torch

from project.models import ARCHITECTURES, Classifier, build_network


@pytest.mark.parametrize(
    "arch,channels,size", [("mlp", 1, 28), ("lenet5", 1, 28), ("lenet5", 3, 32), ("cnn", 3, 32), ("resnet9", 3, 32), ("resnet18", 1, 28)]
)
def test_every_architecture_gives_logits_for_its_input(arch: str, channels: int, size: int) -> None:
    net = build_network(arch, num_classes=7, in_channels=channels, image_size=size)
    assert isinstance(net, Classifier)
    features = net.backbone(torch.randn(3, channels, size, size))
    assert features.shape == (3, net.backbone.num_features)
    assert net(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_mlp_is_784_256_128() -> None:
    net = build_network("mlp", 10, 1, 28)
    widths = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 256), (256, 128), (128, 10)]


def test_lenet5_has_classic_shape() -> None:
    net = build_network("lenet5", 10, 1, 28)
    convs = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert convs == [6, 16]
    assert linears == [(400, 120), (120, 84), (84, 10)]


def test_resnet18_cifar_stem_keeps_resolution() -> None:
    net = build_network("resnet18", 10, 3, 32)
    assert net.backbone.conv1.kernel_size == (3, 3) and net.backbone.conv1.stride == (1, 1)
    assert isinstance(net.backbone.maxpool, torch.nn.Identity)


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="lenet5"):
        build_network("lenet6", 10, 1, 28)
    assert set(ARCHITECTURES) >= {"mlp", "lenet5", "cnn", "resnet9", "resnet18"}


def test_lenet5_relu_after_pool_is_the_same_function_with_the_same_checkpoint_keys() -> None:
    torch.manual_seed(0)
    classic = build_network("lenet5", 10, 1, 28)
    fast = build_network("lenet5", 10, 1, 28, relu_after_pool=True)
    assert [type(m).__name__ for m in fast.backbone.features][:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    assert [type(m).__name__ for m in classic.backbone.features][:3] == ["Conv2d", "ReLU", "MaxPool2d"]
    fast.load_state_dict(classic.state_dict())  # same keys, strict
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    out_classic, out_fast = classic(x), fast(x)
    assert torch.equal(out_classic, out_fast)
    out_classic.sum().backward()
    grads = [p.grad.clone() for p in classic.parameters()]
    out_fast.sum().backward()
    assert all(torch.equal(a, b.grad) for a, b in zip(grads, fast.parameters()))
