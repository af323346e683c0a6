"""`python -m meddap <command> [--config NAME_OR_PATH] [key=value ...]`.

Commands are looked up lazily so `--help` and config errors answer without importing torch or Ray.
A stage is a function `run(cfg: Config) -> dict | None` in `meddap/stages/<module>.py`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from meddap import logs
from meddap.config import ConfigError, load_config, shipped_configs
from meddap.errors import MeddapError

__all__ = ["main", "STAGES", "user_error_exit", "resume_args"]

# command -> (module:function, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("meddap.stages.prepare:run", "real datasets -> manifest, leakage audit, splits and folds"),
    "finetune": ("meddap.stages.finetune:run", "USLoRA fine-tuning on Ray Train (one adapter per fold)"),
    "generate": ("meddap.stages.generate:run", "synthetic images with adjective prompts on Ray Data"),
    "fid": ("meddap.stages.fid:run", "FID / KID / memorisation of each synthetic set"),
    "sweep": ("meddap.stages.sweep:run", "classifier x adjective x ratio x fold grid on Ray Tune"),
    "report": ("meddap.stages.report:run", "tables, statistics, figures and report.md"),
    "run": ("meddap.stages.pipeline:run", "the whole study: prepare -> finetune -> generate -> fid -> sweep -> report"),
    "demo": ("meddap.stages.pipeline:run", "`run` with the demo config (phantom data, the shipped phantom base model, minutes on a CPU)"),
}
STAGES_NAMES = ("prepare", "finetune", "generate", "fid", "sweep", "report")
BENCHES = {
    "finetune": "meddap.bench.finetune:main",
    "generate": "meddap.bench.generate:main",
    "classify": "meddap.bench.classify:main",
    "pipeline": "meddap.bench.pipeline:main",
    "gpu": "meddap.bench.gpu:main",
    "fidelity": "meddap.bench.fidelity:main",
}


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _split_overrides(tokens: list[str]) -> tuple[list[str], list[str]]:
    """key=value tokens vs. everything else (flags for a bench)."""
    overrides = [t for t in tokens if "=" in t and not t.startswith("-")]
    rest = [t for t in tokens if t not in overrides]
    return overrides, rest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meddap",
        description="MEDDAP: LoRA-adapted Stable Diffusion augmentation of small medical-image datasets, on Ray.",
        epilog="Shipped configs: " + ", ".join(shipped_configs()) + ". Overrides are dotted key=value pairs, "
               "e.g. data.folds=3 data.root=/data/BUSI.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", default="demo", help="shipped config name or YAML path (default: demo)"
                        + ("; demo accepts only demo (use `run --config NAME` for others)" if name == "demo" else ""))
        if name in ("run", "demo"):
            sp.add_argument("--force", action="append", default=[], metavar="STAGE",
                            help="redo STAGE and every stage after it that depends on it (repeatable)")
        else:
            # `--force` or `--force NAME` (the form the stale-stage messages give, as for `run`)
            sp.add_argument("--force", nargs="?", const=True, default=False, metavar=name.upper(),
                            help=f"redo {name} even if its record says done or its settings/inputs changed "
                                 f"(its earlier outputs are deleted first); `--force {name}` says the same")
        _verbose_flag(sp)
        sp.add_argument("overrides", nargs="*", metavar="key=value")
    st = sub.add_parser("status", help="how far a run has got: each stage done, running, stale or missing; "
                                       "adapters, images and trials done; the report (read-only)",
                        description="Read-only: safe from another shell while a run is going.")
    st.add_argument("--config", default="demo", help="shipped config name or YAML path (default: demo)")
    st.add_argument("overrides", nargs="*", metavar="key=value")
    ph = sub.add_parser("phantom", help="write the breast-ultrasound phantom dataset in the BUSI layout")
    ph.add_argument("out_dir")
    ph.add_argument("--per-class", type=int, default=60)
    ph.add_argument("--variant", choices=["standard", "shifted"], default="standard")
    ph.add_argument("--size", type=int, default=128)
    ph.add_argument("--seed", type=int, default=0)
    pb = sub.add_parser("pretrain-base", help="pretrain the builtin:phantom base model (and its judge) into OUT",
                        description="Make the builtin:phantom base model from scratch: phantom corpus, VAE, UNet + "
                                    "text encoder, reference judge. Deterministic for --seed; resumes from OUT/.work "
                                    "when killed. Its meddap_pretrain.json records the settings, wall time and losses. "
                                    "The full recipe takes hours on a 2-core CPU (docs/base-model.md).")
    pb.add_argument("out_dir", metavar="OUT", help="folder to write the model into (a diffusers folder + judge/)")
    pb.add_argument("--seed", type=int, default=0, help="the recipe's seed (data, initialisation, order)")
    pb.add_argument("--quick", action="store_true", help="a few steps of every phase (smoke test), not a usable model")
    pb.add_argument("--keep-work", action="store_true", help="keep OUT/.work (corpus, latents, checkpoints)")
    pb.add_argument("--overwrite", action="store_true", help="write over an OUT that holds a finished model or "
                                                                "other files (refused without it)")
    pb.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 2, the model's setting; --quick: 1)")
    pb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                    help="change one recipe setting, e.g. --set filler_share=0 (repeatable; an experiment: the "
                         "shipped model is made with none; docs/base-model.md lists the settings)")
    b = sub.add_parser("bench", help="benchmarks that print figures: " + ", ".join(BENCHES))
    b.add_argument("what", choices=list(BENCHES))
    b.add_argument("--config", default="demo")
    b.add_argument("rest", nargs=argparse.REMAINDER, metavar="key=value | --flag ...")
    c = sub.add_parser("config", help="print the effective config as YAML (after overrides)")
    c.add_argument("--config", default="demo")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _verbose_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help=f"show Ray's own messages on the console too (same as {logs.ENV}=debug); by default "
                        "they go to files under <run_dir>/logs/")


def user_error_exit(label: str, e: BaseException, resume: str | None = None) -> int:
    """Exit status for an exception that reached a command's top level, printing one line for the
    errors a user can fix (config, inputs, unusable paths) and for Ctrl-C or SIGTERM (with `resume`,
    the command that resumes); anything else re-raises.
    Shared by the CLI and the `ray job submit` entry points in jobs/."""
    if isinstance(e, (ConfigError, MeddapError)):
        logs.error(f"{label}: error: {e}")
        _point_at_logs(label)
        return 2
    if isinstance(e, OSError) and not os.environ.get("MEDDAP_TRACEBACK"):
        # A path the user gave that cannot be used (run_dir under a file, no permission, disk full, ...):
        # one line, not a stack trace. MEDDAP_TRACEBACK=1 shows the trace when it is a bug after all.
        logs.error(f"{label}: error: {type(e).__name__}: {e}. Check the paths in the config and on the "
                   f"command line (run_dir, data.root, ...): they must exist where they are read, be folders where "
                   f"folders are expected, and be writable where outputs go (MEDDAP_TRACEBACK=1 shows the stack "
                   f"trace).")
        return 2
    if isinstance(e, KeyboardInterrupt):
        _point_at_logs(label)  # first: the resume line is the last thing the user reads
        how = f": `{resume}`" if resume else " (the same command)"
        logs.error(f"{label}: interrupted; finished work is kept, rerun to resume{how}")
        return 130
    _point_at_logs(label)
    raise e


def _point_at_logs(label: str) -> None:
    """After an error in a quiet command that ran Ray: where Ray's own account of it is."""
    where = logs.ray_log_dir()
    if where:
        logs.error(f"{label}: Ray's own messages (worker output, tracebacks) are in {where}")


