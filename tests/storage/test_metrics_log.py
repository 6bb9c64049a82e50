"""The per-epoch log (modules/storage/metrics_log.py): a rewound log shows each epoch once, in TensorBoard too."""
import csv
import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer

from modules.storage.metrics_log import MetricsLog


def test_a_rewind_in_the_same_second_hides_the_later_epochs_even_when_the_file_counter_gains_a_digit(
        tmp_path, monkeypatch):
    # TensorBoard names a file by its second and a per-process counter read as text: files 9 and 10 made in one
    # second would be read 10 first, and the rewound file's purge would come before the epochs it hides.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    time.sleep(1 - time.time() % 1)  # both files would be made early in one second
    log = MetricsLog(tmp_path / "metrics.csv", tmp_path / "events")
    for epoch in (1, 2, 3):
        log.log(epoch, {"train/loss": float(epoch)})
    log.rewind([{"train/loss": 1.0}])
    for epoch in (2, 3):
        log.log(epoch, {"train/loss": 10.0 * epoch})
    log.close()
    assert sorted(path.name.rsplit(".", 1)[1] for path in (tmp_path / "events").iterdir()) == ["10", "9"]
    events = EventAccumulator(str(tmp_path / "events"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("train/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    with open(tmp_path / "metrics.csv") as rows:
        assert [(row["epoch"], row["train/loss"]) for row in csv.DictReader(rows)] == [
            ("1", "1.0"), ("2", "20.0"), ("3", "30.0")]
