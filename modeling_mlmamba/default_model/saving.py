"""All-or-nothing saving: a model is written aside, then moved into its folder.

transformers writes a model folder file by file over whatever the folder held. A save that dies half-way over an
earlier sharded save leaves shards of both, which load together without an error; and a sharded save over a
single-file save leaves the old `model.safetensors`, which the loader prefers to the new index. Here every file
is first written into a hidden folder inside the target (inside, not beside it: the same file system even when the
target is a mount point, and no write permission needed on its parent), then moved in, the files the loader opens
first last. Files that the save does not write (processor, tokenizer, README, subfolders) stay as they are.
"""

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

STAGING_PREFIX = ".saving-"
# Weight files of one family: `model.safetensors`, `model-00001-of-00003.safetensors`, `model.fp16.safetensors`,
# `pytorch_model.bin` (family and format from the name), and their indexes `model.safetensors.index.json`,
# `model.safetensors.index.fp16.json`.
WEIGHTS = re.compile(r"(?P<family>.+?)(?P<shard>-\d{5}-of-\d{5})?\.(?P<format>safetensors|bin)")
INDEX = re.compile(r"(?P<stem>.+?)\.(?P<format>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json")


def weights_role(name: str) -> tuple[tuple[str, str], bool] | None:
    """((family, format), whether the loader opens this file first) for a weight file name, None for other files.

    The loader opens a single-file checkpoint or an index; shards only through the index.
    """
    if match := INDEX.fullmatch(name):
        family = match["stem"] + (f".{match['variant']}" if match["variant"] else "")
        return (family, match["format"]), True
    if match := WEIGHTS.fullmatch(name):
        return (match["family"], match["format"]), match["shard"] is None
    return None


def check_save_directory(save_directory) -> Path:
    """The folder to save into; a path that is a file is an error (transformers only logs it and returns)."""
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(
            f"save_directory {os.fspath(save_directory)!r} is a file, not a folder; pass the path of a folder "
            "(created if missing) or move the file away"
        )
    return target


def move_into_place(staging: Path, target: Path) -> None:
    """Move every file of `staging` into `target`, replacing the weights of the same family and format.

    The old weights stop being loadable first (their entry points are deleted before their shards), and the new
    entry points arrive last: an interruption in between leaves a folder that refuses to load, never one that
    mixes two saves.
    """
    written = {path.name: weights_role(path.name) for path in staging.iterdir()}
    families = {role[0] for role in written.values() if role}
    old_weights = [
        path for path in target.iterdir()
        if path.is_file() and (role := weights_role(path.name)) and role[0] in families
    ]
    for path in sorted(old_weights, key=lambda path: not weights_role(path.name)[1]):
        path.unlink()
    for name in sorted(written, key=lambda name: bool(written[name] and written[name][1])):
        os.replace(staging / name, target / name)


def save_aside(save_directory, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` on a fresh hidden folder inside `save_directory`, then move what it wrote into place.

    If `write` fails or the process is interrupted (an exception, Ctrl-C), `save_directory` keeps its previous
    contents and no hidden folder is left (a folder created for this save is removed again).
    """
    target = check_save_directory(save_directory)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write(staging)
        move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(target.iterdir()):
            target.rmdir()
        raise
    staging.rmdir()
