"""The command line: ``python -m project {fit,validate,test,predict} --config configs/X.yaml``.

A thin :class:`LightningCLI` subclass. What it adds to Lightning's CLI:

- ``num_classes``, ``in_channels`` and ``image_size`` flow from the DataModule into the model
  (``link_arguments``), so a config never types them;
- a ModelCheckpoint (``--checkpoint.*``: best by ``val/acc`` as ``best.ckpt``, plus ``last.ckpt``) and a
  learning-rate monitor on every run, a TensorBoard logger named after the config file;
- ``fit`` tests the best checkpoint when it ends (``--test_after_fit false`` turns it off) and writes the
  run's hparams with its final metrics to TensorBoard; before that, ``--export`` writes the network's files
  (:mod:`project.fit_artifacts`);
- ``--ckpt_path last`` resumes from the newest ``last.ckpt`` of earlier runs of the same config, into a new
  version folder; checkpoints always load with ``weights_only=True`` and are checked before use;
- bad input ends with one ``error: ...`` line and exit status 2;
- glibc's malloc keeps freed tensor memory for reuse (:func:`project.runtime.keep_freed_memory`), and on a
  machine without a GPU torch stops probing for NVIDIA's driver at every optimizer step
  (:func:`project.runtime.skip_nvml_probe_without_gpu`).
"""

import os
import re
import shutil
from pathlib import Path
from typing import Any

from lightning import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from project.callbacks.checkpoint import BestAndLastCheckpoint
from project.callbacks.guards import NonFiniteLossGuard
from project.callbacks.visuals import TensorBoardViews
from project.checkpoints import AtomicCheckpointIO, check_checkpoint_fits, find_last_checkpoint, load_checkpoint
from project.errors import UserError, exit_on_user_error
from project.fit_artifacts import check_export, export_runtimes, write_fit_artifacts
from project.parsing import ProjectParser
from project.compression.artifacts import is_artifact
from project.predictions import predict_with_model_file, write_predictions_csv
from project.reporting import log_hparams_with_metrics
from project.runtime import finish_distributed, keep_freed_memory, log_info_to_stdout, skip_nvml_probe_without_gpu
from project.tasks import ImageClassifier

_SPECIAL_CKPT = {"best", "last", "hpc", "registry"}


