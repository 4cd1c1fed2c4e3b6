"""What a run shows: log lines, a progress bar on a terminal, tracker scalars and images.

Everything is decided once here: on ranks other than 0 every method is a no-op, so call sites just
log. The rich progress bar appears only when rank 0's stdout is a terminal; SLURM logs and pipes get
a plain line every `log.every_steps` instead. wandb runs offline (one log line says so) when no API
key is configured, writing `RUN_DIR/wandb/offline-run-*`; `wandb sync` uploads it later.
`log.tracker=tensorboard` writes the same scalars, histograms and images to `RUN_DIR/tensorboard`
through Accelerate's tracker (`tensorboard --logdir RUN_DIR/tensorboard`); its alerts are text entries.
"""

from __future__ import annotations

import netrc
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def new_run_id() -> str:
    return os.urandom(4).hex()


def summary_line(values: dict[str, float]) -> str:
    """The few numbers a person reads in a log line; the tracker gets all of them."""
    if "train/loss" in values:
        return (f"loss {values['train/loss']:.4g} (recon {values['train/recon']:.4g}, kl {values['train/kl']:.4g} "
                f"x {values['train/kl_weight']:.3g})  grad {values['train/grad_norm']:.3g}  lr {values['train/lr']:.3g}"
                f"  {values['train/images_per_second']:,.0f} img/s  data wait {values['train/data_wait_fraction']:.0%}"
                f"  epoch {values['train/epoch']:.0f}" + (f"  skipped steps {values['train/skipped_steps']:.0f}"
                                                          if values["train/skipped_steps"] else ""))
    for prefix, weights in (("val", ""), ("val_ema", ", EMA weights")):
        if f"{prefix}/loss" in values:
            v = {key.split("/", 1)[1]: value for key, value in values.items() if key.startswith(f"{prefix}/")}
            neg_elbo = f"  -elbo {v['neg_elbo']:.5g} nats" if "neg_elbo" in v else ""
            return (f"validation{weights}: loss {v['loss']:.4g}{neg_elbo}  kl {v['kl']:.4g}  "
                    f"recon mse {v['recon_mse']:.4g}  psnr {v['psnr']:.2f} dB"
                    + (f"  active units {v['active_units']:.0f}" if "active_units" in v else "")
                    + f"  ({v['images']:.0f} images)")
    return "  ".join(f"{key} {value:.4g}" for key, value in values.items())


