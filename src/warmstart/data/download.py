"""Downloading dataset archives: resumable (HTTP Range), verified, and extracted safely."""

from __future__ import annotations

import json
import os
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from ..errors import UserError
from . import stanford_dogs as dogs

CHUNK = 1 << 20
USER_AGENT = "warmstart (https://pypi.org/project/warmstart)"


class DownloadError(UserError):
    """A download or an archive that failed; the message says what to do."""


def fetch(url: str, dest: Path, attempts: int = 5, timeout: float = 30.0, quiet: bool = False) -> Path:
    """Download `url` to `dest`, resuming from `dest.part` with an HTTP Range request after an
    interruption (in this call or an earlier one)."""
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status == 206:
                    start = int(response.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
                    if start != have:
                        raise DownloadError(f"{url}: server resumed at byte {start}, not {have}")
                else:
                    have = 0  # the server sent the whole file: start over
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with part.open("ab" if have else "wb") as out, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=quiet,
                        leave=False) as bar:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size != total:
                raise ConnectionError(f"connection closed at {size} of {total} bytes")
            part.replace(dest)
            return dest
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: the part is complete, or stale
                part.replace(dest)
                return dest
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}: check the address or try later") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            if attempt == attempts:
                raise DownloadError(
                    f"could not download {url} ({getattr(exc, 'reason', exc)}): check the network and re-run; "
                    f"the {part.stat().st_size if part.exists() else 0} bytes received are kept and the "
                    f"download resumes") from None
            time.sleep(min(2 ** attempt, 10) * 0.1)
    raise AssertionError("unreachable")


def _is_safe(member: tarfile.TarInfo, root: Path) -> bool:
    """No absolute paths, no `..`, no device files, no links that leave `root`."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        return False
    if member.isdev() or member.isfifo():
        return False
    if member.issym() or member.islnk():
        base = (root / member.name).parent if member.issym() else root
        target = (base / member.linkname).resolve()
        return target.is_relative_to(root.resolve())
    return True


def verify_archive(path: Path) -> list[tarfile.TarInfo]:
    """Every member header readable and every member's data present: a complete tar."""
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DownloadError(f"{path.name} is not a complete tar archive ({exc}): it was removed; re-run to "
                            f"download it again") from None
    if not members or any(m.offset_data + m.size > size for m in members):
        raise DownloadError(f"{path.name} is truncated: it was removed; re-run to download it again")
    return members


def extract_safely(path: Path, members: list[tarfile.TarInfo], root: Path) -> None:
    unsafe = [m.name for m in members if not _is_safe(m, root)]
    if unsafe:
        raise DownloadError(f"{path.name} holds unsafe paths (e.g. {unsafe[0]}): refusing to extract it")
    with tarfile.open(path, "r:") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members=members, filter="data")
        else:  # Python without extraction filters: the members were checked above
            tar.extractall(root, members=members)


def _expected_members(archive: str, root: Path, official: bool) -> tuple[str, int] | None:
    """What each archive must hold: as many images / annotations as the official lists name."""
    if archive == "lists.tar":
        return None
    files, annotations, _ = dogs.read_list(dogs.find_list(root, "file_list.mat"))
    count = len(files) if archive == "images.tar" else len(annotations)
    if official and count != dogs.OFFICIAL_COUNTS["train"] + dogs.OFFICIAL_COUNTS["test"]:
        raise DownloadError(f"file_list.mat names {count} images, not 20,580: lists.tar is not the official one")
    return ("Images/" if archive == "images.tar" else "Annotation/"), count


def download_stanford_dogs(directory: str | Path | None = None, base_url: str = dogs.BASE_URL,
                           quiet: bool = False, keep_archives: bool = True) -> Path:
    """Fetch, verify and extract images.tar, annotation.tar and lists.tar into `directory`.
    A second run with everything present and valid does nothing (and needs no network)."""
    root = Path(directory) if directory else dogs.default_dir()
    root.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    official = base_url == dogs.BASE_URL
    for archive in dogs.ARCHIVES:  # lists first: they say what the other two must hold
        marker = root / f".{archive}.verified"
        tar_path = root / archive
        if marker.is_file():
            recorded = json.loads(marker.read_text())
            if tar_path.is_file() and tar_path.stat().st_size == recorded["bytes"] or \
                    not tar_path.exists() and recorded.get("archive_removed"):
                continue
        if not tar_path.is_file():
            if not quiet:
                tqdm.write(f"downloading {base_url}{archive}")
            fetch(base_url + archive, tar_path, quiet=quiet)
        try:
            members = verify_archive(tar_path)
            expected = _expected_members(archive, root, official)
            if expected:
                prefix, count = expected
                found = sum(1 for m in members if m.isfile() and m.name.startswith(prefix))
                if found != count:
                    raise DownloadError(f"{archive} holds {found} files under {prefix}, the lists name {count}: "
                                        f"it was removed; re-run to download it again")
            extract_safely(tar_path, members, root)
        except DownloadError:
            tar_path.unlink(missing_ok=True)
            raise
        record = {"bytes": tar_path.stat().st_size, "members": len(members), "archive_removed": not keep_archives}
        if not keep_archives:
            tar_path.unlink()
        marker.write_text(json.dumps(record))
    if not quiet:
        tqdm.write(f"Stanford Dogs is ready in {root}")
    return root


def ensure_stanford_dogs(quiet: bool = False) -> Path:
    """`--data stanford-dogs`: the default copy, downloaded on first use."""
    root = dogs.default_dir()
    if all((root / f".{a}.verified").is_file() for a in dogs.ARCHIVES) and dogs.is_stanford_dogs(root):
        return root
    return download_stanford_dogs(root, os.environ.get("WARMSTART_STANFORD_DOGS_URL", dogs.BASE_URL), quiet)
