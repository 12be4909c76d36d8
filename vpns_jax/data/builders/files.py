"""A read-only view of a directory tree or a zip archive, addressed by '/'-separated paths."""

from __future__ import annotations

import os
import zipfile


class FileTree:
    """Files under ``root`` (a directory) or under ``prefix`` inside a zip archive.

    ``paths()`` lists every file as a '/'-separated path relative to the root; ``read(path)``
    returns bytes.
    """

    def __init__(self, root: str, *, zip_path: str | None = None, prefix: str = ""):
        self.root, self.zip_path, self.prefix = root, zip_path, prefix
        self._zip: zipfile.ZipFile | None = None

    @classmethod
    def of_zip(cls, zip_path: str, prefix: str) -> FileTree:
        """Files under ``prefix`` ('tiny-imagenet-200/') inside ``zip_path``."""
        return cls(zip_path, zip_path=zip_path, prefix=prefix)

    def describe(self) -> str:
        """Human-readable location, for error messages."""
        return f"{self.zip_path}:{self.prefix}" if self.zip_path else self.root

    def paths(self) -> list[str]:
        """Sorted relative paths of every file."""
        if self.zip_path:
            n = len(self.prefix)
            names = self._archive().namelist()
            return sorted(p[n:] for p in names if p.startswith(self.prefix) and not p.endswith("/"))
        out = []
        for folder, _, files in os.walk(self.root):
            rel = os.path.relpath(folder, self.root)
            for f in files:
                out.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
        return sorted(out)

    def read(self, path: str) -> bytes:
        """Bytes of the file at relative ``path``."""
        if self.zip_path:
            return self._archive().read(self.prefix + path)
        with open(os.path.join(self.root, *path.split("/")), "rb") as f:
            return f.read()

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.zip_path)
        return self._zip
