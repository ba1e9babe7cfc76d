"""The `hfpapers` command: list | info | new | train | run | convert | eval | card | push | pull | hub serve |
zoo build.

Errors print one line on stderr and exit with status 1 (2 for bad usage, as argparse does).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import __version__


def _parse_value(text: str):
    """`--set` values: JSON when they parse as JSON (numbers, booleans, lists), else the plain string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def key_values(pairs: list[str], flag: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.replace("-", "_")] = _parse_value(value)
    return out


LIST_WIDTH = 100  # `hfpapers list` fits a terminal this wide


def cmd_list(args) -> None:
    from . import list_methods

    records = list_methods()
    if args.json:
        print(json.dumps([r.summary() for r in records], indent=2))
        return
    # One line with what to call, then the paper under it; presets are `hfpapers info <method>`'s.
    rows = [(r.slug, r.kind, " ".join(r.arxiv_ids), r.entry_point) for r in records]
    header = ("method", "kind", "arXiv", "how to use")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(3)]
    for row, record in zip([header, *rows], [None, *records]):
        print(_clip("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3], LIST_WIDTH))
        if record is not None:
            print(_clip("    " + record.title, LIST_WIDTH))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_info(args) -> None:
    from . import get_method

    record = get_method(args.method)
    print(json.dumps({**record.summary(), "authors": record.authors, "arxiv_url": record.arxiv_url,
                      "presets": {name: {"config": dict(p.config), "training": dict(p.training)}
                                  for name, p in record.presets.items()},
                      "paper_results": dict(record.paper_results), "bibtex": record.bibtex}, indent=2))


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", help="method slug, see `hfpapers list`")
    parser.add_argument("--preset", help="model size (default: the method's default preset)")
    parser.add_argument("--output-dir", required=True, help="where checkpoints, metrics, weights and card go")
    parser.add_argument("--dataset", help="embedded dataset name, Hub dataset id or local folder "
                                          "(default: the method's embedded dataset)")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option of an embedded dataset, e.g. resolution=32 (repeatable)")
    parser.add_argument("--column", action="append", default=[], metavar="NAME=SOURCE",
                        help="read the method's column NAME from the dataset's column SOURCE, e.g. image=img "
                             "(repeatable)")
    parser.add_argument("--epochs", type=int, dest="num_epochs")
    parser.add_argument("--batch-size", type=int, dest="per_device_train_batch_size", help="per process")
    parser.add_argument("--lr", type=float, dest="learning_rate")
    parser.add_argument("--gradient-accumulation-steps", type=int)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--checkpoint-every-steps", type=int)
    parser.add_argument("--resume", nargs="?", const="latest", dest="resume_from",
                        help="continue from a checkpoint folder, or the latest one in --output-dir")
    parser.add_argument("--overwrite-output-dir", action="store_true", default=None,
                        help="train into a used --output-dir anew (its earlier run's checkpoints and logs go)")
    parser.add_argument("--no-progress", action="store_false", dest="progress_bar", default=None)
    parser.add_argument("--neural-collapse", action="store_true", default=None,
                        help="record NC1-NC4 of a classifier's penultimate features on the eval set each epoch "
                             "(in metrics.jsonl, plotted to neural_collapse.png)")
    parser.add_argument("--tract", nargs="?", type=float, const=0.1, default=None, metavar="LAMBDA",
                        help="train the first layer with TrAct (arXiv 2410.23970) at this lambda (default 0.1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any training argument or recipe field, e.g. label_smoothing=0.1 (repeatable)")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. num_blocks=4 (repeatable)")


def cmd_train(args) -> None:
    from .engine import train

    settings = {k: getattr(args, k) for k in ("num_epochs", "per_device_train_batch_size", "learning_rate",
                                              "gradient_accumulation_steps", "mixed_precision", "seed",
                                              "checkpoint_every_steps", "resume_from", "overwrite_output_dir",
                                              "progress_bar", "neural_collapse", "tract")
                if getattr(args, k) is not None}
    settings.update(key_values(args.set, "--set"))
    dataset_kwargs = key_values(args.dataset_option, "--dataset-option") if args.dataset_option else None
    result = train(args.method, args.output_dir, preset=args.preset, dataset=args.dataset,
                   dataset_kwargs=dataset_kwargs, columns=column_map(args.column),
                   config_overrides=key_values(args.config, "--config"), **settings)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        print(json.dumps({"output_dir": args.output_dir, "eval": result.eval_metrics,
                          "train_seconds": round(result.train_seconds, 2)}))
    state.destroy_process_group()


def column_map(pairs: list[str]) -> dict[str, str]:
    """--column NAME=SOURCE pairs (source names are kept as written)."""
    out = {}
    for pair in pairs:
        name, sep, source = pair.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--column expects NAME=SOURCE, got {pair!r}")
        out[name] = source
    return out


def cmd_run(args) -> None:
    from accelerate import PartialState

    from .runs import run

    options = {k: v for k, v in vars(args).items() if k not in RUN_COMMON}
    dataset_kwargs = key_values(args.dataset_option, "--dataset-option") if args.dataset_option else None
    result = run(args.method, args.model, args.output_dir, preset=args.preset, dataset=args.dataset,
                 dataset_kwargs=dataset_kwargs, columns=column_map(args.column),
                 settings=key_values(args.set, "--set"), overwrite_output_dir=args.overwrite_output_dir,
                 **options)
    state = PartialState()
    if state.is_main_process:
        print(json.dumps({"output_dir": args.output_dir, "metrics": result.metrics}))
    state.destroy_process_group()


def add_run_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`hfpapers run <method>`'s options: the common ones, then the method's runner's own."""
    parser.add_argument("method", help="a procedure or analysis, see `hfpapers list`")
    parser.add_argument("--model", required=True, help="the model to work on: a local folder or a Hub id")
    parser.add_argument("--output-dir", required=True, help="where the result, results.json and the card go")
    parser.add_argument("--preset", help="settings preset (default: the method's default, see `hfpapers info`)")
    parser.add_argument("--dataset", help="embedded dataset name, Hub dataset id or local folder")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--column", action="append", default=[], metavar="NAME=SOURCE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the method's config (see `hfpapers info <method>`), repeatable")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="run into the folder of an earlier run, replacing it")
    # The runner's own options, when the method is named on the command line (so that --help lists them too).
    slug = next((a for a in argv[argv.index("run") + 1:] if not a.startswith("-")), None) if "run" in argv else None
    if slug is not None:
        from .registry import TRAINED_KINDS, get_method

        try:
            record = get_method(slug)
        except KeyError:
            return  # reported by cmd_run with the known methods
        if record.kind not in TRAINED_KINDS:
            record.load(record.runner).add_arguments(parser)


RUN_COMMON = {"command", "func", "method", "model", "output_dir", "preset", "dataset", "dataset_option", "column",
              "set", "overwrite_output_dir"}


def cmd_eval(args) -> None:
    from .engine import evaluate_folder

    print(json.dumps(evaluate_folder(args.folder, dataset=args.dataset), indent=2))


def cmd_card(args) -> None:
    from .cards import write_card

    print(write_card(args.folder, repo_id=args.repo_id))


def cmd_push(args) -> None:
    from .cards import build_card
    from .engine import RUN_FILE
    from .hub import push

    if Path(args.repo_id).is_dir() and not Path(args.folder).is_dir():
        raise ValueError(f"{args.repo_id!r} is a folder and {args.folder!r} is not: the order is "
                         f"`hfpapers push REPO_ID FOLDER` (as `hf upload`), e.g. hfpapers push {args.folder} "
                         f"{args.repo_id}")
    # A folder trained here gets a card that names the repo it is pushed to.
    card = str(build_card(args.folder, repo_id=args.repo_id)) if Path(args.folder, RUN_FILE).exists() else None
    print(push(args.folder, args.repo_id, private=args.private, card=card, token=args.token,
               revision=args.revision, commit_message=args.commit_message, include=args.include or None,
               exclude=args.exclude, keep=args.keep))


def cmd_pull(args) -> None:
    from .hub import pull

    print(pull(args.repo_id, local_dir=args.local_dir, revision=args.revision, token=args.token))


def cmd_hub_serve(args) -> None:
    from .testing.localhub import serve

    serve(args.data_dir, host=args.host, port=args.port, max_request_bytes=args.max_upload_size, token=args.token)


def byte_size(text: str) -> int:
    """`--max-upload-size` values: bytes, or a number with K, M or G (powers of 1024), e.g. 512M."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size like 1048576, 512M or 2G, got {text!r}")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " "))


def port_number(text: str) -> int:
    if not (text.isdigit() and 0 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535 (0 picks a free one), got {text!r}")
    return int(text)


def cmd_convert(args) -> None:
    from .checkpoints import converter

    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "func", "method", "checkpoint", "output_dir")}
    print(converter(args.method).convert(args.checkpoint, args.output_dir, **options))


def cmd_new(args) -> None:
    from .scaffold import new_method

    written = new_method(args.slug, args.kind, title=args.title, arxiv=args.arxiv, root=args.root)
    root = Path(args.root)
    print("\n".join(str(path.relative_to(root)) for path in written))
    print(f"A draft {args.kind} method: replace every TODO (grep -rn TODO on the files above), then see the "
          "README's 'Adding a method' for what done means.")


def cmd_zoo_build(args) -> None:
    from .zoo import build_zoo

    build_zoo(args.output_dir, methods=args.method or None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hfpapers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"hfpapers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the registered methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="one method's record")
    p.add_argument("method")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a method with the shared Accelerate engine")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="run a procedure or analysis on a model")
    add_run_arguments(p, argv)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="evaluate a trained folder on its dataset's test split")
    p.add_argument("folder")
    p.add_argument("--dataset", help="another dataset with the same labels (default: the one it trained on)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("card", help="(re)write a trained folder's model card")
    p.add_argument("folder")
    p.add_argument("--repo-id", help="the repo the card will live in (used in its loading snippet)")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("push", help="make a Hub repo (at HF_ENDPOINT) hold a saved folder, like `hf upload`",
                       description="Upload FOLDER to REPO_ID in one commit. Repo files that are not in FOLDER are "
                                   "deleted (except --keep patterns); training checkpoints and pickles never go up.")
    p.add_argument("repo_id", help="e.g. you/scaling-mlp-tiny")
    p.add_argument("folder", help="a folder written by save_pretrained or `hfpapers train`")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--commit-message")
    p.add_argument("--include", action="append", metavar="PATTERN", help="upload only matching files (repeatable)")
    p.add_argument("--exclude", action="append", metavar="PATTERN", help="do not upload matching files (repeatable)")
    p.add_argument("--keep", action="append", metavar="PATTERN",
                   help="repo files matching this are not deleted though absent from FOLDER (repeatable)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="download a repo from the Hub at HF_ENDPOINT")
    p.add_argument("repo_id")
    p.add_argument("--local-dir", help="download here instead of the Hugging Face cache")
    p.add_argument("--revision")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("convert", help="convert an official checkpoint into a folder that loads with from_pretrained")
    p.add_argument("method", help="a method whose record names a converter (see `hfpapers info <method>`)")
    p.add_argument("checkpoint", help="the official checkpoint, a file or a folder as the method's release has it")
    p.add_argument("output_dir", help="the folder to write")
    if argv[:1] == ["convert"] and argv[1:2] and not argv[1].startswith("-"):  # the method's own options
        from .checkpoints import converter

        try:
            converter(argv[1]).add_arguments(p)
        except (KeyError, ValueError):
            pass  # reported by cmd_convert
    p.set_defaults(func=cmd_convert)

    hub = sub.add_parser("hub", help="a local Hub server").add_subparsers(dest="hub_command", required=True)
    p = hub.add_parser("serve", help="serve the Hub protocol on 127.0.0.1 from a data directory")
    p.add_argument("--port", type=port_number, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--data-dir", default="hub-data", help="where repos are stored (kept between restarts)")
    p.add_argument("--max-upload-size", type=byte_size, default="512M", metavar="SIZE",
                   help="largest accepted upload (commit body), e.g. 2G (default: 512M)")
    p.add_argument("--token", help="the token writes must carry (default: a new random one, printed at start)")
    p.set_defaults(func=cmd_hub_serve)

    zoo = sub.add_parser("zoo", help="the model zoo").add_subparsers(dest="zoo_command", required=True)
    p = zoo.add_parser("build", help="train, evaluate, card and package every method's default preset")
    p.add_argument("--output-dir", default="zoo")
    p.add_argument("--method", action="append", help="only these methods (repeatable)")
    p.set_defaults(func=cmd_zoo_build)

    p = sub.add_parser("new", help="start a new method: its folder, record, card prose, test and reproduction stub",
                       description="Write a draft method from the templates of its kind (status='draft': not listed "
                                   "or registered until it is done). Nothing is written if any target exists.")
    p.add_argument("slug", help="lowercase words joined by hyphens, e.g. scaling-mlp (the folder is scaling_mlp)")
    p.add_argument("--kind", required=True, choices=["model", "diffusers", "adapter", "procedure", "analysis"])
    p.add_argument("--title", help="the paper's title")
    p.add_argument("--arxiv", help="the paper's arXiv id, e.g. 2306.13575")
    p.add_argument("--root", default=".", help="the repository root (default: the current directory)")
    p.set_defaults(func=cmd_new)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (KeyError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"hfpapers {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
