"""Where files live: a local path, or an object in a bucket (``s3://``, ``gs://``, ``az://``).

Guarantees:

* **Credentials are the cloud's own.** Stores are built with obstore's ``from_url``, which
  reads each cloud's standard environment (for S3: ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, a web
  identity token, an instance or container role). obstore does not read ``~/.aws`` profiles,
  so when ``AWS_PROFILE`` names one (or a shared credentials file exists and no keys are in
  the environment) boto3's session supplies the credentials, refreshed as they expire. No
  option of ours carries a credential.
* **A table appears whole or not at all.** A results table or summary bound for a bucket
  is written to a local temporary file, then uploaded as one object (a single PUT, or a
  multipart upload completed at the end): a reader never sees half of it. Locally, the
  temporary file is fsynced and renamed into place as before.
* **A video streams into its object** as its bytes arrive (multipart), never staged whole
  on local disk; a failed download aborts the upload, so no partial object appears.
* **Checked before spending.** :func:`probe` creates and removes a small temporary file
  (or object) where an output will go, so a location that cannot take one (a path under
  a regular file, a read-only directory, a bucket without credentials) stops the run
  before its first request is paid for.
* **Reads are bounded**: an input object larger than :data:`MAX_INPUT_BYTES` is refused.

Why obstore: it is the object_store library polars itself reads buckets with, so inputs,
outputs and videos go through one implementation of each cloud's protocol and credential
chain; it streams multipart uploads from an async iterator, which the downloads need.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from batch.errors import ConfigError, InputError

SCHEMES = ("s3", "gs", "az")
MAX_INPUT_BYTES = 2 << 30


def is_remote(location: str | Path) -> bool:
    # Not urlsplit: it raises on a malformed netloc ("s3://[x"), and this only asks which scheme.
    return isinstance(location, str) and location.partition("://")[0].lower() in SCHEMES and "://" in location


def fsync_path(path: Path | str) -> None:
    """fsync a file or a directory by name (a directory: so a rename or link in it lasts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ObjectUrl:
    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> ObjectUrl:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.netloc:
            raise ConfigError(f"{url}: expected s3://bucket/key, gs://bucket/key or az://container/key")
        return cls(parts.scheme, parts.netloc, parts.path.lstrip("/"))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    def child(self, name: str) -> ObjectUrl:
        prefix = self.key if not self.key or self.key.endswith("/") else self.key + "/"
        return ObjectUrl(self.scheme, self.bucket, prefix + name)


@cache
def _store(scheme: str, bucket: str) -> Any:
    """One store per bucket and process: its client keeps connections and credentials."""
    from obstore.store import from_url  # a real import cost (~60 ms) only runs with buckets use it

    provider = _aws_profile() if scheme == "s3" else None
    if provider is not None:
        return from_url(f"{scheme}://{bucket}", credential_provider=provider)
    return from_url(f"{scheme}://{bucket}")


def _aws_profile() -> Any:
    """A boto3 credential provider for an AWS profile, when one is meant (see the module's
    guarantees); ``None`` when the environment holds keys or no profile exists."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID"):
        return None
    shared = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE")
    if not profile and not shared.exists():
        return None
    try:
        import boto3
        import botocore.exceptions
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise ConfigError("an AWS profile is configured, and reading it needs boto3 (pip install boto3); or set "
                          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
    try:
        return Boto3CredentialProvider(boto3.Session(profile_name=profile))
    except botocore.exceptions.BotoCoreError as exc:
        raise ConfigError(f"AWS profile {profile or 'default'}: {exc}") from None


def store_of(url: ObjectUrl) -> Any:
    return _store(url.scheme, url.bucket)


def _fail(url: object, exc: Exception) -> InputError:
    return InputError(f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


# -- inputs ----------------------------------------------------------------------------------

def list_objects(spec: str, suffixes: tuple[str, ...], passed: list[str] | None = None) -> list[str]:
    """The objects a spec names: one object, every object under a prefix (``.../``), or a
    glob (``*``, ``?``, ``[...]`` in the key), sorted, with one of ``suffixes``; the other
    objects the prefix or glob matches go to ``passed`` (to be named, not read)."""
    import obstore

    url = ObjectUrl.parse(spec)
    glob = any(ch in url.key for ch in "*?[")
    if not glob and url.key and not url.key.endswith("/"):
        return [spec]
    prefix = url.key if not glob else url.key[: min(url.key.find(ch) for ch in "*?[" if ch in url.key)]
    prefix = prefix.rpartition("/")[0] + "/" if "/" in prefix else ""
    found = []
    try:
        for batch in obstore.list(store_of(url), prefix or None):
            for meta in batch:
                key = meta["path"]
                name = PurePosixPath(key).name
                if glob and not fnmatch.fnmatchcase(key, url.key):
                    continue
                if name.startswith(("~$", ".")) or not key.lower().endswith(suffixes):
                    if passed is not None and not key.endswith("/"):
                        passed.append(str(ObjectUrl(url.scheme, url.bucket, key)))
                    continue
                found.append(str(ObjectUrl(url.scheme, url.bucket, key)))
    except Exception as exc:  # obstore raises its own error types per cloud
        raise _fail(spec, exc) from None
    if passed is not None:
        passed.sort()
    return sorted(found)


@contextlib.contextmanager
def local_copy(url: str, suffix: str) -> Iterator[Path]:
    """An input object in a temporary local file while it is read (removed after)."""
    import obstore

    loc = ObjectUrl.parse(url)
    fd, name = tempfile.mkstemp(suffix=suffix, prefix=".seedance-input-")
    path = Path(name)
    try:
        with open(fd, "wb") as out:
            try:
                result = obstore.get(store_of(loc), loc.key)
                size = result.meta["size"]
                if size > MAX_INPUT_BYTES:
                    raise InputError(f"{url}: {size >> 20} MiB, more than the {MAX_INPUT_BYTES >> 20} MiB read at once")
                for chunk in result:
                    out.write(chunk)
            except FileNotFoundError:
                raise InputError(f"{url}: no such object") from None
            except InputError:
                raise
            except Exception as exc:
                raise _fail(url, exc) from None
        yield path
    finally:
        path.unlink(missing_ok=True)


def read_bytes(url: str, limit: int = MAX_INPUT_BYTES) -> bytes | None:
    """An object's bytes, or ``None`` when there is no such object."""
    import obstore

    loc = ObjectUrl.parse(url)
    try:
        result = obstore.get(store_of(loc), loc.key)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _fail(url, exc) from None
    if result.meta["size"] > limit:
        raise InputError(f"{url}: larger than {limit >> 20} MiB")
    return bytes(result.bytes())


def object_size(url: str) -> int | None:
    import obstore

    loc = ObjectUrl.parse(url)
    try:
        return int(obstore.head(store_of(loc), loc.key)["size"])
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _fail(url, exc) from None


async def object_size_async(url: str) -> int | None:
    import obstore

    loc = ObjectUrl.parse(url)
    try:
        return int((await obstore.head_async(store_of(loc), loc.key))["size"])
    except FileNotFoundError:
        return None


# -- outputs ---------------------------------------------------------------------------------

def upload_file(local: Path, url: str) -> None:
    """Publish a finished local file as one object (multipart above 5 MiB, completed last)."""
    import obstore

    loc = ObjectUrl.parse(url)
    try:
        obstore.put(store_of(loc), loc.key, local)
    except Exception as exc:
        raise OSError(f"cannot upload {url} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


async def stream_upload(url: str, chunks: AsyncIterator[bytes]) -> None:
    """Stream ``chunks`` into one object; if they raise, the upload is aborted and no
    object appears (the error propagates)."""
    import obstore

    loc = ObjectUrl.parse(url)
    await obstore.put_async(store_of(loc), loc.key, chunks, chunk_size=8 << 20)


def probe(location: str | Path, what: str, directory: bool = False) -> None:
    """Prove that ``location`` (a file to write, or with ``directory`` a directory or
    bucket prefix to write into) can take a file: create one beside it (inside it) and
    remove it again. Local directories are created as a later write would create them.
    A failure is a :class:`ConfigError` naming ``what`` and the location (exit 2)."""
    text = str(location)
    token = f".seedance-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if is_remote(text):
        import obstore

        loc = ObjectUrl.parse(text).child(token) if directory else ObjectUrl.parse(Target(text).sibling(token).text)
        try:
            store = store_of(loc)
            obstore.put(store, loc.key, b"")
            obstore.delete(store, loc.key)
        except Exception as exc:  # obstore raises its own error types per cloud
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise ConfigError(f"{what} {text}: cannot write there ({type(exc).__name__}: {detail}); "
                              f"nothing sent") from None
        return
    path = Path(text)
    folder = path if directory else (path.parent if str(path.parent) else Path("."))
    try:
        if not directory and path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / token, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(folder / token)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):  # mkdir's words for "a file is in the way"
            blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
            reason = f"{blocker} is a file, not a directory" if blocker is not None else reason
        raise ConfigError(f"{what} {text}: cannot write there ({reason}); nothing sent") from None


def exclusive_temp(final: Path) -> Path:
    """A new, empty ``.<name>.tmp-<random>`` beside ``final``, created with ``O_EXCL`` (which
    never follows a symlink): no name planted beforehand (a link to a file elsewhere) is
    ever written through, and the random part cannot be guessed to plant one."""
    while True:
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
        except FileExistsError:
            continue
        return tmp


@dataclass(frozen=True)
class Target:
    """A file we write (a results table, its summary): a local path or an object URL."""

    text: str

    @property
    def remote(self) -> bool:
        return is_remote(self.text)

    @property
    def name(self) -> str:
        return PurePosixPath(urlsplit(self.text).path).name if self.remote else Path(self.text).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix.lower()

    @property
    def path(self) -> Path:
        """The local path (only for a local target)."""
        assert not self.remote
        return Path(self.text)

    def sibling(self, name: str) -> Target:
        if self.remote:
            return Target(self.text.rpartition("/")[0] + "/" + name)
        return Target(str(Path(self.text).with_name(name)))

    def temp_dir(self) -> Path | None:
        """Where temporary files for this target go: beside it, or the system's."""
        return None if self.remote else Path(self.text).parent

    def exists(self) -> bool:
        return object_size(self.text) is not None if self.remote else Path(self.text).exists()

    def same_file(self, other: str | Path) -> bool:
        if self.remote or is_remote(str(other)):
            return self.text == str(other)
        return Path(self.text).resolve() == Path(other).resolve()

    def __str__(self) -> str:
        return self.text

    def new_temp(self) -> Path:
        """A temporary local file to write this target's content to (see :meth:`publish`):
        beside a local target (the rename stays on one file system), else the system's."""
        if self.remote:
            fd, name = tempfile.mkstemp(prefix=".seedance-out-", suffix=self.suffix)
            os.close(fd)
            return Path(name)
        Path(self.text).parent.mkdir(parents=True, exist_ok=True)
        return exclusive_temp(Path(self.text))

    def publish(self, tmp: Path) -> None:
        """Make a finished temporary file the target: renamed into place (and the directory
        fsynced), or uploaded as one object; the temporary file is gone afterwards."""
        if self.remote:
            try:
                upload_file(tmp, self.text)
            finally:
                tmp.unlink(missing_ok=True)
            return
        final = Path(self.text)
        os.replace(tmp, final)
        fsync_path(final.parent)

    def write_text(self, text: str) -> None:
        """The whole text, atomically: a reader (a person, node_exporter's textfile
        collector, a bucket's consumer) sees the old content or the new, never half."""
        tmp = self.new_temp()
        try:
            tmp.write_text(text, encoding="utf-8")
            self.publish(tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self) -> bytes | None:
        if self.remote:
            return read_bytes(self.text)
        try:
            return Path(self.text).read_bytes()
        except FileNotFoundError:
            return None
