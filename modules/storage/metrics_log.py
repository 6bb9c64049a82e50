"""Per-epoch numbers: a CSV file and TensorBoard event files, written by the main process only."""
import csv
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricsLog:
    """log(epoch, {name: float}) appends a CSV row and a TensorBoard scalar per name ('train/recon', 'lr', ...).

    The VAE logs to output/metrics.csv and runs/<run id>/vae/, the conditioner to output/conditioner_metrics.csv and
    runs/<run id>/conditioner/, so `tensorboard --logdir runs` shows both parts of every run side by side.
    """

    def __init__(self, csv_path: Path, tensorboard_dir: Path, history: list | None = None):
        self.tensorboard_dir, self.csv_path = Path(tensorboard_dir), Path(csv_path)
        self.writer = self._csv_file = self._csv_writer = None
        self.rewind(history or [])

    def rewind(self, history: list) -> None:
        """Continue after `history` (the epochs a resumed or restored state has done): the CSV is rewritten with
        them, and TensorBoard hides what was logged for later epochs, so no epoch appears twice."""
        self.close()
        self._csv_file = self._csv_writer = None
        self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=len(history) + 1 if history else None)
        self.history = [{"epoch": epoch, **record} for epoch, record in enumerate(history, start=1)]
        if history:
            self._open_csv(history[0])
            self._csv_writer.writerows(self.history)
            self._csv_file.flush()

    def log(self, epoch: int, values: dict) -> None:
        row = {"epoch": epoch, **values}
        self.history.append(row)
        for name, value in values.items():
            self.writer.add_scalar(name, value, epoch)
        if self._csv_writer is None:
            self._open_csv(values)
        self._csv_writer.writerow(row)
        self._csv_file.flush()

    def _open_csv(self, values: dict) -> None:
        self._csv_file = open(self.csv_path, "w", newline="")
        self._csv_writer = csv.DictWriter(self._csv_file, fieldnames=["epoch", *values])
        self._csv_writer.writeheader()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._csv_file is not None:
            self._csv_file.close()
