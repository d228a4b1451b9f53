"""The sweep folder `<storage>/<sweep name>/`, on a local (or NFS) path or a URI, and the
mirroring of node-local trial folders to URI storage. The names of the files and folders in
it live in `memray.results` (readers such as `memray report` need them without this package).

With a URI storage (`s3://`, `gs://`, `file://`) the trial folders are written on the node
that runs the trial and mirrored to the URI after every epoch (without checkpoints, which
travel as Ray Tune checkpoints); W&B and the cache stay on the nodes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memray.config import Cell, ConfigError, SweepConfig
from memray.files import is_sweep, load_sweep, load_yaml
from memray.results import CHECKPOINTS_DIR, RESULT_FILE, STATE_FILE, SWEEP_FILE, TRIALS_DIR

DEFAULT_STORAGE = "results"  # relative to where `memray run` starts


def _is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class SweepFolder:
    """A sweep folder: an absolute local (or NFS) path, or a pyarrow URI."""

    location: str

    @classmethod
    def for_sweep(cls, storage: str | Path | None, name: str) -> "SweepFolder":
        """`<storage>/<name>`; a relative path is made absolute (Ray workers have other cwds)."""
        storage = str(storage or DEFAULT_STORAGE)
        if _is_uri(storage):
            return cls(storage.rstrip("/") + "/" + name)
        return cls(str(Path(storage).expanduser().resolve() / name))

    @classmethod
    def open(cls, location: str | Path) -> "SweepFolder":
        location = str(location)
        folder = cls(location.rstrip("/") if _is_uri(location) else str(Path(location).expanduser().resolve()))
        if not folder.exists(SWEEP_FILE):
            _not_a_sweep_folder(location)
            raise ConfigError(location, "", f"not a sweep folder: it has no {SWEEP_FILE}")
        return folder

    @property
    def is_uri(self) -> bool:
        return _is_uri(self.location)

    def _fs(self) -> tuple[Any, str]:
        import pyarrow.fs

        if self.is_uri:
            return pyarrow.fs.FileSystem.from_uri(self.location)
        return pyarrow.fs.LocalFileSystem(), self.location

    def path(self, *parts: str) -> str:
        """A location inside the folder (a path or URI, as the folder is)."""
        return "/".join([self.location, *parts])

    def fs_path(self, *parts: str) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it) of a location inside the folder."""
        fs, root = self._fs()
        return fs, "/".join([root, *parts])

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs

        fs, path = self.fs_path(*parts)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def read_text(self, *parts: str) -> str | None:
        if not self.exists(*parts):
            return None
        fs, path = self.fs_path(*parts)
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, text: str, *parts: str) -> None:
        fs, path = self.fs_path(*parts)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())

    def __str__(self) -> str:
        return self.location


class TrialMirror:
    """Copies a node-local trial folder to the sweep's URI storage, and back on a new node."""

    def __init__(self, folder: SweepFolder, name: str, local: Path):
        self.fs, self.remote = folder.fs_path(TRIALS_DIR, name)
        self.local = local

    def upload(self) -> None:
        import pyarrow.fs

        local_fs = pyarrow.fs.LocalFileSystem()
        for entry in self.local.iterdir():
            if entry.name != CHECKPOINTS_DIR:  # checkpoints travel as Tune checkpoints
                if entry.is_dir():
                    self.fs.create_dir(f"{self.remote}/{entry.name}", recursive=True)
                pyarrow.fs.copy_files(str(entry), f"{self.remote}/{entry.name}",
                                      source_filesystem=local_fs, destination_filesystem=self.fs)

    def download(self, checkpoint: Any) -> None:
        """Fetch the mirrored folder and the last Tune checkpoint, unless already here."""
        import pyarrow.fs

        if (self.local / RESULT_FILE).is_file():
            return
        self.local.mkdir(parents=True, exist_ok=True)
        if self.fs.get_file_info(f"{self.remote}/{RESULT_FILE}").type != pyarrow.fs.FileType.NotFound:
            pyarrow.fs.copy_files(self.remote, str(self.local), source_filesystem=self.fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
        if checkpoint is not None:
            name = checkpoint.get_metadata().get("name", "checkpoint-restored")
            checkpoint.to_directory(str(self.local / CHECKPOINTS_DIR / name))


def open_sweep(sweep_dir: str | Path) -> tuple[SweepFolder, SweepConfig, list[Cell], dict[str, Any], str]:
    """(folder, sweep config, its cells, sweep.json state, where sweep.yaml is) of a sweep
    folder made by `memray run`; ConfigError if it is not one. The cells are every trial:
    the grid's, then its reference models (`memray.references.sweep_cells`)."""
    from memray.references import sweep_cells

    folder = SweepFolder.open(sweep_dir)
    source = folder.path(SWEEP_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / SWEEP_FILE
        local.write_text(folder.read_text(SWEEP_FILE) or "")
        try:
            sweep, cells = load_sweep(local)
            cells = sweep_cells(cells)
        except ConfigError as err:
            raise ConfigError(source, err.field, err.message) from None
    state = json.loads(folder.read_text(STATE_FILE) or "{}")
    if "uid" not in state:
        raise ConfigError(folder.path(STATE_FILE), "uid", "missing: this sweep folder was not made by `memray run`")
    return folder, sweep, cells, state, source


def _not_a_sweep_folder(path: str | Path) -> None:
    """A sweep *file* given where a sweep folder is expected: a ConfigError naming the folder
    that `memray run` made of it."""
    candidate = Path(path)
    if not candidate.is_file() or candidate.suffix not in (".yaml", ".yml"):
        return
    try:
        tree = load_yaml(candidate)
    except ConfigError:
        return
    name = tree.get("name", candidate.stem) if is_sweep(tree) else None
    if name:
        raise ConfigError(str(path), "", f"a sweep file, not a sweep folder: `memray run {path}` keeps its results "
                                         f"in <storage>/{name}/ (default ./results/{name}); "
                                         f"`memray status results/{name}`")
