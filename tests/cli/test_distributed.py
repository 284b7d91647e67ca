"""DDP on CPU (2 gloo processes) through the real command line, alone and with each training callback.

Each run is ``python -m project fit --config configs/mnist_lenet.yaml --config configs/trainer/ddp_cpu.yaml``
in a fresh process (Lightning re-launches it for rank 1), on real MNIST images (the sample shipped in the
package: 6,000 training images, so 79 steps per epoch and rank, and shards one image apart), with the
progress bar on as a user has it: rank 0's bar reads the logged metrics at epoch end and the other rank's
does not, which is what once paired different collectives across ranks. What the ranks saw comes back
through files only: :class:`tests.dist_helpers.RankRecorder` writes one JSON per rank; checkpoints and
TensorBoard logs are read from disk. Checked for every run:

- it completes, both ranks take the same number of steps and end with bit-identical weights;
- validation and test metrics and the training epoch loss are the same on both ranks and equal the
  pooled value of the two shards;
- the in-memory loader gives the ranks disjoint shards that together cover each split exactly once;
- the DDP checkpoint, tested in one process, gives the DDP run's own test metrics.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from project.cli import main
from project.data.idx import read_idx
from project.data.mnist import SAMPLE_DIR
from tests.conftest import REPO, SHARED_DATA, run_project
from tests.dist_helpers import image_hash
from tests.tb import scalars

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

BASE = REPO / "configs" / "mnist_lenet.yaml"
DDP_CPU = REPO / "configs" / "trainer" / "ddp_cpu.yaml"
CPU = REPO / "configs" / "trainer" / "cpu.yaml"
VAL_SIZE = 1001  # odd on purpose: uneven shards (501/500 validation, 2500/2499 training images per rank)
EPOCHS = 2
N_TRAIN, N_TEST = 6000, 1000  # the shipped sample
ABORT = "terminate called"  # C++'s std::terminate at exit after a finished run (project.runtime.finish_distributed)

FREEZING = {
    "class_path": "project.callbacks.freezing.FreezeSchedule",
    "init_args": {"frozen": ["net.backbone.features"], "unfreeze_at_epoch": 1, "unfreeze_lr_factor": 0.5},
}
PRUNING = {
    "class_path": "project.callbacks.magnitude_pruning.MagnitudePruning",
    "init_args": {"amount": 0.5, "start": 0, "end": 1, "frequency": 1, "unit": "epoch"},
}
QAT = {
    "class_path": "project.callbacks.qat.QuantizationAwareTraining",
    "init_args": {"start_epoch": 0},
}
COMBOS = {
    "plain": [],
    "freezing": [FREEZING],  # unfreezes at epoch 1, which the combination below does not
    # all three; the convs stay frozen; pruning before QAT, which keeps its zeros. Pruning and QAT alone
    # under DDP are tested in tests/callbacks/test_magnitude_pruning.py and tests/callbacks/test_qat.py.
    "frozen+pruning+qat": [{**FREEZING, "init_args": {"frozen": ["net.backbone.features"]}}, PRUNING, QAT],
}
NEEDS = {"freezing": ["project.callbacks.freezing"], "qat": ["project.callbacks.qat"]}
NEEDS["frozen+pruning+qat"] = NEEDS["freezing"] + NEEDS["qat"]


def _require(combo: str) -> None:
    """Skip cleanly while a callback module of the combination is not importable yet."""
    for module in NEEDS.get(combo, []):
        try:
            __import__(module)
        except Exception as err:  # noqa: BLE001 - any import failure means "not there yet"
            pytest.skip(f"{module} is not importable yet ({type(err).__name__}: {err})")


def _write_callbacks(path: Path, callbacks: list[dict], out_dir: Path) -> Path:
    recorder = {"class_path": "tests.dist_helpers.RankRecorder", "init_args": {"out_dir": str(out_dir)}}
    path.write_text(json.dumps({"trainer": {"callbacks": [*callbacks, recorder]}}))  # JSON is YAML
    return path


def _common(data_dir: Path) -> list[str]:
    return [
        f"--data.data_dir={data_dir}", f"--data.val_size={VAL_SIZE}", "--data.batch_size=32",
        "--data.rotate_degrees=0", "--data.translate=0",  # the recorder recovers pixels: no augmentation
        "--model.init_args.lr_scheduler.init_args.max_lr=0.01",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
    ]


def _ranks(folder: Path) -> list[dict]:
    files = sorted(folder.glob("rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def _split_hashes(data_dir: Path, prefix: str) -> list[str]:
    raw = data_dir / "MNIST" / "raw"
    path = next(p for p in (raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-images-idx3-ubyte.gz") if p.is_file())
    images = read_idx(path).unsqueeze(1)
    return [image_hash(img) for img in images]


@pytest.fixture(scope="module", params=list(COMBOS))
def ddp_run(request, tmp_path_factory) -> dict:
    combo = request.param
    _require(combo)
    work = tmp_path_factory.mktemp(f"ddp_{combo.replace('+', '_')}")
    config = _write_callbacks(work / "callbacks.yaml", COMBOS[combo], work / "ddp_ranks")
    result = run_project(
        ["fit", f"--config={BASE}", f"--config={DDP_CPU}", f"--config={config}", f"--trainer.max_epochs={EPOCHS}",
         *_common(SAMPLE_DIR)],
        cwd=work,
    )
    assert result.returncode == 0 and ABORT not in result.stderr, f"{combo}: DDP fit failed\n{result.stderr[-4000:]}"
    version = work / "lightning_logs" / "mnist_lenet" / "version_0"
    return {"combo": combo, "work": work, "version": version, "ranks": _ranks(work / "ddp_ranks"), "data": SAMPLE_DIR}


def test_ddp_fit_completes_with_equal_step_counts(ddp_run) -> None:
    ranks = ddp_run["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    ckpt_dir = ddp_run["version"] / "checkpoints"
    assert (ckpt_dir / "best.ckpt").is_file() and (ckpt_dir / "last.ckpt").is_file()
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    steps_per_epoch = -(-((N_TRAIN - VAL_SIZE + 1) // 2) // 32)  # ceil(2500 / 32): every rank gets as many batches
    assert steps_per_epoch > 32  # more steps than the chunked training-metric update holds back
    assert last["global_step"] == EPOCHS * steps_per_epoch == ranks[0]["global_step"] == ranks[1]["global_step"]
    # --export auto: the compressed network is shipped once, by rank 0; a plain or frozen one is not
    assert (ddp_run["version"] / "model.pt2").is_file() == ("pruning" in ddp_run["combo"])


def test_ranks_end_with_identical_weights(ddp_run, request) -> None:
    r0, r1 = ddp_run["ranks"]
    # Gradients were all-reduced on every trainable tensor: the replicas never drifted apart.
    assert r0["weights_digest"] == r1["weights_digest"], f"{ddp_run['combo']}: ranks ended with different weights"


def test_validation_and_test_metrics_are_synced_over_ranks(ddp_run) -> None:
    r0, r1 = ddp_run["ranks"]
    assert len(r0["val"]) == len(r1["val"]) == EPOCHS and len(r0["test"]) == len(r1["test"]) == 1
    for stage in ("val", "test"):
        for a, b in zip(r0[stage], r1[stage]):
            assert a["logged"] == b["logged"], f"{stage}: the ranks report different metrics"
            pooled_acc = (a["correct"] + b["correct"]) / (a["count"] + b["count"])
            assert a["logged"][f"{stage}/acc"] == pytest.approx(pooled_acc, abs=1e-6)
    assert r0["test"][0]["logged"]["test/acc"] > 0.2  # it learned (chance is 0.1): the metrics mean something
    if "qat" in ddp_run["combo"]:
        assert r0["val"][-1]["logged"]["val/acc_int8"] == r1["val"][-1]["logged"]["val/acc_int8"]
    logged = scalars(ddp_run["version"])
    assert logged["test/acc"][-1] == pytest.approx(r0["test"][0]["logged"]["test/acc"], abs=1e-6)


def test_validation_loss_is_the_mean_over_all_validation_images(ddp_run) -> None:
    r0, r1 = ddp_run["ranks"]
    for a, b in zip(r0["val"], r1["val"]):
        assert a["count"] != b["count"]  # 501 / 500: the uneven case
        pooled = (a["loss_sum"] + b["loss_sum"]) / (a["count"] + b["count"])
        assert a["logged"]["val/loss"] == pytest.approx(pooled, rel=1e-5)


def test_training_epoch_loss_is_the_mean_over_all_training_steps_of_both_ranks(ddp_run) -> None:
    r0, r1 = ddp_run["ranks"]
    for a, b in zip(r0["train"], r1["train"]):
        count_a, count_b = sum(a["batch_sizes"]), sum(b["batch_sizes"])
        assert count_a != count_b  # 2500 / 2499: the uneven case
        pooled = (a["loss_sum"] + b["loss_sum"]) / (count_a + count_b)
        assert a["loss_epoch"] == b["loss_epoch"] == pytest.approx(pooled, rel=1e-5)


def test_in_memory_shards_are_disjoint_and_cover_each_split(ddp_run) -> None:
    r0, r1 = ddp_run["ranks"]
    train_file = Counter(_split_hashes(ddp_run["data"], "train"))
    test_file = Counter(_split_hashes(ddp_run["data"], "t10k"))
    assert max(train_file.values()) == max(test_file.values()) == 1  # images are unique: hashes identify them
    val0, val1 = Counter(r0["val"][0]["hashes"]), Counter(r1["val"][0]["hashes"])
    assert sorted([sum(val0.values()), sum(val1.values())]) == [VAL_SIZE // 2, VAL_SIZE // 2 + 1]
    for epoch in range(EPOCHS):
        t0, t1 = Counter(r0["train"][epoch]["hashes"]), Counter(r1["train"][epoch]["hashes"])
        assert not (t0 & t1), f"epoch {epoch}: a training image went to both ranks"
        # training shards + validation shards = the training file, every image exactly once
        assert t0 + t1 + val0 + val1 == train_file
        assert len(r0["train"][epoch]["batch_sizes"]) == len(r1["train"][epoch]["batch_sizes"])
    assert r0["train"][0]["hashes"] != r0["train"][1]["hashes"]  # reshuffled each epoch
    for v in range(1, EPOCHS):  # the validation split and its sharding never change
        assert Counter(r0["val"][v]["hashes"]) == val0 and Counter(r1["val"][v]["hashes"]) == val1
    assert not (val0 & val1)
    test0, test1 = Counter(r0["test"][0]["hashes"]), Counter(r1["test"][0]["hashes"])
    assert not (test0 & test1) and test0 + test1 == test_file


def test_ddp_checkpoint_tests_the_same_in_a_single_process(ddp_run) -> None:
    work = ddp_run["work"]
    config = _write_callbacks(work / "callbacks_single.yaml", COMBOS[ddp_run["combo"]], work / "single_ranks")
    best = ddp_run["version"] / "checkpoints" / "best.ckpt"
    result = run_project(
        ["test", f"--config={BASE}", f"--config={config}", f"--config={CPU}", f"--ckpt_path={best}",
         *_common(ddp_run["data"])],
        cwd=work,
    )
    assert result.returncode == 0 and ABORT not in result.stderr, result.stderr[-4000:]
    (single,) = _ranks(work / "single_ranks")
    assert single["world_size"] == 1
    ddp_test = ddp_run["ranks"][0]["test"][0]
    one = single["test"][0]
    assert Counter(one["hashes"]) == Counter(ddp_test["hashes"]) + Counter(ddp_run["ranks"][1]["test"][0]["hashes"])
    assert one["logged"]["test/acc"] == pytest.approx(ddp_test["logged"]["test/acc"], abs=1e-6)
    for key in ("test/f1", "test/precision", "test/recall"):
        assert one["logged"][key] == pytest.approx(ddp_test["logged"][key], abs=1e-5)
    # equal shards (500/500): the mean over ranks of per-rank means is the mean over all test images
    assert one["logged"]["test/loss"] == pytest.approx(ddp_test["logged"]["test/loss"], rel=1e-4)
    if "test/acc_int8" in ddp_test["logged"]:
        assert one["logged"]["test/acc_int8"] == pytest.approx(ddp_test["logged"]["test/acc_int8"], abs=1e-6)


# ---- every offline experiment config under DDP, on real data ------------------------------------------------

def _shorten(config: dict, name: str) -> dict:
    """The config with its callbacks' schedules moved into a 2-epoch run; everything else as shipped."""
    for callback in config.get("trainer", {}).get("callbacks", []):
        args = callback.setdefault("init_args", {})
        if callback["class_path"].endswith("MagnitudePruning"):
            args.update(start=0, end=1, amount=0.5)  # 93% after 40 steps of training leaves nothing to test
        elif callback["class_path"].endswith("QuantizationAwareTraining"):
            args.update(start_epoch=0, freeze_observers_epoch=1)
    if name == "finetune/mnist_split_finetune":
        config["model"]["init_args"]["init_from"] = None  # its pretraining run is another config
        config["data"]["init_args"]["samples_per_class"] = None  # enough images for > 32 steps per rank
    return config