class RunLog:
    def __init__(self, accelerator, run_dir: Path, max_steps: int, tracker: str):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.run_dir, self.max_steps, self.tracker = run_dir, max_steps, tracker
        self.progress, self.task = None, None

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[distvae {time.strftime('%H:%M:%S')}] {message}"
        if self.progress is not None:
            self.progress.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def start_tracker(self, project: str, run_name: str, run_id: str, config: dict) -> None:
        if self.tracker == "tensorboard":  # logging_dir/project: RUN_DIR/tensorboard; hparams must be flat
            self.accelerator.init_trackers("tensorboard", config=flat_hparams(config))
            return
        if self.tracker != "wandb":
            return
        if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
            os.environ["WANDB_MODE"] = "offline"
            self.info(f"wandb: no API key configured, logging offline to {self.run_dir / 'wandb'}")
        init = {"id": run_id, "resume": "allow", "name": run_name, "dir": str(self.run_dir)}
        self.accelerator.init_trackers(project, config=config, init_kwargs={"wandb": init})

    def start_progress(self, step: int) -> None:
        if not (self.enabled and sys.stdout.isatty()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[metrics]}"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task("train", total=self.max_steps, completed=step, metrics="")
        self.progress.start()

    def step(self, step: int, terms, images_per_second: float) -> None:
        if self.progress is not None:  # .item() waits for the device: only when there is a bar to draw
            metrics = f"loss {terms.total.item():.4g}  kl {terms.kl.item():.4g}  {images_per_second:,.0f} img/s"
            self.progress.update(self.task, completed=step, metrics=metrics)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.progress is None or "val/loss" in values or "val_ema/loss" in values:
            self.info(f"step {step}/{self.max_steps}  {summary_line(values)}")
        if self.tracker != "none":
            self.accelerator.log(values, step=step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Save uint8 (H, W, 3) grids as RUN_DIR/samples/NAME-step-00001000.png and send them to the tracker."""
        if not self.enabled:
            return
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in images.items():
            Image.fromarray(array).save(folder / f"{name}-step-{step:08d}.png")
        if self.tracker == "wandb":
            import wandb  # wandb.Image of uint8 arrays: float arrays are no longer rescaled and come out black

            self.accelerator.log({name: wandb.Image(array) for name, array in images.items()}, step=step)
        elif self.tracker == "tensorboard":
            self.accelerator.get_tracker("tensorboard").log_images(
                {name: array[None] for name, array in images.items()}, step=step, dataformats="NHWC")

    def histogram(self, step: int, name: str, values: np.ndarray) -> None:
        """A distribution over one step (the KL of each latent dimension), in the tracker only."""
        if not self.enabled or self.tracker == "none":
            return
        if self.tracker == "wandb":
            import wandb

            self.accelerator.log({name: wandb.Histogram(np.asarray(values))}, step=step)
        else:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_histogram(name, np.asarray(values), global_step=step)
            writer.flush()

    def alert(self, step: int, title: str, text: str) -> None:
        """A warning in the log line and, where the tracker has alerts (wandb), an alert; TensorBoard: text."""
        if not self.enabled:
            return
        self.info(f"step {step}/{self.max_steps}  WARNING {text}")
        if self.tracker == "wandb":
            import wandb

            self.accelerator.get_tracker("wandb", unwrap=True).alert(title=title, text=text,
                                                                     level=wandb.AlertLevel.WARN)
        elif self.tracker == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_text("alerts", f"{title}: {text}", global_step=step)
            writer.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.tracker != "none":
            self.accelerator.end_training()


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """The config as TensorBoard's hparams take it: dotted keys, values int/float/str/bool."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class WindowStats:
    """Sums over the steps since the last log line, kept on the device; reduced across ranks only when logging.

    Loss terms and the gradient norm average over applied steps only, so one skipped (non-finite) step
    never turns the window's loss into NaN; images/s counts every image a step processed, all
    micro-batches included.
    """

    def __init__(self, device: torch.device):
        self.device = device
        # This step's loss, recon, kl (each x images) and images.
        self.step_sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        # loss, recon, kl (x images), images of applied steps, grad norm of applied steps, images processed
        self.sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        self.steps = self.applied = self.skipped = self.scaler_skips = self.starved = 0
        self.seconds = self.data_seconds = self.bad_samples = 0.0
        self.last_images_per_second = 0.0

    def add(self, terms, images: int) -> None:
        """One micro-batch's loss terms."""
        values = torch.stack([terms.total.detach(), terms.recon.detach(), terms.kl.detach()]).double()
        self.step_sums[:3] += values * images
        self.step_sums[3] += images

    def step_loss_finite(self) -> torch.Tensor:
        """Whether every micro-batch of this step had a finite loss (a device tensor: no wait)."""
        return torch.isfinite(self.step_sums[0])

    def step(self, grad_norm: torch.Tensor, seconds: float, verdict, images: int, bad_samples: float) -> None:
        """Close a step: its sums join the window if it was applied. `images`: this rank's images in the step;
        `bad_samples`: unreadable samples of the step on all ranks (already reduced)."""
        if verdict.apply:
            self.sums[:4] += self.step_sums
            self.sums[4] += grad_norm.detach().double()
            self.applied += 1
        self.sums[5] += self.step_sums[3]
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        self.skipped += verdict.non_finite
        self.scaler_skips += verdict.scaler_overflow
        self.starved += verdict.no_data
        self.bad_samples += bad_samples
        self.last_images_per_second = images / max(seconds, 1e-9)
        self.step_sums.zero_()

    def add_step(self, out, seconds: float) -> None:
        """A whole step at once, from train_step's StepOutput."""
        self.step_sums.copy_(out.sums)
        self.data_seconds += out.data_seconds
        self.step(out.grad_norm, seconds, out.verdict, out.images, out.bad_samples)

    def reduce(self, accelerator) -> dict[str, float]:
        sums = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        timing = accelerator.reduce(torch.tensor([self.seconds, self.data_seconds], device=self.device), "mean")
        seconds, data_seconds = timing.tolist()
        applied_images = max(sums[3], 1.0)
        world = accelerator.num_processes
        nan = float("nan")
        result = {
            "train/loss": sums[0] / applied_images if self.applied else nan,
            "train/recon": sums[1] / applied_images if self.applied else nan,
            "train/kl": sums[2] / applied_images if self.applied else nan,
            "train/grad_norm": sums[4] / world / self.applied if self.applied else nan,
            "train/images_per_second": sums[5] / max(seconds, 1e-9),
            "train/data_wait_fraction": data_seconds / max(seconds, 1e-9),
            "train/skipped_steps": float(self.skipped), "train/scaler_skips": float(self.scaler_skips),
            "train/unreadable_batches": float(self.starved), "train/bad_samples": self.bad_samples,
        }
        self.reset()
        return result
