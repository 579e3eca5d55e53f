"""What a step logs: the metric sums of its micro-batches (one vector, reduced over ranks in one
collective), the step's record, and where records go — ``metrics.jsonl`` (every step, rank 0),
TensorBoard under ``output_dir/tb`` or wandb (every ``log_every``), a tqdm bar on rank 0.

A mean over nothing (a branch with no pairs in the step, or every metric of a step whose pairs
were all bad) is absent: None in the record, null in metrics.jsonl, not sent to TensorBoard,
wandb or the bar. The counts (``pairs``, ``pairs_cond``, ``pairs_uncond``) say why.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from snpo.config import TrainConfig
from snpo.metrics_file import METRICS_FILE, read_lines
from snpo_kernels import SUM_FIELDS, stats_from_sums

# the additive quantities of a micro-batch, in metric_vector order: the loss and pair count, the
# preference statistics exactly as snpo_kernels adds them (PreferenceStats.sums, SUM_FIELDS), the
# two MSE sums and the micro-batch count; the loop fills the last two
METRIC_FIELDS = (
    "loss_sum",
    "pairs",
    *SUM_FIELDS,
    "mse_policy_sum",
    "mse_ref_sum",
    "micro_batches",
    "stop_requested",
    "bad_images",
)
METRIC_SLOTS = len(METRIC_FIELDS)
STATS_SLOTS = slice(2, 2 + len(SUM_FIELDS))
STOP_SLOT = METRIC_FIELDS.index("stop_requested")
BAD_SLOT = METRIC_FIELDS.index("bad_images")


def metric_vector(m: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """(METRIC_SLOTS,) sums of one micro-batch's metrics (:data:`METRIC_FIELDS`), on ``like``'s
    device and dtype with no host synchronisation: loss·P, P, the step's
    ``PreferenceStats.sums()`` (``stat_sums``; an SFT step has only the branch counts), mse_policy·P,
    mse_ref·P, 1, and zeros for the two slots the loop fills."""

    def g(k):
        v = m.get(k)
        if v is None:
            return torch.zeros((), dtype=like.dtype, device=like.device)
        return torch.nan_to_num(v.detach().to(like.device, like.dtype).reshape(()), nan=0.0)

    stats = m.get("stat_sums")
    if stats is None:  # no preference loss (sft): the counts of its CFG dropout only
        zeros = [torch.zeros((), dtype=like.dtype, device=like.device)] * (len(SUM_FIELDS) - 2)
        stats = torch.stack([g("count_cond"), g("count_uncond"), *zeros])
    else:
        stats = stats.detach().to(like.device, like.dtype)
    p = g("pairs")
    one = torch.ones((), dtype=like.dtype, device=like.device)
    head = torch.stack([g("loss") * p, p])
    tail = torch.stack(
        [g("mse_policy") * p, g("mse_ref") * p, one, torch.zeros_like(one), torch.zeros_like(one)]
    )
    return torch.cat([head, stats, tail])


def step_record(s: list[float], step: int, epoch: int, *, preference: bool = True) -> dict:
    """The means of a step from its summed :func:`metric_vector` ``s``; None for a mean over
    nothing (an empty branch; every preference statistic of an SFT run, ``preference=False``).
    The branch means come from :func:`snpo_kernels.stats_from_sums`, as any other trainer would
    compute them."""

    def div(a, b):
        return float(a / b) if b > 0 else None

    stats = stats_from_sums(torch.tensor(s[STATS_SLOTS], dtype=torch.float64))
    if not preference:
        stats = {k: v for k, v in stats.items() if k.startswith("count_")}
    f = dict(zip(METRIC_FIELDS, s, strict=True))
    return {
        "step": step,
        "epoch": epoch,
        "loss": div(f["loss_sum"], f["pairs"]),
        "pairs": int(f["pairs"]),
        "accuracy_cond": stats.get("accuracy_cond"),
        "accuracy_uncond": stats.get("accuracy_uncond"),
        "pairs_cond": int(f["count_cond"]),
        "pairs_uncond": int(f["count_uncond"]),
        "logp_proxy": stats.get("logp_proxy"),
        "mse_policy": div(f["mse_policy_sum"], f["pairs"]),
        "mse_ref": div(f["mse_ref_sum"], f["pairs"]),
    }


def keep_metrics_until(path: Path, step: int) -> int:
    """Rewrite ``path`` (atomically) keeping the records of steps ≤ ``step``; a torn or
    unreadable line (a run killed mid-write) is dropped with a warning. → lines dropped as torn."""
    lines, torn = read_lines(path)
    keep = [line for line, rec in lines if rec["step"] <= step]
    if torn:
        warnings.warn(
            f"{path}: skipped {torn} unreadable line(s) (a run stopped while writing)",
            stacklevel=2,
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)
    return torn


class MetricsLogger:
    """metrics.jsonl (every step) + TensorBoard / wandb (every log_every) + tqdm, rank 0 only."""

    def __init__(self, cfg: TrainConfig, is_main: bool, start_step: int) -> None:
        self.cfg, self.active = cfg, is_main
        self.tb = self.wandb = self.bar = None
        self.path = Path(cfg.output_dir) / METRICS_FILE
        if not self.active:
            return
        if self.path.exists():  # a resumed run: drop what the interrupted run logged past here
            keep_metrics_until(self.path, start_step)
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(Path(cfg.output_dir) / "tb"), purge_step=start_step + 1 if start_step else None
            )
        elif cfg.report_to == "wandb":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project, config=cfg.to_dict(), dir=cfg.output_dir
            )
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=cfg.max_steps, initial=start_step, desc=f"{cfg.objective}", dynamic_ncols=True
            )

    def log(self, record: dict) -> None:
        """Append ``record`` (None and NaN → null) and report its finite scalars."""
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        step = record["step"]
        # every sink gets the same finite scalars: a mean over nothing is None, an unreported
        # norm NaN, and neither is sent (a tracker would plot it as a gap or a spike)
        scalars = {
            k: v
            for k, v in record.items()
            if isinstance(v, (int, float)) and k != "step" and v == v
        }
        if step % self.cfg.log_every == 0 or step == self.cfg.max_steps:
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(f"train/{k}", v, step)
            if self.wandb is not None:
                self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            post = {}
            for k, short, fmt in (
                ("loss", "loss", ".4g"),
                ("accuracy_cond", "acc_cond", ".2f"),
                ("accuracy_uncond", "acc_uncond", ".2f"),
            ):
                v = record.get(k)
                if isinstance(v, (int, float)) and v == v:
                    post[short] = format(v, fmt)
            self.bar.set_postfix(post)

    def image(self, tag: str, array, step: int) -> None:
        """An (H, W, 3) uint8 image (a numpy array) to TensorBoard (``add_image``, HWC) or wandb
        (``wandb.Image``) at ``step``, rank 0 (the validation grids)."""
        if not self.active:
            return
        if self.tb is not None:
            self.tb.add_image(tag, array, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(array)}, step=step)

    def message(self, text: str) -> None:
        """A line on rank 0 (through the bar when there is one)."""
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