def _check_callback_effect(name: str, best: dict, last: dict) -> None:
    """What each config's training callback must have left in its checkpoints."""
    weights = {k: v for k, v in last["state_dict"].items() if k.endswith("weight")}
    if name.startswith("prune/"):
        zeros = sum(int((v == 0).sum()) for v in weights.values()) / sum(v.numel() for v in weights.values())
        assert zeros > 0.4, f"pruned to 50% of the selected weights, but {zeros:.1%} of all weights are zero"
    elif name.startswith("qat/"):
        assert any(".activation_post_process_" in k for k in last["state_dict"]), "QAT left no fake-quant state"
    elif name.startswith("finetune/"):  # the convs stay frozen from the first step: equal after epochs 1 and 2
        convs = [k for k in weights if k.startswith("net.backbone.features.")]
        assert convs and all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in convs)
        assert best["epoch"] == 0, "the check above compares the epochs 1 and 2: pick another config detail"


DDP_CONFIGS = ["quickstart", "mnist_lenet", "prune/mnist_lenet_unstructured", "qat/mnist_lenet_int8",
               "finetune/mnist_split_finetune"]


@pytest.mark.parametrize("name", DDP_CONFIGS)
def test_offline_config_runs_under_ddp_on_real_data_and_its_checkpoint_tests_the_same(name, tmp_path, monkeypatch) -> None:
    """``--config <experiment> --config configs/trainer/ddp_cpu.yaml`` as a user runs it (progress bar on),
    2 epochs of more than 32 steps per rank on real MNIST images, then the best checkpoint in one process."""
    import yaml

    config = _shorten(yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text()), name)
    path = tmp_path / f"{name.split('/')[-1]}.yaml"
    path.write_text(yaml.safe_dump(config))
    full_mnist = (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    data_dir = SHARED_DATA if name == "mnist_lenet" and full_mnist else SAMPLE_DIR  # all of MNIST where present
    data = [] if name == "quickstart" else [f"--data.init_args.data_dir={data_dir}"]
    if data_dir == SAMPLE_DIR and name != "quickstart":
        data.append("--data.init_args.val_size=501")  # of 6,000: 86 steps of 32 per rank, and uneven shards
    quick = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=40", "--trainer.limit_val_batches=5",
             "--trainer.enable_model_summary=false", "--data.init_args.batch_size=32", *data]
    fit = run_project(["fit", f"--config={path}", f"--config={DDP_CPU}", *quick], cwd=tmp_path)
    assert fit.returncode == 0 and ABORT not in fit.stderr, f"{name}: DDP fit failed\n{fit.stderr[-4000:]}"
    runs = tmp_path / "lightning_logs" / path.stem
    ddp = scalars(runs / "version_0")
    assert len(ddp["train/loss_epoch"]) == 2 and len(ddp["train/acc"]) == 2  # both epochs' synced training metrics
    assert ddp["test/acc"][-1] > 0.3, ddp["test/acc"]  # it learned (chance is 0.1 or 0.2)
    best = runs / "version_0" / "checkpoints" / "best.ckpt"
    last = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * 40
    _check_callback_effect(name, torch.load(best, weights_only=True), last)
    monkeypatch.chdir(tmp_path)
    main(["test", f"--config={path}", f"--config={CPU}", f"--ckpt_path={best}", "--trainer.enable_progress_bar=false", *quick])
    one = scalars(runs / "version_1")
    assert one["test/acc"][-1] == pytest.approx(ddp["test/acc"][-1], abs=1e-6)
    if "test/acc_int8" in ddp:
        assert one["test/acc_int8"][-1] == pytest.approx(ddp["test/acc_int8"][-1], abs=1e-6)


