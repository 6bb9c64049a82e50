"""Per-epoch numbers: a CSV file and TensorBoard event files, written by the main process only."""
import csv
import io
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from modules.storage.atomic import disk_full_as, is_out_of_space


class MetricsLog:
    """log(epoch, {name: float}) appends a CSV row and a TensorBoard scalar per name ('train/recon', 'lr', ...).

    The VAE logs to output/metrics.csv and runs/<run id>/vae/, the conditioner to output/conditioner_metrics.csv and
    runs/<run id>/conditioner/, so `tensorboard --logdir runs` shows both parts of every run side by side.
    """

    def __init__(self, csv_path: Path, tensorboard_dir: Path, history: list | None = None):
        self.tensorboard_dir, self.csv_path = Path(tensorboard_dir), Path(csv_path)
        self.writer = self._csv_file = self._fields = None
        self.rewind(history or [])

    def rewind(self, history: list) -> None:
        """Continue after `history` (the epochs a resumed or restored state has done): the CSV is rewritten with
        them, and TensorBoard hides what was logged for later epochs, so no epoch appears twice."""
        self.close()
        self._csv_file = self._fields = None
        self._wait_past_earlier_event_files()
        with self._tensorboard_space():
            self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir),
                                        purge_step=len(history) + 1 if history else None)
        self.history = [{"epoch": epoch, **record} for epoch, record in enumerate(history, start=1)]
        if history:
            self._append(self.history)

    def log(self, epoch: int, values: dict) -> None:
        row = {"epoch": epoch, **values}
        self.history.append(row)
        with self._tensorboard_space():
            for name, value in values.items():
                self.writer.add_scalar(name, value, epoch)
        self._append([row])

    def _wait_past_earlier_event_files(self) -> None:
        """TensorBoard reads a folder's event files in the order of their names, which start with the second each
        was made in and end with a per-process counter compared as text ('10' before '9'). A new file is only made
        once the clock has passed the second of the newest file there, so it is read after them and its purge
        hides their later epochs rather than being overwritten by them."""
        seconds = [path.name.split(".")[3] for path in self.tensorboard_dir.glob("events.out.tfevents.*")]
        newest = max((int(second) for second in seconds if second.isdigit()), default=None)
        while newest is not None and time.time() < newest + 1:
            time.sleep(newest + 1 - time.time())

    def _tensorboard_space(self):
        """TensorBoard writes its events in a thread of its own and reports a full disk, without a file name, at a
        later call: said as DiskFull naming the events folder."""
        return disk_full_as(self.tensorboard_dir)

    def _append(self, rows: list) -> None:
        """Rows to the CSV (made, with its header, by the first), each call written through at once. On a full disk
        the file is cut back to its last whole row and DiskFull is raised."""
        if self._csv_file is None:
            self._csv_file = open(self.csv_path, "wb", buffering=0)  # unbuffered: nothing is left to flush later
            self._fields = list(rows[0])
            rows = [dict(zip(self._fields, self._fields)), *rows]
        text = io.StringIO()
        csv.DictWriter(text, fieldnames=self._fields).writerows(rows)
        whole_rows_end = self._csv_file.tell()
        remaining = memoryview(text.getvalue().encode())
        with disk_full_as(self.csv_path):
            try:
                while remaining:  # an unbuffered write may take part of the bytes (a disk filling up): write the rest
                    remaining = remaining[self._csv_file.write(remaining):]
            except OSError as error:
                if is_out_of_space(error):
                    self._csv_file.truncate(whole_rows_end)
                raise

    def close(self) -> None:
        if self._csv_file is not None:
            self._csv_file.close()
        if self.writer is not None:
            with self._tensorboard_space():
                self.writer.close()
