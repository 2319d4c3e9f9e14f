"""Convert the released ML-Mamba checkpoint, its two timm vision towers and its tokenizer into a Hub folder.

    python -m conversion.convert_original_mlmamba --checkpoint latest-checkpoint.pt --run-config config.json \\
        --dino timm/vit_large_patch14_reg4_dinov2.lvd142m --siglip timm/vit_so400m_patch14_siglip_384.webli \\
        --tokenizer xiuyul/mamba-2.8b-zephyr --output ml-mamba-hf

The work is done by `conversion.convert`; this file only parses arguments and turns the outcome into the exit
status in `EXIT_STATUS`.
"""

import argparse
import signal
import sys
import textwrap
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conversion.convert import DTYPES, UploadError, convert  # noqa: E402
from conversion.mapping import ConversionError  # noqa: E402
from conversion.sources import parse_overrides  # noqa: E402

EXIT_STATUS = """exit status:
  0    the folder was written (and uploaded, with --push-to-hub)
  1    nothing was written; the message lists every problem found
  2    the command line is wrong (argparse); nothing was written
  3    the folder was written completely, but the upload of --push-to-hub failed; upload it again with `hf upload`
  130  interrupted by Ctrl-C (SIGINT), 129 / 143 by SIGHUP / SIGTERM: nothing was written (the unfinished hidden
       folder is removed; one left by a killed run is removed when the next conversion to that --output starts)"""
# Signals that stop a conversion like Ctrl-C does, so that its unfinished folder is removed on the way out.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

OVERRIDE_HELP = (
    "JSON object (inline, or the path of a .json file) merged over the released {what}; only needed for small "
    "or synthetic checkpoints"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=textwrap.fill(
            "Convert the released ML-Mamba weights into a transformers model folder (config, sharded safetensors, "
            "processor and tokenizer, remote code, model card). Every tensor is checked: all model parameters "
            "must be filled exactly once from the sources, with finite values, and every source tensor must be "
            "used or on the documented drop list; otherwise the command exits with status 1, lists every problem "
            "and writes nothing.",
            width=100,
        ),
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="the released training checkpoint `latest-checkpoint.pt` (read with weights_only=True)")
    parser.add_argument("--run-config", required=True, type=Path,
                        help="the run's `config.json` next to the checkpoint (its 'model' entry names the backbones)")
    parser.add_argument("--dino", required=True,
                        help="timm DINOv2-with-registers weights: a local model.safetensors / pytorch_model.bin, a "
                             "folder holding one, or a Hub id such as timm/vit_large_patch14_reg4_dinov2.lvd142m")
    parser.add_argument("--siglip", required=True,
                        help="timm SigLIP weights: a local model.safetensors / pytorch_model.bin, a folder holding "
                             "one, or a Hub id such as timm/vit_so400m_patch14_siglip_384.webli")
    parser.add_argument("--tokenizer", required=True,
                        help="the LM tokenizer, a local folder or a Hub id (the released model: "
                             "xiuyul/mamba-2.8b-zephyr)")
    parser.add_argument("--output", required=True, type=Path,
                        help="folder to create; it must not exist or be empty, and appears only once complete")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of the saved weights; float32 (the default) keeps the released values exactly")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 500MB (default: %(default)s)")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="after writing, upload the folder to this Hub model repo (created if missing)")
    parser.add_argument("--dino-config", help=OVERRIDE_HELP.format(what="DINOv2 config (Dinov2WithRegistersConfig)"))
    parser.add_argument("--siglip-config", help=OVERRIDE_HELP.format(what="SigLIP config (SiglipVisionConfig)"))
    parser.add_argument("--text-config", help=OVERRIDE_HELP.format(what="Mamba-2 LM config (Mamba2Config)"))
    parser.add_argument("--connector-config",
                        help=OVERRIDE_HELP.format(what="top-level MLMambaConfig fields (connector_*, projector_type, "
                                                       "image_token_id: by default the tokenizer's <image> id, or "
                                                       "the first free id, where <image> is added)"))
    return parser


class Stopped(BaseException):
    """A stop signal arrived (raised from its handler, so that the conversion unwinds and cleans up)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum, frame):
    raise Stopped(signum)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    previous_handlers = {stop_signal: signal.signal(stop_signal, raise_stopped) for stop_signal in STOP_SIGNALS}
    try:
        output = convert(
            checkpoint=args.checkpoint,
            run_config=args.run_config,
            dino=args.dino,
            siglip=args.siglip,
            tokenizer=args.tokenizer,
            output=args.output,
            dtype=args.dtype,
            dino_config=parse_overrides(args.dino_config, "--dino-config"),
            siglip_config=parse_overrides(args.siglip_config, "--siglip-config"),
            text_config=parse_overrides(args.text_config, "--text-config"),
            connector_config=parse_overrides(args.connector_config, "--connector-config"),
            max_shard_size=args.max_shard_size,
            push_to_hub=args.push_to_hub,
        )
    except ConversionError as error:
        print(f"error: {error}\nNothing was written.", file=sys.stderr)
        return 1
    except UploadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (KeyboardInterrupt, Stopped) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        name = signal.Signals(signum).name
        # The output was absent or empty at the start and is filled by one final rename: if it holds files now,
        # the interruption came during the upload.
        if args.push_to_hub and args.output.is_dir() and any(args.output.iterdir()):
            print(f"error: interrupted ({name}) while uploading; {args.output} was written completely but not "
                  f"uploaded: upload it with `hf upload {args.push_to_hub} {args.output}`", file=sys.stderr)
            return 3
        print(f"error: interrupted ({name}). Nothing was written.", file=sys.stderr)
        return 128 + signum
    finally:
        for stop_signal, handler in previous_handlers.items():
            signal.signal(stop_signal, handler)
    print(f"Wrote {output}" + (f" and uploaded it to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
