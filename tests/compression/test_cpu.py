"""The int8 setting follows the CPU: reduce_range where int8 kernels saturate (no VNNI), recorded in the artifact,
and fake-quant, eager int8 and compiled int8 agreeing on a trained BN CNN on such a CPU (simulated by capping
oneDNN at AVX2, which runs the saturating kernels on any x86 CPU)."""

import pytest

from project.compression import cpu
from tests.conftest import run_python


@pytest.mark.parametrize(
    ("flags", "isa", "vnni"),
    [
        ({"avx2", "fma"}, "", False),  # the AMD EPYC of the docs: AVX2 only
        ({"avx2", "avx512f", "avx512_vnni"}, "", True),
        ({"avx2", "avx_vnni"}, "", True),
        ({"avx2", "avx512f", "avx512_vnni"}, "AVX2", False),  # oneDNN capped below VNNI in this process
        ({"avx2", "avx512f", "avx512_vnni"}, "avx512_core", False),
        (set(), "", False),  # not x86, or no /proc/cpuinfo
    ],
)
def test_reduce_range_is_chosen_where_int8_kernels_saturate_and_can_be_overridden(monkeypatch, flags, isa, vnni) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert cpu.cpu_has_vnni() is vnni
    assert cpu.choose_reduce_range() is (not vnni)
    assert cpu.choose_reduce_range(True) is True and cpu.choose_reduce_range(False) is False
    assert cpu.int8_settings(cpu.choose_reduce_range()) == {"reduce_range": not vnni, "built_with_vnni": vnni}


def test_the_quantizer_and_the_artifact_follow_the_simulated_cpu(monkeypatch, tmp_path) -> None:
    pytest.importorskip("torchao")
    import torch

    from project.compression.export import read_input_contract, save_program
    from project.compression.ptq import quantize_ptq
    from project.models import build_network

    net = build_network("lenet5", 10, 1, 28).eval()
    calibration = [torch.randn(32, 1, 28, 28)]
    for flags, reduce in (({"avx2"}, True), ({"avx2", "avx512_vnni"}, False)):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        int8 = quantize_ptq(net, (1, 28, 28), calibration)
        activation_ranges = {
            node.args[4] for node in int8.graph.nodes if "quantize_per_tensor" in str(node.target) and len(node.args) > 4
        }
        assert activation_ranges == {127 if reduce else 255}  # 7-bit or 8-bit activations in the graph
        path = save_program(int8, (1, 28, 28), tmp_path / f"vnni_{not reduce}.pt2", (0.5,), (0.5,))
        assert read_input_contract(path)["int8"] == {"reduce_range": reduce, "built_with_vnni": not reduce}
    forced = quantize_ptq(net, (1, 28, 28), calibration, reduce_range=True)
    assert forced.int8_settings["reduce_range"] is True


AGREEMENT = """
import json, torch
from torch import nn
from project.compression import cpu
from project.compression.export import CompiledProgram
from project.compression.ptq import quantize_ptq
from project.compression.quantization import convert_copy, prepare_qat, set_graph_mode
from project.data import MNISTSampleDataModule
from project.models import build_network

torch.manual_seed(0)
torch.set_num_threads(2)
dm = MNISTSampleDataModule(batch_size=64)
dm.prepare_data(); dm.setup("fit")
net = build_network("cnn", 10, 1, 28, channels=[32, 64], hidden=256, batch_norm=True)
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
batches = [(dm.transform(x, train=False), y) for x, y in dm.train_dataloader()]
for x, y in batches[:80]:
    loss = nn.functional.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
net.eval()
calibration = [x for x, _ in batches[80:85]]
test = torch.cat([x for x, _ in batches[85:]])[:1000]

def compare(a, b):
    d = (a - b).abs().mean() / a.std()
    return {"diff": d.item(), "agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}

out = {"vnni": cpu.cpu_has_vnni()}
with torch.no_grad():
    fp32 = net(test)
    for name, reduce in (("auto", None), ("full_range", False)):
        int8 = quantize_ptq(net, (1, 28, 28), calibration, reduce_range=reduce)
        eager, compiled = int8(test), CompiledProgram(int8)(test)
        out[name] = {"compiled_vs_eager": compare(eager, compiled), "eager_vs_fp32": compare(fp32, eager)}
prepared = prepare_qat(net, (1, 28, 28))
opt = torch.optim.SGD(prepared.parameters(), lr=0.005, momentum=0.9)
for x, y in batches[:20]:
    loss = nn.functional.cross_entropy(prepared(x), y); opt.zero_grad(); loss.backward(); opt.step()
set_graph_mode(prepared, False)
with torch.no_grad():
    fake = prepared(test)
    int8 = convert_copy(prepared)
    eager, compiled = int8(test), CompiledProgram(int8)(test)
out["qat"] = {"eager_vs_fake_quant": compare(fake, eager), "compiled_vs_eager": compare(eager, compiled),
              "reduce_range": int8.int8_settings["reduce_range"]}
print(json.dumps(out))
"""


def test_fake_quant_eager_and_compiled_int8_agree_on_a_trained_bn_cnn_without_vnni(tmp_path) -> None:
    """Under oneDNN capped at AVX2 (no VNNI), the automatic choice keeps compiled int8 on eager int8's logits;
    full-range int8 is run too, to show the comparison sees the saturation it guards against."""
    pytest.importorskip("torchao")
    r = run_python(AGREEMENT, tmp_path, env={"ONEDNN_MAX_CPU_ISA": "AVX2"}, timeout=400)
    assert r["vnni"] is False
    auto, full = r["auto"], r["full_range"]
    assert auto["compiled_vs_eager"]["diff"] < 0.004 and auto["compiled_vs_eager"]["agree"] >= 0.99
    assert auto["eager_vs_fp32"]["agree"] >= 0.98
    # full range: the compiled kernels saturate and drift from the reference ops several times further
    assert full["compiled_vs_eager"]["diff"] > 3 * auto["compiled_vs_eager"]["diff"]
    qat = r["qat"]
    assert qat["reduce_range"] is True
    assert qat["eager_vs_fake_quant"]["diff"] < 0.01 and qat["eager_vs_fake_quant"]["agree"] >= 0.99
    assert qat["compiled_vs_eager"]["diff"] < 0.004 and qat["compiled_vs_eager"]["agree"] >= 0.99