# ---- two "nodes" of one process each, started by a launcher --------------------------------------------------

def _launch(kind: str, node: int, port: int) -> list[str] | dict[str, str]:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "project"]
    return {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_LOCALID": "0",
            "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train",
            "SLURM_PROCID": str(node), "SLURM_NODEID": str(node), "MASTER_PORT": str(port)}


@pytest.mark.parametrize("kind", ["torchrun", "slurm"])
def test_two_nodes_from_a_launcher_form_one_group_on_real_data(kind, tmp_path) -> None:
    """The multi-node recipes of the docs, as 2 "nodes" of 1 process on this machine: torchrun on each node,
    or the variables ``srun`` sets. Lightning launches nothing itself; both processes join one group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["fit", f"--config={REPO / 'configs' / 'quickstart.yaml'}", f"--config={DDP_CPU}", "--trainer.num_nodes=2",
            "--trainer.devices=1", "--trainer.max_epochs=2", "--trainer.limit_train_batches=40",
            "--trainer.enable_progress_bar=true"]
    procs = []
    for node in (1, 0):
        launch = _launch(kind, node, port)
        command = launch + args if isinstance(launch, list) else [sys.executable, "-m", "project", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", **(launch if isinstance(launch, dict) else {})}
        procs.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and ABORT not in err, err[-4000:]
    rank1, rank0 = (out for out, _ in outs)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in rank0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1
    logged = scalars(tmp_path / "lightning_logs" / "quickstart" / "version_0")
    assert len(logged["train/acc"]) == 2 and logged["test/acc"][-1] > 0.5
