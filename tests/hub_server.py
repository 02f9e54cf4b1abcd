"""A real Hugging Face Hub server on loopback for tests: `olah` (a self-hosted Hub mirror, from PyPI) serving local
git repos, in offline mode so it never contacts huggingface.co.

`OlahServer` starts `olah-cli` on a free 127.0.0.1 port with a generated config, and `publish(...)` commits a folder
into `<mirrors>/models/<org>/<name>` (a non-bare git repo, branch `main`), which the server then serves to the
ordinary `huggingface_hub` client (`snapshot_download`, `hf_hub_download`, `model_info(revision=...)`).

Quirks of olah 0.5 worth knowing: a missing file is reported as `RepositoryNotFoundError` (401), not
`EntryNotFoundError`; `model_info()` needs an explicit `revision="main"`; `GET /` answers 500 (the health check here
asks `/api/models/<org>/<name>/revision/main`); there are no upload endpoints.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def olah_executable() -> str | None:
    """Path of `olah-cli` next to this interpreter (the virtualenv), or on PATH; None if olah is not installed."""
    local = Path(sys.executable).with_name("olah-cli")
    return str(local) if local.is_file() else shutil.which("olah-cli")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "lynx-tests", "GIT_AUTHOR_EMAIL": "tests@lynx.invalid",
           "GIT_COMMITTER_NAME": "lynx-tests", "GIT_COMMITTER_EMAIL": "tests@lynx.invalid"}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip()


class OlahServer:
    """An olah Hub mirror on a free loopback port, serving the git repos under `root / "mirrors"` offline.

    Use as a context manager: the process is always terminated on exit (then killed if it does not stop within
    `STOP_TIMEOUT_S`). `endpoint` is the value for `HF_ENDPOINT`.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.repos = self.root / "repos"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = self.root / "olah.log"

    def _write_config(self) -> Path:
        netloc = f"127.0.0.1:{self.port}"
        config = self.root / "configs.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'repos-path = "{self.repos}"\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "{netloc}"\n'
            f'mirror-lfs-netloc = "{netloc}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            "\n[accessibility]\n"
            "offline = true\n",
            encoding="utf-8",
        )
        return config

    def publish(self, repo_id: str, folder: str | os.PathLike, message: str = "upload") -> str:
        """Commit the files of `folder` as the new state of model repo `repo_id` on branch `main`; return the sha.

        Files absent from `folder` but present in the previous commit are deleted, as in an upload with
        `delete_patterns="*"`.
        """
        repo = self.mirrors / "models" / repo_id
        if not (repo / ".git").is_dir():
            repo.mkdir(parents=True, exist_ok=True)
            _git(repo, "init", "-q", "-b", "main")
        for entry in repo.iterdir():
            if entry.name != ".git":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.copytree(folder, repo, dirs_exist_ok=True)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "--allow-empty", "-m", message)
        return _git(repo, "rev-parse", "HEAD")

    def start(self, health_repo: str) -> "OlahServer":
        """Start olah and wait (bounded) until it answers for `health_repo`, which must already be published."""
        executable = olah_executable()
        if executable is None:
            raise RuntimeError("olah is not installed: `pip install olah` (it is in the `test` extra).")
        self.repos.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen([executable, "-c", str(config)], cwd=self.root, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        url = f"{self.endpoint}/api/models/{health_repo}/revision/main"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not come up on {self.endpoint}; log:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        """Terminate the server and wait for it; kill it if it does not stop in time."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def __enter__(self) -> "OlahServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def hub_endpoint(endpoint: str) -> Iterator[None]:
    """Point the already-imported `huggingface_hub` at `endpoint` (what `HF_ENDPOINT` does at import time).

    huggingface_hub reads `HF_ENDPOINT` once, into `constants.ENDPOINT`, the download URL template and the set of
    trusted hosts, and builds a module-level `HfApi` from it; all four are patched, and restored on exit.
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants, hf_api

    saved = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_URL_HOSTS, hf_api.api.endpoint,
             os.environ.get("HF_ENDPOINT"))
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_URL_HOSTS = frozenset(constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname})
    hf_api.api.endpoint = endpoint
    os.environ["HF_ENDPOINT"] = endpoint  # for subprocesses
    try:
        yield
    finally:
        (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_URL_HOSTS, hf_api.api.endpoint,
         env) = saved
        if env is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = env
