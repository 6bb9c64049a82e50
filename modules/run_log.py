"""Per-epoch numbers: TensorBoard event files and output/metrics.csv, written by the main process only."""
import csv
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    """log(epoch, {name: float}) appends a CSV row and a TensorBoard scalar per name ('train/recon', 'lr', ...).

    The VAE logs to output/metrics.csv and output/tensorboard/; a part given a name (the conditioner) logs to
    output/<name>_metrics.csv and output/tensorboard/<name>/, so TensorBoard shows both side by side.
    """

    def __init__(self, output_dir: Path, name: str = ""):
        tensorboard = Path(output_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(tensorboard / name if name else tensorboard))
        self.csv_path = Path(output_dir) / (f"{name}_metrics.csv" if name else "metrics.csv")
        self._csv_file = None
        self._csv_writer = None
        self.history = []

    def log(self, epoch: int, values: dict) -> None:
        row = {"epoch": epoch, **values}
        self.history.append(row)
        for name, value in values.items():
            self.writer.add_scalar(name, value, epoch)
        if self._csv_writer is None:
            self._csv_file = open(self.csv_path, "w", newline="")
            self._csv_writer = csv.DictWriter(self._csv_file, fieldnames=list(row))
            self._csv_writer.writeheader()
        self._csv_writer.writerow(row)
        self._csv_file.flush()

    def close(self) -> None:
        self.writer.close()
        if self._csv_file is not None:
            self._csv_file.close()
