"""The controller catalogue (db/controllers.json) and choosing a controller for a client.

The catalogue is re-read when the file changes, off the reactor thread. A
broken file never replaces a good one: the last good copy stays in use and the
log says exactly what is wrong and where. Live sessions hold their own
:class:`Controller` value, so a reload never touches them.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twisted.internet import task, threads
from twisted.logger import Logger

log = Logger(namespace="discon-manager.registry")

_REQUIRED = ("id", "image", "library_path", "proc_name")
_OPTIONAL_TEXT = ("name", "version", "description", "created")
_KNOWN = set(_REQUIRED) | set(_OPTIONAL_TEXT) | {"ports", "allow_path_override"}


class CatalogueError(ValueError):
    """controllers.json cannot be used; the text says where and what."""


class SelectionError(LookupError):
    """The client asked for something the catalogue cannot give; shown in avcMSG."""


@dataclass(frozen=True)
class Controller:
    id: str
    image: str
    library_path: str
    proc_name: str
    name: str = ""
    version: str = ""
    description: str = ""
    created: str = ""
    port: int = 8080
    allow_path_override: bool = False

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ports"] = {"internal": d.pop("port"), "external": 0}
        return d


@dataclass(frozen=True)
class Selection:
    """What one session runs: a controller and the path/proc to dial it with."""

    controller: Controller
    library_path: str
    proc: str


def parse_catalogue(text: str, source: str) -> tuple[Controller, ...]:
    """Validate the JSON text of a catalogue; raises :class:`CatalogueError`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CatalogueError(
            f"{source}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    entries = data.get("controllers") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CatalogueError(f'{source}: expected {{"controllers": [ ... ]}} at the top level')
    if not entries:
        raise CatalogueError(
            f"{source}: the controllers list is empty; add at least one controller"
        )
    out: list[Controller] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        where = f"{source}: controllers[{i}]"
        if not isinstance(e, dict):
            raise CatalogueError(f"{where}: expected an object, got {type(e).__name__}")
        if isinstance(e.get("id"), str):
            where += f" (id '{e['id']}')"
        unknown = sorted(set(e) - _KNOWN)
        if unknown:
            raise CatalogueError(
                f"{where}: unknown field '{unknown[0]}'; known: {', '.join(sorted(_KNOWN))}"
            )
        for key in _REQUIRED:
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise CatalogueError(f"{where}: '{key}' is missing or not a non-empty string")
        for key in _OPTIONAL_TEXT:
            if key in e and not isinstance(e[key], str):
                raise CatalogueError(f"{where}: '{key}' must be a string")
        if e["id"] in seen:
            raise CatalogueError(f"{where}: id '{e['id']}' appears twice; ids must be unique")
        if "/" in e["id"] or e["id"] in ("ws", "health", "metrics", "containers", "controllers"):
            raise CatalogueError(f"{where}: id '{e['id']}' cannot be used in a URL path; rename it")
        seen.add(e["id"])
        ports = e.get("ports", {"internal": 8080})
        port = ports.get("internal") if isinstance(ports, dict) else None
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise CatalogueError(f'{where}: ports must be {{"internal": <port 1-65535>, ...}}')
        override = e.get("allow_path_override", False)
        if not isinstance(override, bool):
            raise CatalogueError(f"{where}: 'allow_path_override' must be true or false")
        out.append(
            Controller(
                id=e["id"],
                image=e["image"],
                library_path=e["library_path"],
                proc_name=e["proc_name"],
                port=port,
                allow_path_override=override,
                **{k: e.get(k, "") for k in _OPTIONAL_TEXT},
            )
        )
    return tuple(out)


def _show(text: str) -> str:
    """A client-supplied name for a message and the log: control characters escaped."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:80])
    return shown + ("..." if len(text) > 80 else "")


def _first(params: dict[str, list[str]], key: str) -> str:
    values = params.get(key) or [""]
    return values[0].strip()


class Registry:
    """The current catalogue, reloaded on change, and the selection rules."""

    def __init__(self, path: Path, default_id: str | None = None) -> None:
        self.path = path
        self.default_id = default_id
        self.controllers: tuple[Controller, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._watch: task.LoopingCall | None = None
        self._last_read_error: str | None = None

    # -- loading -------------------------------------------------------------------

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> None:
        """Blocking first load, before the reactor runs; errors stop the start."""
        stamp = self._stat() if self.path.exists() else None
        try:
            text = self.path.read_text()
        except OSError as e:
            raise CatalogueError(
                f"cannot read controller database {self.path}: {e.strerror}"
            ) from None
        self.controllers = parse_catalogue(text, str(self.path))
        self._stamp = stamp
        if self.default_id and self.find(self.default_id) is None:
            raise CatalogueError(
                f"server.default_controller: '{self.default_id}' is not in {self.path}; "
                f"available: {self.ids()}"
            )

    def _read_if_changed(self) -> tuple[tuple[int, int], str] | None:
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        return stamp, self.path.read_text()

    def _apply(self, result: tuple[tuple[int, int], str] | None) -> None:
        if result is None:
            return
        stamp, text = result
        self._stamp = stamp
        try:
            controllers = parse_catalogue(text, str(self.path))
        except CatalogueError as e:
            log.error("controller database not reloaded, keeping the last good copy: {e}", e=str(e))
            return
        self.controllers = controllers
        self._last_read_error = None
        log.info("controller database reloaded: {ids}", ids=self.ids())

    def _check(self) -> Any:
        d = threads.deferToThread(self._read_if_changed)
        d.addCallback(self._apply)
        d.addErrback(self._read_failed)
        return d

    def _read_failed(self, failure: Any) -> None:
        message = failure.getErrorMessage()
        if message != self._last_read_error:  # once per distinct problem, not every second
            self._last_read_error = message
            log.error(
                "cannot read controller database {path}: {e}; keeping the last good copy",
                path=str(self.path),
                e=message,
            )

    def watch(self, interval: float = 1.0) -> None:
        self._watch = task.LoopingCall(self._check)
        self._watch.start(interval, now=False)

    def stop(self) -> None:
        if self._watch is not None and self._watch.running:
            self._watch.stop()

    # -- selection -----------------------------------------------------------------

    def ids(self) -> str:
        return ", ".join(c.id for c in self.controllers)

    def find(self, controller_id: str) -> Controller | None:
        for c in self.controllers:
            if c.id == controller_id:
                return c
        return None

    def select(self, params: dict[str, list[str]], path_id: str | None) -> Selection:
        """Choose a controller for a client's query and URL path.

        In order: ``controller=ID``; the path form ``/ID/ws``; ``version=V``;
        ``path`` equal to a controller id; the default. An explicit choice that
        does not exist is an error, never silently the default.
        """
        wanted = _first(params, "controller") or (path_id or "")
        version = _first(params, "version")
        client_path = _first(params, "path")
        client_proc = _first(params, "proc")
        if wanted:
            c = self.find(wanted)
            if c is None:
                raise SelectionError(
                    f"controller '{_show(wanted)}' not found; available: {self.ids()}"
                )
            if version and c.version != version:
                raise SelectionError(
                    f"controller '{wanted}' has version '{c.version}', not '{_show(version)}'; "
                    f"drop version= or pick another controller (available: {self.ids()})"
                )
        elif version:
            c = next((x for x in self.controllers if x.version == version), None)
            if c is None:
                versions = ", ".join(sorted({f"{x.id} {x.version}" for x in self.controllers}))
                raise SelectionError(
                    f"no controller has version '{version}'; available: {versions}"
                )
        elif client_path and self.find(client_path) is not None:
            c = self.find(client_path)
        else:
            c = self.find(self.default_id) if self.default_id else self.controllers[0]
            if c is None:
                raise SelectionError(
                    f"the default controller '{self.default_id}' is no longer in the database; "
                    f"ask for one of: {self.ids()}"
                )
        library = c.library_path
        if c.allow_path_override and client_path and client_path != c.id:
            library = _safe_library_path(c, client_path)
        return Selection(controller=c, library_path=library, proc=client_proc or c.proc_name)


def _safe_library_path(c: Controller, path: str) -> str:
    """A client path inside the image's controller directory, or SelectionError."""
    norm = posixpath.normpath(path)
    if posixpath.isabs(path) or norm.startswith("..") or "\\" in path or "\0" in path:
        raise SelectionError(
            f"controller '{c.id}': library path '{_show(path)}' is outside the controller; "
            "give a path relative to the controller's directory, without '..'"
        )
    return norm
