"""ZeRO state written by one worker count, loaded by another: DeepSpeed's universal checkpoint.

ZeRO-1/2/3 save each rank's slice of the optimizer state (and, at stage 3, of the parameters); a group
of another size cannot load those slices directly (DeepSpeed raises ZeRORuntimeException). DeepSpeed's
``ds_to_universal`` merges the slices into one file per parameter, which an engine of any data-parallel
size then loads with ``checkpoint.load_universal``. Stage 0 saves whole state on rank 0 and needs no
conversion.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from argparse import Namespace
from pathlib import Path


def needs_universal(zero_stage: int, saved_world: int, world: int) -> bool:
    """Whether a checkpoint of ``saved_world`` ranks must be converted before ``world`` ranks load it."""
    return zero_stage > 0 and saved_world != world


def to_universal(checkpoint_dir: Path, tag: str, output_dir: Path) -> Path:
    """Convert ``checkpoint_dir/tag`` (every rank's ZeRO files) into a universal checkpoint under
    ``output_dir/tag``; returns ``output_dir``, which ``engine.load_checkpoint(output_dir, tag=tag)`` reads
    with ``checkpoint.load_universal`` set."""
    from deepspeed.checkpoint.ds_to_universal import main

    source = Path(checkpoint_dir) / tag
    if not source.is_dir():
        raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {checkpoint_dir}")
    target = Path(output_dir) / tag
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    args = Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,  # one process: the slices of a model trained here fit one worker's memory
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # Loom's modules declare no tensor-parallel patterns, which the converter otherwise insists on.
        inject_missing_state=True,
    )
    # The converter prints a line per phase and per parameter; the stage's log keeps one line instead.
    with contextlib.redirect_stdout(io.StringIO()):
        main(args)
    return Path(output_dir)
