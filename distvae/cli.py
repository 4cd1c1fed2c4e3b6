"""The `distvae` command.

    distvae train --config tiny [key=value ...]        # one process; multi-GPU: accelerate launch distvae/train.py
    distvae info --config celeba128 [key=value ...]    # layer table, parameters, activation memory
    distvae synth --out data/synth --n 20000           # built-in synthetic CelebA-layout face set
    distvae pack --src data/celeba --out shards/celeba [--resolution 64] [--workers 8]
    distvae bench data [--resolution 64] [--json out.json] [--peers]   # --peers: vs mosaicml-streaming, litdata
    distvae bench pack [--n 800] [--workers 2]         # pack speed, 1 worker vs K
    distvae bench plan [--samples N --world-size W]    # the global data plan at scale, simulated
    distvae bench step [--device cuda] [--quick]       # the step: bare loop vs distvae loop vs end to end
    distvae bench sync [--device cuda] [--quick]       # the step's wait for the device: host vs device decision
    distvae bench resume | e2e [--quick]               # resume late in an epoch; the tutorial loop vs distvae
    distvae bench all [--peers]                        # all of them; rewrites BENCHMARKS.md (make bench)
    distvae bench quality [--quick] [--steps N]        # plain vs resnet rate-distortion at 64 px; writes QUALITY.md
    distvae data plan --config tiny --step S [--world-size W --rank R]   # the sample keys of a step
    distvae sample | reconstruct | interpolate | evaluate | export --ckpt RUN_DIR ...   # after training
    distvae latent-scale --ckpt RUN_DIR [--shards S]   # 1 / std of the latents: a second stage's scaling factor
"""

from __future__ import annotations

import argparse
import sys

