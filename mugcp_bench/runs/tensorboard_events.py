"""Optional TensorBoard event files per run (`run --tensorboard`), written from the run record when the run ends.

`<run dir>/tensorboard/` gets, per epoch, the loss and each loss part, the learning rate and images/s (the record's
`history`), and each evaluation's accuracy. It is rebuilt whole from the record every time (a resumed run writes
its full history once), in a temporary folder renamed into place, so no run ever shows half a log.
Needs the `tensorboard` package (`pip install 'mugcp-bench[tensorboard]'`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from mugcp_bench.atomic import default_mode
from mugcp_bench.errors import UserError

DIRNAME = "tensorboard"
INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install 'mugcp-bench[tensorboard]' (or tensorboard)"


def require_tensorboard() -> None:
    """UserError (before any training) when TensorBoard event files cannot be written here."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None


def write_run_events(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write the record's per-epoch history and evaluations as TensorBoard scalars; returns the event folder."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    final = run_dir / DIRNAME
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{DIRNAME}."))
    try:
        writer = SummaryWriter(log_dir=str(tmp))
        history = record.get("history") or []
        for row in history:
            step = int(row["epoch"])
            for key, value in row.items():
                if key == "loss":
                    writer.add_scalar("loss/total", value, step)
                elif key.startswith("loss_"):
                    writer.add_scalar(f"loss/{key.removeprefix('loss_')}", value, step)
                elif key in ("lr", "images_per_s", "seconds"):
                    writer.add_scalar(f"train/{key}", value, step)
        last = int(history[-1]["epoch"]) if history else 0
        for ev in record.get("evaluations") or []:
            tag = f"accuracy/{ev['protocol']}/{ev['dataset']}/{ev['classes']}"
            writer.add_scalar(tag, float(ev["accuracy"]), last)
        writer.close()
        tmp.chmod(default_mode(directory=True))  # mkdtemp's 0700 -> what mkdir gives
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
