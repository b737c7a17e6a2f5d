"""Train or fine-tune an xLSTM-UNet from image/mask pairs.

Examples::

    # the shipped cell model's recipe
    python training/train.py --config training/configs/cells_small.yaml --out runs/cells

    # fine-tune the shipped model on your own folder (images/ + masks/)
    python training/train.py --config training/configs/finetune_cells.yaml \\
        --set data.train_dir=my_cells --out runs/my_cells

    # continue a run that was stopped or killed
    python training/train.py --out runs/cells --resume

    # several GPUs or machines
    torchrun --nproc_per_node=4 training/train.py --config ... --out runs/cells

The model comes from the package (``napari_xlstm_unet.model``), so the
``model.pt`` written here opens in napari and in ``xlstm-unet segment``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

import torch.distributed as dist

from napari_xlstm_unet.training.config import load_config
from napari_xlstm_unet.training.engine import TrainingError, run

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings: see training/configs/*.yaml, and src/napari_xlstm_unet/training/config.py for every key "
               "and its default.",
    )
    parser.add_argument("--config", type=Path, help="YAML file; defaults apply to keys it leaves out")
    parser.add_argument("--out", type=Path, required=True,
                        help="run folder: config, logs, last/best checkpoints and model.pt")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.epochs=10 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from last.pt, with its saved config.yaml")
    parser.add_argument("--init", help="start from this checkpoint or shipped model name (fine-tuning)")
    parser.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and heads")
    parser.add_argument("--xlstm", choices=["none", "bot", "enc", "full"], help="where the ViL blocks go")
    parser.add_argument("--epochs", type=int, help="number of epochs")
    parser.add_argument("--seed", type=int, help="seed of weights and patches")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s" if "RANK" in os.environ
                        else "%(asctime)s %(levelname)s %(message)s")
    overrides = list(args.overrides)
    for flag, key in (("init", "model.init"), ("xlstm", "model.xlstm"), ("epochs", "train.epochs"),
                      ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.freeze_encoder:
        overrides.append("model.freeze_encoder=true")
    config_path = args.config
    if args.resume:
        saved = args.out / "config.yaml"
        if args.config is not None:
            logger.info("--resume uses %s; --config %s is ignored", saved, args.config)
        config_path = saved if saved.is_file() else args.config
    try:
        config = load_config(config_path, overrides)
        command = "python training/train.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        run(config, args.out, resume=args.resume, command=command)
    except (TrainingError, ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    finally:
        # A rank that exits with its gloo process group still open can abort
        # in the group's destructor ("terminate called without an active
        # exception"), which fails the whole torchrun job after training ended.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