from distvae.config import add_config_arguments, config_from_args
from distvae.errors import UserError
from distvae.state import add_resume_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distvae", description="Train convolutional VAEs on faces.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train a VAE in this process (see README for multi-GPU launches)")
    add_config_arguments(train)
    add_resume_arguments(train)

    info = commands.add_parser("info", help="print a model's layers, parameter count and activation memory")
    add_config_arguments(info)

    synth = commands.add_parser("synth", help="write the built-in synthetic face set in CelebA's layout")
    synth.add_argument("--out", required=True, help="folder to create (img_align_celeba/, list_*.txt)")
    synth.add_argument("--n", type=int, default=20000, help="number of images")
    synth.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    synth.add_argument("--force", action="store_true", help="replace a set already in --out")

    pack = commands.add_parser("pack", help="pack a CelebA root or an image folder into webdataset shards")
    pack.add_argument("--src", required=True, help="CelebA root (img_align_celeba/ + list files) or any image folder")
    pack.add_argument("--out", required=True, help="output folder for NAME-SPLIT-000000.tar and manifest.json")
    pack.add_argument("--name", default=None, help="shard name prefix (default: celeba, or the folder name)")
    pack.add_argument("--resolution", type=int, default=0, help="pre-crop and resize to R x R; 0 = original bytes")
    pack.add_argument("--format", dest="image_format", default="npy", choices=("npy", "png", "jpg"),
                      help="image encoding of pre-resized samples (npy = raw uint8, the fastest to read)")
    pack.add_argument("--workers", type=int, default=1, help="decoding processes")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    pack.add_argument("--val-fraction", type=float, default=0.1, help="plain folders: share of images for val")
    pack.add_argument("--test-fraction", type=float, default=0.1, help="plain folders: share of images for test")
    pack.add_argument("--force", action="store_true", help="replace shards and manifest already in --out")
    pack.add_argument("--order", default="shuffled", choices=("shuffled", "source"),
                      help="sample order within each split: seeded random (default) or the source's own")
    pack.add_argument("--seed", type=int, default=0, help="seed of --order shuffled (same seed, same shards)")

    def tool(name: str, text: str, shards: bool = False):
        command = commands.add_parser(name, help=text)
        command.add_argument("--ckpt", required=True, help="checkpoint folder, or a run directory (its latest)")
        command.add_argument("--raw", action="store_true", help="the live weights instead of the EMA")
        if shards:
            command.add_argument("--shards", required=True, help="shard spec (a manifest's val split by default)")
        if name not in ("export", "evaluate", "latent-scale"):
            command.add_argument("--out", required=True, help="PNG file to write")
        return command

    sample = tool("sample", "a grid of decoder samples, z ~ N(0, T^2 I)")
    sample.add_argument("--n", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--attr", action="append", default=[], metavar="NAME=0|1",
                        help="conditional models: fix an attribute (repeatable); the others come from real rows")
    reconstruct = tool("reconstruct", "inputs and their reconstructions side by side", shards=True)
    reconstruct.add_argument("--n", type=int, default=16)
    interpolate = tool("interpolate", "decoded paths between the posterior means of pairs of images", shards=True)
    interpolate.add_argument("--pairs", type=int, default=4)
    interpolate.add_argument("--steps", type=int, default=8)
    interpolate.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    evaluate = tool("evaluate", "-ELBO, bits/dim, IW bound, MSE, PSNR, SSIM, KL per dim, active units, FID",
                    shards=True)
    evaluate.add_argument("--json", default=None, help="also write every figure as JSON here")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--workers", type=int, default=0, help="data workers per process (JPEG shards want some)")
    evaluate.add_argument("--iw", type=int, default=1, help="importance samples for the IW bound (1 = the ELBO)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    evaluate.add_argument("--fid-images", type=int, default=10_000,
                          help="inputs (the split's first) that FID compares; 0 = no FID")
    evaluate.add_argument("--fid-weights", default=None,
                          help="local Inception weights for FID (default: torch-fidelity's cache; never downloaded)")
    export = tool("export", "config.json + model.safetensors for ConvVAE.from_pretrained")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--scale-shards", default=None, help="training shards to measure the latent scaling factor "
                        "on (spatial latents: the run's data.train_shards by default)")
    export.add_argument("--scale-images", type=int, default=2048, help="images the scaling factor is measured on")
    scale = tool("latent-scale", "1 / the std of the latents over training images (a second stage's scale)")
    scale.add_argument("--shards", default=None, help="training shards (default: the run's data.train_shards)")
    scale.add_argument("--images", type=int, default=2048)
    scale.add_argument("--seed", type=int, default=0)

    data = commands.add_parser("data", help="inspect the training data as the trainer sees it")
    data_kinds = data.add_subparsers(dest="data_kind", metavar="KIND")
    data_plan = data_kinds.add_parser("plan", help="the sample keys of a global batch, or of one rank's part")
    add_config_arguments(data_plan)
    data_plan.add_argument("--epoch", type=int, default=0)
    data_plan.add_argument("--step", type=int, default=0, help="the step within the epoch (0-based)")
    data_plan.add_argument("--world-size", type=int, default=1, help="processes of the run")
    data_plan.add_argument("--rank", type=int, default=None, help="show this rank's part only")
    data_plan.add_argument("--json", default=None, help="also write the rows as JSON here")

    bench = commands.add_parser("bench", help="measure the data stream against the reference loader")
    bench_kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND")
    bench_data = bench_kinds.add_parser("data", help="images/s per core: reference loader vs our stream")
    bench_data.add_argument("--source", default=None, help="CelebA-layout folder (default: synthetic)")
    bench_data.add_argument("--resolution", type=int, default=64)
    bench_data.add_argument("--seconds", type=float, default=5.0, help="time per measured path")
    bench_data.add_argument("--json", default=None, help="also write the results as JSON here")
    bench_data.add_argument("--n", type=int, default=3000, help="synthetic images to make when --source is not given")
    bench_data.add_argument("--peers", action="store_true", help="per CPU second against mosaicml-streaming and "
                            "litdata instead, one fresh process per epoch (pip install -e '.[bench]'; synthetic only)")
    bench_step = bench_kinds.add_parser("step", help="training images/s: a bare PyTorch loop vs distvae's loop and "
                                        "its end-to-end run, each in its own process")
    from distvae.bench.step import add_arguments as step_arguments

    step_arguments(bench_step)
    from distvae.bench.sync import add_arguments as sync_arguments

    sync_arguments(bench_kinds.add_parser("sync", help="what the step's wait for the device costs: guards decided on "
                                          "the host vs on the device vs none"))
    from distvae.bench import e2e as e2e_bench
    from distvae.bench import resume as resume_bench

    resume_bench.add_arguments(bench_kinds.add_parser("resume", help="seconds to resume late in an epoch vs reading "
                                                      "the skipped data"))
    e2e_bench.add_arguments(bench_kinds.add_parser("e2e", help="the tutorial loop vs distvae train --config "
                                                   "reference, 10 epochs, pack included"))
    from distvae.bench import quality as quality_bench

    quality_bench.add_arguments(bench_kinds.add_parser("quality", help="rate-distortion of the plain and resnet archs "
                                                       "at an equal cost per step, 64 px; writes QUALITY.md"))
    bench_all = bench_kinds.add_parser("all", help="data, step, resume and e2e in one run; writes BENCHMARKS.md")
    bench_all.add_argument("--peers", action="store_true", help="also the peer loaders (pip install -e '.[bench]')")
    bench_all.add_argument("--quick", action="store_true", help="every bench's quick variant (seconds each)")
    bench_all.add_argument("--json", default=None, help="also write every figure as JSON here")
    bench_all.add_argument("--markdown", default="BENCHMARKS.md", help="the file whose bench section is rewritten")
    bench_plan = bench_kinds.add_parser("plan", help="the global data plan at cluster scale, simulated: time, memory")
    bench_plan.add_argument("--samples", type=int, default=10**8, help="samples in the simulated dataset")
    bench_plan.add_argument("--shards", type=int, default=10**5, help="shards they are packed into")
    bench_plan.add_argument("--world-size", type=int, default=1024, help="ranks")
    bench_plan.add_argument("--batch-size", type=int, default=64, help="samples per rank per step")
    bench_plan.add_argument("--shuffle-block", type=int, default=2**18, help="shuffle block in samples; 0 = epoch")
    bench_plan.add_argument("--json", default=None, help="also write the results as JSON here")
    bench_pack = bench_kinds.add_parser("pack", help="pack speed with 1 worker against --workers, side by side")
    bench_pack.add_argument("--n", type=int, default=800, help="synthetic images to pack")
    bench_pack.add_argument("--workers", type=int, default=2, help="the worker count compared with 1")
    bench_pack.add_argument("--resolution", type=int, default=64, help="pre-resize to R x R")
    bench_pack.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest of each is kept")
    bench_pack.add_argument("--json", default=None, help="also write the results as JSON here")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command in ("train", "info"):
        cfg = config_from_args(args)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        if args.command == "info":
            from distvae.info import print_info

            print_info(cfg)
            return 0
        from distvae.train import run

        return run(cfg, args.reset_data)
    if args.command == "synth":
        from distvae.data.synth import make_synthetic_celeba

        make_synthetic_celeba(args.out, n=args.n, seed=args.seed, force=args.force)
        return 0
    if args.command == "pack":
        from distvae.data.pack import pack

        pack(
            src=args.src,
            out=args.out,
            name=args.name,
            resolution=args.resolution,
            image_format=args.image_format,
            workers=args.workers,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            force=args.force,
            order=args.order,
            seed=args.seed,
        )
        return 0
    if args.command in ("sample", "reconstruct", "interpolate", "export", "evaluate", "latent-scale"):
        from distvae import tools  # evaluate and export import their own modules (FID needs torchmetrics)

        if args.command == "sample":
            line = tools.sample(args.ckpt, args.out, args.n, args.temperature, args.seed, args.raw, args.attr)
        elif args.command == "reconstruct":
            line = tools.reconstruct(args.ckpt, args.shards, args.out, args.n, args.raw)
        elif args.command == "interpolate":
            line = tools.interpolate(args.ckpt, args.shards, args.out, args.pairs, args.steps, args.slerp, args.raw)
        elif args.command == "evaluate":
            from distvae import scores

            line = scores.evaluate_checkpoint(args.ckpt, args.shards, args.json, args.batch_size, args.iw, args.seed,
                                              args.raw, args.fid_images, args.fid_weights, workers=args.workers)
        elif args.command == "latent-scale":
            line = tools.latent_scale(args.ckpt, args.shards, args.images, args.seed, args.raw)[1]
        else:
            from distvae import export

            line = export.export(args.ckpt, args.out, args.raw, args.scale_shards, args.scale_images)
        if line:  # other ranks of a multi-process evaluate print nothing
            print(line)
        return 0
    if args.command == "data" and args.data_kind == "plan":
        from distvae.data.show import show_plan

        if args.world_size < 1 or args.epoch < 0:
            raise UserError("--world-size must be at least 1 and --epoch at least 0")
        show_plan(config_from_args(args), args.epoch, args.step, args.world_size, args.rank, args.json)
        return 0
    if args.command == "bench" and args.bench_kind == "plan":
        from distvae.bench.plan import bench_plan

        bench_plan(samples=args.samples, shards=args.shards, world_size=args.world_size, batch_size=args.batch_size,
                   shuffle_block=args.shuffle_block, json_path=args.json)
        return 0
    if args.command == "bench" and args.bench_kind == "pack":
        from distvae.bench.pack import bench_pack

        bench_pack(n=args.n, workers=args.workers, resolution=args.resolution, rounds=args.rounds, json_path=args.json)
        return 0
    if args.command == "bench" and args.bench_kind == "resume":
        from distvae.bench.resume import bench_resume

        bench_resume(args.images, args.copies, args.at, args.rounds, args.quick, args.json)
        return 0
    if args.command == "bench" and args.bench_kind == "e2e":
        from distvae.bench.e2e import bench_e2e

        bench_e2e(args.images, args.epochs, args.rounds, args.quick, args.json)
        return 0
    if args.command == "bench" and args.bench_kind == "quality":
        from distvae.bench.quality import run_args

        run_args(args)
        return 0
    if args.command == "bench" and args.bench_kind == "all":
        from distvae.bench.report import bench_all

        bench_all(peers=args.peers, quick=args.quick, json_path=args.json, markdown=args.markdown)
        return 0
    if args.command == "bench" and args.bench_kind == "step":
        from distvae.bench.step import bench_step

        bench_step(args.device, args.rounds, args.steps, args.quick, args.json, args.configs, args.threads,
                   args.batch, args.e2e_cache)
        return 0
    if args.command == "bench" and args.bench_kind == "sync":
        from distvae.bench.sync import bench_sync

        bench_sync(args.device, args.resolution, args.batch, args.precision, True, args.steps, args.rounds, args.quick,
                   args.json)
        return 0
    if args.command == "bench" and args.bench_kind == "data" and args.peers:
        from distvae.bench.peers import bench_peers

        if args.source is not None:
            raise UserError("--peers measures the synthetic faces only: drop --source")
        bench_peers(n=args.n, resolution=args.resolution, json_path=args.json)
        return 0
    if args.command == "bench" and args.bench_kind == "data":
        from distvae.bench.data import bench_data

        bench_data(source=args.source, resolution=args.resolution, seconds=args.seconds, json_path=args.json, n=args.n)
        return 0
    parser.print_help()
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except UserError as error:
        print(f"distvae {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distvae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
