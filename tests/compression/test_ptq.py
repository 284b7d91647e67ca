"""Post-training static int8 through torchao PT2E: a calibrated int8 copy, the float model untouched, bad input."""

import pytest
import torch
from lightning import seed_everything

pytest.importorskip("torchao")

from project.compression.ptq import quantize_ptq  # noqa: E402
from project.compression.quantization import fake_quantizers, prepare_qat  # noqa: E402
from project.errors import UserError  # noqa: E402
from project.models import build_network  # noqa: E402
from tests.toys import LoaderData, block_loaders, blocks, cpu_trainer, toy_classifier  # noqa: E402

BN_CNN = {"arch": "cnn", "arch_kwargs": {"channels": [8, 16], "hidden": 32, "batch_norm": True}}


def test_ptq_of_a_trained_bn_cnn_agrees_with_fp32_and_leaves_it_untouched(tmp_path) -> None:
    seed_everything(0)
    model = toy_classifier(**BN_CNN)
    train, val = block_loaders(n=256)
    cpu_trainer(tmp_path, max_epochs=2).fit(model, datamodule=LoaderData(train, val))
    net = model.net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calibration = [blocks(128, seed=5).tensors[0][i : i + 32] for i in range(0, 128, 32)]
    int8 = quantize_ptq(net, (1, 28, 28), calibration)
    assert any(b.dtype == torch.int8 for b in int8.buffers())  # int8 weights
    assert not any(p.dtype == torch.float32 and p.dim() == 4 for p in int8.parameters())  # no float conv weights left
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the float model is untouched
    held_out = blocks(256, seed=9)
    with torch.no_grad():
        fp32 = net(held_out.tensors[0]).argmax(-1)
        quantized = int8(held_out.tensors[0]).argmax(-1)
    assert (fp32 == held_out.tensors[1]).float().mean() > 0.9  # the float model learned the toy task
    assert (quantized == fp32).float().mean() >= 0.95


def test_too_few_calibration_images_and_quantized_models_are_one_line_errors() -> None:
    net = build_network("lenet5", 4, 1, 28).eval()
    with pytest.raises(UserError, match="at least 32 calibration images") as err:
        quantize_ptq(net, (1, 28, 28), [torch.rand(8, 1, 28, 28)])
    assert "\n" not in str(err.value)
    prepared = prepare_qat(build_network("lenet5", 4, 1, 28), (1, 28, 28))
    assert fake_quantizers(prepared)
    with pytest.raises(UserError, match="already prepared"):
        quantize_ptq(prepared, (1, 28, 28), [torch.rand(64, 1, 28, 28)])


def test_a_network_the_x86_quantizer_cannot_annotate_is_one_line_pointing_to_export() -> None:
    """torchao 0.18's x86 quantizer fails on torchvision's ResNet-18 blocks; PTQ and QAT say so in one line."""
    for quantize in (lambda net: quantize_ptq(net.eval(), (3, 32, 32), [torch.rand(64, 3, 32, 32)]),
                     lambda net: prepare_qat(net, (3, 32, 32))):
        net = build_network("resnet18", 10, 3, 32)
        try:
            quantize(net)
        except UserError as err:
            assert "\n" not in str(err) and "python -m project export" in str(err)
        # a torchao that handles ResNet-18 quantizes it: nothing to explain then
