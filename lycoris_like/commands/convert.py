"""`lycoris-like convert`: between kohya/LyCORIS, PEFT, SGM names, prefixes, dense diff,
svdiff-pytorch and SaRA official."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert between kohya/LyCORIS, PEFT, SGM/diffusers names, prefixes, dense diff, svdiff-pytorch, SaRA"

TARGETS = ("kohya", "peft", "diff", "sgm", "diffusers", "svdiff-pytorch")
SOURCES = ("auto", "kohya", "peft", "svdiff-pytorch", "sara-official")


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_output

    p = subparsers.add_parser(
        "convert", help=HELP,
        description="--to peft: a PEFT adapter folder (needs --base for module paths). --to kohya: from a PEFT "
                    "folder, svdiff-pytorch or SaRA official (those two need --base, a model folder with config.json), "
                    "or just --rename-prefix. --to diff: dense ΔW. --to sgm / --to diffusers: SDXL UNet names.")
    p.add_argument("input", help="adapter file, PEFT adapter folder, svdiff-pytorch spectral_shifts.safetensors or SaRA unet.pt")
    add_output(p, "file (a folder for --to peft)")
    p.add_argument("--to", choices=TARGETS, required=True, help="target layout")
    p.add_argument("--from", dest="source", choices=SOURCES, default="auto", help="input layout (default: detected)")
    p.add_argument("--base", help="base model: checkpoint or diffusers folder (PEFT, diff), model folder with config.json (svdiff-pytorch, SaRA)")
    p.add_argument("--rename-prefix", action="append", default=[], metavar="OLD=NEW", help="rename a name prefix, e.g. lycoris=lora_unet (repeatable)")
    p.add_argument("--unet-config", help="UNet config.json or model folder for --to sgm/diffusers (default: SDXL base)")
    p.add_argument("--prefix", help="name prefix for modules converted from PEFT without a record (default: by component or guessed)")
    p.add_argument("--threshold", type=float, help="SaRA θ when the official checkpoint has none")
    p.add_argument("--dtype", help="dtype of a dense diff (default: the input's)")
    p.set_defaults(func=run)


def _source(args: argparse.Namespace) -> str:
    if args.source != "auto":
        return args.source
    path = Path(args.input)
    if path.is_dir() or path.name == "adapter_config.json":
        return "peft"
    if path.suffix in (".pt", ".pth", ".bin"):
        return "sara-official"
    return "kohya"


def run(args: argparse.Namespace) -> int:
    from ..cli import check_output
    from ..errors import ConfigError
    from ..tools import convert

    out = check_output(args, [args.input])
    source = _source(args)
    if args.rename_prefix and (args.to != "kohya" or source != "kohya"):
        raise ConfigError("--rename-prefix works on kohya/LyCORIS files: use it with --to kohya")
    if source == "peft" and args.to != "kohya":
        raise ConfigError("a PEFT folder converts --to kohya (then convert that file further)")
    if source in ("svdiff-pytorch", "sara-official") and args.to != "kohya":
        raise ConfigError(f"{source} converts --to kohya (then convert that file further)")
    if args.to == "peft":
        folders, notes = convert.to_peft(args.input, out, base=args.base, overwrite=args.overwrite)
        for note in notes:
            print(f"note: {note}")
        print("wrote " + ", ".join(str(f) for f in folders))
        return 0
    if args.to == "svdiff-pytorch":
        model = _model(args)
        print(f"wrote {convert.to_svdiff_pytorch(args.input, model, out)}")
        return 0
    if source == "peft":
        result = convert.from_peft(args.input, base=args.base, prefix=args.prefix)
    elif source == "svdiff-pytorch":
        result = convert.from_svdiff_pytorch(args.input, _model(args))
    elif source == "sara-official":
        result = convert.from_sara_official(args.input, _model(args), threshold=args.threshold)
    elif args.to == "diff":
        result = convert.to_diff(args.input, base=args.base, dtype=args.dtype)
    elif args.to in ("sgm", "diffusers"):
        result = convert.to_sgm(args.input, unet=args.unet_config, reverse=args.to == "diffusers")
    elif args.rename_prefix:
        mapping = {}
        for item in args.rename_prefix:
            old, sep, new = item.partition("=")
            if not sep:
                raise ConfigError(f"--rename-prefix takes OLD=NEW, got {item!r}")
            mapping[old] = new
        result = convert.rename_prefix(args.input, mapping)
    else:
        raise ConfigError("nothing to do: a kohya file converts --to peft, diff, sgm or diffusers, or --to kohya with --rename-prefix")
    print(result.table())
    result.save(out)
    print(f"wrote {out}: {len(result.tensors)} tensors")
    return 0


def _model(args: argparse.Namespace):
    from ..errors import ConfigError
    from ..tools.convert import load_pretrained

    if not args.base:
        raise ConfigError("this conversion needs the base model: --base MODEL_FOLDER (with config.json)")
    return load_pretrained(args.base)
