"""Train KARMA on Ray and write a servable artifact.

  python jobs/train.py                              # the `demo` preset, on a local Ray started for you
  ray job submit --working-dir . -- python jobs/train.py --preset demo
  python jobs/train.py --preset ml100k --set train.max_steps=500 --set loss.lambda_rec=0
  python jobs/train.py --data DIR                   # your data, in the layout of karma_ray/data/prepare.py
  python jobs/train.py --storage-path s3://B/runs --artifacts-dir s3://B/artifacts   # shared storage (multi-node)

Progress goes to stderr: a live bar on a terminal; in a log (`ray job logs`, CI, a file) one line
per `train.log_every` steps with the loss parts, tokens/s and an ETA (karma_ray.progress). With
RAY_ADDRESS set (as under `ray job submit`), or --address, it joins that cluster.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from karma_ray.config import PRESETS  # noqa: E402
from karma_ray.progress import quiet_library_bars_in_logs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="named config: demo (synthetic shop, all 30 SmolLM2 layers, the top 2 trained over a cached trunk, minutes on CPU), "
                        "ml100k (MovieLens-100K, CPU budget), gpu (full model, bf16, several GPU workers), "
                        "tiny (random 2-layer model, for tests). Default: demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set train.max_steps=200 --set loss.act=infonce "
                        "(sections: data, model, loss, train, index; repeatable)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (DDP); same as --set train.num_workers=N")
    p.add_argument("--max-steps", type=int, help="optimizer steps; same as --set train.max_steps=N")
    p.add_argument("--data", help="prepared data directory (the preset's dataset is prepared there if the "
                                  "directory does not exist; an existing one must hold meta.json)")
    p.add_argument("--artifacts-dir", help="where artifacts/<run>/ and artifacts/latest go (default: ./artifacts)")
    p.add_argument("--storage-path", help="Ray Train storage for checkpoints: a local dir or s3://… (default: ./runs)")
    p.add_argument("--address", default=None,
                   help="Ray address; default: the job's cluster under `ray job submit`, else a new local Ray")
    p.add_argument("--run-name", help="name of this run (default: <preset>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint with the config it was "
                                                   "started with (after its driver died); give the same --storage-path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--prepare-only", action="store_true",
                   help="prepare the preset's data under --data (if not there yet) and exit: cluster.yaml runs this on "
                        "every node, so Ray Data tasks and export actors find the same data wherever they run")
    p.add_argument("--no-progress", action="store_true", help="no progress output at all (bars or log lines)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace):
    from karma_ray.config import get_preset

    overrides = list(args.overrides)
    for flag, key in ((args.num_workers, "train.num_workers"), (args.max_steps, "train.max_steps"),
                      (args.data, "data.path"), (args.artifacts_dir, "train.artifacts_dir"),
                      (args.storage_path, "train.storage_path")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    return get_preset(args.preset).with_overrides(overrides)


def check_data_dir(path: str | None, protocol: str) -> str | None:
    """Why `--data` cannot be used, or None. `--data` is a dataset root whose `<protocol>/` holds a prepared
    split (meta.json marks one as complete). An existing directory without it is not a dataset root: the
    preset's data would be prepared into it beside the user's files, so refuse rather than guess."""
    if path is None or not Path(path).exists() or (Path(path) / protocol / "meta.json").exists():
        return None
    if (Path(path) / "meta.json").exists():
        return (f"{path} holds a prepared split directly; --data is a dataset root now: move it to "
                f"{Path(path) / protocol} (the split of the `{protocol}` protocol)")
    return (f"{path} exists but holds no prepared `{protocol}` split ({Path(path) / protocol / 'meta.json'} is missing): "
            f"use the layout karma_ray/data/prepare.py documents under {Path(path) / protocol}, or a directory that "
            f"does not exist yet (the preset's dataset is then prepared there)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_bars_in_logs()
    if args.resume:
        from karma_ray.train.run import resumable_config

        try:
            cfg = resumable_config(args.storage_path or "runs", args.resume)
        except FileNotFoundError as e:
            print(f"train: error: {e}", file=sys.stderr)
            return 2
        args.run_name = args.resume
    else:
        cfg = resolve_config(args)
        problem = check_data_dir(args.data, cfg.eval.protocol)
        if problem:
            print(f"train: error: {problem}", file=sys.stderr)
            return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.prepare_only:
        from karma_ray.data.prepare import ensure_prepared

        print(f"data: {ensure_prepared(cfg.with_absolute_paths())}")
        return 0
    from karma_ray.train.run import run

    out = run(cfg, address=args.address, run_name=args.run_name, show_progress=not args.no_progress)
    print(f"artifact: {out}")
    return 0


if __name__ == "__main__":
    from karma_ray.allocator import reexec_with_fast_allocator

    reexec_with_fast_allocator()  # this process evaluates and exports on CPU
    sys.exit(main())