class ProjectCLI(LightningCLI):
    """LightningCLI with this project's links, defaults and checks (see the module docstring)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        keep_freed_memory()
        skip_nvml_probe_without_gpu()
        kwargs.setdefault("parser_class", ProjectParser)
        kwargs.setdefault("parser_kwargs", {"prog": "python -m project", "allow_abbrev": False})
        kwargs.setdefault("model_class", ImageClassifier)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault(
            "trainer_defaults",
            {
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    # save_dir "default": <trainer.default_root_dir>/lightning_logs, resolved before the logger is built
                    "init_args": {"save_dir": "default", "name": "default", "default_hp_metric": False},
                },
            },
        )
        super().__init__(args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for attr in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{attr}", f"model.init_args.{attr}", apply_on="instantiate")
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(TensorBoardViews, "views")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, test the best checkpoint (the last weights if none was saved).",
        )
        parser.add_argument(
            "--export",
            type=str,
            default="auto",
            help="At the end of fit, write the network (last weights) as <log_dir>/model.pt2/.onnx/.xml: a "
            "comma-separated subset of torch,onnxruntime,openvino; none; or auto (the .pt2 when a pruning or QAT "
            "callback changed the network).",
        )

    @property
    def _active_config(self) -> Any:
        """The parsed config of the running subcommand (the whole config with ``run=False``)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._active_config
        for key in ("max_epochs", "min_epochs"):
            value = config.trainer.get(key)
            if value is not None and value < 0 and not (key == "max_epochs" and value == -1):
                raise UserError(f"trainer.{key} must be >= 0 (max_epochs -1 means no limit), got {value}")
        logger = config.trainer.logger
        configs = config.get("config") or []
        if getattr(logger, "class_path", "").endswith("TensorBoardLogger"):
            if configs and logger.init_args.get("name") == "default":
                logger.init_args.name = Path(str(configs[0])).stem
            if str(logger.init_args.get("save_dir")) == "default":  # the logger's own save_dir, when given, wins
                logger.init_args.save_dir = str(Path(config.trainer.get("default_root_dir") or ".") / "lightning_logs")
        data_args = getattr(config.data, "init_args", None)
        if data_args is not None and data_args.get("val_size", None) == 0 and str(config.checkpoint.monitor).startswith("val/"):
            config.checkpoint.monitor = None  # no validation: keep the newest weights as best.ckpt

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(NonFiniteLossGuard())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, before any of our hooks: check the file first.
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path is not None and is_artifact(ckpt_path):
            if self.config.subcommand != "predict":
                raise UserError(f"{ckpt_path} is an exported model: only `predict` runs it; pass a .ckpt for {self.config.subcommand}")
            return
        if ckpt_path is not None and ckpt_path not in _SPECIAL_CKPT:
            load_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    # ---- subcommands -------------------------------------------------------------------------------

    def _run_subcommand(self, subcommand: str) -> None:
        log_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        existed = log_dir is not None and log_dir.exists()
        try:
            super()._run_subcommand(subcommand)
        except UserError:
            # a run rejected before its first step leaves no version folder behind
            if log_dir is not None and not existed and self.trainer.global_step == 0 and log_dir.is_dir():
                if not any(log_dir.rglob("*.ckpt")):
                    shutil.rmtree(log_dir, ignore_errors=True)
            raise

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        self._check_log_dir_writable()
        if "weights_only" in kwargs:
            kwargs["weights_only"] = True  # a downloaded checkpoint must not be able to run code
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path == "last" and subcommand == "fit":
            kwargs["ckpt_path"] = ckpt_path = str(self._find_last_checkpoint())
        if ckpt_path is not None and ckpt_path not in _SPECIAL_CKPT and not is_artifact(ckpt_path):
            head = getattr(self.model, "head_prefix", None)
            check_checkpoint_fits(ckpt_path, self.model, self.trainer.callbacks, head_prefix=head)
        return kwargs

    def _check_log_dir_writable(self) -> None:
        logger = self.trainer.logger
        root = Path(logger.root_dir) if logger is not None and logger.root_dir else Path(self.trainer.default_root_dir)
        existing = next((p for p in (root, *root.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot write the run's logs under {root}: {existing} is not a writable folder;"
                " pass a writable --trainer.default_root_dir (or --trainer.logger.init_args.save_dir)"
            )

    def _find_last_checkpoint(self) -> Path:
        logger = self.trainer.logger
        if not isinstance(logger, TensorBoardLogger):
            raise UserError("--ckpt_path last needs the TensorBoard logger's folders: pass the checkpoint's path instead")
        return find_last_checkpoint(Path(logger.root_dir))

    def _export_runtimes(self) -> list[str]:
        return export_runtimes(self._active_config.get("export"), self.trainer.callbacks)

    def before_fit(self) -> None:
        check_export(self._export_runtimes(), self.datamodule)  # fail before training, not after

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        write_fit_artifacts(self.trainer, self.model, self._export_runtimes())
        callback = self.trainer.checkpoint_callback
        metrics: dict[str, float] = {}
        if isinstance(callback, ModelCheckpoint) and callback.best_model_score is not None:
            metrics[f"hp/best_{callback.monitor.replace('/', '_')}"] = float(callback.best_model_score)
        if self._active_config.get("test_after_fit", True):
            best = callback.best_model_path if isinstance(callback, ModelCheckpoint) else ""
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update(_hp_metrics(results))
        self._log_hparams(metrics)
        self._say_where_the_run_is(callback)

    def _say_where_the_run_is(self, callback: Any) -> None:
        """The last lines of a fit: the run's folder, its best checkpoint and how to look at it."""
        logger, log_dir = self.trainer.logger, self.trainer.log_dir  # log_dir is a collective call: every rank asks
        if not self.trainer.is_global_zero or logger is None or not log_dir:
            return
        best = callback.best_model_path if isinstance(callback, ModelCheckpoint) else ""
        print(f"run folder:      {log_dir}")
        if best:
            print(f"best checkpoint: {best}")
        print(f"look at it:      tensorboard --logdir {logger.root_dir}", flush=True)

    def after_test(self) -> None:
        self._log_hparams(_hp_metrics([dict(self.trainer.callback_metrics)]))

    def predict(self, **kwargs: Any) -> None:
        """Predict on the DataModule's predict split and write ``predictions.csv`` into the run's folder.

        ``--ckpt_path`` may also be a model the project exported (a fit's ``model.pt2``/``.onnx``/``.xml``, a
        compress or export report's artifacts): it is fed the images in [0, 1].
        """
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path is not None and is_artifact(ckpt_path):
            dm = self.datamodule
            dm.prepare_data()
            dm.setup("predict")
            outputs = [predict_with_model_file(Path(ckpt_path), (batch[0] for batch in dm.predict_dataloader()))]
        else:
            outputs = self.trainer.predict(**kwargs) or []
        if self.trainer.is_global_zero and outputs:
            path = Path(self.trainer.log_dir or ".") / "predictions.csv"
            print(f"wrote {write_predictions_csv(outputs, path)} predictions to {path}")

    def _log_hparams(self, metrics: dict[str, float]) -> None:
        config = self._active_config
        params: dict[str, Any] = {"model": config.model.class_path, "data": config.data.class_path}
        for section in ("model", "data"):
            for key, value in vars(config[section].init_args).items():
                params[f"{section}.{key}"] = value
        for key in ("max_epochs", "precision", "accumulate_grad_batches"):
            params[f"trainer.{key}"] = config.trainer.get(key)
        params["seed"] = config.get("seed_everything")
        log_hparams_with_metrics(self.trainer, params, metrics)


def _hp_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for result in results or []:
        for key, value in result.items():
            if key.startswith("test/"):
                out["hp/" + re.sub(r"\W", "_", key)] = float(value)
    return out


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m project``: run the subcommand, then end the distributed run cleanly
    (:func:`project.runtime.finish_distributed`); a rank launched by this one that failed fails the command."""
    log_info_to_stdout()
    cli = exit_on_user_error(ProjectCLI, args)
    launcher = getattr(getattr(cli, "trainer", None) and cli.trainer.strategy, "launcher", None)
    children = list(getattr(launcher, "procs", None) or [])
    del cli
    status = finish_distributed(children)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
