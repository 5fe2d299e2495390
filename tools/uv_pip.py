"""`uv pip …` with this machine's pip configuration: what `make install` runs instead of `pip install`.

uv installs a fresh venv in about a third of pip's time (downloads, unpacking and byte-compiling run in
parallel), but it reads no pip.conf and no PIP_* variable. Machines that keep local wheels, mirrors, a
constraints file or a private CA in pip's configuration would silently resolve differently, so this hands
pip's effective settings (`pip config list`, files and environment) to uv as flags, and keeps pip's rule
of taking the best version across every index. Usage: python tools/uv_pip.py install [uv pip args...]
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

# pip setting -> uv flag; a setting may hold several space-separated values
FLAGS = {"find-links": "--find-links", "extra-index-url": "--extra-index-url", "index-url": "--index-url",
         "constraint": "--constraint"}


def pip_settings(python: str) -> dict[str, str]:
    """pip's effective settings, later sources winning (files by precedence, then PIP_* variables)."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    settings: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return settings


def uv_command(python: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    settings, env = pip_settings(python), dict(os.environ)
    flags = ["--python", python, "--index-strategy", "unsafe-best-match", "--compile-bytecode"]
    for key, flag in FLAGS.items():
        for value in shlex.split(settings.get(key, "")):
            flags += [flag, value]
    if settings.get("cert"):
        env.setdefault("SSL_CERT_FILE", settings["cert"])
    if settings.get("default-timeout"):
        env.setdefault("UV_HTTP_TIMEOUT", settings["default-timeout"])
    uv = str(Path(python).parent / "uv")
    return [uv, "pip", args[0], *flags, *args[1:]], env


def main() -> int:
    if not sys.argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, env = uv_command(sys.executable, sys.argv[1:])
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
