"""Read what a run logged to TensorBoard."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_run(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar tag of the run in ``log_dir`` with its values in step order."""
    acc = read_run(log_dir)
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hparams_entry(log_dir: Path) -> tuple[dict[str, object], list[str]]:
    """The run's entry in TensorBoard's HPARAMS tab: (hyperparameter values, names of its metrics)."""
    from tensorboard.plugins.hparams import metadata

    content = read_run(log_dir).PluginTagToContent(metadata.PLUGIN_NAME)  # KeyError: no entry was written
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    values = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()}
    return values, [m.name.tag for m in experiment.metric_infos]
