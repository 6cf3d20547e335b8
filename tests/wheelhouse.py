"""Wheels of what ``pip install .`` of imsa needs, packed from the packages installed in this interpreter.

The install tests follow the README's ``pip install .`` into a fresh virtual environment with pip pointed at these
wheels only (no index), so they need no network and install exactly the versions the suite runs with. An installed
package is an unpacked wheel: its files (RECORD) and its .dist-info; the wheel is rebuilt from them, with a new
RECORD, leaving out what the installer made (bytecode, console scripts, INSTALLER, direct_url.json).
"""

import base64
import hashlib
import os
import re
import zipfile
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What pyproject.toml's [build-system] needs, besides imsa's own requirements.
BUILD_REQUIREMENTS = ("setuptools", "wheel")
# .dist-info files the installer wrote; a wheel does not carry them.
INSTALLER_FILES = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}


def requirement_closure(names):
    """The installed distributions *names* need, themselves included (extras and other platforms' markers off)."""
    found, pending = {}, list(names)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(found.values())


def _record_hash(data):
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def pack(dist, directory):
    """Write *dist* (installed) as a wheel into *directory*; returns the wheel's path."""
    files = [entry for entry in dist.files or () if not entry.as_posix().startswith("../")
             and "__pycache__" not in entry.parts and entry.suffix != ".pyc"]
    info_dir = next(entry.parts[0] for entry in files if entry.parts[0].endswith(".dist-info"))
    tags = [line.split(":", 1)[1].strip().split("-") for line in dist.read_text("WHEEL").splitlines()
            if line.startswith("Tag:")]
    # The file name carries every tag, compressed: py2-none-any and py3-none-any make py2.py3-none-any.
    tag = "-".join(".".join(dict.fromkeys(part[index] for part in tags)) for index in range(3))
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = os.path.join(directory, f"{name}-{dist.version}-{tag}.whl")
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for entry in files:
            arcname = entry.as_posix()
            if arcname.startswith(info_dir + "/") and entry.name in INSTALLER_FILES:
                continue
            source = str(entry.locate())
            with open(source, "rb") as handle:
                data = handle.read()
            wheel.writestr(zipfile.ZipInfo.from_file(source, arcname), data)
            record.append(f"{arcname},{_record_hash(data)},{len(data)}")
        record.append(f"{info_dir}/RECORD,,")
        wheel.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    return path


def build(directory, project="imsa"):
    """Wheels of everything ``pip install .`` of *project* needs (not *project* itself) into *directory*."""
    os.makedirs(directory, exist_ok=True)
    needed = [dist for dist in requirement_closure([project]) if canonicalize_name(dist.metadata["Name"]) != project]
    needed += requirement_closure(BUILD_REQUIREMENTS)
    return [pack(dist, directory) for dist in needed]
