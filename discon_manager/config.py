"""config/config.yaml: read, validated and frozen once at start.

A wrong value stops the start with one line naming the key, the value and
what is allowed: an operator who typed ``memory_limit: 512x`` learns it from
``twistd``'s first line, not from a container that fails an hour later.
Unknown keys are errors too, so a misspelt key is never silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from docker.utils import parse_bytes


class ConfigError(ValueError):
    """The configuration cannot be used; the text names the key and the fix."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    debug_level: int = 0
    default_controller: str | None = None
    call_timeout: float = 30.0


@dataclass(frozen=True)
class DockerConfig:
    network_name: str = "discon-net"
    container_prefix: str = "discon-controller-"
    memory_limit: int = 512 * 1024 * 1024
    cpu_limit: float = 1.0
    pids_limit: int = 256
    cleanup_timeout: float = 10.0
    idle_timeout: float = 600.0
    ready_timeout: float = 30.0
    instance: str | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    docker: DockerConfig
    database_path: Path

    @property
    def instance(self) -> str:
        """Label value that marks this manager's containers (see docker.instance)."""
        return self.docker.instance or f"disconmanager-{self.server.port}"


_HANDSHAKE_LIMIT = 40.0  # the existing client gives up on a handshake after 45 s


def _number(key: str, value: Any, *, integer: bool, low: float, high: float | None) -> Any:
    kind = "a whole number" if integer else "a number"
    allowed = f"{kind} >= {low:g}" + (f" and <= {high:g}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: {value!r} is not {kind}; use {allowed}")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{key}: {value!r} is not {kind}; use {allowed}")
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        raise ConfigError(f"{key}: {value!r} is out of range; use {allowed}")
    return int(value) if integer else float(value)


def _text(key: str, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: {value!r} is not a non-empty string")
    return value


def _size(key: str, value: Any) -> int:
    try:
        size = parse_bytes(value) if isinstance(value, str) else None
    except Exception:
        size = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    if not isinstance(size, int) or size <= 0:
        raise ConfigError(f"{key}: {value!r} is not a size; use e.g. 512m or 1g")
    if size < 6 * 1024 * 1024:
        raise ConfigError(f"{key}: {value!r} is below Docker's minimum of 6m; use e.g. 512m")
    return size


def _section(data: dict[str, Any], name: str, keys: set[str]) -> dict[str, Any]:
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {section!r}")
    unknown = sorted(set(section) - keys)
    if unknown:
        raise ConfigError(
            f"{name}.{unknown[0]}: unknown key; known keys are {', '.join(sorted(keys))}"
        )
    return section


def parse(data: Any) -> Config:
    """Validate a parsed YAML document; raises :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the configuration must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"server", "docker", "database"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; known are server, docker, database")
    s = _section(data, "server", set(ServerConfig.__dataclass_fields__))
    d = _section(data, "docker", set(DockerConfig.__dataclass_fields__))
    db = _section(data, "database", {"path"})
    sd, dd = ServerConfig(), DockerConfig()

    def numbers(name: str, section: dict[str, Any], defaults: Any, rules: dict) -> dict:
        """Each numeric key of a section, checked against (integer, low, high)."""
        return {
            key: _number(
                f"{name}.{key}",
                section.get(key, getattr(defaults, key)),
                integer=integer,
                low=low,
                high=high,
            )
            for key, (integer, low, high) in rules.items()
        }

    debug = s.get("debug_level", sd.debug_level)
    if debug not in (0, 1, 2) or isinstance(debug, bool):
        raise ConfigError(f"server.debug_level: {debug!r} is not allowed; use 0, 1 or 2")
    server = ServerConfig(
        host=_text("server.host", s.get("host", sd.host)),
        debug_level=debug,
        default_controller=_text(
            "server.default_controller", s.get("default_controller"), optional=True
        ),
        **numbers("server", s, sd, {"port": (True, 1, 65535), "call_timeout": (False, 0, None)}),
    )
    prefix = _text("docker.container_prefix", d.get("container_prefix", dd.container_prefix))
    if not all(c.isalnum() or c in "_.-" for c in prefix) or not prefix[0].isalnum():
        raise ConfigError(
            f"docker.container_prefix: {prefix!r} is not a valid container name start; "
            "use letters, digits, '_', '.', '-' (e.g. discon-controller-)"
        )
    docker_cfg = DockerConfig(
        network_name=_text("docker.network_name", d.get("network_name", dd.network_name)),
        container_prefix=prefix,
        memory_limit=_size("docker.memory_limit", d.get("memory_limit", "512m")),
        instance=_text("docker.instance", d.get("instance"), optional=True),
        **numbers(
            "docker",
            d,
            dd,
            {
                "cpu_limit": (False, 0.01, None),
                "pids_limit": (True, 8, None),
                "cleanup_timeout": (False, 1, None),
                "idle_timeout": (False, 1, None),
                "ready_timeout": (False, 1, _HANDSHAKE_LIMIT),
            },
        ),
    )
    path = _text("database.path", db.get("path", "db/controllers.json"))
    return Config(server=server, docker=docker_cfg, database_path=Path(path))


def load(path: str | Path) -> Config:
    """Read and validate a YAML file; every problem is a :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read configuration {p}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    try:
        return parse(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
