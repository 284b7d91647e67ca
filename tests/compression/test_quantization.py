"""Quantization without a Trainer: the int8 copy of a prepared network, train/eval in the prepared graph,
and networks prepare_qat refuses with a one-line error."""

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from project.compression import quantization as Q  # noqa: E402
from project.compression.graph_mode import freeze_bn  # noqa: E402
from project.errors import UserError  # noqa: E402
from project.models import build_network  # noqa: E402


def test_int8_copy_leaves_training_model_untouched():
    torch.manual_seed(0)
    prepared = Q.prepare_qat(build_network("lenet5", 4, 1, 28), (1, 28, 28))
    x = torch.randn(16, 1, 28, 28)
    prepared(x)  # calibrate the observers once
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    code, training = prepared.code, prepared.training
    converted = Q.convert_copy(prepared)
    assert prepared.code == code and prepared.training == training
    after = prepared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert Q.is_converted(converted) and not Q.is_converted(prepared)
    assert not any(p.dtype == torch.float32 and p.dim() > 1 for p in converted.parameters())  # fp32 weights gone
    prepared.eval()
    with torch.no_grad():
        assert (converted(x).argmax(-1) == prepared(x).argmax(-1)).float().mean() >= 0.9


def test_train_eval_switches_batchnorm_and_dropout_in_the_graph():
    prepared = Q.prepare_qat(build_network("cnn", 4, 3, 16, dropout=0.3), (3, 16, 16))
    prepared.eval()
    assert "True" not in str([n.args for n in prepared.graph.nodes if "batch_norm" in str(n.target) or "dropout" in str(n.target)])
    prepared.train()
    drop = [n for n in prepared.graph.nodes if "dropout" in str(n.target)]
    assert drop and drop[0].args[1] == 0.3 and drop[0].args[2] is True  # p kept (torchao's helper resets it)
    freeze_bn(prepared)
    bn = [n for n in prepared.graph.nodes if "batch_norm" in str(n.target)]
    assert bn and all(n.args[5] is False for n in bn) and drop[0].args[2] is True


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return y if y.sum() > 0 else -y  # data-dependent control flow: not exportable


class _NoWeights(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4].relu()


@pytest.mark.parametrize("net", [_Branchy(), _NoWeights()], ids=["not-exportable", "nothing-to-quantize"])
def test_unsupported_architecture_is_one_line_error(net):
    with pytest.raises(UserError, match="QAT cannot handle") as err:
        Q.prepare_qat(net, (1, 28, 28))
    assert "\n" not in str(err.value)