def _command_line(argv: list[str] | None) -> str:
    """The command as typed, for the resume hint (--force dropped: a resume must not redo work)."""
    return "python -m meddap " + resume_args(sys.argv[1:] if argv is None else argv)


def resume_args(argv: list[str]) -> str:
    """`argv` without --force (and run's stage after it), shell-quoted."""
    import shlex

    args = list(argv)
    keep = []
    skip_next = False
    for i, a in enumerate(args):
        if skip_next:
            skip_next = False
            continue
        if a == "--force":
            # run's (and a job's) --force takes a stage name; a one-stage command's is a bare flag
            skip_next = i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1] \
                and (args[0] in ("run", "demo") or args[i + 1] in STAGES_NAMES)
            continue
        if a.startswith("--force="):
            continue
        keep.append(a)
    return " ".join(shlex.quote(a) for a in keep)


def _one_stage_force(parser, args) -> None:
    """A one-stage command's --force: True, the command's own name, or (argparse took it) an override."""
    if args.command in ("run", "demo") or not isinstance(args.force, str):
        return
    value, args.force = args.force, True
    if "=" in value:
        args.overrides.insert(0, value)
    elif value != args.command:
        parser.error(f"`{args.command} --force` redoes {args.command} only; to redo {value} and the stages "
                     f"after it: python -m meddap run --force {value} (same --config and overrides)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "overrides", None) is not None and hasattr(args, "force"):
        _one_stage_force(parser, args)
    if args.command is None:
        _parser().print_help()
        return 2
    from meddap.raytools import interrupt_on_sigterm

    # timeout, Slurm, Kubernetes and spot preemption send SIGTERM: stop as Ctrl-C does
    with interrupt_on_sigterm():
        return _main(args, argv)


def _main(args, argv: list[str] | None) -> int:
    t0 = time.perf_counter()
    try:
        if args.command == "phantom":
            from meddap.data.phantom import write_phantom
            write_phantom(args.out_dir, per_class=args.per_class, variant=args.variant, size=args.size,
                          seed=args.seed)
            return 0
        if args.command == "pretrain-base":
            from meddap.diffusion.pretrain import parse_setting_overrides, pretrain_base, settings_from
            settings = settings_from(args.quick, **{**parse_setting_overrides(args.settings), "seed": args.seed,
                                                    "threads": args.threads})
            pretrain_base(args.out_dir, settings,
                          keep_work=args.keep_work, overwrite=args.overwrite)
            return 0
        if args.command == "config":
            cfg = load_config(args.config, args.overrides)
            sys.stdout.write(cfg.to_yaml(header=True))
            return 0
        if args.command == "status":
            cfg = load_config(args.config, args.overrides)
            from meddap.status import show_status

            show_status(cfg)
            return 0
        if args.command == "bench":
            overrides, rest = _split_overrides(args.rest)
            cfg = load_config(args.config, overrides)
            _load(BENCHES[args.what])(cfg, rest)
            return 0
        if args.command == "demo" and args.config != "demo":  # it would be ignored: say so instead
            raise ConfigError(f"`demo` always runs the demo config; for --config {args.config} use "
                              f"`python -m meddap run --config {args.config} ...`.")
        config = "demo" if args.command == "demo" else args.config
        cfg = load_config(config, args.overrides)
        with logs.console(cfg.run_dir, args.command, verbose=args.verbose):
            if args.command in ("run", "demo"):
                _load(STAGES[args.command][0])(cfg, force=args.force)
            else:
                # One stage with the pipeline's bookkeeping: skipped when its record says done, refused when
                # its settings or inputs changed since (unless --force), recorded when it finishes.
                from meddap.stages.pipeline import run_stages

                run_stages(cfg, (args.command,), force=[args.command] if args.force else ())
            where = logs.ray_log_dir()
            logs.say(f"[meddap] {args.command} finished in {time.perf_counter() - t0:.1f}s; outputs under "
                     f"{cfg.run_dir}" + (f"; Ray's own messages: {where}" if where else ""))
        return 0
    except BaseException as e:  # noqa: BLE001 - user-facing errors become one line; bugs re-raise
        return user_error_exit(f"meddap {args.command}", e, resume=_command_line(argv))


if __name__ == "__main__":
    raise SystemExit(main())
