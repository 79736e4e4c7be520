"""What prepare may touch in its output folder: it replaces or removes only folders it made
(recognised by their content, shards.is_prepared_folder, and by its own temp naming), and it never
reads its own output back as a source's data."""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.store.shards import is_prepared_folder

BUILTIN_FOLDER = "_builtin"
"""Where builtin: sources are written out under the output folder."""


def temp_folder_name(name: str) -> str:
    """`.tmp-<name>-<host>-<pid>-<random>`: the build folder of one source in this process; the
    host and pid let a later run tell a dead run's leftovers from a live run's work."""
    return f".tmp-{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_pattern(name: str) -> re.Pattern:
    """`.tmp-<name>-<host>-<pid>-<random>`: the name of a build folder of this tool on this host."""
    return re.compile(re.escape(f".tmp-{name}-{socket.gethostname()}-") + r"(\d+)-\w+")


def clean_stale_temps(out_dir: Path, name: str) -> None:
    """Remove temp folders of this source left by dead processes on this host (a killed run): only
    folders named as this tool names them whose content is only files it writes."""
    pattern = temp_pattern(name)
    for tmp in out_dir.iterdir():
        match = pattern.fullmatch(tmp.name)
        if not match or not is_prepared_folder(tmp):
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (OverflowError, PermissionError):  # a pid no process can have / alive under another user
            continue


def without_own_output(files: list[str], out_dir: Path, path: str) -> list[str]:
    """A source folder that contains the output folder (`--source a=data --out data/prepared`)
    must not read prepare's own files back as data: manifests are .json files too."""
    out = out_dir.resolve()
    kept = []
    for name in files:
        parts = () if "://" in name else _parts_under(Path(name).resolve(), out)
        if len(parts) > 1 and (parts[0].startswith((".tmp-", ".old-")) or parts[0] == BUILTIN_FOLDER or
                               is_prepared_folder(out / parts[0])):
            continue
        kept.append(name)
    if not kept:
        raise DataError("no data files found besides prepare's own output", file=path, reason="missing_input")
    return kept


def _parts_under(path: Path, root: Path) -> tuple[str, ...]:
    try:
        return path.relative_to(root).parts
    except ValueError:
        return ()


def check_replaceable(final: Path) -> None:
    """prepare replaces a source folder only if it made it: an unrelated folder (or file, or link)
    that happens to carry the source's name is an error, and stays as it is."""
    if (final.exists() or final.is_symlink()) and not is_prepared_folder(final):
        raise DataError(f"{final} exists and is not a prepared source folder (it holds other files, or is a file "
                        "or a link); prepare will not replace it: move it away, or choose another source name or "
                        "output folder", file=str(final), reason="output_exists")
