"""The one rule for the files the inference and export tools write: everything that could stop
the write is checked before the work (a model built, generations made, arrays read), and a file
appears only once it is complete, so an interrupted or failed tool never leaves a partial file or
destroys one it did not own.

    check_output(path, force=..., inputs={"prompts_file": ...})   before the work; ConfigError
    with atomic_write(path) as temporary: ...                     write ``temporary``; renamed when done
"""

import contextlib
import os

from thann.config import ConfigError, nearest_existing


def _same_or_inside(output: str, source: str) -> bool:
    if os.path.isdir(source):
        return os.path.commonpath([output, os.path.realpath(source)]) == os.path.realpath(source)
    return os.path.exists(output) and os.path.exists(source) and os.path.samefile(output, source)  # or a hard link


def check_output(path: str, *, force: bool, inputs: dict[str, str | None] | None = None, field: str = "output",
                 force_flag: str = "force=true") -> None:
    """Refuses (ConfigError naming ``field``) an output that would destroy something: an existing
    file unless ``force``; always a directory, any of ``inputs`` (name -> path; a directory input
    covers everything inside it) and a place that cannot be written. ``force_flag`` is how the
    tool's user asks to overwrite."""
    if not isinstance(force, bool):
        raise ConfigError("force", force, "must be true or false")
    output = os.path.realpath(path)
    if os.path.isdir(output) or path.endswith(os.sep):
        raise ConfigError(field, path, "is a directory; name a file")
    for name, source in (inputs or {}).items():
        if source is not None and _same_or_inside(output, str(source)):
            where = "is inside" if os.path.isdir(source) else "is"
            raise ConfigError(field, path, f"{where} {name} ({source}), which it reads; write it elsewhere")
    if os.path.exists(output) and not force:
        raise ConfigError(field, path, f"exists; pass {force_flag} to overwrite it")
    existing = nearest_existing(os.path.dirname(output))
    if not os.path.isdir(existing):
        raise ConfigError(field, path, f"cannot be written: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(field, path, f"cannot be written: {existing} is read-only")


@contextlib.contextmanager
def atomic_write(path: str):
    """Yields a temporary name beside ``path`` (its missing directories created) to write; it
    becomes ``path`` when the block completes and is removed if the block fails or is interrupted."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"  # the process id: two runs writing one output never share it
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
